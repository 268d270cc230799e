"""How a notification becomes a safe email message.

Anything a student typed (name) or an operator typed (course name) is reduced to one
line of printable text before it reaches a template or a header, so it can never add
a header or a recipient. The recipient is exactly one address validated by
email-validator; the HTML part is autoescaped by the templates.
"""

from __future__ import annotations

import email.policy
import email.utils
import re
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage

from email_validator import EmailNotValidError, validate_email

from services.notifier.domain.model import PermanentDeliveryError

DEFAULT_LOCALE = "en"
SUPPORTED_LOCALES = ("en", "pt-BR")
_LOCALES_BY_KEY = {locale.lower().replace("_", "-"): locale for locale in SUPPORTED_LOCALES}
_WHITESPACE = re.compile(r"\s+")
# Longest name or course name we put in a subject or greeting; longer ones are cut.
MAX_FIELD_CHARS = 200


def resolve_locale(requested: str) -> str:
    """The template locale for a requested one: "pt-BR" (any case, - or _) or else "en"."""
    return _LOCALES_BY_KEY.get(requested.strip().lower().replace("_", "-"), DEFAULT_LOCALE)


def single_line(value: str, max_chars: int = MAX_FIELD_CHARS) -> str:
    """One line of printable text: control, format and line/paragraph separator
    characters (CR, LF, NEL, U+2028, ...) become spaces, runs of whitespace collapse."""
    cleaned = "".join(
        " " if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") else char for char in value
    )
    return _WHITESPACE.sub(" ", cleaned).strip()[:max_chars]


class InvalidRecipient(PermanentDeliveryError):
    """The address cannot receive email; retrying will not change that."""


def validate_recipient(address: str) -> str:
    """The normalized form of exactly one syntactically valid address (no DNS lookup)."""
    try:
        return validate_email(address, check_deliverability=False).normalized
    except EmailNotValidError as error:
        raise InvalidRecipient(f"invalid recipient address: {error}") from error


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


def compose_message(
    rendered: RenderedEmail,
    *,
    mail_from: str,
    recipient: str,
    kind: str = "",
    registration_id: str = "",
    now: datetime | None = None,
) -> EmailMessage:
    """A multipart/alternative (text + HTML) message to `recipient`, a validated address."""
    _, from_address = email.utils.parseaddr(mail_from)
    domain = from_address.rpartition("@")[2] or "course-signup.local"
    # SMTPUTF8 only when an address needs it; otherwise non-ASCII headers are RFC 2047 encoded.
    policy = email.policy.SMTP if recipient.isascii() and mail_from.isascii() else email.policy.SMTPUTF8
    message = EmailMessage(policy=policy)
    message["From"] = mail_from
    message["To"] = recipient
    message["Subject"] = single_line(rendered.subject, max_chars=900)
    message["Date"] = email.utils.format_datetime(now or datetime.now(UTC))
    message["Message-ID"] = email.utils.make_msgid(domain=domain)
    # RFC 3834: tells auto-responders not to answer.
    message["Auto-Submitted"] = "auto-generated"
    # Machine-readable tags for mail filters and support tools (e.g. "declined-full").
    if kind:
        message["X-Course-Signup-Kind"] = kind.lower().replace("_", "-")
    if registration_id:
        message["X-Course-Signup-Registration"] = single_line(registration_id, max_chars=64)
    message.set_content(rendered.text)
    message.add_alternative(rendered.html, subtype="html")
    # A random boundary cannot occur in the parts; chosen here, the generator skips
    # compiling a regex per message to search them for its own candidate.
    message.set_boundary(f"=_{uuid.uuid4().hex}")
    return message
