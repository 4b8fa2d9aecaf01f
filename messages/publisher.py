"""The thin producer: turns an event into the Dramatiq message the workers consume.

It needs only dramatiq and redis: no worker code is imported, so a front end can
publish without installing the back end.
"""

from __future__ import annotations

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from messages.events import Event
from messages.wire import APPLY_EVENT_ACTOR, EVENT_KWARG, EVENTS_QUEUE

#: A publish never hangs on a broker that has stopped answering: it fails, and is published again.
CONNECT_TIMEOUT_SECONDS = 5
COMMAND_TIMEOUT_SECONDS = 10


class PublishFailed(Exception):
    """The broker did not take the event (unreachable, timed out, or refused it): nothing may
    have been enqueued. Publish the same event again, with the same ``event_id``, until it is
    taken: a duplicate is recognised and applied once. The cause is chained (``__cause__``)."""


class Publisher:
    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker

    @classmethod
    def from_url(cls, redis_url: str) -> "Publisher":
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=CONNECT_TIMEOUT_SECONDS, socket_timeout=COMMAND_TIMEOUT_SECONDS)
        # No middleware: the producer only enqueues, and must not need worker options.
        return cls(RedisBroker(client=client, middleware=[]))

    def publish(self, event: Event) -> str:
        """Enqueue one event; returns the Dramatiq message id.

        Enqueueing is one atomic Redis script. If it raises ``PublishFailed``, the caller
        publishes again with the same ``event_id``: duplicates are harmless.
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
        try:
            return self.broker.enqueue(message).message_id
        except redis.RedisError as error:
            raise PublishFailed(f"event {event.event_id!r} was not published ({type(error).__name__}: {error}); publish it again with the same event_id") from error

    def close(self) -> None:
        self.broker.close()
