"""Failures the service layer reports to its callers (actors and HTTP routes)."""


class EventConflict(Exception):
    """The same event_id arrived with a different payload: never applied, sent to dead letters."""


class CustomerNotFound(LookupError):
    def __init__(self, customer_id: str) -> None:
        super().__init__(f"no customer {customer_id!r}")
        self.customer_id = customer_id


class NothingOwed(Exception):
    """The customer has no unpaid invoice: there is nothing to retry."""

    def __init__(self, customer_id: str) -> None:
        super().__init__(f"customer {customer_id!r} has no unpaid invoice")


class RetryLimited(Exception):
    """The customer asked for immediate charges too often; ``retry_after`` says when they may again."""

    def __init__(self, customer_id: str, retry_after) -> None:
        super().__init__(
            f"customer {customer_id!r} may retry the payment again in {int(retry_after.total_seconds()) + 1} s"
        )
        self.retry_after = retry_after
