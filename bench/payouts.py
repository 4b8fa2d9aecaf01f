"""The Friday referral payout batch against its set-based ceiling, measured in one process.

    .venv/bin/python -m bench.payouts --payees 100000 [--gateway manual|instant]

Both runs start from the same data in a scratch PostgreSQL database (created, migrated with
alembic, dropped at the end), seeded set-based and then VACUUM ANALYZEd, reseeded between
the runs (same ids). The data: ``--payees`` referrers (1 in 20 a partner, 1 in 20 an
employee, the rest customers), all paid the same way (below), each with 1-3 due rewards (1
in 4 still ``pending`` with its hold over, the rest ``approved`` by earlier hourly runs);
about 1 payee in 37 also has an open clawback of an older, already paid reward. Every
payee's total is at least the weekly minimum, so each gets exactly one payout. ``now`` is a
Friday in the payout time zone (10:00 in New York), so the batch pays everyone.

``--gateway``: ``manual`` (the default) seeds payees paid by the ``manual`` method and sends
through the real ``ManualGateway``: each payout is exported, its rewards stay ``in_payout``.
``instant`` seeds Stripe Connect payees and sends through an in-memory gateway that pays at
once (the provider's latency excluded): payouts and rewards end ``paid``.

* baseline (the ceiling): one transaction of set-based statements doing the same raw work,
  row for row: release the pending rewards, one payout per payee with the summed amount, its
  payout items, the clawbacks linked, the rewards moved to ``in_payout`` with their
  ``approved`` / ``in_payout`` history rows, then the payouts exported (or paid, with their
  rewards and ``paid`` history rows), each tried once.
* ``pay_referrals``: the service-layer function the ``pay_referrals`` actor calls, with the
  actor's arguments (default ``ReferralRules``, the default ``PAYOUT_GATEWAYS`` method map)
  and the gateway above. Should a call leave payouts unsent it is called again, as the
  hourly actor would be (at most ``--max-calls``); the first call and the whole batch are
  reported. The three phases (``release_rewards``, ``make_payouts``, ``send_payouts``) are
  timed by wrapping them in this process only, and the SQL statements each issues (and its
  connection checkouts, one transaction each) are counted with SQLAlchemy engine events.
  Logging is configured as in the workers (``configure_logging``, JSON at INFO) but written
  to /dev/null.

After each run the result is checked: every payee has exactly one payout for the Friday,
with the expected amount and idempotency key, equal to the sum of its items; every payout
of the Friday is sent (exported or paid) and its rewards moved with it; no clawback is left
open; both runs wrote the same number of rows of each kind.

Reported: payees per second for each, the phase split, pay_referrals / baseline, and the
1-minute load average at the start and at the end (the machine is shared: compare ratios,
not rates).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from unittest import mock

from sqlalchemy import event, text

from bench.scratch import scratch_database
from domain.referrals import ReferralRules, ReferrerKind
from infra.db import Database
from infra.db.referrals import payout_key
from infra.logging import configure_logging
from infra.payouts import ManualGateway
from infra.settings import Settings
from service_layer import payouts
from service_layer.unit_of_work import SqlUnitOfWork

TABLES = "referrers, referral_codes, referrals, referral_history, referral_clawbacks, payouts, payout_items"
#: Friday 2026-11-20, 10:00 in New York (EST): the weekly batch for every payee.
FRIDAY = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)
RULES = ReferralRules()
#: PAYOUT_GATEWAYS's default: payout method -> gateway name.
METHOD_GATEWAYS: dict[str, str] = Settings.model_fields["payout_gateways"].default
PHASES = ("release_rewards", "make_payouts", "send_payouts")


class InstantGateway:
    """A PayoutGateway that pays at once, in memory: no provider latency. It stands in for the
    ``stripe_connect`` gateway, so payouts go through the paid path (the rewards paid too)."""

    name = "instant"

    async def send(self, order: payouts.PayoutOrder) -> payouts.Sent:
        return payouts.Sent("paid", f"tr_bench_{order.payout_id}")


@dataclass(frozen=True)
class Mode:
    """How the payees are paid: the payout method seeded, its gateway, and what a sent payout becomes."""

    method: str
    gateway: payouts.PayoutGateway
    payout_status: str  # a sent payout's status
    reward_status: str  # its rewards' status


MODES = {
    # The manual gateway (Cash App, bank transfers by hand): exported for operations; the rewards stay in the payout.
    "manual": Mode("manual", ManualGateway(), "exported", "in_payout"),
    # Stripe Connect, paid at once in memory: the payouts and their rewards paid.
    "instant": Mode("stripe_connect", InstantGateway(), "paid", "paid"),
}


# ---------------------------------------------------------------- seeding

_REWARD = "CASE g % 20 WHEN 0 THEN CAST(:partner AS bigint) WHEN 1 THEN CAST(:employee AS bigint) ELSE CAST(:customer AS bigint) END"
_PAYOUT_KEY = (
    "'payout-' || CAST(:period AS text) || '-' || left(encode(sha256(convert_to({payee}, 'UTF8')), 'hex'), 32)"
)
#: Payees with an open clawback: every 25th, among those with 2 or 3 due rewards (so the
#: payout stays above the minimum).
_CLAWED_BACK = "g % 25 = 0 AND g % 3 <> 0"

SEED = [
    """
    INSERT INTO referrers (referrer_id, kind, name, email, payout_method, same_day, stripe_account_id, created_at)
    SELECT 'payee-' || g, CASE g % 20 WHEN 0 THEN 'partner' WHEN 1 THEN 'employee' ELSE 'customer' END,
           'Payee ' || g, 'payee-' || g || '@example.com', :method, false, 'acct_bench' || g,
           CAST(:now AS timestamptz) - interval '120 days'
    FROM generate_series(1, :payees) g
    """,
    # 1-3 due rewards per payee; every hold is over (approve_after 7-14 days before now).
    f"""
    INSERT INTO referrals (referred_customer_id, attributed, referrer_id, code, submitted_at, status, flags,
                           reward_cents, qualifying_payment_id, approve_after)
    SELECT 'ref-' || g || '-' || i, true, 'payee-' || g, 'BENCH' || g,
           CAST(:now AS timestamptz) - interval '30 days' + make_interval(mins => i),
           CASE WHEN (g + i) % 4 = 0 THEN 'pending' ELSE 'approved' END, CAST('[]' AS json),
           {_REWARD}, 'pay-' || g || '-' || i,
           CAST(:now AS timestamptz) - interval '14 days' + make_interval(mins => (7 * g + i) % 10000)
    FROM generate_series(1, :payees) g, generate_series(1, 1 + g % 3) i
    """,
    """
    INSERT INTO referral_history (referral_id, status, at, reason)
    SELECT id, 'awaiting_payment', submitted_at, NULL FROM referrals
    UNION ALL
    SELECT id, 'pending', approve_after - interval '14 days',
           'first payment ' || qualifying_payment_id || '; held until ' || to_char(approve_after, 'YYYY-MM-DD')
    FROM referrals
    UNION ALL
    SELECT id, 'approved', approve_after, 'hold period over' FROM referrals WHERE status = 'approved'
    ORDER BY 1, 3
    """,
    # The clawbacks: an older reward paid last Friday, then refunded.
    f"""
    INSERT INTO payouts (payee_id, period, method, gateway, amount_cents, currency, status, idempotency_key,
                         external_reference, attempts, last_tried_at, created_at, paid_at)
    SELECT 'payee-' || g, CAST(:period AS text), :method, :gateway, {_REWARD}, :currency, 'paid',
           {_PAYOUT_KEY.format(payee="'payee-' || g")}, 'tr_old_' || g, 1,
           CAST(:paid_at AS timestamptz), CAST(:paid_at AS timestamptz), CAST(:paid_at AS timestamptz)
    FROM generate_series(1, :payees) g WHERE {_CLAWED_BACK}
    """,
    """
    INSERT INTO referrals (referred_customer_id, attributed, referrer_id, code, submitted_at, status, flags,
                           reward_cents, qualifying_payment_id, approve_after, payout_id)
    SELECT 'ref-' || payee_id || '-old', true, payee_id, 'OLD', created_at - interval '30 days', 'paid', CAST('[]' AS json),
           amount_cents, 'pay-old-' || payee_id, created_at - interval '1 day', id
    FROM payouts WHERE period = CAST(:period AS text)
    """,
    "INSERT INTO payout_items (payout_id, referral_id, amount_cents) SELECT payout_id, id, reward_cents FROM referrals WHERE status = 'paid'",
    """
    INSERT INTO referral_clawbacks (referral_id, payee_id, amount_cents, created_at)
    SELECT id, referrer_id, reward_cents, CAST(:now AS timestamptz) - interval '2 days' FROM referrals WHERE status = 'paid'
    """,
]

EXPECTED_TOTALS = """
SELECT payee_id, sum(amount) AS total FROM (
    SELECT referrer_id AS payee_id, reward_cents AS amount FROM referrals WHERE status IN ('pending', 'approved')
    UNION ALL
    SELECT payee_id, -amount_cents FROM referral_clawbacks WHERE payout_id IS NULL
) due GROUP BY payee_id
"""


async def _seed(db: Database, payees: int, mode: Mode) -> dict[str, tuple[int, str]]:
    """Fresh data; returns each payee's expected (amount, idempotency key) for the Friday."""
    rewards = RULES.rewards_cents
    last_friday = FRIDAY - timedelta(days=7)
    params = {
        "payees": payees,
        "method": mode.method,
        "gateway": METHOD_GATEWAYS[mode.method],
        "now": FRIDAY,
        "paid_at": last_friday,
        "period": RULES.calendar.weekly_period(last_friday),
        "currency": RULES.currency,
        "partner": rewards[ReferrerKind.PARTNER],
        "employee": rewards[ReferrerKind.EMPLOYEE],
        "customer": rewards[ReferrerKind.CUSTOMER],
    }
    async with db.begin() as connection:
        await connection.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
        for statement in SEED:
            await connection.execute(text(statement), params)
        totals = {row.payee_id: row.total for row in await connection.execute(text(EXPECTED_TOTALS))}
    async with db.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        await connection.execute(text("VACUUM ANALYZE"))
    assert len(totals) == payees and min(totals.values()) >= RULES.minimum_payout_cents, "every payee must get a payout"
    period = RULES.calendar.weekly_period(FRIDAY)
    return {payee: (total, payout_key(payee, period)) for payee, total in totals.items()}


