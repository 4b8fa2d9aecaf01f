"""The process's Dramatiq broker. Import this before declaring or sending actors."""

import dramatiq

from infra.broker import make_broker
from infra.logging import configure_logging
from workers.middleware import install
from workers.runtime import get_runtime

_settings = get_runtime().settings
configure_logging(_settings.log_level)
broker = install(make_broker(_settings))
dramatiq.set_broker(broker)
