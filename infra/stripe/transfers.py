"""Referral payouts as Stripe Connect transfers to the payee's connected account."""

from __future__ import annotations

import stripe

from infra.settings import Settings
from infra.stripe.client import stripe_client
from service_layer.payouts import PayoutFailed, PayoutOrder, Sent


class StripeConnectGateway:
    name = "stripe_connect"

    def __init__(self, settings: Settings) -> None:
        self.client = stripe_client(settings)

    async def send(self, order: PayoutOrder) -> Sent:
        if not order.stripe_account_id:
            raise PayoutFailed(f"payee {order.payee_id} has no Stripe connected account")
        if order.attempts > 0:
            # An earlier try may have gone through with its answer lost, and Stripe keeps an
            # idempotency key for a day only: look for that transfer before making another.
            earlier = await self._earlier_transfer(order)
            if earlier is not None:
                return Sent("paid", earlier)
        try:
            transfer = await self.client.v1.transfers.create_async(
                {
                    "amount": order.amount_cents,
                    "currency": order.currency.lower(),
                    "destination": order.stripe_account_id,
                    "transfer_group": order.payout_key,
                    "metadata": {"payout_id": str(order.payout_id), "payee_id": order.payee_id, "period": order.period},
                },
                options={"idempotency_key": order.idempotency_key},
            )
        except stripe.StripeError as error:
            raise PayoutFailed(f"{type(error).__name__}: {error._message or error}") from None
        return Sent("paid", transfer.id)

    async def _earlier_transfer(self, order: PayoutOrder) -> str | None:
        try:
            found = await self.client.v1.transfers.list_async({"transfer_group": order.payout_key, "limit": 1})
        except stripe.StripeError as error:
            raise PayoutFailed(f"cannot check for an earlier transfer: {error._message or error}") from None
        return found.data[0].id if found.data else None
