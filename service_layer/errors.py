"""Failures the service layer reports to its callers (actors and HTTP routes)."""


class EventConflict(Exception):
    """The same event_id arrived with a different payload: never applied, sent to dead letters."""


class CustomerNotFound(LookupError):
    def __init__(self, customer_id: str) -> None:
        super().__init__(f"no customer {customer_id!r}")
        self.customer_id = customer_id
