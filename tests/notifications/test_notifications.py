"""The notifications outbox, sent over SMTP to a real local SMTP server (aiosmtpd).

Everything below the mailer is real: events applied to PostgreSQL by the handlers (and, at
the end, by `dramatiq` worker processes fed through Redis), the outbox rows they queue, the
`SmtpMailer` (aiosmtplib) talking SMTP over TCP to an aiosmtpd server in a thread of this
process, which records every envelope it accepts. The tests assert on both sides: the rows
in `notifications` and the messages that arrived.

Time is passed in: `deliver` and `warn_expiring_credits` take the moment they run at, so
back-off and leases are crossed by moving a clock, not by sleeping.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import subprocess
import sys
import threading
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from sqlalchemy import select, text

from api.app import create_app
from domain import CreditPolicy
from infra.clock import FixedClock
from infra.db.tables import (
    credit_lots,
    customer_profiles,
    customers,
    dunning_cases,
    notifications,
    processed_events,
)
from infra.mail import SmtpMailer
from infra.settings import load_settings
from messages import (
    CustomerSignedUp,
    JobCompleted,
    MembershipFrozen,
    PaymentActionRequired,
    PaymentFailed,
    PaymentSucceeded,
    Publisher,
)
from service_layer import handlers
from service_layer.notifications import (
    MAX_ATTEMPTS,
    SEND_LEASE,
    deliver,
    warn_expiring_credits,
)
from service_layer.notifications import message_id as notification_message_id
from service_layer.unit_of_work import SqlUnitOfWork
from tests.support import ROOT, eventually, free_port

SENDER = "no-reply@credits.test"
FROM_HEADER = f"Credits <{SENDER}>"
CREDITS_CLI = str(Path(sys.executable).with_name("credits"))
T0 = datetime(2025, 3, 3, 10, 0, tzinfo=UTC)


# ---------------------------------------------------------------- the SMTP server


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes

    @property
    def message(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.raw, policy=email.policy.default)

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    @property
    def to(self) -> str:
        return str(self.message["To"])

    @property
    def message_id(self) -> str:
        # The header as written on the wire, unparsed.
        return email.message_from_bytes(self.raw, policy=email.policy.compat32)["Message-ID"].strip()

    @property
    def body(self) -> str:
        return self.message.get_content().strip()


@dataclass
class RecordingHandler:
    """An aiosmtpd handler: accepts and records every message, unless told to refuse.

    ``rcpt_reply`` / ``data_reply`` map a recipient to the reply it gets at RCPT / at the end
    of DATA ("*" for every recipient); ``stall`` holds the DATA reply of a recipient until
    released (a server that is slow to answer)."""

    received: list[Received] = field(default_factory=list)
    rcpt_reply: dict[str, str] = field(default_factory=dict)
    data_reply: dict[str, str] = field(default_factory=dict)
    drop_after_data: bool = False
    #: The reply to MAIL FROM when set (a sender address the server refuses).
    mail_reply: str | None = None
    stall: dict[str, threading.Event] = field(default_factory=dict)
    stalled: threading.Event = field(default_factory=threading.Event)

    def _reply(self, replies: dict[str, str], address: str) -> str | None:
        return replies.get(address) or replies.get("*")

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        refusal = self._reply(self.rcpt_reply, address)
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        for address in envelope.rcpt_tos:
            if address in self.stall:
                self.stalled.set()
                await asyncio.get_running_loop().run_in_executor(None, self.stall[address].wait, 20)
        refusal = next((r for r in (self._reply(self.data_reply, a) for a in envelope.rcpt_tos) if r), None)
        if refusal:
            return refusal
        self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content)))
        if self.drop_after_data:
            # The message is in; the connection breaks before the client hears so.
            server.transport.close()
        return "250 Message accepted for delivery"


class SmtpServer:
    def __init__(self, port: int | None = None, **smtp_options) -> None:
        self.port = port or free_port()
        self.handler = RecordingHandler()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port, **smtp_options)

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    def start(self) -> SmtpServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()


@pytest.fixture
def smtp():
    server = SmtpServer().start()
    yield server
    server.stop()


def mailer_for(port: int, timeout: float = 5, **settings) -> SmtpMailer:
    return SmtpMailer(
        load_settings(
            smtp_host="127.0.0.1",
            smtp_port=port,
            smtp_security="none",
            smtp_from=FROM_HEADER,
            smtp_timeout_seconds=timeout,
            **settings,
        )
    )


# ---------------------------------------------------------------- the database


@pytest.fixture
async def outbox_db(db):
    """The test database, its outbox emptied too (the shared `db` fixture does not truncate it)."""
    async with db.begin() as connection:
        await connection.execute(text("TRUNCATE notifications RESTART IDENTITY"))
    return db


def uow_factory(db):
    return lambda: SqlUnitOfWork(db)


async def apply(db, event) -> None:
    await handlers.apply_event(event, SqlUnitOfWork(db), CreditPolicy())


async def rows(db, **where) -> list:
    query = select(notifications).order_by(notifications.c.id)
    for column, value in where.items():
        query = query.where(notifications.c[column] == value)
    async with db.connect() as connection:
        return list(await connection.execute(query))


async def row(db, key: str):
    (found,) = await rows(db, key=key)
    return found


def eid() -> str:
    return uuid.uuid4().hex


async def signed_up(db, customer_id: str, address: str, at: datetime = T0) -> None:
    await apply(db, CustomerSignedUp(event_id=eid(), occurred_at=at, customer_id=customer_id, email=address))


async def pays(db, customer_id: str, credits: int, at: datetime, payment_id: str | None = None) -> None:
    await apply(
        db,
        PaymentSucceeded(
            event_id=eid(),
            occurred_at=at,
            customer_id=customer_id,
            payment_id=payment_id or "pay-" + eid()[:10],
            credits=credits,
        ),
    )


async def uses(db, customer_id: str, credits: int, at: datetime) -> None:
    await apply(
        db,
        JobCompleted(
            event_id=eid(), occurred_at=at, customer_id=customer_id, job_id="job-" + eid()[:10], credits=credits
        ),
    )


def message_id_of(key: str) -> str:
    return notification_message_id(key)


async def depleted_customer(db, customer_id: str, address: str | None, at: datetime = T0) -> str:
    """A customer (with or without an email) who paid for 2 credits and used both at ``at``: the depletion's key."""
    if address is not None:
        await signed_up(db, customer_id, address, at - timedelta(days=2))
    await pays(db, customer_id, 2, at - timedelta(days=1))
    await uses(db, customer_id, 2, at)
    return f"credits_depleted:{customer_id}:{at.isoformat()}"


