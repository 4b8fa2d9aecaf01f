"""SimulatedPaymentProvider: a stand-in for Stripe in `credits demo`. No network, no money.

It answers the real dunning use cases (service_layer/payments.py) through the same
PaymentProvider port as infra/stripe/client.py, from a script the demo writes when an invoice
is billed: how many charges are declined before one goes through, or that none ever will.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from domain.dunning import AttemptOutcome
from service_layer.ports import ChargeResult, PaidInvoice

DECLINE_CODE = "insufficient_funds"
DECLINE_MESSAGE = "Your card has insufficient funds. (simulated)"


@dataclass
class SimulatedInvoice:
    customer_id: str
    credits: int
    amount_cents: int
    #: Charges declined before one succeeds; None: every charge is declined.
    declines_left: int | None
    paid_at: datetime | None = None


class SimulatedPaymentProvider:
    """Charges simulated invoices. ``at`` is the story's moment (the demo moves it), so a
    recovered payment is dated when it happens in the story, not when the demo runs."""

    name = "SimulatedPaymentProvider"

    def __init__(self, at: datetime) -> None:
        self.at = at
        self.invoices: dict[str, SimulatedInvoice] = {}
        self.charges = 0

    def bill(
        self, invoice_id: str, customer_id: str, credits: int, amount_cents: int, declines_before_paying: int | None
    ) -> None:
        self.invoices[invoice_id] = SimulatedInvoice(customer_id, credits, amount_cents, declines_before_paying)

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
        invoice = self.invoices.get(invoice_id)
        if invoice is None or invoice.customer_id != customer_id:
            return ChargeResult(AttemptOutcome.CLOSED, message=f"no simulated invoice {invoice_id}")
        if invoice.paid_at is None:
            self.charges += 1
            if invoice.declines_left is None or invoice.declines_left > 0:
                if invoice.declines_left is not None:
                    invoice.declines_left -= 1
                return ChargeResult(AttemptOutcome.DECLINED, DECLINE_CODE, DECLINE_MESSAGE)
            invoice.paid_at = self.at
        paid = PaidInvoice(invoice_id, customer_id, invoice.paid_at, invoice.credits, invoice.amount_cents, "USD")
        return ChargeResult(AttemptOutcome.SUCCEEDED, paid=paid)

    async def cancel_subscription(self, subscription_id: str, idempotency_key: str) -> None:
        return None  # the demo keeps subscriptions (DUNNING_END_ACTION=keep)
