"""Forged Stripe webhook deliveries are never accepted, never stored and never relayed.

The app runs in-process (httpx over ASGI, its lifespan run) on the test database, with
REDIS_URL set so an accepted delivery really would be published to the workers' queue
(``dramatiq:credit_events``). The forgeries are all built from one genuine delivery that
*would* be relayed (an ``invoice.paid`` for a linked Stripe customer whose price is worth
credits): a wrong secret, one byte changed at every position of the body and the header, a
stale timestamp, a signature for another body or another moment, several ``v1`` signatures
none of which matches, a missing or empty header, and thousands of seeded random mutations
of the body and the header. Every answer must be a 400 (a 413 for an oversized body), the
``stripe_events`` table must stay empty and nothing may be published. The positive control:
the genuine delivery itself is accepted once, relays one event, and its redelivery is a
duplicate that publishes nothing.

A ``FIGURES {...}`` line reports the cases tried, accepted and answered with a 5xx.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import time
import uuid
from collections import Counter

import httpx
import pytest
import redis
from sqlalchemy import func, select

from api.app import create_app
from infra.db import Database
from infra.db.tables import stripe_events
from infra.settings import Settings, load_settings
from tests.support.fake_stripe import event, invoice, mark_paid, signed

ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
FRONTEND_TOKEN = "front-" + uuid.uuid4().hex
OLD_SECRET = "whsec_old" + uuid.uuid4().hex
NEW_SECRET = "whsec_new" + uuid.uuid4().hex
TOLERANCE = 300
SEED = int(os.environ.get("FORGERY_SEED", "4242"))
RANDOM_MUTATIONS = int(os.environ.get("FORGERY_MUTATIONS", "2000"))
QUEUE = "dramatiq:credit_events"
WEBHOOK = "/webhooks/stripe"
MAX_WEBHOOK_BYTES = Settings.model_fields["stripe_webhook_max_body_bytes"].default


class Tally:
    def __init__(self) -> None:
        self.tried = 0
        self.statuses: Counter[int] = Counter()
        self.kinds: Counter[str] = Counter()
        self.bad: list[str] = []
        self.unsendable = 0

    def note(self, kind: str, response: httpx.Response, *allowed: int) -> None:
        self.tried += 1
        self.kinds[kind] += 1
        self.statuses[response.status_code] += 1
        if response.status_code not in (allowed or (400,)) and len(self.bad) < 50:
            request = response.request
            self.bad.append(
                f"{kind}: Stripe-Signature={request.headers.get('stripe-signature', '<none>').encode('latin-1', 'replace')!r} "
                f"body={request.content[:120]!r}{'...' if len(request.content) > 120 else ''} -> {response.status_code} {response.text[:200]!r}"
            )

    @property
    def accepted(self) -> int:
        return sum(n for code, n in self.statuses.items() if 200 <= code < 300)

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.statuses.items() if code >= 500)


def report(capsys: pytest.CaptureFixture, figures: dict) -> None:
    with capsys.disabled():
        print("\nFIGURES " + json.dumps(figures))


def sign(payload: bytes, secret: str, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


@pytest.fixture
async def webhook_app(db: Database, redis_url: str, redis_client: redis.Redis):
    """The app on the emptied test database and a flushed Redis database; a linked Stripe customer."""
    settings = load_settings(
        database_url="postgresql+asyncpg://unused/unused",  # the app is handed the test `db`
        redis_url=redis_url,
        admin_api_token=ADMIN_TOKEN,
        frontend_api_token=FRONTEND_TOKEN,
        stripe_webhook_secrets=f"{OLD_SECRET},{NEW_SECRET}",
        stripe_webhook_tolerance_seconds=TOLERANCE,
        stripe_plan_credits={"price_basic": 10},
        admin_cookie_secure=False,
    )
    app = create_app(settings, db=db)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
            base_url="http://credits.test",
            timeout=20,
        ) as http,
    ):
        linked = await http.put(
            "/api/admin/stripe-customers/cus_forge",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            json={"customer_id": "cust-forge"},
        )
        assert linked.status_code == 200, linked.text
        yield http


async def stored_events(db: Database) -> int:
    async with db.connect() as connection:
        return (await connection.execute(select(func.count()).select_from(stripe_events))).scalar_one()


def published(redis_client: redis.Redis) -> int:
    """Messages on the workers' queue (and any of its side keys: delayed queue, message bodies)."""
    keys = [k.decode() for k in redis_client.scan_iter(match="dramatiq:credit_events*")]
    total = 0
    for key in keys:
        kind = redis_client.type(key).decode()
        total += {
            "list": redis_client.llen,
            "hash": redis_client.hlen,
            "zset": redis_client.zcard,
            "set": redis_client.scard,
        }.get(kind, lambda _k: 1)(key)
    return total