async def _count_due_rewards(db: Database) -> int:
    async with db.connect() as connection:
        return await connection.scalar(text("SELECT count(*) FROM referrals WHERE status IN ('pending', 'approved')"))


# ---------------------------------------------------------------- the baseline

BASELINE = [
    # Release: the hold is over.
    """
    WITH released AS (
        UPDATE referrals SET status = 'approved', updated_at = now()
        WHERE status = 'pending' AND approve_after <= CAST(:now AS timestamptz) RETURNING id
    )
    INSERT INTO referral_history (referral_id, status, at, reason)
    SELECT id, 'approved', CAST(:now AS timestamptz), 'hold period over' FROM released ORDER BY id
    """,
    # One payout per payee: approved rewards less open clawbacks.
    f"""
    INSERT INTO payouts (payee_id, period, method, gateway, amount_cents, currency, status, idempotency_key, created_at)
    SELECT due.payee_id, CAST(:period AS text), r.payout_method, COALESCE(m.gateway, 'manual'),
           due.total, :currency, 'pending', {_PAYOUT_KEY.format(payee="due.payee_id")}, CAST(:now AS timestamptz)
    FROM (
        SELECT payee_id, sum(amount) AS total FROM (
            SELECT referrer_id AS payee_id, reward_cents AS amount FROM referrals WHERE status = 'approved'
            UNION ALL
            SELECT payee_id, -amount_cents FROM referral_clawbacks WHERE payout_id IS NULL
        ) items GROUP BY payee_id HAVING sum(amount) >= :minimum
    ) due
    JOIN referrers r ON r.referrer_id = due.payee_id
    LEFT JOIN unnest(CAST(:methods AS text[]), CAST(:gateways AS text[])) AS m (method, gateway) ON m.method = r.payout_method
    ORDER BY due.payee_id
    """,
    """
    INSERT INTO payout_items (payout_id, referral_id, clawback_id, amount_cents)
    SELECT p.id, r.id, NULL, r.reward_cents
    FROM referrals r JOIN payouts p ON p.payee_id = r.referrer_id AND p.period = CAST(:period AS text)
    WHERE r.status = 'approved'
    UNION ALL
    SELECT p.id, NULL, c.id, -c.amount_cents
    FROM referral_clawbacks c JOIN payouts p ON p.payee_id = c.payee_id AND p.period = CAST(:period AS text)
    WHERE c.payout_id IS NULL
    """,
    """
    UPDATE referral_clawbacks c SET payout_id = i.payout_id
    FROM payout_items i WHERE i.clawback_id = c.id AND c.payout_id IS NULL
    """,
    # The rewards into their payout (and, when the gateway pays, paid with it).
    """
    WITH moved AS (
        UPDATE referrals r SET status = CAST(:reward_status AS text), payout_id = i.payout_id, updated_at = now()
        FROM payout_items i JOIN payouts p ON p.id = i.payout_id AND p.period = CAST(:period AS text)
        WHERE i.referral_id = r.id AND r.status = 'approved'
        RETURNING r.id, r.payout_id
    )
    INSERT INTO referral_history (referral_id, status, at, reason)
    SELECT id, 'in_payout', CAST(:now AS timestamptz), 'payout ' || payout_id FROM moved
    UNION ALL
    SELECT id, 'paid', CAST(:paid_at AS timestamptz), 'payout ' || payout_id || ' paid' FROM moved WHERE CAST(:reward_status AS text) = 'paid'
    """,
]
#: Then the payouts sent, by mode: exported by the manual gateway, or paid.
SENT = {
    "exported": """
    UPDATE payouts SET status = 'exported', attempts = attempts + 1, last_tried_at = CAST(:paid_at AS timestamptz),
                       leased_until = NULL, last_error = NULL
    WHERE period = CAST(:period AS text) AND status = 'pending'
    """,
    "paid": """
    UPDATE payouts SET status = 'paid', attempts = attempts + 1, last_tried_at = CAST(:paid_at AS timestamptz),
                       paid_at = CAST(:paid_at AS timestamptz), external_reference = 'tr_bench_' || id,
                       leased_until = NULL, last_error = NULL
    WHERE period = CAST(:period AS text) AND status = 'pending'
    """,
}


