"""The Account aggregate's PostgreSQL statements: one to lock and load a batch, one to write it.

Both take their rows as arrays (``unnest``), so a batch of 1 and a batch of 1,000 cost one
round trip each, and they go to asyncpg as they are (``exec_driver_sql``): no per-parameter
processing by SQLAlchemy. Only live state is read: lots with credit left, active holds, and
of the history only what the caller names (charged job ids, spent payment lots).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from domain import Account, Hold, HoldStatus, Lot, LotSource

#: The customer part: $1 ids (sorted), $2 the ids that may be created, $3 lock_timeout (NULL
#: keeps the session's). Locking comes after the inserts and the timeout (the one-time filters).
_LOCK = """
WITH settings AS MATERIALIZED (
    SELECT set_config('lock_timeout', coalesce($3::text, current_setting('lock_timeout')), true) AS lock_timeout
), created AS (
    INSERT INTO customers (customer_id)
    SELECT id FROM unnest($2::text[]) AS id WHERE (SELECT lock_timeout FROM settings) IS NOT NULL ORDER BY id
    ON CONFLICT (customer_id) DO NOTHING
    RETURNING customer_id
), locked AS MATERIALIZED (
    SELECT c.customer_id, c.xmin::text AS version, c.overdraft, c.credits_depleted_at, c.frozen_since, c.unfrozen_at
    FROM unnest($1::text[]) AS asked(id) JOIN customers c ON c.customer_id = asked.id
    WHERE (SELECT count(*) FROM created) >= 0 AND (SELECT lock_timeout FROM settings) IS NOT NULL
    ORDER BY c.customer_id
    FOR UPDATE OF c {skip}
), seen AS (
    -- The statement's snapshot of the same rows: when a writer committed while we waited for
    -- its lock, the locked version is newer than the snapshot the rest of this statement reads.
    SELECT c.customer_id, c.xmin::text AS version FROM unnest($1::text[]) AS asked(id) JOIN customers c ON c.customer_id = asked.id
)"""

#: The live state of each locked customer; $4/$5 (customer, job) pairs asked about, $6/$7
#: (customer, payment) pairs whose lots are wanted even when spent. History is reached only
#: from those pairs (index probes), never by scanning a customer's rows.
_LOAD = """, lot_rows AS (
    SELECT o.* FROM locked l JOIN credit_lots o ON o.customer_id = l.customer_id AND o.remaining > 0
    UNION ALL
    SELECT p.* FROM unnest($6::text[], $7::text[]) AS q(customer, payment)
    JOIN credit_lots p ON p.payment_id = q.payment AND p.customer_id = q.customer AND p.remaining = 0
), lots AS (
    SELECT customer_id, array_agg(id) AS ids, array_agg(amount) AS amounts, array_agg(remaining) AS remainings, array_agg(issued_at) AS issued,
           array_agg(expires_at) AS expires, array_agg(source) AS sources, array_agg(event_id) AS events, array_agg(payment_id) AS payments,
           array_agg(paid_cents) AS paid, array_agg(reversed) AS reversed, array_agg(expired) AS expired
    FROM lot_rows GROUP BY customer_id
), active_holds AS (
    SELECT h.customer_id, array_agg(h.id) AS ids, array_agg(h.job_id) AS jobs, array_agg(h.credits) AS credits,
           array_agg(h.placed_at) AS placed, array_agg(h.expires_at) AS expires
    FROM locked l JOIN holds h ON h.customer_id = l.customer_id AND h.status = 'active'
    GROUP BY h.customer_id
), charged AS (
    SELECT e.customer_id, array_agg(e.job_id) AS jobs
    FROM unnest($4::text[], $5::text[]) AS q(customer, job)
    JOIN ledger_entries e ON e.customer_id = q.customer AND e.job_id = q.job AND e.kind IN ('debited', 'captured')
    GROUP BY e.customer_id
)
SELECT l.customer_id, l.version = s.version AS fresh, false AS created, l.overdraft, l.credits_depleted_at, l.frozen_since, l.unfrozen_at,
       lots.ids, lots.amounts, lots.remainings, lots.issued, lots.expires, lots.sources, lots.events, lots.payments, lots.paid, lots.reversed, lots.expired,
       hs.ids, hs.jobs, hs.credits, hs.placed, hs.expires, coalesce(charged.jobs, '{}')