# ---------------------------------------------------------------- 1. depleted and restored


async def test_depleted_then_restored_each_sent_exactly_once_to_the_customer(outbox_db, smtp):
    db = outbox_db
    customer, address = "cust-dana", "dana@example.com"
    await signed_up(db, customer, address, T0)
    await pays(db, customer, 3, T0 + timedelta(hours=1))
    assert await rows(db) == []  # paying is no news

    depleted_at = T0 + timedelta(days=2)
    await uses(db, customer, 3, depleted_at)
    depleted_key = f"credits_depleted:{customer}:{depleted_at.isoformat()}"
    (queued,) = await rows(db)
    assert (queued.key, queued.kind, queued.status, queued.to_address) == (
        depleted_key,
        "credits_depleted",
        "pending",
        address,
    )
    assert queued.created_at == queued.send_after == depleted_at
    assert queued.attempts == 0 and queued.sent_at is None

    restored_at = T0 + timedelta(days=5)
    await pays(db, customer, 10, restored_at)
    restored_key = f"credits_restored:{customer}:{depleted_at.isoformat()}"
    assert [(r.key, r.kind, r.status) for r in await rows(db)] == [
        (depleted_key, "credits_depleted", "pending"),
        (restored_key, "credits_restored", "pending"),
    ]

    sent_at = T0 + timedelta(days=6)
    mailer = mailer_for(smtp.port)
    first = await deliver(uow_factory(db), mailer, lambda: sent_at)
    assert (first.sent, first.retrying, first.failed, first.uncertain) == (2, 0, 0, 0)
    second = await deliver(uow_factory(db), mailer, lambda: sent_at + timedelta(hours=1))
    assert (second.sent, second.retrying, second.failed, second.uncertain) == (0, 0, 0, 0)

    for r in await rows(db):
        assert (r.status, r.attempts, r.sent_at, r.last_error, r.leased_until) == ("sent", 1, sent_at, None, None)

    assert len(smtp.received) == 2
    by_id = {m.message_id: m for m in smtp.received}
    assert set(by_id) == {message_id_of(depleted_key), message_id_of(restored_key)}
    assert message_id_of(depleted_key) != message_id_of(restored_key) and message_id_of(depleted_key).endswith(
        "@credits>"
    )
    for m in smtp.received:
        assert m.mail_from == SENDER
        assert m.rcpt_tos == [address]
        assert m.to == address
        assert str(m.message["From"]) == FROM_HEADER

    depleted = by_id[message_id_of(depleted_key)]
    assert depleted.subject == "You are out of credits"
    assert "ran out on March 5, 2025" in depleted.body
    restored = by_id[message_id_of(restored_key)]
    assert restored.subject == "Your credits are back"
    assert "you have 10 credits again as of March 8, 2025" in restored.body


async def test_each_new_depletion_is_a_new_notice_and_a_replayed_event_queues_nothing(outbox_db, smtp):
    db = outbox_db
    customer = "cust-twice"
    await signed_up(db, customer, "twice@example.com", T0)
    await pays(db, customer, 1, T0)
    job = JobCompleted(
        event_id="job-twice-1", occurred_at=T0 + timedelta(days=1), customer_id=customer, job_id="job-t1", credits=1
    )
    await apply(db, job)
    await apply(db, job)  # redelivered by the broker: a duplicate, nothing new
    await pays(db, customer, 1, T0 + timedelta(days=2))
    await uses(db, customer, 1, T0 + timedelta(days=3))
    assert [r.kind for r in await rows(db)] == ["credits_depleted", "credits_restored", "credits_depleted"]

    await deliver(uow_factory(db), mailer_for(smtp.port), lambda: T0 + timedelta(days=4))
    assert sorted(m.subject for m in smtp.received) == [
        "You are out of credits",
        "You are out of credits",
        "Your credits are back",
    ]
    assert len({m.message_id for m in smtp.received}) == 3


# ---------------------------------------------------------------- 2. payment failed


async def test_a_failed_payment_opening_a_dunning_case_is_notified_once_per_invoice(outbox_db, smtp):
    db = outbox_db
    customer, address, invoice_id = "cust-pat", "pat@example.com", "in_pat_1"
    await signed_up(db, customer, address, T0 - timedelta(days=1))
    failed = {
        "customer_id": customer,
        "invoice_id": invoice_id,
        "decline_code": "insufficient_funds",
        "failure_message": "Your card has insufficient funds",
    }
    await apply(db, PaymentFailed(event_id=eid(), occurred_at=T0, **failed))
    async with db.connect() as connection:
        case = (await connection.execute(select(dunning_cases).where(dunning_cases.c.invoice_id == invoice_id))).one()
    assert case.next_retry_at == T0 + timedelta(days=1)

    key = f"payment_failed:{invoice_id}"
    (queued,) = await rows(db)
    assert (queued.key, queued.kind, queued.status, queued.to_address, queued.created_at) == (
        key,
        "payment_failed",
        "pending",
        address,
        T0,
    )

    # The same invoice failing again (a Stripe retry, a redelivered webhook): no second notice.
    await apply(db, PaymentFailed(event_id=eid(), occurred_at=T0 + timedelta(hours=5), **failed))
    await apply(
        db,
        PaymentFailed(
            event_id=eid(), occurred_at=T0 + timedelta(days=1, hours=1), **{**failed, "decline_code": "card_declined"}
        ),
    )
    assert [r.key for r in await rows(db)] == [key]

    mailer = mailer_for(smtp.port)
    assert (await deliver(uow_factory(db), mailer, lambda: T0 + timedelta(days=2))).sent == 1
    assert (await deliver(uow_factory(db), mailer, lambda: T0 + timedelta(days=3))).sent == 0
    (message,) = smtp.received
    assert message.rcpt_tos == [address] and message.to == address
    assert message.message_id == message_id_of(key)
    assert message.subject == "Your payment did not go through"
    assert "We could not collect your membership payment." in message.body
    assert "The bank said: Your card has insufficient funds." in message.body
    assert "We will try again on March 4, 2025." in message.body
    assert (await row(db, key)).status == "sent"

    # Another invoice of the same customer is news of its own.
    await apply(
        db,
        PaymentFailed(event_id=eid(), occurred_at=T0 + timedelta(days=30), customer_id=customer, invoice_id="in_pat_2"),
    )
    assert [r.key for r in await rows(db)] == [key, "payment_failed:in_pat_2"]


