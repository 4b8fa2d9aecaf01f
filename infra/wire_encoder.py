"""The workers' message encoder: Dramatiq's JSON, refusing an oversized envelope before decoding it.

Set with ``dramatiq.set_encoder``, it is where every broker's consumer decodes a message (Redis
and RabbitMQ alike), so the size check holds whichever broker delivers. A refusal is a
``DecodeError``: the consumer dead-letters the envelope without decoding it (see
``infra.broker`` for Redis; Dramatiq's RabbitMQ consumer nacks it to its dead-letter queue).
Its text names the size and the reason only, never the envelope: consumers log it.
"""

from __future__ import annotations

import json

from dramatiq.encoder import JSONEncoder, MessageData
from dramatiq.errors import DecodeError

#: The default bound on one message as stored in the broker, in bytes (MAX_MESSAGE_BYTES).
DEFAULT_MAX_MESSAGE_BYTES = 65_536


class MessageTooLarge(DecodeError):
    """An envelope longer than MAX_MESSAGE_BYTES: refused unread."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes is larger than MAX_MESSAGE_BYTES ({limit})", None, None)
        self.size, self.limit = size, limit


class BoundedJSONEncoder(JSONEncoder):
    """JSON messages of at most ``max_bytes``; decoding errors that do not quote the message.

    Dramatiq's own ``JSONEncoder`` puts the whole message in its error text (``%r``), which a
    consumer then logs.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_bytes = max_bytes

    def decode(self, data: bytes) -> MessageData:
        if len(data) > self.max_bytes:
            raise MessageTooLarge(len(data), self.max_bytes)
        try:
            text = data.decode("utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else data
        except UnicodeDecodeError as error:
            raise DecodeError(f"message is not UTF-8 (byte {error.start})", None, None) from None
        try:
            return json.loads(text)
        except (json.JSONDecodeError, RecursionError) as error:
            reason = (
                f"{error.msg} at char {error.pos}" if isinstance(error, json.JSONDecodeError) else "nested too deeply"
            )
            raise DecodeError(f"message is not JSON: {reason}", None, None) from None
