"""Validation of a sign-up request: every bad field is named in one INVALID_ARGUMENT."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email

from libs.errors import Validator
from libs.ids import check_resource_id

LOCALES = {"en", "pt-BR"}
MIN_AGE_YEARS = 1
MAX_AGE_YEARS = 120


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
) -> SignUp:
    validator = Validator()
    clean_name = " ".join(name.split())
    if not clean_name:
        validator.add("name", "is required")
    elif len(clean_name) > 200:
        validator.add("name", "must be at most 200 characters")
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        validator.add("name", "must not contain control characters")

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
    if not email.strip():
        validator.add("email", "is required")
    else:
        try:
            normalized_email = validate_email(email.strip(), check_deliverability=False).normalized
        except EmailNotValidError as error:
            validator.add("email", f"is not a valid address: {error}")

    if len(request_id) > 128:
        validator.add("request_id", "must be at most 128 characters")
    if locale and locale not in LOCALES:
        validator.add("locale", f"must be one of {', '.join(sorted(LOCALES))} (or empty for en)")
    validator.check()
    assert birth_date is not None
    return SignUp(clean_name, birth_date, course_id, normalized_email, request_id, locale or "en")
