"""A no-op actor on the workers' own broker and middleware: ``bench.end_to_end``'s ceiling (b).

    dramatiq bench.noop_actors --processes P --threads T

Run like ``dramatiq workers.actors`` (same settings, same middleware, an async actor on the
same event-loop thread), so what it drains per second is what Dramatiq and our middleware
allow those processes and threads, with the ledger's work taken out.
"""

import dramatiq

from bench.ceilings import NOOP_ACTOR, NOOP_QUEUE
from workers.broker import broker


@dramatiq.actor(actor_name=NOOP_ACTOR, queue_name=NOOP_QUEUE, broker=broker, max_retries=0)
async def bench_noop() -> None:
    """Nothing: the message is fetched, run and acknowledged."""