async def test_an_authentication_request_for_a_new_invoice_is_notified_once_per_invoice(outbox_db, smtp):
    """The bank asking the customer to authenticate (PaymentActionRequired) is a payment that
    did not go through: its invoice gets the `payment_failed` notice too, once, whichever of
    the invoice's reports comes first."""
    db = outbox_db
    customer, address = "cust-sca", "sca@example.com"
    await signed_up(db, customer, address, T0 - timedelta(days=1))
    needs_auth = PaymentActionRequired(
        event_id="auth-1",
        occurred_at=T0,
        customer_id=customer,
        invoice_id="in_sca_1",
        hosted_invoice_url="https://pay.example.com/in_sca_1",
    )
    await apply(db, needs_auth)
    key = "payment_failed:in_sca_1"
    (queued,) = await rows(db)
    assert (queued.key, queued.kind, queued.status, queued.to_address, queued.created_at) == (
        key,
        "payment_failed",
        "pending",
        address,
        T0,
    )
    assert "could not collect your membership payment" in queued.body
    assert "confirm this payment" in queued.body
    assert "We will try again" not in queued.body  # nothing is retried without the customer

    # Replayed, asked again, then declined outright: still the one notice for that invoice.
    await apply(db, needs_auth)
    await apply(
        db,
        PaymentActionRequired(
            event_id=eid(), occurred_at=T0 + timedelta(hours=2), customer_id=customer, invoice_id="in_sca_1"
        ),
    )
    await apply(
        db,
        PaymentFailed(
            event_id=eid(),
            occurred_at=T0 + timedelta(days=1),
            customer_id=customer,
            invoice_id="in_sca_1",
            decline_code="card_declined",
        ),
    )
    assert [r.key for r in await rows(db)] == [key]

    # A failure first, the authentication request after: one notice as well.
    await apply(
        db,
        PaymentFailed(
            event_id=eid(),
            occurred_at=T0,
            customer_id=customer,
            invoice_id="in_sca_2",
            decline_code="insufficient_funds",
        ),
    )
    await apply(
        db,
        PaymentActionRequired(
            event_id=eid(), occurred_at=T0 + timedelta(hours=1), customer_id=customer, invoice_id="in_sca_2"
        ),
    )
    assert [r.key for r in await rows(db)] == [key, "payment_failed:in_sca_2"]

    # An invoice already paid: a late authentication request is no news.
    await pays(db, customer, 5, T0, payment_id="in_sca_paid")
    await apply(
        db,
        PaymentActionRequired(
            event_id=eid(), occurred_at=T0 + timedelta(hours=3), customer_id=customer, invoice_id="in_sca_paid"
        ),
    )
    assert [r.key for r in await rows(db)] == [key, "payment_failed:in_sca_2"]

    assert (await deliver(uow_factory(db), mailer_for(smtp.port), lambda: T0 + timedelta(days=2))).sent == 2
    assert (await deliver(uow_factory(db), mailer_for(smtp.port), lambda: T0 + timedelta(days=3))).sent == 0
    assert sorted(m.message_id for m in smtp.received) == sorted(
        [message_id_of(key), message_id_of("payment_failed:in_sca_2")]
    )
    assert all(m.subject == "Your payment did not go through" and m.rcpt_tos == [address] for m in smtp.received)


# ---------------------------------------------------------------- 2b. booking: holds placed and released over HTTP

ADMIN_TOKEN = "admin-token-notifications-0123456789"
FRONTEND_TOKEN = "frontend-token-notifications-0123456789"
FRONT = {"Authorization": f"Bearer {FRONTEND_TOKEN}"}


@asynccontextmanager
async def serving(db, pg_url: str, clock: FixedClock):
    settings = load_settings(
        database_url=pg_url, admin_api_token=ADMIN_TOKEN, frontend_api_token=FRONTEND_TOKEN, redis_url=None
    )
    app = create_app(settings, db=db, clock=clock)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://credits.test") as http,
    ):
        yield http


async def test_releasing_a_hold_after_the_last_lot_expired_queues_the_depleted_notice(outbox_db, pg_url, smtp):
    """Booking reads the ledger at its own moment: a release after the customer's only lot
    expired writes that expiry, which depletes them, and the customer is told (once)."""
    db = outbox_db
    customer, address = "cust-release", "release@example.com"
    await signed_up(db, customer, address, datetime(2024, 3, 1, tzinfo=UTC))
    await pays(db, customer, 5, datetime(2024, 3, 10, tzinfo=UTC))  # expires 2025-03-10
    expired_at = datetime(2025, 3, 10, tzinfo=UTC)
    clock = FixedClock(datetime(2025, 3, 1, tzinfo=UTC))
    async with serving(db, pg_url, clock) as http:
        placed = await http.post(
            f"/api/customers/{customer}/holds", json={"job_id": "job-r1", "credits": 2}, headers=FRONT
        )
        assert placed.status_code == 201, placed.text
        assert await rows(db) == []  # a hold moves no balance: no news

        clock.move_to(datetime(2025, 3, 12, 9, tzinfo=UTC))
        released = await http.delete(f"/api/customers/{customer}/holds/job-r1", headers=FRONT)
        assert released.status_code == 204, released.text
        key = f"credits_depleted:{customer}:{expired_at.isoformat()}"
        (queued,) = await rows(db)
        assert (queued.key, queued.kind, queued.status, queued.to_address) == (
            key,
            "credits_depleted",
            "pending",
            address,
        )
        assert queued.created_at == clock.now()
        async with db.connect() as connection:
            depleted_at = (
                await connection.execute(
                    select(customers.c.credits_depleted_at).where(customers.c.customer_id == customer)
                )
            ).scalar_one()
        assert depleted_at == expired_at

        # Releasing it again (nothing to release) queues nothing more.
        again = await http.delete(f"/api/customers/{customer}/holds/job-r1", headers=FRONT)
        assert again.status_code == 404
        assert [r.key for r in await rows(db)] == [key]

    assert (await deliver(uow_factory(db), mailer_for(smtp.port), lambda: clock.now())).sent == 1
    (message,) = smtp.received
    assert message.subject == "You are out of credits" and "ran out on March 10, 2025" in message.body


