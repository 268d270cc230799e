"""AIP-158 page tokens: opaque to clients, tied to the query that produced them.

A token carries the last key of the page and a digest of the request's other
parameters, signed with HMAC; a token replayed with different parameters, or edited,
is rejected as INVALID_ARGUMENT naming page_token. Services pass their own secret
(`key`, from configuration: no key is written in the source) so that a client reading
the source cannot forge tokens. Because a key may still leak, what a token carries
is held, even signed, to what a database can bind: text without NUL or lone
surrogates, 64-bit integers, finite numbers (also inside a key that is itself JSON, a
multi-column sort key); anything else is the same INVALID_ARGUMENT, never a driver's
error turned INTERNAL.

`after_keyset` turns the last key of a multi-column order into the WHERE condition of
the next page (keyset pagination: no OFFSET, so a page costs the same deep in a list).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, or_

from libs.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# What a SQL BIGINT (and SQLite's INTEGER) holds.
_SQL_INTEGER = range(-(2**63), 2**63)


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument.single("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _query_digest(query: object) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_token(last_key: str, query: object, key: bytes) -> str:
    payload = json.dumps({"k": last_key, "q": _query_digest(query)}, separators=(",", ":")).encode()
    tag = hmac.new(key, payload, hashlib.sha256).digest()[:12]
    return base64.urlsafe_b64encode(tag + payload).decode().rstrip("=")


def decode_token(token: str, query: object, key: bytes) -> str | None:
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
        _check_bindable(data["k"])
        if data["k"][:1] in ("{", "["):
            _check_bindable(json.loads(data["k"], parse_constant=_refuse_constant))
    except (ValueError, TypeError, RecursionError) as error:
        # ValueError covers bad base64, JSON, UTF-8 (UnicodeError) and the checks above;
        # RecursionError, JSON nested deeper than the parser's stack.
        raise InvalidArgument.single("page_token", "not a token returned by this method") from error
    if data.get("q") != _query_digest(query):
        raise InvalidArgument.single("page_token", "the request's other parameters changed since this token")
    return str(data["k"])


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is no sort key")


def _check_bindable(value: object) -> None:
    """Raises ValueError unless every value in `value` can be bound as a SQL parameter."""
    pending = [value]
    while pending:  # iterative: no nesting exhausts the stack
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise ValueError("NUL in a token")
            item.encode("utf-8")  # UnicodeEncodeError on a lone surrogate
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if item not in _SQL_INTEGER:
                raise ValueError("integer out of SQL range in a token")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError("non-finite number in a token")
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        else:
            raise ValueError(f"unexpected {type(item).__name__} in a token")


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
