"""How many credits the ledger holds: bounds well inside the 64-bit columns.

Credits are stored as BIGINT (at most 9,223,372,036,854,775,807). The bounds below sit
millions of times lower, so no stored amount, balance or sum of balances can overflow, and
an event that would pass them is refused as a domain error (a dead letter; 409 over HTTP)
instead of failing in the database. docs/LEDGER_RULES.md states them.
"""

#: The most credits one event (a payment, a job, an adjustment, a gift, a hold) may move.
#: messages.events.MAX_CREDITS is the same number (the producer library cannot import this).
MAX_CREDITS_PER_EVENT = 1_000_000

#: The largest balance a customer may hold: 10^12 credits.
MAX_BALANCE = 1_000_000_000_000

#: The largest overdraft (credits owed) a customer may run up: 10^12 credits.
MAX_OVERDRAFT = 1_000_000_000_000
