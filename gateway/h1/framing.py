"""Small HTTP/1.1 helpers shared by the server and the target client.

The framing itself (heads, field lines, body lengths, chunked bodies) is llhttp's
(`request_parser`, `response_parser`; ADR 0016); what is left here is what both legs
check or write themselves.
"""

from __future__ import annotations

import re

MAX_HEAD_BYTES = 64 * 1024

Headers = list[tuple[bytes, bytes]]

# A method or a field name.
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A field value that can be written: no control characters but horizontal tab.
_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")
# Answers that never have a body, whatever their head says (besides 1xx).
NO_BODY_STATUSES = frozenset({204, 304})


def valid_value(value: bytes) -> bool:
    """Whether `value` can be written in a header (no CR, LF or other control bytes)."""
    return _VALUE.fullmatch(value) is not None


def has_token(fields: Headers, name: bytes, token: bytes) -> bool:
    """Whether a comma-separated header (`connection`, `expect`) lists `token`."""
    for key, value in fields:
        if key == name and token in [t.strip().lower() for t in value.split(b",")]:
            return True
    return False
