"""Hostile request sizes against a real `credits web` process (issue 11, items 1 and 2).

- A request line over HTTP_MAX_REQUEST_LINE_BYTES is 414, header lines over
  HTTP_MAX_HEADER_BYTES 431: answered by the parser, before the app, routing or logging
  see them, whether the head arrives in one read (60 KB) or many (1 MB); meanwhile
  /healthz answers within 100 ms.
- Every route has a body limit, enforced before authentication and while the body streams:
  a declared Content-Length over it is 413 before any body is sent (and a client that goes on
  sending reads it: the server drains a few MB before it closes); a chunked 300 MB upload
  is cut off (413, connection closed) after a few MB, and the web process's memory grows by
  less than 20 MB; a route that never reads its body closes the connection instead of
  reading the rest.

FIGURES lines report what was measured.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from infra.settings import Settings
from tests.support.web import ADMIN_TOKEN, FRONTEND_TOKEN, WebServer, clean_env, start_web_server

LINE_LIMIT = Settings.model_fields["http_max_request_line_bytes"].default
HEADER_LIMIT = Settings.model_fields["http_max_header_bytes"].default
BODY_LIMIT = Settings.model_fields["http_max_body_bytes"].default
FRONT = {"Authorization": f"Bearer {FRONTEND_TOKEN}"}
HOLDS = "/api/customers/cust-nobody/holds"
MB = 1024 * 1024


@pytest.fixture(scope="module")
def web(pg_url: str, redis_url: str, tmp_path_factory) -> Iterator[WebServer]:
    env = clean_env(
        DATABASE_URL=pg_url,
        REDIS_URL=redis_url,
        ADMIN_API_TOKEN=ADMIN_TOKEN,
        FRONTEND_API_TOKEN=FRONTEND_TOKEN,
        LOG_LEVEL="INFO",
    )
    server = start_web_server(env, tmp_path_factory.mktemp("web") / "web.log")
    yield server
    server.stop()


def figures(capsys: pytest.CaptureFixture, **values) -> None:
    with capsys.disabled():
        print("\nFIGURES " + json.dumps(values))


def address(web: WebServer) -> tuple[str, int]:
    host, port = web.base_url.removeprefix("http://").split(":")
    return host, int(port)


def exchange(web: WebServer, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``request`` raw (as far as the server lets it), then read the answer: (status, body)."""
    with socket.create_connection(address(web), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except OSError:  # the server refused and closed while we were still sending
            pass
        answer = bytearray()
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    head, _, body = bytes(answer).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), f"no HTTP answer: {bytes(answer[:200])!r}"
    return int(head.split(b" ")[1]), body


def get(target: bytes, headers: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: credits.test\r\n" + headers + b"\r\n"


def rss_kb(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


# --------------------------------------------------------------------------- request line and headers


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (get(b"/" + b"a" * (LINE_LIMIT + 1)), 414),
        (get(b"/" + b"a" * 60_000), 414),  # arrives in one read: the head is whole, and still refused
        (get(b"/healthz?" + b"q" * MB), 414),  # arrives in many reads
        (get(b"/healthz", b"X-Pad: " + b"h" * (HEADER_LIMIT + 1) + b"\r\n"), 431),
        (get(b"/healthz", b"".join(b"X-Pad-%d: %s\r\n" % (i, b"h" * 100) for i in range(400))), 431),
        (get(b"/healthz", b"Cookie: " + b"c" * MB + b"\r\n"), 431),
    ],
    ids=["line-just-over", "line-60kb", "line-1mb", "header-just-over", "400-headers", "header-1mb"],
)
def test_a_long_request_line_is_414_and_large_headers_are_431(
    web: WebServer, capsys, request_bytes: bytes, status: int
):
    started = time.monotonic()
    answered, body = exchange(web, request_bytes)
    elapsed = time.monotonic() - started

    figures(capsys, test="oversized head", bytes=len(request_bytes), status=answered, ms=round(elapsed * 1000, 1))
    assert answered == status, body
    assert "over" in json.loads(body)["detail"]
    assert elapsed < 2, elapsed
    # Refused by the parser: the app never saw it, so nothing of it reached the access log.
    assert b"a" * 1000 not in web.log().encode() and b"q" * 1000 not in web.log().encode()