async def test_placing_a_hold_queues_the_depleted_notice_when_it_finds_the_credits_expired(outbox_db, pg_url, smtp):
    db = outbox_db
    customer, address = "cust-book", "book@example.com"
    await signed_up(db, customer, address, datetime(2024, 3, 1, tzinfo=UTC))
    await pays(db, customer, 5, datetime(2024, 3, 10, tzinfo=UTC))  # expires 2025-03-10
    expired_at = datetime(2025, 3, 10, tzinfo=UTC)
    key = f"credits_depleted:{customer}:{expired_at.isoformat()}"
    clock = FixedClock(datetime(2025, 3, 1, tzinfo=UTC))
    async with serving(db, pg_url, clock) as http:
        # A hold that leaves credits available changes no depletion: nothing queued.
        assert (
            await http.post(f"/api/customers/{customer}/holds", json={"job_id": "job-b1", "credits": 2}, headers=FRONT)
        ).status_code == 201
        assert (
            await http.post(f"/api/customers/{customer}/holds", json={"job_id": "job-b2", "credits": 3}, headers=FRONT)
        ).status_code == 201
        assert await rows(db) == []

        clock.move_to(datetime(2025, 3, 11, tzinfo=UTC))
        # A new booking after the lot expired is refused, and a refusal writes nothing at all.
        refused = await http.post(
            f"/api/customers/{customer}/holds", json={"job_id": "job-b3", "credits": 1}, headers=FRONT
        )
        assert (refused.status_code, refused.json()["reason"]) == (409, "insufficient_credits")
        assert await rows(db) == []
        # The same booking placed again (the front end retrying): it stands, and reading the
        # ledger at this moment expires the lot, which depletes the customer: a notice.
        same = await http.post(
            f"/api/customers/{customer}/holds", json={"job_id": "job-b1", "credits": 2}, headers=FRONT
        )
        assert same.status_code == 200, same.text
        (queued,) = await rows(db)
        assert (queued.key, queued.status, queued.to_address, queued.created_at) == (
            key,
            "pending",
            address,
            clock.now(),
        )
        # Once depleted, further bookings and releases are no news.
        assert (
            await http.post(f"/api/customers/{customer}/holds", json={"job_id": "job-b2", "credits": 3}, headers=FRONT)
        ).status_code == 200
        assert (await http.delete(f"/api/customers/{customer}/holds/job-b2", headers=FRONT)).status_code == 204
        assert [r.key for r in await rows(db)] == [key]

    # The credits come back with a payment: the restored notice names the same depletion.
    await pays(db, customer, 4, datetime(2025, 3, 12, tzinfo=UTC))
    assert [r.kind for r in await rows(db)] == ["credits_depleted", "credits_restored"]
    assert (
        await deliver(uow_factory(db), mailer_for(smtp.port), lambda: datetime(2025, 3, 12, 1, tzinfo=UTC))
    ).sent == 2


# ---------------------------------------------------------------- 3. expiring credits


async def lot_of(db, payment_id: str):
    async with db.connect() as connection:
        return (await connection.execute(select(credit_lots).where(credit_lots.c.payment_id == payment_id))).one()


async def test_expiring_credits_are_warned_once_per_lot_within_the_window(outbox_db, smtp):
    db = outbox_db
    now = datetime(2025, 4, 1, tzinfo=UTC)
    # Credits last 12 months: a payment on 2024-04-20 expires on 2025-04-20, within 30 days.
    await signed_up(db, "cust-amy", "amy@example.com", datetime(2024, 4, 1, tzinfo=UTC))
    await pays(db, "cust-amy", 7, datetime(2024, 4, 20, 12, tzinfo=UTC), "pay-amy-soon")
    await pays(db, "cust-amy", 5, datetime(2024, 6, 1, 12, tzinfo=UTC), "pay-amy-later")
    # Spent lot: nothing to warn about (no email: his depletion notice is not mailed).
    await pays(db, "cust-ben", 4, datetime(2024, 4, 15, tzinfo=UTC), "pay-ben")
    await uses(db, "cust-ben", 4, datetime(2024, 5, 1, tzinfo=UTC))
    # A frozen membership: nothing of theirs expires while frozen.
    await signed_up(db, "cust-cat", "cat@example.com", datetime(2024, 4, 1, tzinfo=UTC))
    await pays(db, "cust-cat", 6, datetime(2024, 4, 25, tzinfo=UTC), "pay-cat")
    await apply(
        db,
        MembershipFrozen(event_id=eid(), occurred_at=datetime(2025, 3, 1, tzinfo=UTC), customer_id="cust-cat"),
    )
    # Already past its expiry (not swept yet): too late to warn.
    await signed_up(db, "cust-dan", "dan@example.com", datetime(2024, 3, 1, tzinfo=UTC))
    await pays(db, "cust-dan", 3, datetime(2024, 3, 20, tzinfo=UTC), "pay-dan")

    soon, later = await lot_of(db, "pay-amy-soon"), await lot_of(db, "pay-amy-later")
    assert soon.expires_at == datetime(2025, 4, 20, 12, tzinfo=UTC)
    assert (await lot_of(db, "pay-cat")).expires_at == datetime(2025, 4, 25, tzinfo=UTC)
    before = {r.key for r in await rows(db)}  # ben's depletion (no_address)

    new_uow = uow_factory(db)
    assert await warn_expiring_credits(new_uow, now, 30) == 1
    warnings = [r for r in await rows(db) if r.key not in before]
    assert [(r.key, r.kind, r.customer_id, r.status, r.to_address, r.created_at) for r in warnings] == [
        (
            f"credits_expiring:{soon.id}:{soon.expires_at.isoformat()}",
            "credits_expiring",
            "cust-amy",
            "pending",
            "amy@example.com",
            now,
        )
    ]
    assert warnings[0].subject == "7 credits expire on April 20, 2025"
    assert "You have 7 credits that will expire on April 20, 2025 (UTC)." in warnings[0].body

    # Again the same day, and the next day: nothing more for that lot.
    assert await warn_expiring_credits(new_uow, now, 30) == 0
    assert await warn_expiring_credits(new_uow, now + timedelta(days=1), 30) == 0
    assert len(await rows(db, kind="credits_expiring")) == 1

    assert (await deliver(new_uow, mailer_for(smtp.port), lambda: now + timedelta(days=1))).sent == 1
    (message,) = smtp.received
    assert message.rcpt_tos == ["amy@example.com"]
    assert message.message_id == message_id_of(f"credits_expiring:{soon.id}:{soon.expires_at.isoformat()}")
    assert message.subject == "7 credits expire on April 20, 2025"
    assert "7 credits that will expire on April 20, 2025" in message.body

    # A month on, the second lot comes within 30 days: it gets its own warning, once.
    month_on = datetime(2025, 5, 3, tzinfo=UTC)
    assert await warn_expiring_credits(new_uow, month_on, 30) == 1
    assert await warn_expiring_credits(new_uow, month_on + timedelta(days=1), 30) == 0
    assert [r.key for r in await rows(db, kind="credits_expiring")] == [
        f"credits_expiring:{soon.id}:{soon.expires_at.isoformat()}",
        f"credits_expiring:{later.id}:{later.expires_at.isoformat()}",
    ]
    assert (await deliver(new_uow, mailer_for(smtp.port), lambda: month_on)).sent == 1
    assert [m.subject for m in smtp.received] == [
        "7 credits expire on April 20, 2025",
        "5 credits expire on June 1, 2025",
    ]
    assert all(m.rcpt_tos == ["amy@example.com"] for m in smtp.received)
    # Never ben (spent), cat (frozen) or dan (already expired).
    assert {r.customer_id for r in await rows(db, kind="credits_expiring")} == {"cust-amy"}