def genuine_event() -> dict:
    body = mark_paid(invoice(f"in_{uuid.uuid4().hex[:12]}", "cus_forge", amount=4900))
    return event("invoice.paid", body, event_id=f"evt_{uuid.uuid4().hex}")


# --------------------------------------------------------------------------- mutations


def genuinely_signed(body: bytes, header: bytes, now: int) -> bool:
    """An independent oracle: does ``header`` carry a real secret's fresh signature of ``body``?

    A random mutation of both parts can land on one (the body gains a space and the header is
    the genuine signature of that body): such a pair is no forgery and is not sent.
    """
    items = [item.split(b"=", 1) for item in header.split(b",")]
    stamps = [value for key, *value in items if key == b"t" and value]
    if not stamps:
        return False
    try:
        timestamp = int(stamps[0][0])
    except ValueError:
        return False
    if timestamp < now - TOLERANCE:
        return False
    expected = {
        hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest().encode()
        for secret in (OLD_SECRET, NEW_SECRET)
    }
    return any(key == b"v1" and value and value[0] in expected for key, *value in items)


def mutate_body(rng: random.Random, body: bytes) -> bytes:
    choice = rng.randrange(9)
    data = bytearray(body)
    if choice == 0:  # flip some bits
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif choice == 1:  # insert bytes
        i = rng.randrange(len(data) + 1)
        data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif choice == 2:  # delete a run
        i = rng.randrange(len(data))
        del data[i : i + rng.randint(1, 16)]
    elif choice == 3:  # truncate or extend
        data = (
            data[: rng.randrange(len(data))]
            if rng.random() < 0.5
            else data + rng.choice([b" ", b"\n", b"\x00", b"{}", b"\r\n"])
        )
    elif choice == 4:  # the same JSON, other bytes: still not what was signed
        parsed = json.loads(body)
        data = bytearray(
            json.dumps(
                parsed,
                indent=rng.choice([None, 1, 2]),
                sort_keys=rng.random() < 0.5,
                separators=rng.choice([(",", ":"), (", ", ": ")]),
            ).encode()
        )
        if data == body:
            data += b" "
    elif choice == 5:  # change a value an attacker cares about
        parsed = json.loads(body)
        target = rng.choice(["amount", "quantity", "customer", "id", "created", "type", "price"])
        obj = parsed["data"]["object"]
        if target == "amount":
            obj["amount_paid"] = obj["amount_due"] = rng.choice([1, 10**9, -1, 0])
        elif target == "quantity":
            obj["lines"]["data"][0]["quantity"] = rng.choice([2, 100, 10**6])
        elif target == "customer":
            obj["customer"] = rng.choice(["cus_other", "cus_forge ", "CUS_FORGE"])
        elif target == "id":
            parsed["id"] = parsed["id"] + rng.choice(["x", "_2", "0"])
        elif target == "created":
            parsed["created"] += rng.choice([-1, 1, 3600])
        elif target == "type":
            parsed["type"] = rng.choice(["invoice.payment_succeeded", "invoice.paid ", "customer.created"])
        else:
            obj["lines"]["data"][0]["pricing"]["price_details"]["price"] = rng.choice(["price_gold", "price_basic2"])
        data = bytearray(json.dumps(parsed).encode())
    elif choice == 6:  # duplicate key (last one wins in most parsers)
        data = bytearray(body[:-1] + b', "livemode": true}')
    elif choice == 7:  # change letter case somewhere
        i = rng.randrange(len(data))
        data[i : i + 1] = bytes(data[i : i + 1]).swapcase() if bytes(data[i : i + 1]).isalpha() else b"X"
    else:  # unicode escapes instead of the characters (same JSON value, other bytes)
        data = bytearray(body.replace(b'"in_', b'"\\u0069n_', 1) if b'"in_' in body else body + b"\t")
    if bytes(data) == body:
        data += b" "
    return bytes(data)


