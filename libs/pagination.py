"""AIP-158 page tokens: opaque to clients, tied to the query that produced them.

A token carries the last key of the page and a digest of the request's other
parameters; a token replayed with different parameters, or edited, is rejected as
INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from libs.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_KEY = b"course-signup-page-token-v1"


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument.single("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _query_digest(query: object) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_token(last_key: str, query: object) -> str:
    payload = json.dumps({"k": last_key, "q": _query_digest(query)}, separators=(",", ":")).encode()
    tag = hmac.new(_KEY, payload, hashlib.sha256).digest()[:12]
    return base64.urlsafe_b64encode(tag + payload).decode().rstrip("=")


def decode_token(token: str, query: object) -> str | None:
    """The last key of the previous page, or None for the first page."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        tag, payload = raw[:12], raw[12:]
        if not hmac.compare_digest(tag, hmac.new(_KEY, payload, hashlib.sha256).digest()[:12]):
            raise ValueError("bad tag")
        data = json.loads(payload)
    except (ValueError, TypeError) as error:
        raise InvalidArgument.single("page_token", "not a token returned by this method") from error
    if data.get("q") != _query_digest(query):
        raise InvalidArgument.single("page_token", "the request's other parameters changed since this token")
    return str(data["k"])
