"""Rule violations. Each carries a message a person can act on."""


class DomainError(Exception):
    """A request the ledger rules refuse."""


class InsufficientCredits(DomainError):
    def __init__(self, customer_id: str, wanted: int, available: int) -> None:
        super().__init__(f"customer {customer_id!r} has {available} credit(s) available and the job needs {wanted}")
        self.customer_id = customer_id
        self.wanted = wanted
        self.available = available


class HoldConflict(DomainError):
    """A hold for this job already exists with a different amount."""


class JobAlreadyCharged(DomainError):
    """A second completion for a job that has already been charged.

    Charging it again would double-spend the customer's credits, so the
    event is refused instead of applied.
    """


class PaymentAlreadyApplied(DomainError):
    """A payment has already issued its credits: a second issuance would double them."""


class PaymentNotApplied(Exception):
    """A reversal arrived for a payment whose credits have not been issued (yet).

    Not a DomainError: the payment may simply be a few messages behind, so it is retried.
    """


class MembershipIsFrozen(DomainError):
    """The membership is paused: no booking, no gifts, until it is unfrozen."""


class CreditLimitExceeded(DomainError):
    """The event would move more credits than one event may, or take a balance or an
    overdraft past its bound (domain/limits.py): refused, never stored."""


class UnknownCustomer(DomainError):
    """The event names a customer the ledger does not know, where it must (a gift's receiver)."""
