"""Pure credit-ledger rules: no I/O, no clock reads. Every rule takes the moment it applies at."""

from domain.acceptance import EventWindow
from domain.errors import (
    DomainError,
    HoldConflict,
    InsufficientCredits,
    JobAlreadyCharged,
    MembershipFrozen,
    NoActiveHold,
    UnknownCustomer,
)
from domain.model import Account, Entry, EntryKind, Hold, HoldStatus, Lot, LotSource, Movement
from domain.policy import CreditPolicy, add_months

__all__ = [
    "Account",
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
    "MembershipFrozen",
    "Lot",
    "LotSource",
    "Movement",
    "NoActiveHold",
    "UnknownCustomer",
    "add_months",
]
