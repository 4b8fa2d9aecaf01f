"""Payout gateways, chosen per payout method by PAYOUT_GATEWAYS."""

from __future__ import annotations

from infra.settings import Settings
from service_layer.payouts import PayoutGateway, PayoutOrder, Sent


class ManualGateway:
    """For methods with no payout API we may use (Cash App has no public one): the payout is
    exported for operations to pay by hand (`GET /api/admin/payouts?status=exported&format=csv`),
    who then record the external reference (`POST /api/admin/payouts/{id}/reference`)."""

    name = "manual"

    async def send(self, order: PayoutOrder) -> Sent:
        return Sent("exported")


def payout_gateways(settings: Settings) -> dict[str, PayoutGateway]:
    """Every gateway this configuration can use, by name (Stripe Connect only with an API key)."""
    gateways: dict[str, PayoutGateway] = {"manual": ManualGateway()}
    if settings.stripe_api_key is not None:
        from infra.stripe.transfers import StripeConnectGateway

        gateways["stripe_connect"] = StripeConnectGateway(settings)
    return gateways
