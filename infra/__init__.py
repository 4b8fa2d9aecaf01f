"""Adapters to the outside world: settings, database, broker, logging, clock."""
