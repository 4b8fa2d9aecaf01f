"""The payment provider: Stripe's API (charging, cancelling) and its webhooks (verifying, reading)."""