def mutate_header(rng: random.Random, header: str, body: bytes, timestamp: int) -> bytes:
    signature = header.split(",v1=", 1)[1]
    choice = rng.randrange(12)
    if choice == 0:  # flip bits anywhere (may leave ASCII: latin-1 bytes on the wire)
        raw = bytearray(header.encode("latin-1"))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(raw))
            raw[i] ^= 1 << rng.randrange(7)  # stay in ASCII here; bytes >= 0x80 are case 11
        out = bytes(raw)
    elif choice == 1:  # another moment, same signature
        out = f"t={timestamp + rng.choice([-1, 1, -TOLERANCE, 60, 10**6])},v1={signature}".encode()
    elif choice == 2:  # signature of another body (a splice)
        out = sign(body + b" ", NEW_SECRET, timestamp).encode()
    elif choice == 3:  # signed by a stranger
        out = sign(body, "whsec_" + "".join(rng.choice("abcdef0123456789") for _ in range(32)), timestamp).encode()
    elif choice == 4:  # the right MAC over the body alone (no timestamp)
        out = f"t={timestamp},v1={hmac.new(NEW_SECRET.encode(), body, hashlib.sha256).hexdigest()}".encode()
    elif choice == 5:  # the signature under another scheme name
        out = f"t={timestamp},{rng.choice(['v0', 'V1', 'v2', 'v1 ', ' v1', 'v'])}={signature}".encode()
    elif choice == 6:  # truncated / extended / upper-cased signature
        variants = [signature[:-1], signature + "0", signature.upper(), signature[:32], signature[::-1], "0" * 64]
        out = f"t={timestamp},v1={rng.choice(variants)}".encode()
    elif choice == 7:  # several signatures, none right
        n = rng.randint(2, 20)
        sigs = [hashlib.sha256(rng.randbytes(16)).hexdigest() for _ in range(n)]
        out = (f"t={timestamp}," + ",".join(f"v1={s}" for s in sigs)).encode()
    elif choice == 8:  # parts missing or doubled
        out = rng.choice(
            [f"v1={signature}", f"t={timestamp}", f"t={timestamp},t={timestamp},v1=", "", ",", f"t=,v1={signature}"]
        ).encode()
    elif choice == 9:  # stale, genuinely signed
        stale = timestamp - TOLERANCE - rng.randint(5, 10**7)
        out = sign(body, NEW_SECRET, stale).encode()
    elif choice == 10:  # a secret near the right one
        near = rng.choice(
            [
                NEW_SECRET + "x",
                NEW_SECRET[:-1],
                NEW_SECRET.upper(),
                NEW_SECRET.removeprefix("whsec_"),
                OLD_SECRET[::-1],
                "",
            ]
        )
        out = sign(body, near or "x", timestamp).encode()
    else:  # bytes outside ASCII in the header (latin-1 on the wire, as a real client can send)
        raw = bytearray(header.encode("latin-1"))
        i = rng.randrange(len(raw))
        raw[i] = rng.randrange(0x80, 0x100)
        out = bytes(raw)
    return out


# --------------------------------------------------------------------------- the test