# ---------------------------------------------------------------- 4. SMTP down, refused, retried


async def test_smtp_down_backs_off_then_sends_once_when_the_server_is_up(outbox_db):
    db = outbox_db
    key = await depleted_customer(db, "cust-down", "down@example.com")
    port = free_port()  # nothing listens here yet
    mailer = mailer_for(port)
    t1 = T0 + timedelta(hours=1)

    result = await deliver(uow_factory(db), mailer, lambda: t1)
    assert (result.sent, result.retrying, result.failed, result.uncertain) == (0, 1, 0, 0)
    r = await row(db, key)
    assert (r.status, r.attempts, r.sent_at, r.leased_until) == ("pending", 1, None, None)
    assert r.last_error and "cannot reach the SMTP server" in r.last_error
    assert r.send_after == t1 + timedelta(minutes=1) > t1

    server = SmtpServer(port).start()
    try:
        # Up now, but the back-off has not run out: not yet.
        assert (await deliver(uow_factory(db), mailer, lambda: t1 + timedelta(seconds=30))).sent == 0
        assert server.received == []
        assert (await row(db, key)).attempts == 1

        when = t1 + timedelta(minutes=1)
        assert (await deliver(uow_factory(db), mailer, lambda: when)).sent == 1
        assert (await deliver(uow_factory(db), mailer, lambda: when + timedelta(hours=1))).sent == 0
        (message,) = server.received
        assert message.rcpt_tos == ["down@example.com"] and message.message_id == message_id_of(key)
        r = await row(db, key)
        assert (r.status, r.attempts, r.sent_at, r.last_error) == ("sent", 2, when, None)
    finally:
        server.stop()


async def test_a_message_that_keeps_failing_backs_off_exponentially_then_is_given_up(outbox_db, smtp):
    """A refusal of this message (a 4xx the receiving side keeps giving it) is retried with
    back-off, and given up after MAX_ATTEMPTS tries: it is about the message, not about us."""
    db = outbox_db
    key = await depleted_customer(db, "cust-never", "never@example.com")
    smtp.handler.rcpt_reply["never@example.com"] = "452 4.2.2 <never@example.com>: Mailbox full"
    mailer = mailer_for(smtp.port)
    now = T0
    waits = []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        await deliver(uow_factory(db), mailer, lambda at=now: at)
        r = await row(db, key)
        assert r.attempts == attempt
        assert "452" in r.last_error
        if attempt < MAX_ATTEMPTS:
            assert r.status == "pending"
            waits.append(r.send_after - now)
            now = r.send_after
    assert waits == [timedelta(minutes=m) for m in (1, 2, 4, 8, 16, 32, 64, 128, 256, 360, 360)]
    assert (r.status, r.sent_at) == ("failed", None)
    # Given up means given up: not tried again once the mailbox has room.
    smtp.handler.rcpt_reply.clear()
    await deliver(uow_factory(db), mailer, lambda: now + timedelta(days=30))
    assert (await row(db, key)).attempts == MAX_ATTEMPTS
    assert smtp.received == []


async def test_an_smtp_outage_of_any_length_never_gives_a_notice_up(outbox_db):
    """The server unreachable is our problem, not the message's: however many tries it takes
    (many more than MAX_ATTEMPTS), the notice stays pending, and goes out once it is back."""
    db = outbox_db
    key = await depleted_customer(db, "cust-outage", "outage@example.com")
    port = free_port()  # nothing listens here for a long while
    mailer = mailer_for(port)
    now = T0
    waits = []
    tries = MAX_ATTEMPTS + 6
    for attempt in range(1, tries + 1):
        result = await deliver(uow_factory(db), mailer, lambda at=now: at)
        assert (result.sent, result.retrying, result.failed, result.uncertain) == (0, 1, 0, 0)
        r = await row(db, key)
        assert (r.status, r.attempts, r.sent_at) == ("pending", attempt, None)
        assert "cannot reach the SMTP server" in r.last_error
        waits.append(r.send_after - now)
        now = r.send_after
    # The same back-off as any sure failure, capped at six hours, then six hours for ever.
    assert waits == [timedelta(minutes=m) for m in (1, 2, 4, 8, 16, 32, 64, 128, 256)] + [timedelta(hours=6)] * (
        tries - 9
    )

    server = SmtpServer(port).start()
    try:
        assert (await deliver(uow_factory(db), mailer, lambda: now)).sent == 1
        assert (await deliver(uow_factory(db), mailer, lambda: now + timedelta(days=1))).sent == 0
        (message,) = server.received
        assert message.rcpt_tos == ["outage@example.com"] and message.message_id == message_id_of(key)
        r = await row(db, key)
        assert (r.status, r.attempts, r.sent_at, r.last_error) == ("sent", tries + 1, now, None)
    finally:
        server.stop()


def _refuse_login(server, session, envelope, mechanism, auth_data):
    """An aiosmtpd authenticator (called synchronously) that takes no credentials at all."""
    return AuthResult(success=False, handled=False)


