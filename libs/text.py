"""Display names (students, campuses, courses): one rule, checked the same way by every
service. A name is shown in emails, listings and logs of other people's programs, so it
holds only visible text: no control characters (C0, C1, NEL), no invisible formatting
(bidi overrides and isolates, zero-width spaces, word joiners, BOM), no line or
paragraph separators, no private-use, surrogate, unassigned or noncharacter code
points. ZWNJ and ZWJ are kept: Persian, Indic scripts and emoji sequences need them.
Names are stored in NFC with runs of whitespace collapsed to one space.
"""

from __future__ import annotations

import unicodedata

from libs.errors import Validator

MAX_NAME = 200
# Refused general categories, with the words a violation uses for them.
_REFUSED = {
    "Cc": "control characters",
    "Cf": "invisible formatting characters (bidi controls, zero-width spaces and the like)",
    "Zl": "line separators",
    "Zp": "paragraph separators",
    "Co": "private-use characters",
    "Cs": "surrogate code points",
    "Cn": "unassigned code points or noncharacters",
}
_ALLOWED_FORMAT = frozenset("\u200c\u200d")  # ZERO WIDTH NON-JOINER, ZERO WIDTH JOINER


def check_display_name(validator: Validator, field: str, value: str, max_chars: int = MAX_NAME) -> str:
    """The name as stored (NFC, whitespace collapsed), or a violation added for `field`."""
    if len(value) > 4 * max_chars:  # refused by its length before any per-character work
        validator.add(field, f"must be at most {max_chars} characters")
        return value
    refused = sorted({_REFUSED[category] for ch in value
                      if (category := unicodedata.category(ch)) in _REFUSED and ch not in _ALLOWED_FORMAT})
    if refused:
        validator.add(field, f"must not contain {', '.join(refused)}")
        return value
    clean = " ".join(unicodedata.normalize("NFC", value).split())
    if not clean:
        validator.add(field, "is required")
    elif len(clean) > max_chars:
        validator.add(field, f"must be at most {max_chars} characters")
    return clean
