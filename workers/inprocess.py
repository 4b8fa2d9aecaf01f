"""Run Dramatiq workers inside this process: the embedded default (fakeredis) and `credits run`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dramatiq
from dramatiq.common import dq_name


@contextmanager
def running_worker(broker: dramatiq.Broker, threads: int = 1) -> Iterator[dramatiq.Worker]:
    # One thread on SQLite: it has a single writer, and the event loop is shared anyway.
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=200)
    # A deeper prefetch than Dramatiq's 2 per thread keeps the consumer from idling in its
    # back-off while the workers are busy (Worker takes no argument for it).
    worker.queue_prefetch = max(worker.queue_prefetch, 64)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def drain(broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
    """Wait until every declared queue, its delay queue and the worker are idle."""
    while True:
        for queue in sorted(broker.get_declared_queues()):
            broker.join(queue, interval=50)
            broker.join(dq_name(queue), interval=50)
        worker.join()
        if all(broker.do_qsize(q) == 0 and broker.do_qsize(dq_name(q)) == 0 for q in broker.get_declared_queues()):
            return
