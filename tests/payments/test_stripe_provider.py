"""The real StripeProvider (Stripe's SDK over httpx) against a local fake Stripe served over HTTP.

Each scripted outcome maps to its ChargeResult or ProviderUnavailable; the idempotency key
we give is the one sent, and Stripe's replay of a saved answer (a saved 500 included) is why
``charge_key`` changes the key after a provider error; a charge whose answer timed out is
found paid by reading the invoice first, without a second charge; credits come from the plan
table or the price's metadata; void invoices close; subscriptions are cancelled.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from domain.dunning import AttemptKind, AttemptOutcome
from infra.db.payments import Attempt
from infra.settings import load_settings
from infra.stripe.client import StripeProvider
from service_layer.payments import ChargeResult, ProviderUnavailable, charge_key
from service_layer.ports import PaidInvoice
from tests.support.fake_stripe import FakeStripe, invoice

API_KEY = "sk_test_provider_0123456789"
PLAN_CREDITS = {"price_basic": 100, "price_pro": 500}
CUSTOMER = "customer-1"
STRIPE_CUSTOMER = "cus_1"
#: The provider's client gives up after this; the fake's ``timeout`` answers after TIMEOUT_DELAY.
CLIENT_TIMEOUT = 0.5
TIMEOUT_DELAY = 2.0


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(timeout_delay=TIMEOUT_DELAY) as server:
        yield server


def make_provider(
    fake: FakeStripe, api_key: str = API_KEY, plan_credits: dict[str, int] | None = None
) -> StripeProvider:
    settings = load_settings(
        stripe_api_key=api_key,
        stripe_api_base=fake.url,
        stripe_plan_credits=PLAN_CREDITS if plan_credits is None else plan_credits,
        stripe_timeout_seconds=CLIENT_TIMEOUT,
    )
    return StripeProvider(settings)


@pytest.fixture
def provider(fake: FakeStripe) -> StripeProvider:
    return make_provider(fake)


def open_invoice(fake: FakeStripe, invoice_id: str, **shape) -> dict:
    return fake.add_invoice(invoice(invoice_id, STRIPE_CUSTOMER, **shape))


def invoice_requests(fake: FakeStripe, invoice_id: str) -> list[tuple[str, str]]:
    """(method, path) of every request the fake saw about this invoice, in order."""
    return [(r.method, r.path) for r in fake.requests if f"/v1/invoices/{invoice_id}" in r.path]


# ---------------------------------------------------------------- outcomes


async def test_success_returns_the_paid_invoice_with_plan_credits_times_quantity(fake, provider):
    open_invoice(fake, "in_ok", price="price_basic", quantity=3, amount=14700)
    fake.script("in_ok", "succeed")
    before = int(time.time())

    result = await provider.pay_invoice("in_ok", CUSTOMER, "key-ok")

    assert result.outcome is AttemptOutcome.SUCCEEDED
    assert result.decline_code is None
    paid = result.paid
    assert isinstance(paid, PaidInvoice)
    assert paid.invoice_id == "in_ok"
    assert paid.customer_id == CUSTOMER
    assert paid.credits == 300  # 100 per unit × 3
    assert paid.amount_cents == 14700
    assert paid.currency == "USD"
    assert before - 1 <= paid.paid_at.timestamp() <= time.time() + 1
    assert fake.invoices["in_ok"]["status"] == "paid"
    assert invoice_requests(fake, "in_ok") == [("POST", "/v1/invoices/in_ok/pay")]


async def test_soft_decline_is_declined_with_its_code_and_message(fake, provider):
    open_invoice(fake, "in_soft")
    fake.script("in_soft", "soft_decline")

    result = await provider.pay_invoice("in_soft", CUSTOMER, "key-soft")

    assert result == ChargeResult(AttemptOutcome.DECLINED, "insufficient_funds", "Your card has insufficient funds.")
    assert fake.invoices["in_soft"]["status"] == "open"


async def test_hard_decline_is_declined_with_the_hard_code(fake, provider):
    open_invoice(fake, "in_hard")
    fake.script("in_hard", "hard_decline")

    result = await provider.pay_invoice("in_hard", CUSTOMER, "key-hard")

    assert result.outcome is AttemptOutcome.DECLINED
    assert result.decline_code == "lost_card"
    assert result.message == "Your card has been declined."
    assert result.paid is None


async def test_authentication_required_is_action_required(fake, provider):
    open_invoice(fake, "in_3ds")
    fake.script("in_3ds", "action_required")

    result = await provider.pay_invoice("in_3ds", CUSTOMER, "key-3ds")

    assert result.outcome is AttemptOutcome.ACTION_REQUIRED
    assert result.decline_code == "authentication_required"
    assert result.message == "This payment requires authentication."
    assert result.paid is None


async def test_server_error_is_provider_unavailable(fake, provider):
    open_invoice(fake, "in_500")
    fake.script("in_500", "server_error")

    with pytest.raises(ProviderUnavailable, match="APIError"):
        await provider.pay_invoice("in_500", CUSTOMER, "key-500")
    assert fake.invoices["in_500"]["status"] == "open"


async def test_timeout_is_provider_unavailable_within_the_client_timeout(fake, provider):
    open_invoice(fake, "in_slow")
    fake.script("in_slow", "timeout")

    started = time.monotonic()
    with pytest.raises(ProviderUnavailable, match="APIConnectionError"):
        await provider.pay_invoice("in_slow", CUSTOMER, "key-slow")
    elapsed = time.monotonic() - started

    assert elapsed < TIMEOUT_DELAY - 0.5, f"the client waited {elapsed:.2f}s, past its {CLIENT_TIMEOUT}s timeout"
    # The fake charged all the same: only the answer was lost.
    assert fake.invoices["in_slow"]["status"] == "paid"


# ---------------------------------------------------------------- idempotency


async def test_the_idempotency_key_given_is_the_one_sent_with_the_api_key(fake, provider):
    open_invoice(fake, "in_key")

    await provider.pay_invoice("in_key", CUSTOMER, "dunning:in_key:1")

    [request] = fake.pay_requests("in_key")
    assert request.idempotency_key == "dunning:in_key:1"
    assert request.authorization == f"Bearer {API_KEY}"


async def test_the_same_key_replays_the_same_answer(fake, provider):
    open_invoice(fake, "in_replay")
    fake.script("in_replay", "soft_decline", "succeed")

    first = await provider.pay_invoice("in_replay", CUSTOMER, "key-replay")
    again = await provider.pay_invoice("in_replay", CUSTOMER, "key-replay")

    assert first.outcome is AttemptOutcome.DECLINED
    assert again == first  # Stripe's saved answer, not a new charge
    assert fake.invoices["in_replay"]["status"] == "open"
    # The replay did not consume the script: a new key makes a new charge, which succeeds.
    fresh = await provider.pay_invoice("in_replay", CUSTOMER, "key-replay-2")
    assert fresh.outcome is AttemptOutcome.SUCCEEDED
    assert [r.idempotency_key for r in fake.pay_requests("in_replay")] == ["key-replay", "key-replay", "key-replay-2"]


async def test_a_saved_500_is_replayed_for_the_same_key_so_charge_key_changes_it(fake, provider):
    open_invoice(fake, "in_saved500", quantity=2)
    fake.script("in_saved500", "server_error", "succeed")
    attempt = Attempt(
        1, 1, CUSTOMER, "in_saved500", AttemptKind.SCHEDULED, 1, "dunning:in_saved500:1", provider_errors=0
    )

    with pytest.raises(ProviderUnavailable):
        await provider.pay_invoice("in_saved500", CUSTOMER, charge_key(attempt))
    # The same key again: Stripe answers with the saved 500 although the charge would now succeed.
    with pytest.raises(ProviderUnavailable):
        await provider.pay_invoice("in_saved500", CUSTOMER, charge_key(attempt))
    assert fake.invoices["in_saved500"]["status"] == "open"

    # After one provider error the attempt's key changes, and the charge goes through.
    retried = Attempt(
        1, 1, CUSTOMER, "in_saved500", AttemptKind.SCHEDULED, 1, "dunning:in_saved500:1", provider_errors=1
    )
    retry_key = charge_key(retried)
    assert retry_key != charge_key(attempt)
    assert charge_key(retried) == retry_key  # stable: a crash during this try repeats this key
    result = await provider.pay_invoice("in_saved500", CUSTOMER, retry_key, check_first=True)

    assert result.outcome is AttemptOutcome.SUCCEEDED
    assert result.paid.credits == 200
    assert [r.idempotency_key for r in fake.pay_requests("in_saved500")] == [
        "dunning:in_saved500:1",
        "dunning:in_saved500:1",
        retry_key,
    ]


async def test_reconcile_first_after_a_timed_out_charge_returns_succeeded_without_paying_again(fake, provider):
    open_invoice(fake, "in_lost", quantity=2)
    fake.script("in_lost", "timeout", "succeed")

    with pytest.raises(ProviderUnavailable):
        await provider.pay_invoice("in_lost", CUSTOMER, "dunning:in_lost:1")
    result = await provider.pay_invoice("in_lost", CUSTOMER, "dunning:in_lost:1:retry-1", check_first=True)

    assert result.outcome is AttemptOutcome.SUCCEEDED
    assert result.paid.invoice_id == "in_lost"
    assert result.paid.credits == 200
    assert len(fake.pay_requests("in_lost")) == 1, "the invoice was charged a second time"
    assert invoice_requests(fake, "in_lost") == [("POST", "/v1/invoices/in_lost/pay"), ("GET", "/v1/invoices/in_lost")]


async def test_reconcile_first_on_an_open_invoice_reads_it_then_charges(fake, provider):
    open_invoice(fake, "in_recon")
    fake.script("in_recon", "succeed")

    result = await provider.pay_invoice("in_recon", CUSTOMER, "key-recon", check_first=True)

    assert result.outcome is AttemptOutcome.SUCCEEDED
    assert invoice_requests(fake, "in_recon") == [
        ("GET", "/v1/invoices/in_recon"),
        ("POST", "/v1/invoices/in_recon/pay"),
    ]
    assert fake.pay_requests("in_recon")[0].idempotency_key == "key-recon"


async def test_an_invoice_paid_meanwhile_is_succeeded_not_declined_even_without_reconciling(fake, provider):
    open_invoice(fake, "in_paid", status="paid")

    result = await provider.pay_invoice("in_paid", CUSTOMER, "key-paid")

    # Stripe refuses to pay it again (invoice_already_paid); its own state says it is paid.
    assert result.outcome is AttemptOutcome.SUCCEEDED
    assert result.paid.credits == 100
    assert invoice_requests(fake, "in_paid") == [("POST", "/v1/invoices/in_paid/pay"), ("GET", "/v1/invoices/in_paid")]


# ---------------------------------------------------------------- credits


async def test_legacy_shape_credits_come_from_the_price_metadata_times_quantity(fake, provider):
    open_invoice(
        fake, "in_legacy", price="price_metadata_only", quantity=4, legacy_shape=True, price_metadata={"credits": "25"}
    )

    result = await provider.pay_invoice("in_legacy", CUSTOMER, "key-legacy")

    assert result.outcome is AttemptOutcome.SUCCEEDED
    assert result.paid.credits == 100  # 25 per unit × 4


async def test_legacy_shape_plan_table_wins_over_metadata(fake, provider):
    open_invoice(
        fake, "in_legacy_plan", price="price_pro", quantity=2, legacy_shape=True, price_metadata={"credits": "1"}
    )

    result = await provider.pay_invoice("in_legacy_plan", CUSTOMER, "key-legacy-plan")

    assert result.paid.credits == 1000  # 500 per unit × 2, from the plan table


async def test_unknown_price_pays_with_no_credits(fake, provider):
    open_invoice(fake, "in_unknown", price="price_nobody_knows", quantity=3)

    result = await provider.pay_invoice("in_unknown", CUSTOMER, "key-unknown")

    assert result.outcome is AttemptOutcome.SUCCEEDED
    assert result.paid is not None
    assert result.paid.credits is None
    assert fake.invoices["in_unknown"]["status"] == "paid"


# ---------------------------------------------------------------- closed invoices


@pytest.mark.parametrize("status", ["void", "uncollectible"])
async def test_a_void_or_uncollectible_invoice_is_closed(fake, provider, status):
    open_invoice(fake, f"in_{status}", status=status)

    result = await provider.pay_invoice(f"in_{status}", CUSTOMER, f"key-{status}")

    assert result.outcome is AttemptOutcome.CLOSED
    assert result.paid is None
    assert status in (result.message or "")


async def test_a_void_invoice_with_reconcile_first_is_closed_without_a_charge(fake, provider):
    open_invoice(fake, "in_void2", status="void")

    result = await provider.pay_invoice("in_void2", CUSTOMER, "key-void2", check_first=True)

    assert result.outcome is AttemptOutcome.CLOSED
    assert fake.pay_requests("in_void2") == []


async def test_a_missing_invoice_is_closed(fake, provider):
    result = await provider.pay_invoice("in_missing", CUSTOMER, "key-missing")

    assert result.outcome is AttemptOutcome.CLOSED
    assert result.decline_code == "resource_missing"


# ---------------------------------------------------------------- subscriptions


async def test_cancel_subscription_cancels_it(fake, provider):
    open_invoice(fake, "in_sub", subscription="sub_cancel_me")
    assert fake.subscriptions["sub_cancel_me"]["status"] == "active"

    await provider.cancel_subscription("sub_cancel_me", "dunning-cancel:in_sub")

    assert fake.subscriptions["sub_cancel_me"]["status"] == "canceled"
    [request] = [r for r in fake.requests if r.path == "/v1/subscriptions/sub_cancel_me"]
    assert request.method == "DELETE"
    assert request.idempotency_key == "dunning-cancel:in_sub"


async def test_cancelling_a_missing_subscription_is_tolerated(fake, provider):
    await provider.cancel_subscription("sub_gone", "dunning-cancel:in_gone")  # no exception

    assert [(r.method, r.path) for r in fake.requests] == [("DELETE", "/v1/subscriptions/sub_gone")]


# ---------------------------------------------------------------- configuration


async def test_a_bad_api_key_is_provider_unavailable(fake):
    provider = make_provider(fake, api_key="pk_test_not_a_secret_key")
    open_invoice(fake, "in_badkey", subscription="sub_badkey")

    with pytest.raises(ProviderUnavailable, match="AuthenticationError"):
        await provider.pay_invoice("in_badkey", CUSTOMER, "key-badkey")
    with pytest.raises(ProviderUnavailable, match="AuthenticationError"):
        await provider.pay_invoice("in_badkey", CUSTOMER, "key-badkey-2", check_first=True)
    with pytest.raises(ProviderUnavailable):
        await provider.cancel_subscription("sub_badkey", "dunning-cancel:in_badkey")

    assert fake.invoices["in_badkey"]["status"] == "open"
    assert fake.subscriptions["sub_badkey"]["status"] == "active"
    assert {r.authorization for r in fake.requests} == {"Bearer pk_test_not_a_secret_key"}


def test_a_provider_needs_an_api_key(fake):
    with pytest.raises(ValueError, match="STRIPE_API_KEY"):
        StripeProvider(load_settings(stripe_api_key=None, stripe_api_base=fake.url))
