"""The catalogue's id rule (campus and course ids), checked the same way by every service."""

from __future__ import annotations

import re

from libs.errors import Validator

RESOURCE_ID = re.compile(r"[a-z][a-z0-9-]{0,62}")
RULE = "must be 1-63 lowercase letters, digits or '-', starting with a letter"


def is_resource_id(value: str) -> bool:
    return RESOURCE_ID.fullmatch(value) is not None


def check_resource_id(validator: Validator, field: str, value: str) -> None:
    """Adds a violation naming `field` when `value` is missing or not a valid id."""
    if not value:
        validator.add(field, "is required")
    elif not is_resource_id(value):
        validator.add(field, RULE)