@pytest.mark.parametrize("fault", ["login refused", "sender refused"])
async def test_our_smtp_settings_refused_keep_the_notice_until_they_are_fixed(outbox_db, fault):
    """A wrong SMTP password or a SMTP_FROM the server will not take is a configuration
    problem: every notice would fail the same way. They wait (pending, however many tries)
    and go out once it is fixed, instead of being given up after MAX_ATTEMPTS."""
    db = outbox_db
    key = await depleted_customer(db, "cust-config", "config@example.com")
    if fault == "login refused":
        server = SmtpServer(auth_require_tls=False, authenticator=_refuse_login).start()
        broken = mailer_for(server.port, smtp_username="credits", smtp_password="wrong-password")
        expected_code = "535"
    else:
        server = SmtpServer().start()
        server.handler.mail_reply = "553 5.7.1 <no-reply@credits.test>: Sender address rejected: not owned by user"
        broken = mailer_for(server.port)
        expected_code = "553"
    try:
        now = T0
        for attempt in range(1, MAX_ATTEMPTS + 3):
            result = await deliver(uow_factory(db), broken, lambda at=now: at)
            assert (result.sent, result.retrying, result.failed) == (0, 1, 0)
            r = await row(db, key)
            assert (r.status, r.attempts) == ("pending", attempt), r.last_error
            assert expected_code in r.last_error and "check the SMTP settings" in r.last_error
            now = r.send_after
        assert server.received == []

        # Fixed (the right settings deployed): sent, once.
        if fault == "login refused":
            server.stop()
            server = SmtpServer(server.port).start()
            fixed = mailer_for(server.port)
        else:
            server.handler.mail_reply = None
            fixed = broken
        assert (await deliver(uow_factory(db), fixed, lambda: now)).sent == 1
        assert (await deliver(uow_factory(db), fixed, lambda: now + timedelta(hours=7))).sent == 0
        (message,) = server.received
        assert message.message_id == message_id_of(key)
        assert (await row(db, key)).status == "sent"
    finally:
        server.stop()


async def test_tries_during_an_outage_do_not_use_up_the_tries_a_refused_message_gets(outbox_db):
    """ "Such tries do not count toward giving up" (service_layer/notifications.py): after a
    long outage, the server is back and the recipient's side greylists the first try (450),
    the most common temporary refusal there is. The notice has had no message-specific
    failure before, so it must be retried, not given up on its first refusal."""
    db = outbox_db
    key = await depleted_customer(db, "cust-greylisted", "greylisted@example.com")
    port = free_port()
    mailer = mailer_for(port)
    now = T0
    for _ in range(MAX_ATTEMPTS):  # about 20 hours of outage
        await deliver(uow_factory(db), mailer, lambda at=now: at)
        now = (await row(db, key)).send_after
    assert (await row(db, key)).status == "pending"

    server = SmtpServer(port).start()
    try:
        server.handler.rcpt_reply["*"] = (
            "450 4.2.0 <greylisted@example.com>: Recipient address rejected: Greylisted, try again later"
        )
        await deliver(uow_factory(db), mailer, lambda: now)
        r = await row(db, key)
        assert r.status == "pending", (
            f"given up on its first greylisting after an outage: {r.status} after {r.attempts} tries ({r.last_error})"
        )
        server.handler.rcpt_reply.clear()
        assert (await deliver(uow_factory(db), mailer, lambda: r.send_after)).sent == 1
        assert [m.message_id for m in server.received] == [message_id_of(key)]
    finally:
        server.stop()


async def test_a_run_stops_taking_notices_after_its_budget_and_the_next_run_goes_on(outbox_db, smtp):
    """A run takes no new notice once its budget is spent (so the worker's time limit never
    cuts a send off mid-way); the send in flight is finished and recorded; the rest wait, untouched."""
    db = outbox_db
    keys = [
        await depleted_customer(db, f"cust-budget-{n}", f"budget{n}@example.com", T0 + timedelta(seconds=n))
        for n in range(4)
    ]
    gate = threading.Event()
    smtp.handler.stall["budget0@example.com"] = gate  # the first send takes longer than the budget
    timer = threading.Timer(0.6, gate.set)
    timer.start()
    try:
        first = await deliver(
            uow_factory(db), mailer_for(smtp.port), lambda: T0 + timedelta(minutes=1), budget=timedelta(seconds=0.3)
        )
    finally:
        timer.cancel()
        gate.set()
    assert (first.sent, first.retrying, first.failed, first.uncertain) == (1, 0, 0, 0)
    assert [(r.key, r.status, r.attempts) for r in await rows(db)] == [(keys[0], "sent", 1)] + [
        (k, "pending", 0) for k in keys[1:]
    ]

    # A spent budget takes nothing at all.
    nothing = await deliver(
        uow_factory(db), mailer_for(smtp.port), lambda: T0 + timedelta(minutes=2), budget=timedelta(0)
    )
    assert nothing.sent == 0
    assert [r.attempts for r in await rows(db)] == [1, 0, 0, 0]

    # The next run (the default budget) sends the rest, each once.
    rest = await deliver(uow_factory(db), mailer_for(smtp.port), lambda: T0 + timedelta(minutes=3))
    assert rest.sent == 3
    assert sorted(m.message_id for m in smtp.received) == sorted(message_id_of(k) for k in keys)
    assert {r.status for r in await rows(db)} == {"sent"}


@pytest.mark.parametrize(
    "stage, reply",
    [("rcpt", "550 5.1.1 <refused@example.com>: no such user"), ("data", "554 5.7.1 Message rejected as spam")],
)
async def test_a_permanent_refusal_fails_and_is_never_retried(outbox_db, smtp, stage, reply):
    db = outbox_db
    key = await depleted_customer(db, "cust-refused", "refused@example.com")
    (smtp.handler.rcpt_reply if stage == "rcpt" else smtp.handler.data_reply)["*"] = reply
    mailer = mailer_for(smtp.port)

    result = await deliver(uow_factory(db), mailer, lambda: T0)
    assert (result.sent, result.retrying, result.failed, result.uncertain) == (0, 0, 1, 0)
    r = await row(db, key)
    assert (r.status, r.attempts, r.sent_at) == ("failed", 1, None)
    assert reply.split()[0] in r.last_error

    # Even once the server would take it, a refused message is not tried again.
    smtp.handler.rcpt_reply.clear()
    smtp.handler.data_reply.clear()
    assert (await deliver(uow_factory(db), mailer, lambda: T0 + timedelta(days=1))).sent == 0
    assert smtp.received == []
    assert (await row(db, key)).attempts == 1