async def _baseline(db: Database, mode: Mode) -> float:
    """Seconds for the set-based statements, one transaction."""
    params = {
        "now": FRIDAY,
        "paid_at": datetime.now(UTC),
        "period": RULES.calendar.weekly_period(FRIDAY),
        "currency": RULES.currency,
        "minimum": RULES.minimum_payout_cents,
        "methods": list(METHOD_GATEWAYS),
        "gateways": list(METHOD_GATEWAYS.values()),
        "reward_status": mode.reward_status,
    }
    started = time.perf_counter()
    async with db.begin() as connection:
        for statement in [*BASELINE, SENT[mode.payout_status]]:
            await connection.execute(text(statement), params)
    return time.perf_counter() - started


# ---------------------------------------------------------------- pay_referrals


@dataclass
class PhaseStats:
    seconds: float = 0.0
    statements: int = 0
    transactions: int = 0


@dataclass
class BatchResult:
    seconds: float = 0.0
    calls: int = 0
    first_call_seconds: float = 0.0
    first_call_sent: int = 0
    created: int = 0
    sent: int = 0
    phases: dict[str, PhaseStats] = field(default_factory=lambda: defaultdict(PhaseStats))


class SqlCounter:
    """Counts the statements SQLAlchemy sends and the connections the unit of work checks out."""

    def __init__(self, db: Database) -> None:
        self.statements = 0
        self.checkouts = 0
        event.listen(db.engine.sync_engine, "before_cursor_execute", self._statement)
        event.listen(db.engine.sync_engine.pool, "checkout", self._checkout)

    def _statement(self, *_args: object) -> None:
        self.statements += 1

    def _checkout(self, *_args: object) -> None:
        self.checkouts += 1


