"""A local fake of the parts of Stripe's API we call, served over real HTTP for the real SDK.

Outcomes are scripted per invoice: ``succeed``, ``soft_decline``, ``hard_decline``,
``action_required``, ``server_error`` (500) and ``timeout`` (answers after the client gave
up). Like Stripe's v1 API it saves the first response per Idempotency-Key, 500s included,
and replays it for the same key; a paid invoice cannot be paid again.

Also here: Stripe-shaped objects and genuinely signed webhook deliveries for the tests.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import stripe

OUTCOMES = ("succeed", "soft_decline", "hard_decline", "action_required", "server_error", "timeout")
SOFT_DECLINE = ("insufficient_funds", "Your card has insufficient funds.")
HARD_DECLINE = ("lost_card", "Your card has been declined.")


@dataclass
class Request:
    method: str
    path: str
    idempotency_key: str | None
    authorization: str | None
    form: dict
    at: float


@dataclass
class FakeStripe:
    """Start with ``with FakeStripe() as stripe_server:``; point STRIPE_API_BASE at ``.url``."""

    #: How long a ``timeout`` outcome waits before answering (longer than the client's timeout).
    timeout_delay: float = 3.0
    #: Outcome for an invoice with nothing scripted.
    default_outcome: str = "succeed"
    invoices: dict[str, dict] = field(default_factory=dict)
    subscriptions: dict[str, dict] = field(default_factory=dict)
    transfers: list[dict] = field(default_factory=list)
    #: Outcomes for the next transfers: ``succeed``, ``server_error``, ``timeout`` (made, answer lost), ``no_account``.
    transfer_script: deque = field(default_factory=deque)
    requests: list[Request] = field(default_factory=list)
    _scripts: dict[str, deque] = field(default_factory=dict)
    _saved: dict[str, tuple[str, int, dict]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------ set-up

    def add_invoice(self, invoice: dict) -> dict:
        with self._lock:
            self.invoices[invoice["id"]] = invoice
            subscription = invoice_subscription(invoice)
            if subscription:
                self.subscriptions.setdefault(
                    subscription,
                    {"id": subscription, "object": "subscription", "status": "active", "customer": invoice["customer"]},
                )
        return invoice

    def script(self, invoice_id: str, *outcomes: str) -> None:
        unknown = set(outcomes) - set(OUTCOMES)
        if unknown:
            raise ValueError(f"unknown outcomes {unknown}; use {OUTCOMES}")
        with self._lock:
            self._scripts.setdefault(invoice_id, deque()).extend(outcomes)

    def pay_requests(self, invoice_id: str | None = None) -> list[Request]:
        return [
            r
            for r in self.requests
            if r.method == "POST" and r.path.endswith("/pay") and (invoice_id is None or f"/{invoice_id}/" in r.path)
        ]

    # ------------------------------------------------------------ server

    def __enter__(self) -> FakeStripe:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_DELETE(self) -> None:
                fake._handle(self, "DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        # A short poll: stopping waits for it, once per test that uses the fake.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length).decode() if length else ""
        path = urlparse(handler.path).path
        key = handler.headers.get("Idempotency-Key")
        request = Request(method, path, key, handler.headers.get("Authorization"), parse_qs(body), time.time())
        with self._lock:
            self.requests.append(request)
            saved = self._saved.get(key) if key else None
        if not (request.authorization or "").startswith("Bearer sk_"):
            return _send(handler, 401, _error("invalid_request_error", "Invalid API Key provided"))
        if saved is not None:
            saved_path, status, payload = saved
            if saved_path != f"{method} {path}":
                return _send(
                    handler,
                    400,
                    _error(
                        "idempotency_error", "Keys for idempotent requests can only be used with the same parameters"
                    ),
                )
            return _send(handler, status, payload, replayed=True)
        status, payload, delay = self._route(method, path, request.form, urlparse(handler.path).query)
        if key and method == "POST":
            with self._lock:
                self._saved[key] = (f"{method} {path}", status, payload)
        if delay:
            time.sleep(delay)
        _send(handler, status, payload)

    def _route(self, method: str, path: str, form: dict | None = None, query: str = "") -> tuple[int, dict, float]:
        parts = path.strip("/").split("/")
        with self._lock:
            if parts == ["v1", "transfers"] and method == "POST":
                return self._transfer(form or {})
            if parts == ["v1", "transfers"] and method == "GET":
                group = (parse_qs(query).get("transfer_group") or [None])[0]
                found = [t for t in self.transfers if group is None or t["transfer_group"] == group]
                return 200, {"object": "list", "data": found[:1], "has_more": len(found) > 1, "url": "/v1/transfers"}, 0
            if len(parts) == 3 and parts[:2] == ["v1", "invoices"] and method == "GET":
                invoice = self.invoices.get(parts[2])
                return (200, invoice, 0) if invoice else (404, _missing("invoice", parts[2]), 0)
            if len(parts) == 4 and parts[:2] == ["v1", "invoices"] and parts[3] == "pay" and method == "POST":
                return self._pay(parts[2])
            if len(parts) == 3 and parts[:2] == ["v1", "subscriptions"] and method == "DELETE":
                subscription = self.subscriptions.get(parts[2])
                if subscription is None:
                    return 404, _missing("subscription", parts[2]), 0
                subscription["status"] = "canceled"
                return 200, subscription, 0
        return 404, _error("invalid_request_error", f"Unrecognized request URL ({method}: {path})"), 0

    def _transfer(self, form: dict) -> tuple[int, dict, float]:
        outcome = self.transfer_script.popleft() if self.transfer_script else "succeed"
        if outcome == "server_error":
            return 500, _error("api_error", "An unknown error occurred"), 0
        if outcome == "no_account":
            return 400, _error("invalid_request_error", "No such destination", code="resource_missing"), 0
        first = lambda name: (form.get(name) or [None])[0]  # noqa: E731
        transfer = {
            "id": f"tr_{next(_ids)}",
            "object": "transfer",
            "amount": int(first("amount")),
            "currency": first("currency"),
            "destination": first("destination"),
            "transfer_group": first("transfer_group"),
            "metadata": {
                key[len("metadata[") : -1]: values[0] for key, values in form.items() if key.startswith("metadata[")
            },
        }
        self.transfers.append(transfer)
        return 200, transfer, self.timeout_delay if outcome == "timeout" else 0

    def _pay(self, invoice_id: str) -> tuple[int, dict, float]:
        invoice = self.invoices.get(invoice_id)
        if invoice is None:
            return 404, _missing("invoice", invoice_id), 0
        if invoice["status"] == "paid":
            return 400, _error("invalid_request_error", "Invoice is already paid", code="invoice_already_paid"), 0
        if invoice["status"] != "open":
            return (
                400,
                _error(
                    "invalid_request_error",
                    f"You can only pay an open invoice; this one is {invoice['status']}",
                    code="invoice_not_open",
                ),
                0,
            )
        script = self._scripts.get(invoice_id)
        outcome = script.popleft() if script else self.default_outcome
        if outcome == "succeed":
            mark_paid(invoice)
            return 200, invoice, 0
        if outcome == "timeout":
            # The charge goes through; the answer comes too late for the client.
            mark_paid(invoice)
            return 200, invoice, self.timeout_delay
        if outcome == "server_error":
            return 500, _error("api_error", "An unknown error occurred"), 0
        if outcome == "action_required":
            return (
                402,
                _error(
                    "card_error",
                    "This payment requires authentication.",
                    code="authentication_required",
                    decline_code="authentication_required",
                ),
                0,
            )
        decline_code, message = SOFT_DECLINE if outcome == "soft_decline" else HARD_DECLINE
        return 402, _error("card_error", message, code="card_declined", decline_code=decline_code), 0


def _send(handler: BaseHTTPRequestHandler, status: int, payload: dict, replayed: bool = False) -> None:
    data = json.dumps(payload).encode()
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Request-Id", f"req_{next(_ids)}")
        if replayed:
            handler.send_header("Idempotent-Replayed", "true")
        handler.end_headers()
        handler.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client gave up (a scripted timeout)


def _error(kind: str, message: str, code: str | None = None, decline_code: str | None = None) -> dict:
    error = {"type": kind, "message": message}
    if code:
        error["code"] = code
    if decline_code:
        error["decline_code"] = decline_code
    return {"error": error}


def _missing(kind: str, object_id: str) -> dict:
    return _error("invalid_request_error", f"No such {kind}: '{object_id}'", code="resource_missing")


_ids = itertools.count(1)


# ---------------------------------------------------------------- Stripe-shaped objects


def invoice(
    invoice_id: str,
    stripe_customer: str,
    *,
    price: str = "price_basic",
    quantity: int = 1,
    amount: int = 4900,
    subscription: str | None = "sub_1",
    status: str = "open",
    created: int | None = None,
    price_metadata: dict | None = None,
    legacy_shape: bool = False,
) -> dict:
    """An invoice as the current API version shapes it (or the pre-2025 shape with ``legacy_shape``)."""
    created = created or int(time.time())
    line = {"id": f"il_{invoice_id}", "object": "line_item", "quantity": quantity, "amount": amount}
    if legacy_shape:
        line["price"] = {"id": price, "object": "price", "metadata": price_metadata or {}}
    else:
        line["pricing"] = {"type": "price_details", "price_details": {"price": price, "product": "prod_1"}}
    body = {
        "id": invoice_id,
        "object": "invoice",
        "customer": stripe_customer,
        "status": status,
        "currency": "usd",
        "amount_due": amount,
        "amount_paid": amount if status == "paid" else 0,
        "created": created,
        "hosted_invoice_url": f"https://invoice.stripe.com/i/acct_1/{invoice_id}",
        "lines": {"object": "list", "data": [line], "has_more": False},
        "status_transitions": {"finalized_at": created, "paid_at": created if status == "paid" else None},
    }
    if legacy_shape:
        body["subscription"] = subscription
        body["payment_intent"] = f"pi_{invoice_id}"
        body["charge"] = f"ch_{invoice_id}"
    else:
        body["parent"] = (
            {"type": "subscription_details", "subscription_details": {"subscription": subscription}}
            if subscription
            else None
        )
    return body


def mark_paid(invoice_body: dict, at: int | None = None) -> dict:
    invoice_body["status"] = "paid"
    invoice_body["amount_paid"] = invoice_body["amount_due"]
    invoice_body["status_transitions"]["paid_at"] = at or int(time.time())
    return invoice_body


def invoice_subscription(invoice_body: dict) -> str | None:
    return invoice_body.get("subscription") or (
        (invoice_body.get("parent") or {}).get("subscription_details") or {}
    ).get("subscription")


_event_ids = itertools.count(1)


def event(
    event_type: str,
    obj: dict,
    *,
    created: int | None = None,
    event_id: str | None = None,
    previous_attributes: dict | None = None,
) -> dict:
    data = {"object": obj}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    return {
        "id": event_id or f"evt_{int(time.time() * 1000)}_{next(_event_ids)}",
        "object": "event",
        "api_version": "2026-10-28.endive",
        "type": event_type,
        "created": created or int(time.time()),
        "livemode": False,
        "data": data,
    }


def signed(event_body: dict | str, secret: str, timestamp: int | None = None) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a genuine delivery, signed like Stripe signs it."""
    payload = event_body if isinstance(event_body, str) else json.dumps(event_body)
    header = stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=timestamp)
    return payload.encode(), {"Stripe-Signature": header, "Content-Type": "application/json"}