@pytest.mark.parametrize(
    "stage, reply",
    [
        ("data", "451 4.3.0 Temporary local problem, try again later"),
        # Greylisting answers RCPT with a 4xx: the most common temporary refusal there is.
        ("rcpt", "450 4.2.0 <later@example.com>: Recipient address rejected: Greylisted, try again later"),
    ],
)
async def test_a_temporary_refusal_is_retried_later_and_then_sent_once(outbox_db, smtp, stage, reply):
    db = outbox_db
    key = await depleted_customer(db, "cust-later", "later@example.com")
    (smtp.handler.rcpt_reply if stage == "rcpt" else smtp.handler.data_reply)["*"] = reply
    mailer = mailer_for(smtp.port)

    result = await deliver(uow_factory(db), mailer, lambda: T0)
    r = await row(db, key)
    assert (r.status, r.attempts, r.sent_at) == ("pending", 1, None), (
        f"a {reply[:3]} at {stage.upper()} must be retried; got {r.status}: {r.last_error}"
    )
    assert reply.split()[0] in r.last_error
    assert r.send_after == T0 + timedelta(minutes=1)
    assert result.retrying == 1

    smtp.handler.rcpt_reply.clear()
    smtp.handler.data_reply.clear()
    assert (await deliver(uow_factory(db), mailer, lambda: T0 + timedelta(seconds=59))).sent == 0
    assert (await deliver(uow_factory(db), mailer, lambda: T0 + timedelta(minutes=1))).sent == 1
    assert (await deliver(uow_factory(db), mailer, lambda: T0 + timedelta(hours=1))).sent == 0
    (message,) = smtp.received
    assert message.message_id == message_id_of(key)
    assert ((await row(db, key)).status, (await row(db, key)).attempts) == ("sent", 2)


# ---------------------------------------------------------------- 5. at most once


async def test_a_send_left_mid_way_by_a_crash_is_marked_uncertain_and_never_sent(outbox_db, smtp):
    db = outbox_db
    key = await depleted_customer(db, "cust-crash", "crash@example.com")
    other = await depleted_customer(db, "cust-fine", "fine@example.com")
    claimed_at = T0 + timedelta(minutes=5)

    # A sender claims the batch, commits, and dies before sending or finishing anything.
    async with SqlUnitOfWork(db) as uow:
        claimed = await uow.notifications.claim(claimed_at, SEND_LEASE, 1)
        await uow.commit()
    assert [c.key for c in claimed] == [key]
    r = await row(db, key)
    assert (r.status, r.attempts, r.leased_until) == ("sending", 1, claimed_at + SEND_LEASE)

    mailer = mailer_for(smtp.port)
    # While the lease runs, the next sender leaves it alone (and sends the rest).
    during = await deliver(uow_factory(db), mailer, lambda: claimed_at + timedelta(minutes=1))
    assert (during.sent, during.uncertain) == (1, 0)
    assert (await row(db, key)).status == "sending"

    after = await deliver(uow_factory(db), mailer, lambda: claimed_at + SEND_LEASE + timedelta(seconds=1))
    assert (after.sent, after.uncertain) == (0, 1)
    r = await row(db, key)
    assert (r.status, r.attempts, r.sent_at) == ("uncertain", 1, None)
    assert "not sent again" in r.last_error

    assert (await deliver(uow_factory(db), mailer, lambda: claimed_at + timedelta(days=1))).sent == 0
    assert [m.message_id for m in smtp.received] == [message_id_of(other)]
    assert (await row(db, key)).status == "uncertain"


async def test_a_connection_lost_after_the_data_is_uncertain_and_never_resent(outbox_db, smtp):
    db = outbox_db
    key = await depleted_customer(db, "cust-lost", "lost@example.com")
    smtp.handler.drop_after_data = True
    mailer = mailer_for(smtp.port)

    result = await deliver(uow_factory(db), mailer, lambda: T0)
    assert (result.sent, result.retrying, result.failed, result.uncertain) == (0, 0, 0, 1)
    r = await row(db, key)
    assert (r.status, r.attempts) == ("uncertain", 1)
    assert "connection lost while sending" in r.last_error

    smtp.handler.drop_after_data = False
    assert (await deliver(uow_factory(db), mailer, lambda: T0 + timedelta(days=1))).sent == 0
    # The server did get it, once; it is never sent a second time.
    assert [m.message_id for m in smtp.received] == [message_id_of(key)]


async def test_a_sender_outliving_its_lease_does_not_lose_messages_it_never_tried(outbox_db, smtp):
    """A batch is leased for SEND_LEASE (10 minutes) as a whole, but sending it can take longer:
    50 messages at up to SMTP_TIMEOUT_SECONDS (20 s) per SMTP step each. The next periodic run
    then marks the rest of the batch `uncertain` ("the sender stopped mid-send") although
    the sender is alive and has not tried them yet; the sender carries on regardless, and
    what it then learns (here: a sure 4xx refusal) is dropped by `finish`. Messages surely
    never sent are given up."""
    db = outbox_db
    slow = await depleted_customer(db, "cust-slow", "slow@example.com", T0)
    second = await depleted_customer(db, "cust-second", "second@example.com", T0 + timedelta(seconds=1))
    gate = threading.Event()
    smtp.handler.stall["slow@example.com"] = gate
    smtp.handler.data_reply["second@example.com"] = "451 4.3.0 Try again later"
    mailer = mailer_for(smtp.port, timeout=30)
    clock = [T0 + timedelta(minutes=1)]

    first_run = asyncio.create_task(deliver(uow_factory(db), mailer, lambda: clock[0]))
    try:
        await asyncio.to_thread(smtp.handler.stalled.wait, 10)
        assert smtp.handler.stalled.is_set()
        # The server is slow; the next run comes after the lease (as the scheduler runs it every minute).
        clock[0] += SEND_LEASE + timedelta(minutes=1)
        await deliver(uow_factory(db), mailer_for(smtp.port), lambda: clock[0])
    finally:
        gate.set()
    await first_run

    assert [m.message_id for m in smtp.received] == [message_id_of(slow)]
    r = await row(db, second)
    # Refused with a 4xx and never sent: it must be retried, not written off as maybe sent.
    assert r.status == "pending", f"{second} was surely not sent but is {r.status!r}: {r.last_error}"


# ---------------------------------------------------------------- 6. no address


async def test_a_customer_without_an_email_gets_no_address_and_nothing_is_sent(outbox_db, smtp):
    db = outbox_db
    key = await depleted_customer(db, "cust-anon", None)
    r = await row(db, key)
    assert (r.status, r.to_address, r.kind) == ("no_address", None, "credits_depleted")

    result = await deliver(uow_factory(db), mailer_for(smtp.port), lambda: T0 + timedelta(days=1))
    assert (result.sent, result.retrying, result.failed, result.uncertain) == (0, 0, 0, 0)
    r = await row(db, key)
    assert (r.status, r.attempts, r.sent_at) == ("no_address", 0, None)
    assert smtp.received == []


# ---------------------------------------------------------------- the address sent to


