"""Where events travel: the Dramatiq queue and actor that consume them.

A producer in another language writes exactly what `Publisher.publish` writes; see
docs/WIRE_CONTRACT.md for the raw Redis commands.
"""

EVENTS_QUEUE = "credit_events"
APPLY_EVENT_ACTOR = "apply_event"
#: The single keyword argument of the message: the event as a JSON *string*.
EVENT_KWARG = "event"

#: Internal (not for producers): charge requested payment attempts at once.
PAYMENTS_QUEUE = "credit_payments"
CHARGE_ATTEMPTS_ACTOR = "charge_payment_attempts"