@contextlib.contextmanager
def _timed_phases(counter: SqlCounter, result: BatchResult):
    """Wrap pay_referrals's three phases (module globals it looks up at call time) to time them."""

    def timed(name: str, phase):
        async def wrapper(*args, **kwargs):
            started, statements, checkouts = time.perf_counter(), counter.statements, counter.checkouts
            try:
                return await phase(*args, **kwargs)
            finally:
                stats = result.phases[name]
                stats.seconds += time.perf_counter() - started
                stats.statements += counter.statements - statements
                stats.transactions += counter.checkouts - checkouts

        return wrapper

    with contextlib.ExitStack() as stack:
        for name in PHASES:
            stack.enter_context(mock.patch.object(payouts, name, timed(name, getattr(payouts, name))))
        yield


async def _pay_referrals(db: Database, max_calls: int, mode: Mode) -> BatchResult:
    """Call pay_referrals (as the hourly actor would) until every payout of the batch is sent."""
    counter = SqlCounter(db)
    gateways = {METHOD_GATEWAYS[mode.method]: mode.gateway}
    result = BatchResult()
    with _timed_phases(counter, result):
        while result.calls == 0 or result.sent < result.created:
            if result.calls >= max_calls:
                raise RuntimeError(f"{result.sent}/{result.created} payouts sent after {result.calls} calls")
            started = time.perf_counter()
            run = await payouts.pay_referrals(lambda: SqlUnitOfWork(db), gateways, METHOD_GATEWAYS, FRIDAY, RULES)
            elapsed = time.perf_counter() - started
            assert not run.failed and not run.held_back and set(run.sent) <= {mode.payout_status}, run
            result.seconds += elapsed
            result.calls += 1
            result.created += len(run.created)
            result.sent += run.sent.get(mode.payout_status, 0)
            if result.calls == 1:
                result.first_call_seconds, result.first_call_sent = elapsed, run.sent.get(mode.payout_status, 0)
    return result


