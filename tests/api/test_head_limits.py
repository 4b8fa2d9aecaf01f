"""The request head limits at their exact bounds, on partial and whole heads (api.head_limits)."""

from __future__ import annotations

import h11
import pytest

from api.head_limits import HeadLimitedConnection, HeadLimits

LIMITS = HeadLimits(request_line_bytes=100, header_bytes=200)


def line(length: int) -> bytes:
    start, end = b"GET /", b" HTTP/1.1"
    return start + b"a" * (length - len(start) - len(end)) + end


def headers(length: int) -> bytes:
    """Header lines of exactly ``length`` bytes, CRLFs included."""
    return b"X-Pad: " + b"h" * (length - len(b"X-Pad: \r\n")) + b"\r\n"


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_a_request_line_at_the_limit_passes_and_one_byte_more_is_414(ending: bytes):
    assert LIMITS.refusal(line(100) + ending + b"\r\n") is None
    assert LIMITS.refusal(line(101) + ending + b"\r\n")[0] == 414


def test_a_partial_request_line_is_judged_as_soon_as_it_is_too_long():
    assert LIMITS.refusal(b"GET /" + b"a" * 96) is None  # 101 bytes, the "\r" may still come
    assert LIMITS.refusal(b"GET /" + b"a" * 97)[0] == 414


def test_header_lines_at_the_limit_pass_and_one_byte_more_is_431():
    assert LIMITS.refusal(line(50) + b"\r\n" + headers(200) + b"\r\n") is None
    assert LIMITS.refusal(line(50) + b"\r\n" + headers(201) + b"\r\n")[0] == 431
    # Unfinished: refused once the blank line could no longer end within the limit.
    assert LIMITS.refusal(line(50) + b"\r\n" + headers(200) + b"\r") is None
    assert LIMITS.refusal(line(50) + b"\r\n" + headers(200) + b"XX")[0] == 431


def test_a_head_without_headers_and_a_body_after_the_head_are_not_counted():
    assert LIMITS.refusal(line(100) + b"\r\n\r\n" + b"b" * 10_000) is None


def test_the_connection_refuses_before_parsing_and_says_why():
    connection = HeadLimitedConnection(LIMITS)
    connection.receive_data(line(50) + b"\r\nHost: x\r\n" + headers(300) + b"\r\n")
    with pytest.raises(h11.RemoteProtocolError):
        connection.next_event()
    assert connection.refused[0] == 431

    accepted = HeadLimitedConnection(LIMITS)
    accepted.receive_data(line(50) + b"\r\nHost: x\r\n\r\n")
    assert isinstance(accepted.next_event(), h11.Request)


def test_h11s_own_refusals_keep_their_status():
    connection = HeadLimitedConnection(LIMITS)
    connection.receive_data(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError):
        connection.next_event()
    assert connection.refused[0] == 400