def test_heads_at_the_limits_are_served(web: WebServer):
    line = b"GET /healthz?" + b"q" * (LINE_LIMIT - len(b"GET /healthz? HTTP/1.1")) + b" HTTP/1.1"
    assert len(line) == LINE_LIMIT
    header = b"X-Pad: " + b"h" * (HEADER_LIMIT - len(b"X-Pad: \r\nHost: credits.test\r\n")) + b"\r\n"
    assert exchange(web, line + b"\r\nHost: credits.test\r\nConnection: close\r\n\r\n")[0] == 200
    assert len(b"Host: credits.test\r\n" + header) == HEADER_LIMIT
    assert (
        exchange(web, b"GET /healthz HTTP/1.1\r\nHost: credits.test\r\n" + header + b"Connection: close\r\n\r\n")[0]
        == 431
    )
    assert exchange(web, b"GET /healthz HTTP/1.1\r\nHost: credits.test\r\n" + header + b"\r\n")[0] == 200


def test_an_http_client_sending_a_long_url_gets_414(web: WebServer):
    # httpx itself refuses URLs over 64 KB.
    response = httpx.get(f"{web.base_url}/healthz?q={'x' * 60_000}", timeout=10)
    assert response.status_code == 414, response.text
    assert response.headers["connection"] == "close"


