"""Masking personal data and secrets in text bound for a log: cut to a bounded length, then mask.

Masking by field name (``infra.logging``) comes first; these patterns are the backstop for
free text: exception messages, Dramatiq's and uvicorn's lines, an error that quotes its input.

Every pattern is one RE2 expression (google-re2): RE2 matches in time linear in the text and
never backtracks, so no input, however long or crafted, makes masking slow. Text is cut to
``max_chars`` *before* matching, so a line costs at most a bounded amount of work.
"""

from __future__ import annotations

import re2

#: The default bound on one logged value, in characters (LOG_MAX_VALUE_CHARS).
DEFAULT_MAX_CHARS = 2_000

#: At most this many masks in one value (see ``mask``).
MAX_MASKS = 64

#: Where a word ends: a secret cut in half by truncation would no longer match its pattern,
#: so the word at each cut is dropped whole.
_BREAKS = " \t\r\n\"',;&<>()[]{}"

#: Field names whose value is a secret or personal data, in ``key=value`` / ``"key": "value"`` text.
_SECRET_NAMES = (
    r"[\w-]*(?:token|secret|passw(?:or)?d|pwd|api[_-]?key|apikey|authorization|auth|cookie|session|signature|"
    r"cvc2?|cvv2?|card(?:[_-]?num(?:ber)?)?|fingerprint|email|e-mail|phone|mobile|iban)"
)
#: A field name whose whole value is masked, wherever it is logged (by structure, not by pattern).
SECRET_FIELD = re2.compile(rf"(?i:{_SECRET_NAMES})")
_QUOTED_VALUE = r'"[^"\r\n]*"|' r"'[^'\r\n]*'|" r'\\"(?:[^"\\\r\n]|\\[^"])*\\"'
_PATTERN = re2.compile(
    "|".join(
        (
            # A UUID (message and event ids) is kept whole: its digit groups would pass for a card.
            r"(?P<uuid>\b[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\b)",
            # scheme://user:password@host
            r"(?P<url>://[^:/@\s]*:)[^@\s/]+@",
            # token=..., "password": "...", Authorization: Bearer ..., cvc=...
            rf"(?P<kv>(?i:{_SECRET_NAMES})\\?[\"']?\s*[=:]\s*(?:(?i:bearer|basic|digest|token)\s+)?)(?:{_QUOTED_VALUE}|[^\s&\"',;<>]+)",
            r"(?P<auth>(?i:bearer)\s+|Basic\s+)[^\s\"',;]+",
            # Stripe secret, restricted, publishable keys and webhook signing secrets; client secrets.
            r"(?P<key>\b(?:sk|rk|pk|whsec)_)[A-Za-z0-9_]+",
            r"\b[a-z]+_[A-Za-z0-9]+_secret_[A-Za-z0-9]+",
            # local@domain, "quoted"@domain, non-ASCII, no dot needed (bob@localhost); %40 as in a URL path.
            r"(?P<email>(?:[\pL\pN\pM._%+-]+|\"[^\"\s@]{1,64}\")(?:@|%40)[\pL\pN\pM-]+(?:\.[\pL\pN\pM-]+)*)",
            # 13-19 digits, maybe grouped by spaces or dashes: a card number (see _card).
            r"(?P<card>\b\d(?:[ -]?\d){12,18}\b)",
            # +1 555 010 9999, (555) 010-9999, 555-010-9999
            r"(?P<phone>\+\d[\d ().-]{5,20}\d|\(\d{3}\)\s?\d{3}[-. ]\d{4}|\b\d{3}[-.]\d{3}[-.]\d{4}\b)",
        )
    )
)


def truncate(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """``text`` cut to about ``max_chars``: its start and end kept, the middle replaced by a note."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    head, tail = text[:half], text[-half:]
    head = head[: max(head.rfind(c) for c in _BREAKS) + 1]
    tail = tail[min((i for i in (tail.find(c) for c in _BREAKS) if i >= 0), default=len(tail)) :]
    return f"{head}…[{len(text) - len(head) - len(tail)} chars cut]…{tail}"


def is_secret_field(name: str) -> bool:
    return SECRET_FIELD.fullmatch(name) is not None


def mask(text: str) -> str:
    """``text`` with every secret and piece of personal data the patterns know replaced. Linear time.

    Past MAX_MASKS matches the rest of the text is dropped: each match costs tens of
    microseconds in the RE2 binding, and a value that dense is junk (or an attack).
    """
    pieces, end = [], 0
    for count, match in enumerate(_PATTERN.finditer(text)):
        if count == MAX_MASKS:
            pieces.append(f"…[{len(text) - end} chars dropped: too many masked values]")
            return "".join(pieces)
        pieces += (text[end : match.start()], _replacement(match))
        end = match.end()
    pieces.append(text[end:])
    return "".join(pieces)


def scrub(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Cut ``text`` to a bounded length, then mask it: what every logged string goes through."""
    return mask(truncate(text, max_chars))


def _replacement(match) -> str:
    kind = match.lastgroup
    if kind == "uuid":
        return match.group()
    if kind == "email":
        return "[email]"
    if kind == "card":
        return "[card]" if _card(match.group()) else match.group()
    if kind == "phone":
        return "[phone]"
    prefix = match.group(kind) if kind in ("url", "kv", "auth", "key") else ""
    value = match.group()[len(prefix) :]
    quote = value[:2] if value.startswith('\\"') else value[:1] if value[:1] in "\"'" else ""
    suffix = "@" if kind == "url" else ""
    return f"{prefix}{quote}[redacted]{quote}{suffix}"


def _card(text: str) -> bool:
    """A card number: grouped like one (spaces or dashes), or a bare run that passes Luhn's check."""
    digits = [int(c) for c in text if c.isdigit()]
    if len(digits) != len(text):
        return True
    checksum = sum(digits[-1::-2]) + sum(sum(divmod(2 * d, 10)) for d in digits[-2::-2])
    return checksum % 10 == 0


def shape_of(value: object) -> str:
    """What a bad argument is, without its content (refusals are logged; the message itself is in the dead letters)."""
    size = f" of length {len(value)}" if isinstance(value, (str, bytes, list, dict)) else ""
    return f"a {type(value).__name__}{size}"
