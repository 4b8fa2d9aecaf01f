"""Charging through Stripe's SDK (``StripeClient``, async over httpx) behind the PaymentProvider port."""

from __future__ import annotations

from datetime import UTC, datetime

import stripe
import structlog

from domain.dunning import AttemptOutcome, is_hard_decline
from infra.settings import Settings
from infra.stripe.invoices import last_payment_error, paid_invoice
from service_layer.ports import ChargeResult, ProviderUnavailable

log = structlog.get_logger("credits.stripe")

#: Stripe says the customer must authenticate (3-D Secure): retrying without them cannot succeed.
_NEEDS_ACTION = frozenset({"authentication_required", "invoice_payment_intent_requires_action"})
#: Failures on Stripe's side or on the way to it: the same request (same key) is tried again later.
UNAVAILABLE = (
    stripe.APIConnectionError,
    stripe.APIError,
    stripe.RateLimitError,
    stripe.AuthenticationError,
    stripe.PermissionError,
    stripe.IdempotencyError,
)


def stripe_client(settings: Settings) -> stripe.StripeClient:
    if settings.stripe_api_key is None:
        raise ValueError("STRIPE_API_KEY is not set")
    return stripe.StripeClient(
        settings.stripe_api_key.get_secret_value(),
        base_addresses={"api": settings.stripe_api_base} if settings.stripe_api_base else None,
        # No retries inside the SDK: a failed charge or payout is retried by its own schedule,
        # with its idempotency key, and recorded.
        max_network_retries=0,
        http_client=stripe.HTTPXClient(timeout=settings.stripe_timeout_seconds),
    )


class StripeProvider:
    def __init__(self, settings: Settings) -> None:
        self.plan_credits = dict(settings.stripe_plan_credits)
        self.client = stripe_client(settings)

    async def pay_invoice(
        self,
        invoice_id: str,
        customer_id: str,
        idempotency_key: str,
        *,
        check_first: bool = False,
        payment_method_id: str | None = None,
        heed_last_decline: bool = True,
    ) -> ChargeResult:
        if check_first:
            settled = await self._settled(invoice_id, customer_id, heed_last_decline and payment_method_id is None)
            if settled is not None:
                return settled
        params = {"payment_method": payment_method_id} if payment_method_id else None
        try:
            invoice = await self.client.v1.invoices.pay_async(
                invoice_id, params=params, options={"idempotency_key": idempotency_key}
            )
        except stripe.CardError as error:
            code = (error.error.decline_code if error.error else None) or error.code
            message = error.user_message or str(error._message or "")
            outcome = (
                AttemptOutcome.ACTION_REQUIRED
                if code in _NEEDS_ACTION or error.code in _NEEDS_ACTION
                else AttemptOutcome.DECLINED
            )
            return ChargeResult(outcome, code, message or None)
        except stripe.InvalidRequestError as error:
            # Paid, voided or not payable as it stands: the invoice's own state says which.
            return await self._settled_otherwise(invoice_id, customer_id, error)
        except UNAVAILABLE as error:
            raise ProviderUnavailable(f"{type(error).__name__}: {error._message or error}") from None
        return self._result(invoice.to_dict(), customer_id)

    async def cancel_subscription(self, subscription_id: str, idempotency_key: str) -> None:
        try:
            await self.client.v1.subscriptions.cancel_async(
                subscription_id, options={"idempotency_key": idempotency_key}
            )
        except stripe.InvalidRequestError as error:
            if error.code != "resource_missing":
                raise ProviderUnavailable(f"cannot cancel {subscription_id}: {error._message}") from None
            log.warning("subscription_already_gone", subscription_id=subscription_id)
        except UNAVAILABLE as error:
            raise ProviderUnavailable(f"{type(error).__name__}: {error._message or error}") from None

    async def _settled_otherwise(
        self, invoice_id: str, customer_id: str, error: stripe.InvalidRequestError
    ) -> ChargeResult:
        if error.code in _NEEDS_ACTION:
            return ChargeResult(AttemptOutcome.ACTION_REQUIRED, error.code, error.user_message or error._message)
        settled = await self._settled(invoice_id, customer_id)
        return settled or ChargeResult(AttemptOutcome.DECLINED, error.code, error.user_message or error._message)

    async def _settled(self, invoice_id: str, customer_id: str, heed_last_decline: bool = False) -> ChargeResult | None:
        """The result an invoice's own state gives when it is paid, voided, gone or its last
        charge was hard-declined; None while it is open and worth charging."""
        try:
            invoice = (
                await self.client.v1.invoices.retrieve_async(
                    invoice_id, params={"expand": ["payments.data.payment.payment_intent"]}
                )
            ).to_dict()
        except stripe.InvalidRequestError as missing:
            return ChargeResult(AttemptOutcome.CLOSED, missing.code, f"invoice cannot be read: {missing._message}")
        except UNAVAILABLE as failure:
            raise ProviderUnavailable(f"{type(failure).__name__}: {failure._message or failure}") from None
        if invoice.get("status") in ("paid", "void", "uncollectible"):
            return self._result(invoice, customer_id)
        code, message = last_payment_error(invoice)
        if heed_last_decline and is_hard_decline(code):
            return ChargeResult(
                AttemptOutcome.DECLINED, code, f"not charged again: the last charge was declined ({message or code})"
            )
        return None

    def _result(self, invoice: dict, customer_id: str) -> ChargeResult:
        status = invoice.get("status")
        if status == "paid":
            paid = paid_invoice(invoice, customer_id, self.plan_credits, datetime.now(UTC))
            return ChargeResult(AttemptOutcome.SUCCEEDED, paid=paid)
        if status in ("void", "uncollectible"):
            return ChargeResult(AttemptOutcome.CLOSED, message=f"invoice is {status}")
        return ChargeResult(AttemptOutcome.DECLINED, None, f"invoice is still {status} after the charge")