async def test_mail_goes_to_the_address_the_customer_gave_not_its_normalised_form(outbox_db, smtp):
    """Profiles keep emails normalised for the referral fraud rules (lower case, +tag and
    Gmail dots dropped): that form may be another mailbox. Mail goes to the address as given."""
    db = outbox_db
    given = "Dana.Scully+credits@Example.org"
    key = await depleted_customer(db, "cust-tagged", given)
    async with db.connect() as connection:
        stored = (
            await connection.execute(
                select(customer_profiles.c.email).where(customer_profiles.c.customer_id == "cust-tagged")
            )
        ).scalar_one()
    assert stored == "dana.scully@example.org"  # what the fraud rules compare: fine there

    await deliver(uow_factory(db), mailer_for(smtp.port), lambda: T0 + timedelta(hours=1))
    (message,) = smtp.received
    assert message.rcpt_tos == [given], f"sent to {message.rcpt_tos}, but the customer signed up as {given!r}"
    assert (await row(db, key)).to_address == given


async def test_a_profile_without_the_address_as_given_is_no_address_never_its_normalised_form(outbox_db, smtp):
    """A profile holding only the normalised email (recorded before the address as given was
    kept): mail goes only to `contact_email`, so the notice is `no_address`, not sent to a
    normalised form that may be someone else's mailbox."""
    db = outbox_db
    async with db.begin() as connection:
        await connection.execute(
            customer_profiles.insert().values(
                customer_id="cust-old",
                email="dana.scully@example.org",
                contact_email=None,
                signed_up_at=T0 - timedelta(days=400),
            )
        )
    key = await depleted_customer(db, "cust-old", None)
    r = await row(db, key)
    assert (r.status, r.to_address) == ("no_address", None)

    # Beside it, a customer who gave an address is mailed at it.
    given = await depleted_customer(db, "cust-new", "Fox.Mulder+x@Example.org")
    assert ((await row(db, given)).status, (await row(db, given)).to_address) == ("pending", "Fox.Mulder+x@Example.org")

    result = await deliver(uow_factory(db), mailer_for(smtp.port), lambda: T0 + timedelta(hours=1))
    assert (result.sent, result.failed) == (1, 0)
    assert [m.rcpt_tos for m in smtp.received] == [["Fox.Mulder+x@Example.org"]]
    assert ((await row(db, key)).status, (await row(db, key)).attempts) == ("no_address", 0)


async def test_each_message_has_a_well_formed_message_id_of_its_own_whatever_the_customer_id(outbox_db, smtp):
    """Customer ids are the producers' ids: any text but NUL (messages/events.py). The
    Message-ID is the key with ':' turned into '.', nothing else escaped."""
    db = outbox_db
    customer = "Jane Doe"
    await signed_up(db, customer, "jane.doe@example.com", T0)
    await pays(db, customer, 1, T0)
    await uses(db, customer, 1, T0 + timedelta(days=1))
    await pays(db, customer, 1, T0 + timedelta(days=30))
    await uses(db, customer, 1, T0 + timedelta(days=31))
    assert [r.kind for r in await rows(db)] == ["credits_depleted", "credits_restored", "credits_depleted"]

    assert (await deliver(uow_factory(db), mailer_for(smtp.port), lambda: T0 + timedelta(days=32))).sent == 3
    ids = [m.message_id for m in smtp.received]
    for message_id in ids:
        assert message_id.startswith("<") and message_id.endswith("@credits>") and " " not in message_id, (
            f"malformed Message-ID {message_id!r}"
        )
    # Two different depletions must not share a Message-ID: mail stores drop the second as a duplicate.
    assert len(set(ids)) == 3, f"Message-IDs collide: {ids}"


# ---------------------------------------------------------------- 7. end to end with workers


async def _one(db, query) -> object:
    async with db.connect() as connection:
        return (await connection.execute(query)).one_or_none()


def run_send_notifications(env: dict[str, str]) -> None:
    """What the scheduler (or an operator) does: enqueue the periodic send job."""
    subprocess.run(
        [CREDITS_CLI, "run", "send_notifications"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=60
    )


@pytest.mark.slow
async def test_end_to_end_events_through_workers_and_the_send_job_reach_the_smtp_server(
    outbox_db, redis_client, service_env, start_workers, smtp
):
    db = outbox_db
    env = {
        **service_env,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp.port),
        "SMTP_SECURITY": "none",
        "SMTP_FROM": FROM_HEADER,
    }
    start_workers(processes=1, threads=2, env=env)
    publisher = Publisher.from_url(service_env["REDIS_URL"])
    customer, address = "cust-e2e", "erin@example.com"
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    events = [
        CustomerSignedUp(event_id="e2e-signup", occurred_at=base, customer_id=customer, email=address),
        PaymentSucceeded(
            event_id="e2e-pay",
            occurred_at=base + timedelta(hours=1),
            customer_id=customer,
            payment_id="pay-e2e",
            credits=2,
        ),
        JobCompleted(
            event_id="e2e-job", occurred_at=base + timedelta(hours=2), customer_id=customer, job_id="job-e2e", credits=2
        ),
    ]
    for event in events:  # one at a time: two worker threads could otherwise take them out of order
        publisher.publish(event)
        await eventually(
            lambda event_id=event.event_id: _one(
                db, select(processed_events.c.event_id).where(processed_events.c.event_id == event_id)
            ),
            timeout=20,
            message=f"{event.event_id} to be applied",
        )
    depleted_at = base + timedelta(hours=2)
    key = f"credits_depleted:{customer}:{depleted_at.isoformat()}"
    assert (
        await _one(db, select(customers.c.credits_depleted_at).where(customers.c.customer_id == customer))
    ).credits_depleted_at == depleted_at
    r = await row(db, key)
    assert (r.status, r.to_address) == ("pending", address)
    assert smtp.received == []  # queued, not sent, until the send job runs

    await asyncio.to_thread(run_send_notifications, env)

    async def arrived() -> bool:
        return len(smtp.received) >= 1 and (await row(db, key)).status == "sent"

    await eventually(arrived, timeout=20, message="the depletion email to arrive and be recorded as sent")
    (message,) = smtp.received
    assert message.mail_from == SENDER and message.rcpt_tos == [address] and message.to == address
    assert message.message_id == message_id_of(key)
    assert message.subject == "You are out of credits"
    r = await row(db, key)
    assert (r.status, r.attempts, r.last_error) == ("sent", 1, None)

    # Running the job again sends nothing more.
    await asyncio.to_thread(run_send_notifications, env)
    await asyncio.sleep(1.0)
    assert len(smtp.received) == 1
