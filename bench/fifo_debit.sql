-- One FIFO debit of one credit, the fewest statements that make the ledger's writes:
-- pgbench's custom script for bench.end_to_end's ceiling (a). Run on the scratch database
-- of the same run, on customers seeded there ('pgbench-c0' .. 'pgbench-c<customers - 1>',
-- each with enough credit never to run out), one transaction per debit:
--   pgbench -n -M prepared -f bench/fifo_debit.sql -D customers=500 -c 16 -j 2 -T 10 <db>
\set c random(0, :customers - 1)
BEGIN;
-- The event id (the idempotency record): unique per debit.
INSERT INTO processed_events (event_id, event_type, customer_id, fingerprint, payload)
    VALUES (gen_random_uuid()::text, 'JobCompleted', 'pgbench-c' || :c, 'pgbench', '{}')
    RETURNING event_id \gset
SELECT balance FROM customers WHERE customer_id = 'pgbench-c' || :c FOR UPDATE \gset
-- Take from the oldest live lot.
UPDATE credit_lots SET remaining = remaining - 1
    WHERE id = (SELECT id FROM credit_lots
                WHERE customer_id = 'pgbench-c' || :c AND remaining > 0 AND expires_at > now()
                ORDER BY expires_at, issued_at, id LIMIT 1)
    RETURNING id AS lot_id \gset
INSERT INTO ledger_entries (customer_id, kind, credits, balance_after, occurred_at, event_id, job_id, lot_id)
    VALUES ('pgbench-c' || :c, 'debited', -1, :balance - 1, now(), :event_id, :event_id, :lot_id)
    RETURNING id AS entry_id \gset
INSERT INTO lot_movements (entry_id, lot_id, credits) VALUES (:entry_id, :lot_id, 1);
UPDATE customers SET balance = balance - 1, updated_at = now() WHERE customer_id = 'pgbench-c' || :c;
END;
