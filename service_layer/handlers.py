"""The ledger's use cases under one name, as the API, the workers and the tests import them.

Each lives with its use case: applying events in ``events`` (the one apply path over
``apply``), holds and the credit view in ``holds``, the sweeps in ``sweeps``, admins'
actions in ``adjustments``, immediate charges in ``payments``.
"""

from service_layer.adjustments import admin_adjustment, apply_admin_event
from service_layer.apply import Outcome, Rules
from service_layer.events import (
    BATCH_LOCK_WAIT,
    HANDLERS,
    BatchNotApplicable,
    apply_event,
    apply_events,
    apply_in,
    batchable,
)
from service_layer.holds import credit_view, place_hold, release_hold
from service_layer.payments import request_immediate_charges
from service_layer.ports import UnitOfWorkFactory
from service_layer.sweeps import SweepResult, expire_due_credits, lapse_due_holds

__all__ = [
    "BATCH_LOCK_WAIT",
    "HANDLERS",
    "BatchNotApplicable",
    "Outcome",
    "Rules",
    "SweepResult",
    "UnitOfWorkFactory",
    "admin_adjustment",
    "apply_admin_event",
    "apply_event",
    "apply_events",
    "apply_in",
    "batchable",
    "credit_view",
    "expire_due_credits",
    "lapse_due_holds",
    "place_hold",
    "release_hold",
    "request_immediate_charges",
]