# ---------------------------------------------------------------- checking


async def _check(db: Database, expected: dict[str, tuple[int, str]], mode: Mode) -> dict[str, int]:
    """Assert the batch is complete and right; returns the rows it left, by kind, for comparing runs."""
    period = RULES.calendar.weekly_period(FRIDAY)
    async with db.connect() as connection:
        rows = (
            await connection.execute(
                text("SELECT payee_id, amount_cents, idempotency_key FROM payouts WHERE period = :p"), {"p": period}
            )
        ).all()
        paid = {row.payee_id: (row.amount_cents, row.idempotency_key) for row in rows}
        assert len(rows) == len(paid) == len(expected), (
            f"{len(rows)} payouts for {len(paid)} payees, {len(expected)} expected"
        )
        assert paid == expected, "payout amounts or keys differ from the seeded sums"
        mismatched = await connection.scalar(
            text(
                "SELECT count(*) FROM payouts p WHERE p.period = :p AND p.amount_cents <> "
                "(SELECT coalesce(sum(amount_cents), 0) FROM payout_items i WHERE i.payout_id = p.id)"
            ),
            {"p": period},
        )
        assert mismatched == 0, f"{mismatched} payouts differ from the sum of their items"
        unsent = (
            await connection.execute(
                text(
                    "SELECT (SELECT count(*) FROM payouts WHERE (period = :p AND status <> :sent) OR (status = 'paid') <> (paid_at IS NOT NULL)) AS payouts, "
                    "(SELECT count(*) FROM referrals r LEFT JOIN payouts p ON p.id = r.payout_id "
                    " WHERE p.id IS NULL OR r.status <> CASE WHEN p.period = :p THEN :reward ELSE 'paid' END) AS rewards, "
                    "(SELECT count(*) FROM referral_clawbacks WHERE payout_id IS NULL) AS clawbacks"
                ),
                {"p": period, "sent": mode.payout_status, "reward": mode.reward_status},
            )
        ).one()
        assert tuple(unsent) == (0, 0, 0), f"left unsent: {unsent._asdict()}"
        counts = dict(
            (
                await connection.execute(
                    text("SELECT 'history ' || status, count(*) FROM referral_history GROUP BY status")
                )
            ).all()
        )
        for table in ("payouts", "payout_items", "referrals", "referral_clawbacks"):
            counts[table] = await connection.scalar(text(f"SELECT count(*) FROM {table}"))
    return counts


# ---------------------------------------------------------------- the run