def test_healthz_answers_within_100ms_while_1mb_and_60kb_urls_are_refused(web: WebServer, capsys):
    statuses: list[int] = []
    done = threading.Event()

    latencies = []

    def attack() -> None:
        # At least 25 rounds, and on until enough probes were taken during the attack (a fast
        # machine refuses 25 rounds before ten probes would have run).
        try:
            rounds = 0
            while rounds < 25 or len(latencies) < 20:
                statuses.append(exchange(web, get(b"/healthz?" + b"q" * MB))[0])
                statuses.append(exchange(web, get(b"/" + b"a" * 60_000))[0])
                rounds += 1
        finally:
            done.set()

    with httpx.Client(base_url=web.base_url, timeout=10) as http:
        http.get("/healthz")  # the connection is open before the attack starts
        attacker = threading.Thread(target=attack)
        attacker.start()
        while not done.is_set():
            started = time.monotonic()
            assert http.get("/healthz").status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.01)
        attacker.join()

    ms = sorted(round(latency * 1000, 1) for latency in latencies)
    figures(
        capsys,
        test="healthz during 1 MB and 60 KB URLs",
        refusals=len(statuses),
        probes=len(ms),
        median_ms=ms[len(ms) // 2],
        max_ms=ms[-1],
    )
    assert len(statuses) >= 50 and set(statuses) == {414}
    assert len(ms) >= 20
    # Before, one 60 KB URL held the process for seconds. On a shared CI machine one probe
    # in a run may lose its CPU for a moment: allowed once, never past a second.
    assert ms[-2] < 100 and ms[-1] < 1000, ms[-5:]


# --------------------------------------------------------------------------- bodies


class Upload:
    """A generated chunked body of ``total`` bytes; counts what the client actually sent on."""

    def __init__(self, total: int, chunk: int = 64 * 1024) -> None:
        self.total, self.chunk, self.pulled = total, chunk, 0

    def __iter__(self) -> Iterator[bytes]:
        block = b"x" * self.chunk
        while self.pulled < self.total:
            self.pulled += len(block)
            yield block


@pytest.mark.parametrize(
    "method, path, headers, status",
    [
        ("POST", HOLDS, {}, 413),  # unauthenticated: refused for its size, before the token is looked at
        ("POST", HOLDS, FRONT, 413),
        ("POST", "/api/customers/cust-nobody/payment-retry", {}, 401),  # never reads its body
        ("GET", "/healthz", {}, 200),
    ],
    ids=["holds-no-token", "holds-with-token", "unread-body", "healthz"],
)
def test_a_chunked_300mb_upload_is_cut_off_and_memory_stays_flat(
    web: WebServer, capsys, method: str, path: str, headers: dict, status: int
):
    before = rss_kb(web.process.pid)
    upload = Upload(300 * MB)
    started = time.monotonic()
    with httpx.Client(base_url=web.base_url, timeout=30) as http:
        response = http.request(method, path, content=iter(upload), headers=headers)
    elapsed = time.monotonic() - started
    after = rss_kb(web.process.pid)

    growth_mb = {name: round((after[name] - before[name]) / 1024, 1) for name in after}
    figures(
        capsys,
        test=f"chunked 300 MB upload, {method} {path}",
        status=response.status_code,
        sent_mb=round(upload.pulled / MB, 1),
        seconds=round(elapsed, 2),
        rss_growth_mb=growth_mb["VmRSS"],
        peak_growth_mb=growth_mb["VmHWM"],
    )
    assert response.status_code == status, response.text
    if status == 413:
        assert response.json() == {"detail": f"the request body is over {BODY_LIMIT} bytes, this route's limit"}
    assert response.headers["connection"] == "close"
    assert upload.pulled < 32 * MB, "the server read on instead of cutting the upload off"
    assert growth_mb["VmRSS"] < 20 and growth_mb["VmHWM"] < 20, growth_mb
    assert httpx.get(f"{web.base_url}/healthz").status_code == 200


def test_a_declared_length_over_the_limit_is_413_before_any_body_is_sent(web: WebServer):
    for path in (HOLDS, "/webhooks/stripe", "/admin/login"):
        request = f"POST {path} HTTP/1.1\r\nHost: credits.test\r\nContent-Type: application/json\r\nContent-Length: {300 * MB}\r\n\r\n"
        answered, body = exchange(
            web, request.encode(), timeout=5
        )  # no body follows: a server waiting for it would time out
        assert answered == 413, (path, body)
        assert "over" in json.loads(body)["detail"]


def test_a_client_still_sending_a_body_over_the_limit_reads_its_413_not_a_reset(web: WebServer):
    """Most clients send the whole body before reading. The server answers 413 on the declared
    length at once; had it closed then, the bytes still arriving would reset the connection and
    the client would never see the 413. It drains them (a few MB at most) and then closes."""
    body = b"x" * (2 * MB)
    head = f"POST /webhooks/stripe HTTP/1.1\r\nHost: credits.test\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(address(web), timeout=10) as sock:
        sock.sendall(head.encode())
        time.sleep(0.3)  # the 413 is written meanwhile, before any body byte arrives
        sock.sendall(body)  # raises if the server closed: a reset, not an answer
        answer = bytearray()
        while chunk := sock.recv(65536):  # raises ConnectionResetError on a reset
            answer += chunk
    head_out, _, detail = bytes(answer).partition(b"\r\n\r\n")
    assert head_out.startswith(b"HTTP/1.1 413 "), bytes(answer[:200])
    assert b"connection: close" in head_out.lower()
    assert "over" in json.loads(detail)["detail"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_the_json_api_reads_64_kb_and_refuses_one_byte_more(web: WebServer, chunked: bool):
    def hold(size: int) -> httpx.Response:
        body = json.dumps({"job_id": "job-1", "credits": 1}).encode()
        body = body[:-1] + b" " * (size - len(body)) + b"}"
        assert len(body) == size
        content = iter([body[: size // 2], body[size // 2 :]]) if chunked else body
        return httpx.post(
            f"{web.base_url}{HOLDS}", content=content, headers={**FRONT, "Content-Type": "application/json"}, timeout=10
        )

    at_limit = hold(BODY_LIMIT)
    assert at_limit.status_code == 404, at_limit.text  # read and judged: no such customer
    over = hold(BODY_LIMIT + 1)
    assert over.status_code == 413, over.text
    assert over.json()["detail"] == f"the request body is over {BODY_LIMIT} bytes, this route's limit"
