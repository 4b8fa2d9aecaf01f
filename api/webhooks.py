"""Stripe's webhook: verified, recorded once, translated into domain events for the workers."""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import APIRouter, Header, HTTPException, Request, status

from api.dependencies import now, publisher, uow
from api.schemas import WebhookReceiptOut
from infra.stripe.webhooks import WebhookRejected, verify
from service_layer import webhooks

log = structlog.get_logger("credits.api")
router = APIRouter()


@router.post(
    "/webhooks/stripe",
    response_model=WebhookReceiptOut,
    responses={
        400: {"description": "Not a genuine, fresh, well-formed Stripe event"},
        503: {"description": "Webhooks are not configured"},
    },
)
async def stripe_webhook(
    request: Request, stripe_signature: Annotated[str | None, Header()] = None
) -> WebhookReceiptOut:
    settings = request.app.state.settings
    secrets_ = [secret.get_secret_value() for secret in settings.stripe_webhook_secrets]
    if not secrets_:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "STRIPE_WEBHOOK_SECRETS is not set")
    publish = publisher(request)
    payload = await request.body()  # at most STRIPE_WEBHOOK_MAX_BODY_BYTES (api.body_limits)
    try:
        event = verify(payload, stripe_signature, secrets_, settings.stripe_webhook_tolerance_seconds)
    except WebhookRejected as error:
        log.warning("stripe_webhook_rejected", reason=str(error), bytes=len(payload))
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(error)) from None
    receipt = await webhooks.receive(uow(request), event, publish, settings.stripe_plan_credits, now(request))
    if receipt.linked_stripe_customer:
        try:
            await webhooks.relay_parked(
                lambda: uow(request),
                publish,
                settings.stripe_plan_credits,
                now(request),
                receipt.linked_stripe_customer,
            )
        except Exception:  # the delivery is recorded; the parked events wait for an admin's relay
            log.exception("parked_relay_failed", stripe_customer_id=receipt.linked_stripe_customer)
    return WebhookReceiptOut(outcome=receipt.outcome, detail=receipt.detail)