FROM locked l JOIN seen s ON s.customer_id = l.customer_id
LEFT JOIN lots ON lots.customer_id = l.customer_id
LEFT JOIN active_holds hs ON hs.customer_id = l.customer_id
LEFT JOIN charged ON charged.customer_id = l.customer_id
UNION ALL
SELECT customer_id, true, true, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '{}'
FROM created
"""

#: Lock (waiting, or passing over rows others hold) and load, in one statement.
LOCK_AND_LOAD = _LOCK.format(skip="") + _LOAD
LOCK_AVAILABLE_AND_LOAD = _LOCK.format(skip="SKIP LOCKED") + _LOAD

#: Every write of a batch of accounts in one statement. New rows take their ids from their
#: sequences first (materialised CTEs), so entries and movements can point at new lots by
#: position in the batch (``*_new``: 1-based, NULL for a stored lot). Closed holds are updated
#: before new ones are inserted (the one-active-hold-per-job index).
WRITE = """
WITH lot_updates AS (
    UPDATE credit_lots l SET remaining = u.remaining, reversed = u.reversed, expired = u.expired, expires_at = u.expires_at
    FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::timestamptz[]) AS u(id, remaining, reversed, expired, expires_at)
    WHERE l.id = u.id
), new_lots AS MATERIALIZED (
    SELECT nextval('credit_lots_id_seq') AS id, n.*
    FROM unnest($6::text[], $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::timestamptz[], $12::timestamptz[], $13::text[], $14::bigint[], $15::bigint[], $16::bigint[])
         WITH ORDINALITY AS n(customer_id, source, event_id, amount, remaining, issued_at, expires_at, payment_id, paid_cents, reversed, expired, position)
), lot_inserts AS (
    INSERT INTO credit_lots (id, customer_id, source, event_id, amount, remaining, issued_at, expires_at, payment_id, paid_cents, reversed, expired)
    SELECT id, customer_id, source, event_id, amount, remaining, issued_at, expires_at, payment_id, paid_cents, reversed, expired FROM new_lots
), hold_updates AS (
    UPDATE holds h SET status = u.status, closed_at = u.closed_at
    FROM unnest($17::bigint[], $18::text[], $19::timestamptz[]) AS u(id, status, closed_at)
    WHERE h.id = u.id
    RETURNING h.id
), new_holds AS MATERIALIZED (
    SELECT nextval('holds_id_seq') AS id, n.*
    FROM unnest($20::text[], $21::text[], $22::bigint[], $23::timestamptz[], $24::timestamptz[], $25::text[], $26::timestamptz[])
         WITH ORDINALITY AS n(customer_id, job_id, credits, placed_at, expires_at, status, closed_at, position)
), hold_inserts AS (
    INSERT INTO holds (id, customer_id, job_id, credits, placed_at, expires_at, status, closed_at)
    SELECT id, customer_id, job_id, credits, placed_at, expires_at, status, closed_at FROM new_holds
    WHERE (SELECT count(*) FROM hold_updates) >= 0
), new_entries AS MATERIALIZED (
    SELECT nextval('ledger_entries_id_seq') AS id, e.*
    FROM unnest($27::text[], $28::text[], $29::bigint[], $30::bigint[], $31::bigint[], $32::timestamptz[], $33::text[], $34::text[], $35::bigint[], $36::bigint[], $37::text[])
         WITH ORDINALITY AS e(customer_id, kind, credits, balance_after, overdraft_change, occurred_at, event_id, job_id, lot_id, lot_new, note, position)
), entry_inserts AS (
    INSERT INTO ledger_entries (id, customer_id, kind, credits, balance_after, overdraft_change, occurred_at, event_id, job_id, lot_id, note)
    SELECT e.id, e.customer_id, e.kind, e.credits, e.balance_after, e.overdraft_change, e.occurred_at, e.event_id, e.job_id, coalesce(e.lot_id, n.id), e.note
    FROM new_entries e LEFT JOIN new_lots n ON n.position = e.lot_new
), movement_inserts AS (
    INSERT INTO lot_movements (entry_id, lot_id, credits)
    SELECT e.id, coalesce(m.lot_id, n.id), m.credits
    FROM unnest($38::bigint[], $39::bigint[], $40::bigint[], $41::bigint[]) AS m(entry, lot_id, lot_new, credits)
    JOIN new_entries e ON e.position = m.entry LEFT JOIN new_lots n ON n.position = m.lot_new
), customer_updates AS (
    UPDATE customers c SET balance = u.balance, overdraft = u.overdraft, credits_depleted_at = u.depleted_at,
        frozen_since = u.frozen_since, unfrozen_at = u.unfrozen_at, updated_at = now()
    FROM unnest($42::text[], $43::bigint[], $44::bigint[], $45::timestamptz[], $46::timestamptz[], $47::timestamptz[])
         AS u(customer_id, balance, overdraft, depleted_at, frozen_since, unfrozen_at)
    WHERE c.customer_id = u.customer_id
)
SELECT 'lot' AS kind, position, id FROM new_lots UNION ALL SELECT 'hold', position, id FROM new_holds
"""


def lock_parameters(
    customer_ids: Sequence[str],
    create: Iterable[str],
    job_ids: Mapping[str, Iterable[str]],
    payment_ids: Mapping[str, Iterable[str]],
    wait_at_most: timedelta | None,
) -> tuple:
    """LOCK_AND_LOAD's parameters; ``customer_ids`` sorted (locks are taken in id order)."""
    asked = set(customer_ids)
    jobs = [(customer_id, job) for customer_id, jobs in job_ids.items() if customer_id in asked for job in jobs]
    payments = [
        (customer_id, payment) for customer_id, ids in payment_ids.items() if customer_id in asked for payment in ids
    ]
    timeout = None if wait_at_most is None else f"{int(wait_at_most.total_seconds() * 1000)}ms"
    return (
        list(customer_ids),
        sorted(set(create) & asked),
        timeout,
        [customer for customer, _ in jobs],
        [job for _, job in jobs],
        [customer for customer, _ in payments],
        [payment for _, payment in payments],
    )