@pytest.mark.timeout(120)
async def test_forged_deliveries_are_all_refused_and_the_genuine_one_accepted_once(
    webhook_app: httpx.AsyncClient, db: Database, redis_client: redis.Redis, capsys
):
    http = webhook_app
    started = time.monotonic()
    rng = random.Random(SEED)
    tally = Tally()
    assert await stored_events(db) == 0 and published(redis_client) == 0

    genuine = genuine_event()
    body = json.dumps(genuine, separators=(",", ":")).encode()  # small: every byte position is tried
    now = int(time.time())
    header = sign(body, NEW_SECRET, now)
    assert header == signed(body.decode(), NEW_SECRET, now)[1]["Stripe-Signature"]  # as Stripe signs it

    async def post(
        kind: str, content, signature: bytes | str | None, *allowed: int, content_type: str = "application/json"
    ) -> None:
        headers: dict = {"Content-Type": content_type}
        if signature is not None:
            headers["Stripe-Signature"] = signature
        try:
            response = await http.post(WEBHOOK, content=content, headers=headers)
        except (httpx.LocalProtocolError, ValueError, UnicodeError):  # not sendable (e.g. CR/LF in a header)
            tally.unsendable += 1
            return
        tally.note(kind, response, *allowed)

    # No header, an empty one, a blank one.
    await post("missing header", body, None)
    await post("empty header", body, "")
    await post("blank header", body, "   ")

    # Wrong secrets.
    for secret in ["whsec_" + uuid.uuid4().hex for _ in range(20)] + [
        NEW_SECRET + " ",
        " " + OLD_SECRET,
        NEW_SECRET.upper(),
        "whsec_",
    ]:
        await post("wrong secret", body, sign(body, secret, now))

    # One byte changed, at every position of the body (with the genuine header).
    for i in range(len(body)):
        changed = bytearray(body)
        changed[i] ^= rng.randrange(1, 256)
        await post("body byte changed", bytes(changed), header)

    # One character changed at every position of the header (printable ASCII).
    for i in range(len(header)):
        replacement = rng.choice([c for c in "0123456789abcdefABCDEF=,tv " if c != header[i]])
        await post("header char changed", body, header[:i] + replacement + header[i + 1 :])

    # A stale timestamp (genuinely signed, older than the tolerance), and the genuine signature re-dated.
    for age in (TOLERANCE + 5, TOLERANCE + 60, 3600, 86_400, 30 * 86_400, now - 1):
        await post("stale timestamp", body, sign(body, NEW_SECRET, now - age))
        await post("re-dated signature", body, f"t={now - age},v1={header.split('v1=')[1]}")
    for ahead in (TOLERANCE + 5, 3600, 86_400 * 365):  # future-dated with the genuine signature (for `now`): no match
        await post("future re-dated signature", body, f"t={now + ahead},v1={header.split('v1=')[1]}")

    # Several v1 signatures, none of which matches (the genuine one truncated, others random).
    for n in (2, 5, 50, 500):
        sigs = [hashlib.sha256(rng.randbytes(8)).hexdigest() for _ in range(n - 1)] + [header.split("v1=")[1][:-1]]
        rng.shuffle(sigs)
        await post("several v1, none matching", body, f"t={now}," + ",".join(f"v1={s}" for s in sigs))

    # Oversized (with the genuine header): refused by size.
    await post("oversized", body + b" " * (MAX_WEBHOOK_BYTES + 1), header, 413)

    # Thousands of seeded random mutations of the body, the header, or both.
    genuine_skipped = 0
    for _ in range(RANDOM_MUTATIONS):
        which = rng.randrange(3)
        new_body = mutate_body(rng, body) if which in (0, 2) else body
        new_header = mutate_header(rng, header, body, now) if which in (1, 2) else header.encode()
        if genuinely_signed(new_body, new_header, now):
            genuine_skipped += 1
            continue
        await post(f"random mutation ({['body', 'header', 'both'][which]})", new_body, new_header)

    forgeries_seconds = time.monotonic() - started
    events_after_forgeries, published_after_forgeries = await stored_events(db), published(redis_client)

    # The positive control: the genuine delivery is accepted once, its redelivery is a duplicate.
    first = await http.post(
        WEBHOOK,
        content=body,
        headers={"Stripe-Signature": sign(body, NEW_SECRET, int(time.time())), "Content-Type": "application/json"},
    )
    again = await http.post(
        WEBHOOK,
        content=body,
        headers={"Stripe-Signature": sign(body, OLD_SECRET, int(time.time())), "Content-Type": "application/json"},
    )

    figures = {
        "test": "webhook forgeries",
        "seed": SEED,
        "cases": tally.tried,
        "body_bytes_each_changed": len(body),
        "header_chars_each_changed": len(header),
        "random_mutations": RANDOM_MUTATIONS,
        "unsendable": tally.unsendable,
        "random_pairs_genuinely_signed_skipped": genuine_skipped,
        "accepted": tally.accepted,
        "5xx": tally.server_errors,
        "statuses": dict(sorted(tally.statuses.items())),
        "stripe_events_after_forgeries": events_after_forgeries,
        "published_after_forgeries": published_after_forgeries,
        "genuine": [first.status_code, first.json().get("outcome") if first.status_code == 200 else first.text[:100]],
        "redelivered": [
            again.status_code,
            again.json().get("outcome") if again.status_code == 200 else again.text[:100],
        ],
        "seconds": round(time.monotonic() - started, 1),
    }
    report(capsys, figures)

    assert not tally.bad, f"{len(tally.bad)}+ forgeries not answered 400/413:\n" + "\n".join(tally.bad[:30])
    assert tally.accepted == 0 and tally.server_errors == 0
    assert tally.tried >= 0.95 * RANDOM_MUTATIONS + len(body)
    assert events_after_forgeries == 0, "a forged delivery was stored"
    assert published_after_forgeries == 0, "a forged delivery was published"
    assert first.status_code == 200 and first.json()["outcome"] == "relayed", first.text
    assert again.status_code == 200 and again.json()["outcome"] == "duplicate", again.text
    assert await stored_events(db) == 1
    assert redis_client.llen(QUEUE) == 1, "the genuine delivery publishes exactly one event"
    assert forgeries_seconds < 60


