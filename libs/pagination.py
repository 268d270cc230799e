"""AIP-158 page tokens: opaque to clients, tied to the query that produced them.

A token carries the last key of the page and a digest of the request's other
parameters, signed with HMAC; a token replayed with different parameters, or edited,
is rejected as INVALID_ARGUMENT naming page_token. Services pass their own secret
(`key`) so that a client reading the source cannot forge tokens; without one, a
built-in development key is used.

`after_keyset` turns the last key of a multi-column order into the WHERE condition of
the next page (keyset pagination: no OFFSET, so a page costs the same deep in a list).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, or_

from libs.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
DEVELOPMENT_KEY = b"course-signup-page-token-v1"


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument.single("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _query_digest(query: object) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_token(last_key: str, query: object, key: bytes = DEVELOPMENT_KEY) -> str:
    payload = json.dumps({"k": last_key, "q": _query_digest(query)}, separators=(",", ":")).encode()
    tag = hmac.new(key, payload, hashlib.sha256).digest()[:12]
    return base64.urlsafe_b64encode(tag + payload).decode().rstrip("=")


def decode_token(token: str, query: object, key: bytes = DEVELOPMENT_KEY) -> str | None:
    """The last key of the previous page, or None for the first page."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        tag, payload = raw[:12], raw[12:]
        if not hmac.compare_digest(tag, hmac.new(key, payload, hashlib.sha256).digest()[:12]):
            raise ValueError("bad tag")
        data = json.loads(payload)
        if not isinstance(data, dict) or not isinstance(data.get("k"), str):
            raise ValueError("bad payload")
    except (ValueError, TypeError) as error:
        raise InvalidArgument.single("page_token", "not a token returned by this method") from error
    if data.get("q") != _query_digest(query):
        raise InvalidArgument.single("page_token", "the request's other parameters changed since this token")
    return str(data["k"])


def after_keyset(sort_keys: Sequence[tuple[ColumnElement[Any], bool]], last: Sequence[Any]) -> ColumnElement[bool]:
    """Rows strictly after `last` in the order of sort_keys, each (expression, descending).

    The order must end in a unique key, so that "after" is well defined. Expressions
    must not be NULL (the comparisons below treat NULL as unknown).
    """
    if len(sort_keys) != len(last) or not sort_keys:
        raise ValueError("one last value per sort key is needed")
    alternatives = []
    for position, (expression, descending) in enumerate(sort_keys):
        equal_before = [sort_keys[i][0] == last[i] for i in range(position)]
        beyond = expression < last[position] if descending else expression > last[position]
        alternatives.append(and_(*equal_before, beyond))
    return or_(*alternatives)