def _quiet_production_logging() -> None:
    """The workers' logging (JSON at INFO, every payout line formatted), written to /dev/null."""
    configure_logging("INFO")
    logging.getLogger().handlers[0].setStream(open(os.devnull, "w"))  # noqa: SIM115 - for the process's life


async def run(payees: int, max_calls: int, mode_name: str) -> None:
    assert RULES.calendar.is_payout_day(FRIDAY)
    mode = MODES[mode_name]
    load_at_start = os.getloadavg()[0]
    _quiet_production_logging()
    async with scratch_database() as scratch:
        db = Database(scratch.url)

        expected = await _seed(db, payees, mode)
        baseline_seconds = await _baseline(db, mode)
        baseline_rows = await _check(db, expected, mode)

        assert await _seed(db, payees, mode) == expected
        seeded_rewards = await _count_due_rewards(db)
        batch = await _pay_referrals(db, max_calls, mode)
        batch_rows = await _check(db, expected, mode)
        assert batch_rows == baseline_rows, (
            f"the runs wrote different rows: baseline {baseline_rows}, pay_referrals {batch_rows}"
        )
        await db.dispose()
    _report(
        payees,
        seeded_rewards,
        baseline_seconds,
        batch,
        f"gateway {mode_name}, load {load_at_start:.2f} -> {os.getloadavg()[0]:.2f}",
    )


def _report(payees: int, rewards: int, baseline_seconds: float, batch: BatchResult, conditions: str) -> None:
    baseline_rate = payees / baseline_seconds
    batch_rate = payees / batch.seconds
    print(
        f"payees {payees:,} ({rewards:,} due rewards), Friday {FRIDAY.isoformat()}, {os.cpu_count()} CPUs, {conditions}"
    )
    print(f"  {'':48} {'seconds':>9} {'payees/s':>10}")
    print(f"  {'baseline: set-based SQL, one transaction':48} {baseline_seconds:>9.2f} {baseline_rate:>10,.0f}")
    print(f"  {f'pay_referrals, whole batch ({batch.calls} calls)':48} {batch.seconds:>9.2f} {batch_rate:>10,.0f}")
    print(f"  {f'pay_referrals, first call only ({batch.first_call_sent:,} sent)':48} {batch.first_call_seconds:>9.2f}")
    if batch.calls > 1:
        print(
            f"  (one call sends at most {batch.first_call_sent:,} payouts: the hourly actor needs {batch.calls} runs for this batch)"
        )
    print(
        f"  pay_referrals / baseline {batch_rate / baseline_rate:>34.4f}  (baseline {baseline_rate / batch_rate:,.0f}x faster)"
    )
    print()
    print(
        f"  {'phase (summed over calls)':24} {'seconds':>9} {'share':>6} {'payees/s':>10} {'statements':>11} {'per payee':>9} {'transactions':>12}"
    )
    for name in PHASES:
        stats = batch.phases[name]
        rate = f"{payees / stats.seconds:>10,.0f}" if stats.seconds else f"{'':>10}"
        print(
            f"  {name:24} {stats.seconds:>9.2f} {stats.seconds / batch.seconds:>6.0%} {rate} "
            f"{stats.statements:>11,} {stats.statements / payees:>9.1f} {stats.transactions:>12,}"
        )
    total_statements = sum(s.statements for s in batch.phases.values())
    total_transactions = sum(s.transactions for s in batch.phases.values())
    print(
        f"  {'total':24} {batch.seconds:>9.2f} {'':>6} {'':>10} {total_statements:>11,} {total_statements / payees:>9.1f} {total_transactions:>12,}"
    )
    print(
        "  (statements: SQL sent through SQLAlchemy; each transaction adds three round trips: pool pre-ping, BEGIN, COMMIT)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payees", type=int, default=5_000)
    parser.add_argument(
        "--max-calls",
        type=int,
        default=1_000,
        help="give up if the batch is not sent after this many pay_referrals calls",
    )
    parser.add_argument(
        "--gateway",
        choices=sorted(MODES),
        default="manual",
        help="manual: exported (the default); instant: Stripe Connect paid at once in memory",
    )
    args = parser.parse_args()
    asyncio.run(run(args.payees, args.max_calls, args.gateway))


if __name__ == "__main__":
    main()
