"""The process's Dramatiq broker. Import this before declaring or sending actors."""

import dramatiq

from infra.broker import make_broker
from infra.logging import configure_logging
from infra.wire_encoder import BoundedJSONEncoder
from workers.middleware import install
from workers.runtime import get_runtime

_settings = get_runtime().settings
configure_logging(_settings.log_level, _settings.log_max_value_chars)
# Before any consumer decodes: an oversized message is refused unread, whichever the broker.
dramatiq.set_encoder(BoundedJSONEncoder(_settings.max_message_bytes))
broker = install(make_broker(_settings))
dramatiq.set_broker(broker)