async def test_a_non_ascii_stripe_signature_header_is_a_400_not_a_500(
    webhook_app: httpx.AsyncClient, db: Database, redis_client: redis.Redis
):
    """Regression: a ``v1`` value with a byte >= 0x80 (latin-1 on the wire) reached
    ``hmac.compare_digest`` inside stripe's ``verify_header`` as a non-ASCII str, which raises
    TypeError; ``infra.stripe.webhooks.verify`` catches only SignatureVerificationError, so the
    unauthenticated request got a 500."""
    body = json.dumps(genuine_event()).encode()
    now = int(time.time())
    genuine = sign(body, NEW_SECRET, now)
    for header in (
        f"t={now},v1=\xe9".encode("latin-1"),
        f"t={now},v1={'a' * 63}\xff".encode("latin-1"),
        sign(body, "whsec_x", now).encode() + b"\xa0",
    ):
        response = await webhook_app.post(
            WEBHOOK, content=body, headers={"Stripe-Signature": header, "Content-Type": "application/json"}
        )
        assert response.status_code == 400, (header, response.status_code, response.text)
    # A garbage signature before the genuine one: honoured (200) or refused (400), never a 500.
    header = f"t={now},v1=\xe9,v1={genuine.split('v1=')[1]}".encode("latin-1")
    response = await webhook_app.post(
        WEBHOOK, content=body, headers={"Stripe-Signature": header, "Content-Type": "application/json"}
    )
    assert response.status_code in (200, 400), (header, response.status_code, response.text)
    assert published(redis_client) <= 1


async def test_a_correctly_signed_future_dated_delivery_is_refused(
    webhook_app: httpx.AsyncClient, db: Database, redis_client: redis.Redis
):
    """Hardening, not a forgery: stripe-python's ``verify_header`` only refuses timestamps older
    than the tolerance, so a delivery signed with the real secret for a moment a year ahead is
    accepted. Only a holder of the secret can make one (and event ids are deduplicated), but a
    signature valid for a year is a replay window the tolerance is meant to close."""
    body = json.dumps(genuine_event()).encode()
    response = await webhook_app.post(
        WEBHOOK,
        content=body,
        headers={
            "Stripe-Signature": sign(body, NEW_SECRET, int(time.time()) + 365 * 86_400),
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 400, (response.status_code, response.text)
    assert await stored_events(db) == 0 and published(redis_client) == 0
