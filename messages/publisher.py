"""The thin producer: turns an event into the Dramatiq message the workers consume.

It needs only dramatiq and redis: no worker code is imported, so a front end can
publish without installing the back end.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import dramatiq
import dramatiq.errors
import redis
from dramatiq.brokers.redis import RedisBroker

from messages.events import Event
from messages.wire import APPLY_EVENT_ACTOR, EVENT_KWARG, EVENTS_QUEUE

#: A publish never hangs on a broker that has stopped answering: it fails, and is published again.
CONNECT_TIMEOUT_SECONDS = 5
COMMAND_TIMEOUT_SECONDS = 10


def _with_timeouts(amqp_url: str) -> str:
    """The same URL, with pika's connect and blocked-connection timeouts unless it names its own."""
    parts = urlsplit(amqp_url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("socket_timeout", str(CONNECT_TIMEOUT_SECONDS))
    query.setdefault("blocked_connection_timeout", str(COMMAND_TIMEOUT_SECONDS))
    return urlunsplit(parts._replace(query=urlencode(query)))


class PublishFailed(Exception):
    """The broker did not take the event (unreachable, timed out, or refused it): nothing may
    have been enqueued. Publish the same event again, with the same ``event_id``, until it is
    taken: a duplicate is recognised and applied once. The cause is chained (``__cause__``)."""


class Publisher:
    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker

    @classmethod
    def from_url(cls, url: str) -> Publisher:
        """redis://… (Redis) or amqp://… (RabbitMQ, needs pika: ``dramatiq[rabbitmq]``)."""
        # No middleware: the producer only enqueues, and must not need worker options.
        if url.startswith(("amqp://", "amqps://")):
            from dramatiq.brokers.rabbitmq import RabbitmqBroker

            # Every publish waits for RabbitMQ's confirmation: returned means stored (durable queue, persistent message).
            return cls(RabbitmqBroker(url=_with_timeouts(url), confirm_delivery=True, middleware=[]))
        client = redis.Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT_SECONDS, socket_timeout=COMMAND_TIMEOUT_SECONDS
        )
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
        except (redis.RedisError, dramatiq.errors.BrokerConnectionError) as error:
            raise PublishFailed(
                f"event {event.event_id!r} was not published ({type(error).__name__}: {error}); publish it again with the same event_id"
            ) from error

    def close(self) -> None:
        self.broker.close()
