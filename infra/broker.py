"""The Redis broker: a real Redis server, or an in-process fakeredis (with Lua) for the embedded default."""

from __future__ import annotations

import dramatiq
import fakeredis
import structlog
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker
from dramatiq.errors import DecodeError

from infra.settings import Settings
from infra.wire_encoder import MessageTooLarge
from messages.wire import CHARGE_ATTEMPTS_ACTOR, PAYMENTS_QUEUE

log = structlog.get_logger("credits.broker")

#: A dispatch.lua command that matches no branch: the script only heartbeats and, forced, maintains.
_MAINTAIN = "maintain"

#: One in-process Redis per process, so the producer and the workers of the embedded default meet.
_EMBEDDED_SERVER = fakeredis.FakeServer()


class DeadLetteringRedisBroker(RedisBroker):
    """A RedisBroker whose consumers dead-letter an envelope that is not a Dramatiq message.

    Dramatiq's Redis consumer raises on such an envelope and stalls every message it had
    prefetched; a producer in another language can write one. Here it goes to the dead-letter
    queue (`<queue>.XQ`) with an error log, and the rest of the batch is delivered. So does an
    envelope larger than MAX_MESSAGE_BYTES: the encoder (``infra.wire_encoder``) refuses it
    before reading it. The log line says why and how big, never what it holds.
    """

    def maintain(self) -> None:
        """Heartbeat, and put back on their queues the fetched messages of processes silent for
        ``heartbeat_timeout``: Dramatiq's own maintenance (dispatch.lua), on every declared queue.

        Dramatiq runs it only by chance (1 in 1,000 commands, per queue), which left a dead
        process's messages stranded for minutes; a worker calls this on a clock instead.
        """
        for queue_name in sorted(self.queues | self.delay_queues):
            self._dispatch(_MAINTAIN)(queue_name)

    def _should_do_maintenance(self, command: str) -> int:
        return 1 if command == _MAINTAIN else super()._should_do_maintenance(command)

    def do_fetch(self, queue_name: str, prefetch: int) -> list:
        batch = self._dispatch("fetch")(queue_name, prefetch)
        refused: dict[bytes, DecodeError] = {}
        for data in batch:
            if data is None:
                continue
            try:
                Message.decode(data)
            except DecodeError as error:
                refused[data] = error
        if refused:
            self._dead_letter(queue_name, refused)
            batch = [data for data in batch if data not in refused]
        return batch

    def _dead_letter(self, queue_name: str, refused: dict[bytes, DecodeError]) -> None:
        # Fetching moved the ids into this broker's ack set; find theirs and nack them (to the XQ).
        acks = f"{self.namespace}:__acks__.{self.broker_id}.{queue_name}"
        messages = f"{self.namespace}:{queue_name}.msgs"
        reasons = {data: error.error or error for data, error in refused.items()}
        # Any envelope over the limit is refused, so one is known by its length: never read twice.
        limit = min((r.limit for r in reasons.values() if isinstance(r, MessageTooLarge)), default=None)
        sizes = {len(data) for data, reason in reasons.items() if not isinstance(reason, MessageTooLarge)}
        for redis_message_id in self.client.smembers(acks):
            size = self.client.hstrlen(messages, redis_message_id)
            if limit is not None and size > limit:
                reason = MessageTooLarge(size, limit)
            elif size in sizes and (data := self.client.hget(messages, redis_message_id)) in reasons:
                reason = reasons[data]
            else:
                continue
            self.do_nack(queue_name, redis_message_id.decode())
            log.error(
                "message_too_large" if isinstance(reason, MessageTooLarge) else "message_undecodable",
                queue=queue_name,
                redis_message_id=redis_message_id.decode(),
                bytes=size,
                reason=f"{type(reason).__name__}: {reason}",
            )


def make_broker(settings: Settings, middleware: list | None = None) -> dramatiq.Broker:
    """The process's broker (workers, scheduler, web): RabbitMQ for an amqp:// BROKER_URL, else
    Redis, or the in-process Redis of the embedded default. ``middleware=None`` keeps Dramatiq's
    defaults. Every process builds its broker here: extend it here."""
    if settings.uses_rabbitmq:
        return rabbitmq_broker(settings.broker_url, middleware)
    timeout_ms = settings.redis_heartbeat_timeout_seconds * 1000
    if settings.broker_address:
        return DeadLetteringRedisBroker(
            url=settings.broker_address, middleware=middleware, heartbeat_timeout=timeout_ms
        )
    return DeadLetteringRedisBroker(
        client=fakeredis.FakeRedis(server=_EMBEDDED_SERVER), middleware=middleware, heartbeat_timeout=timeout_ms
    )


#: The older name, for callers written before RabbitMQ.
redis_broker = make_broker


def rabbitmq_broker(url: str, middleware: list | None = None) -> dramatiq.Broker:
    """Dramatiq's RabbitMQ broker: durable queues, persistent messages, and every publish
    confirmed by RabbitMQ before ``enqueue`` returns. A consumer's unacknowledged messages go
    back to their queue as soon as its connection closes (a dead process: at once)."""
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    return RabbitmqBroker(url=url, confirm_delivery=True, middleware=middleware)


def dead_letter_bodies(broker: dramatiq.Broker, queue_name: str) -> list[bytes]:
    """The raw messages in a queue's dead letters (``<queue>.XQ``), left where they are."""
    from dramatiq.common import xq_name

    if isinstance(broker, RedisBroker):
        return list(broker.client.hgetall(f"{broker.namespace}:{xq_name(queue_name)}.msgs").values())
    import pika

    connection = pika.BlockingConnection(broker.parameters)
    bodies = []
    try:
        channel = connection.channel()
        while True:
            method, _properties, body = channel.basic_get(xq_name(queue_name), auto_ack=False)
            if method is None:
                return bodies
            bodies.append(body)
    except pika.exceptions.ChannelClosedByBroker as error:
        if error.reply_code == 404:  # no dead-letter queue declared yet: nothing dead-lettered
            return bodies
        raise
    finally:
        connection.close()  # never acknowledged: RabbitMQ keeps every one of them queued


def enqueue_charges(broker, attempt_ids: list[int]) -> None:
    """Ask a worker to charge these payment attempts now. If this is lost, the periodic
    ``collect_payments`` charges them within minutes: the attempts are rows in the database."""
    if attempt_ids:
        broker.enqueue(
            Message(
                queue_name=PAYMENTS_QUEUE,
                actor_name=CHARGE_ATTEMPTS_ACTOR,
                args=(),
                kwargs={"attempt_ids": list(attempt_ids)},
                options={},
            )
        )


def is_embedded(settings: Settings) -> bool:
    return not settings.broker_address
