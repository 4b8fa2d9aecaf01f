"""Request line and header limits, enforced by the HTTP parser before a request exists.

uvicorn's h11 parser only bounds a head that is still incomplete (16 KB, answered 400); a
long head that arrives whole in one read is parsed and handed to the app, which then
routes, logs and answers it. Here the h11 connection measures the bytes it holds before it
parses them: a request line past its limit is answered 414, header lines past theirs 431,
and the connection is closed without reading the rest. See docs/SECURITY.md, "Limits".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

#: h11 ends a head at the first blank line, with or without its carriage return.
_BLANK_LINE = re.compile(rb"\n\r?\n")


@dataclass(frozen=True)
class HeadLimits:
    request_line_bytes: int
    header_bytes: int

    def refusal(self, head: bytes) -> tuple[int, str] | None:
        """(status, reason) if ``head`` (the start of a request) is over a limit already."""
        # The request line may take its limit plus "\r"; its "\n" must come by then.
        line_end = head.find(b"\n", 0, self.request_line_bytes + 2)
        # Unfinished, its last byte may be the "\r".
        line_length = len(head) - 1 if line_end < 0 else line_end - head[line_end - 1 : line_end].count(b"\r")
        if line_length > self.request_line_bytes:
            return 414, f"the request line is over {self.request_line_bytes} bytes"
        if line_end < 0:
            return None
        # From the request line's newline to the blank line's last byte: the header lines.
        window_end = line_end + self.header_bytes + 3
        if _BLANK_LINE.search(head, line_end, window_end) is None and len(head) >= window_end:
            return 431, f"the request headers are over {self.header_bytes} bytes"
        return None


class HeadLimitedConnection(h11.Connection):
    """h11's server side, refusing a request head over its limits before parsing it."""

    def __init__(self, limits: HeadLimits) -> None:
        # h11's own cap on an incomplete head, just above ours: ours speak first.
        super().__init__(h11.SERVER, max_incomplete_event_size=limits.request_line_bytes + limits.header_bytes + 8)
        self.limits = limits
        self.refused: tuple[int, str] | None = None

    def next_event(self):
        if self.their_state is h11.IDLE and self.refused is None:
            self.refused = self.limits.refusal(self.trailing_data[0])
            if self.refused is not None:
                raise h11.RemoteProtocolError(self.refused[1], error_status_hint=self.refused[0])
        try:
            return super().next_event()
        except h11.RemoteProtocolError as error:
            self.refused = self.refused or (error.error_status_hint, "invalid HTTP request")
            raise


class HeadLimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a ``HeadLimitedConnection``; its refusals keep h11's status."""

    limits: HeadLimits

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn = HeadLimitedConnection(self.limits)

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers every parser refusal 400; say which limit, as the API does, in JSON.
        status, reason = self.conn.refused or (400, msg)
        body = json.dumps({"detail": reason}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def head_limited_protocol(limits: HeadLimits) -> type[HeadLimitedH11Protocol]:
    """The protocol class to give uvicorn (``http=``): uvicorn builds one per connection."""
    return type("HeadLimitedH11Protocol", (HeadLimitedH11Protocol,), {"limits": limits})
