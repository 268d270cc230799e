"""Validation of a sign-up request: every bad field is named in one INVALID_ARGUMENT."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from email_validator import EmailNotValidError, EmailSyntaxError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES

from libs.errors import Validator
from libs.ids import check_resource_id
from libs.text import check_display_name

LOCALES = {"en", "pt-BR"}
MIN_AGE_YEARS = 1
MAX_AGE_YEARS = 120
# Every field's length is checked before any per-character work: gRPC allows 4 MB
# messages, and email_validator's cost grows with its input (seconds over 4 MB, on the
# event loop). An address is at most 254 characters (RFC 5321's path limit), as given:
# the input is refused by its length alone, before anything parses it.
MAX_EMAIL = 254
MAX_REQUEST_ID = 128

# An unquoted ASCII local part (RFC 5322 dot-atom): email_validator keeps it as written.
_ASCII_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
# Domain as written -> its normalized form, for ASCII domains email_validator accepted.
_KNOWN_DOMAINS: dict[str, str] = {}
_MAX_KNOWN_DOMAINS = 10_000


def normalize_email(address: str) -> str:
    """email_validator's normalized address (no DNS), or EmailNotValidError.

    Sign-ups come from few domains, so an address whose local part is a plain ASCII
    dot-atom and whose domain email_validator has already accepted is normalized here
    without running the whole validator again (same result: the local part is kept as
    written, the domain normalized as before); everything else goes to email_validator.
    """
    if len(address) > MAX_EMAIL:
        raise EmailSyntaxError(f"The email address is too long (at most {MAX_EMAIL} characters).")
    local, _, domain = address.rpartition("@")
    known = _KNOWN_DOMAINS.get(domain)
    plain_local = len(local) <= 64 and _ASCII_DOT_ATOM.fullmatch(local) is not None \
        and local.lower() not in CASE_INSENSITIVE_MAILBOX_NAMES
    if known is not None and plain_local and len(local) + 1 + len(known) <= 254:
        return f"{local}@{known}"
    result = validate_email(address, check_deliverability=False)
    if plain_local and result.original == address and result.local_part == local and result.domain.isascii() \
            and result.domain == result.ascii_domain:
        if len(_KNOWN_DOMAINS) >= _MAX_KNOWN_DOMAINS:
            _KNOWN_DOMAINS.clear()
        _KNOWN_DOMAINS[domain] = result.domain
    return str(result.normalized)


@dataclass(frozen=True)
class SignUp:
    name: str
    birth_date: dt.date
    course_id: str
    email: str
    request_id: str
    locale: str


def validate_sign_up(
    name: str,
    birth_year: int,
    birth_month: int,
    birth_day: int,
    course_id: str,
    email: str,
    request_id: str,
    locale: str,
    today: dt.date,
    *,
    internationalized_mailboxes: bool = True,
) -> SignUp:
    """`internationalized_mailboxes`: whether the mail relay takes SMTPUTF8; without it an
    address whose mailbox name is outside ASCII could never get its emails, so it is
    refused here (an ASCII mailbox at an internationalised domain is always deliverable:
    the notifier writes the domain in IDNA)."""
    validator = Validator()
    clean_name = check_display_name(validator, "name", name)

    birth_date: dt.date | None = None
    if (birth_year, birth_month, birth_day) == (0, 0, 0):
        validator.add("birth_date", "is required")
    else:
        try:
            birth_date = dt.date(birth_year, birth_month, birth_day)
        except ValueError:
            validator.add("birth_date", "is not a valid calendar date (year, month and day are all required)")
    if birth_date is not None:
        if birth_date > today:
            validator.add("birth_date", "is in the future")
        elif (today - birth_date).days < 365 * MIN_AGE_YEARS:
            validator.add("birth_date", f"is less than {MIN_AGE_YEARS} year before today")
        elif birth_date.year < today.year - MAX_AGE_YEARS:
            validator.add("birth_date", f"is more than {MAX_AGE_YEARS} years ago")

    check_resource_id(validator, "course_id", course_id)

    normalized_email = ""
    if len(email) > MAX_EMAIL:
        validator.add("email", f"must be at most {MAX_EMAIL} characters")
    elif not email.strip():
        validator.add("email", "is required")
    else:
        try:
            normalized_email = normalize_email(email.strip())
        except EmailNotValidError as error:
            validator.add("email", f"is not a valid address: {error}")
        else:
            if not internationalized_mailboxes and not normalized_email.rpartition("@")[0].isascii():
                validator.add("email", "has a mailbox name outside ASCII, which this service's mail relay cannot "
                                       "deliver to (no SMTPUTF8): give an address in ASCII")

    if len(request_id) > MAX_REQUEST_ID:
        validator.add("request_id", f"must be at most {MAX_REQUEST_ID} characters")
    if locale and locale not in LOCALES:
        validator.add("locale", f"must be one of {', '.join(sorted(LOCALES))} (or empty for en)")
    validator.check()
    assert birth_date is not None
    return SignUp(clean_name, birth_date, course_id, normalized_email, request_id, locale or "en")
