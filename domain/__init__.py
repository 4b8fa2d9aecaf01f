"""Pure credit-ledger rules: no I/O, no clock reads. Every rule takes the moment it applies at."""

from domain.acceptance import EventWindow
from domain.errors import (
    CreditLimitExceeded,
    DomainError,
    HoldConflict,
    InsufficientCredits,
    JobAlreadyCharged,
    MembershipIsFrozen,
    UnknownCustomer,
)
from domain.limits import MAX_BALANCE, MAX_CREDITS_PER_EVENT, MAX_OVERDRAFT
from domain.model import Account, Entry, EntryKind, Hold, HoldStatus, Lot, LotSource, Movement
from domain.policy import CreditPolicy, add_months

__all__ = [
    "Account",
    "CreditLimitExceeded",
    "CreditPolicy",
    "DomainError",
    "Entry",
    "EntryKind",
    "EventWindow",
    "Hold",
    "HoldConflict",
    "HoldStatus",
    "InsufficientCredits",
    "JobAlreadyCharged",
    "MembershipIsFrozen",
    "Lot",
    "LotSource",
    "MAX_BALANCE",
    "MAX_CREDITS_PER_EVENT",
    "MAX_OVERDRAFT",
    "Movement",
    "UnknownCustomer",
    "add_months",
]
