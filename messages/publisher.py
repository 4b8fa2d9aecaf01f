"""The thin producer: turns an event into the Dramatiq message the workers consume.

It needs only dramatiq and redis: no worker code is imported, so a front end can
publish without installing the back end.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from messages.events import Event
from messages.wire import APPLY_EVENT_ACTOR, EVENT_KWARG, EVENTS_QUEUE


class Publisher:
    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker

    @classmethod
    def from_url(cls, redis_url: str) -> "Publisher":
        # No middleware: the producer only enqueues, and must not need worker options.
        return cls(RedisBroker(url=redis_url, middleware=[]))

    def publish(self, event: Event) -> str:
        """Enqueue one event; returns the Dramatiq message id.

        Enqueueing is one atomic Redis script. If it raises, nothing was enqueued and the
        caller should publish again with the same ``event_id``: duplicates are harmless.
        """
        if not isinstance(event, Event):
            raise TypeError(f"publish() takes an event model, not {type(event).__name__}")
        message = dramatiq.Message(
            queue_name=EVENTS_QUEUE,
            actor_name=APPLY_EVENT_ACTOR,
            args=(),
            kwargs={EVENT_KWARG: event.model_dump_json()},
            options={},
        )
        return self.broker.enqueue(message).message_id

    def close(self) -> None:
        self.broker.close()