def account_from_row(row) -> Account:
    """An Account from one LOCK_AND_LOAD row (its arrays hold the lots and holds)."""
    (customer_id, _, _, overdraft, depleted_at, frozen_since, unfrozen_at, *lot_columns) = row[:18]
    hold_columns = row[18:23]
    lots = [
        Lot(
            amount,
            remaining,
            issued_at,
            expires_at,
            LotSource(source),
            event_id,
            id=lot_id,
            payment_id=payment_id,
            paid_cents=paid,
            reversed=rev,
            expired=exp,
        )
        for lot_id, amount, remaining, issued_at, expires_at, source, event_id, payment_id, paid, rev, exp in zip(
            *_columns(lot_columns), strict=True
        )
    ]
    holds = {
        job_id: Hold(job_id, credits, placed_at, expires_at, HoldStatus.ACTIVE, None, id=hold_id)
        for hold_id, job_id, credits, placed_at, expires_at in zip(*_columns(hold_columns), strict=True)
    }
    return Account(
        customer_id=customer_id,
        lots=lots,
        holds=holds,
        overdraft=overdraft,
        depleted_at=depleted_at,
        frozen_since=frozen_since,
        unfrozen_at=unfrozen_at,
        charged_jobs=set(row[23]),
    )


def _columns(arrays: Sequence[list | None]) -> list[list]:
    # array_agg over no rows is NULL, not an empty array.
    return [array or [] for array in arrays]


@dataclass
class Writes:
    """WRITE's parameters for a batch of accounts, and the new lots and holds awaiting their ids."""

    parameters: tuple
    new_lots: list[Lot]
    new_holds: list[Hold]


def write_parameters(accounts: Sequence[Account], changed_lots: list, changed_holds: list) -> Writes:
    """``changed_lots``/``changed_holds``: (account, item) pairs, each item once."""
    stored_lots = [lot for _, lot in changed_lots if lot.id is not None]
    new_lots = [(account, lot) for account, lot in changed_lots if lot.id is None]
    position = {id(lot): n for n, (_, lot) in enumerate(new_lots, start=1)}
    stored_holds = [hold for _, hold in changed_holds if hold.id is not None]
    new_holds = [(account, hold) for account, hold in changed_holds if hold.id is None]
    entries = [(account, entry) for account in accounts for entry in account.new_entries]
    movements = [(n, movement) for n, (_, entry) in enumerate(entries, start=1) for movement in entry.movements]
    entry_lots = [entry.movements[0].lot if entry.credits > 0 and entry.movements else None for _, entry in entries]
    parameters = (
        *_arrays(stored_lots, lambda lot: (lot.id, lot.remaining, lot.reversed, lot.expired, lot.expires_at), 5),
        *_arrays(
            new_lots,
            lambda pair: (
                pair[0].customer_id,
                pair[1].source.value,
                pair[1].event_id,
                pair[1].amount,
                pair[1].remaining,
                pair[1].issued_at,
                pair[1].expires_at,
                pair[1].payment_id,
                pair[1].paid_cents,
                pair[1].reversed,
                pair[1].expired,
            ),
            11,
        ),
        *_arrays(stored_holds, lambda hold: (hold.id, hold.status.value, hold.closed_at), 3),
        *_arrays(
            new_holds,
            lambda pair: (
                pair[0].customer_id,
                pair[1].job_id,
                pair[1].credits,
                pair[1].placed_at,
                pair[1].expires_at,
                pair[1].status.value,
                pair[1].closed_at,
            ),
            7,
        ),
        *_arrays(
            list(zip(entries, entry_lots, strict=True)),
            lambda item: _entry_row(item[0][0].customer_id, item[0][1], item[1], position),
            11,
        ),
        *_arrays(movements, lambda item: (item[0], item[1].lot.id, position.get(id(item[1].lot)), item[1].credits), 4),
        *_arrays(
            accounts,
            lambda a: (a.customer_id, a.book_balance, a.overdraft, a.depleted_at, a.frozen_since, a.unfrozen_at),
            6,
        ),
    )
    return Writes(parameters, [lot for _, lot in new_lots], [hold for _, hold in new_holds])


def _entry_row(customer_id: str, entry, lot: Lot | None, position: dict[int, int]) -> tuple:
    lot_id = lot.id if lot is not None else None
    lot_new = position.get(id(lot)) if lot is not None and lot_id is None else None
    return (
        customer_id,
        entry.kind.value,
        entry.credits,
        entry.balance_after,
        entry.overdraft_change,
        entry.occurred_at,
        entry.event_id,
        entry.job_id,
        lot_id,
        lot_new,
        entry.note,
    )


def _arrays(items: Sequence, row, width: int) -> list[list]:
    """Column arrays (for unnest) from ``items``, each turned into a row of ``width`` values."""
    if not items:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*(row(item) for item in items), strict=True)]
