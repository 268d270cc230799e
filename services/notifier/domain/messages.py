"""How a notification becomes a safe email message.

Anything a student typed (name) or an operator typed (course name) is reduced to one
line of printable text before it reaches a template or a header, so it can never add
a header or a recipient. The recipient is exactly one address validated by
email-validator; the HTML part is autoescaped by the templates. The message bytes are
written here directly (the standard library's EmailMessage costs about a millisecond
per message); tests parse them back with the standard library, hostile input included.
"""

from __future__ import annotations

import binascii
import email.policy
import email.utils
import functools
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
    # str.isprintable() is False for every character of those categories (and a few
    # more), so text that passes it has none to replace: the common case, checked in C.
    # Leading and trailing whitespace (a rendered template's final newline) would end up
    # stripped anyway; removing it first keeps such text on the fast path.
    value = value.strip()
    if not value.isprintable():
        value = "".join(
            " " if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") else char for char in value
        )
    return _WHITESPACE.sub(" ", value).strip()[:max_chars]


class InvalidRecipient(PermanentDeliveryError):
    """The address cannot receive email; retrying will not change that."""


# A sign-up's emails ("received", then the decision) go to one address seconds apart:
# validating it once saves the second email ~0.1 ms of CPU. Only valid addresses are
# kept (an exception is not cached), in memory, as the database already holds them.
@functools.lru_cache(maxsize=8192)
def validate_recipient(address: str) -> str:
    """The form to send to of exactly one syntactically valid address (no DNS lookup):
    all ASCII whenever the local part is (an internationalised domain in its IDNA "xn--"
    form), so only a local part outside ASCII needs a server with SMTPUTF8."""
    try:
        result = validate_email(address, check_deliverability=False)
        return result.ascii_email or result.normalized
    except EmailNotValidError as error:
        raise InvalidRecipient(f"invalid recipient address: {error}") from error


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


# Characters that have a meaning around an address in a header or an SMTP command.
_ADDRESS_UNSAFE = re.compile(r'[\x00-\x20\x7f<>()\[\]\\,;:"]')
# RFC 5322 recommends header lines of at most 78 characters.
_FOLD_AT = 78
# An RFC 2047 encoded-word is at most 75 characters: "=?utf-8?b?" + 60 base64 + "?=" (45 bytes).
_ENCODED_WORD_BYTES = 45


def _header(name: str, value: str) -> bytes:
    """One header line (CRLF-terminated), folded; anything not plain ASCII is RFC 2047 encoded.

    `value` is reduced to one line first, so it can hold no CR or LF of its own; the
    final check makes sure the only line breaks are the folds this function added.
    """
    value = single_line(value, max_chars=900)
    if value.isascii() and value.isprintable() and "=?" not in value:
        tokens = value.split(" ")
    else:
        # Whitespace between adjacent encoded-words is not part of the decoded text.
        # The first word is cut to fit on the line after the header's name.
        room = (_FOLD_AT - len(name) - 2 - len("=?utf-8?b??=")) // 4 * 3
        tokens = _encoded_words(value, max(3, min(room, _ENCODED_WORD_BYTES)))
    lines = [f"{name}:"]
    for token in tokens:
        if len(lines[-1]) + 1 + len(token) > _FOLD_AT and lines[-1] != f"{name}:":
            lines.append(" " + token)  # folding: the space becomes CRLF + space
        else:
            lines[-1] += " " + token
    line = "\r\n".join(lines)
    if "\r" in line.replace("\r\n ", "") or "\n" in line.replace("\r\n ", ""):
        raise ValueError(f"{name} header would contain a line break")
    return line.encode() + b"\r\n"


def _encoded_words(value: str, first_word_bytes: int) -> list[str]:
    """`value` as base64 encoded-words, each holding whole characters (never a split UTF-8 sequence)."""
    words: list[str] = []
    chunk = bytearray()
    limit = first_word_bytes
    for char in value:
        encoded = char.encode()
        if chunk and len(chunk) + len(encoded) > limit:
            words.append(f"=?utf-8?b?{binascii.b2a_base64(chunk, newline=False).decode()}?=")
            chunk.clear()
            limit = _ENCODED_WORD_BYTES
        chunk += encoded
    if chunk:
        words.append(f"=?utf-8?b?{binascii.b2a_base64(chunk, newline=False).decode()}?=")
    return words


def _quoted_printable(text: str) -> bytes:
    """A body part's text, quoted-printable: 7-bit, lines of at most 76 characters, CRLF.

    "=" is always encoded, so the multipart boundary (which starts with "=_") can never
    occur inside a part.
    """
    normalized = text.replace("\r\n", "\n").replace("\r", "\n").encode()
    return binascii.b2a_qp(normalized, istext=True).replace(b"\n", b"\r\n")


@functools.lru_cache(maxsize=8)
def _from_header(mail_from: str) -> bytes:
    """The From line for the configured sender, built once by the standard library."""
    # A display name outside ASCII is RFC 2047 encoded; only an address outside ASCII
    # is written as UTF-8 (and then every message needs SMTPUTF8 anyway).
    policy = email.policy.SMTP if email.utils.parseaddr(mail_from)[1].isascii() else email.policy.SMTPUTF8
    message = EmailMessage(policy=policy)
    message["From"] = mail_from
    return message.as_bytes().split(b"\r\n\r\n", 1)[0] + b"\r\n"


@functools.lru_cache(maxsize=8)
def _domain(mail_from: str) -> str:
    """The sender's domain, for Message-IDs."""
    return email.utils.parseaddr(mail_from)[1].rpartition("@")[2] or "course-signup.local"


def compose_message(
    rendered: RenderedEmail,
    *,
    mail_from: str,
    recipient: str,
    kind: str = "",
    registration_id: str = "",
    now: datetime | None = None,
) -> bytes:
    """A multipart/alternative (text + HTML) message to `recipient`, a validated address,
    as the bytes to send (CRLF line ends).

    Written directly rather than through email.message.EmailMessage, whose header
    objects and generator cost about a millisecond of CPU per message: the headers
    that carry outside text go through `_header` (one line, folded, RFC 2047 encoded
    when not plain ASCII), the bodies are quoted-printable. Only a non-ASCII address
    puts 8-bit bytes in the message; such a message needs SMTPUTF8.
    """
    if _ADDRESS_UNSAFE.search(recipient) or recipient.count("@") != 1:
        raise InvalidRecipient("recipient is not one plain address")
    boundary = f"=_{uuid.uuid4().hex}"
    head = [
        _from_header(mail_from),
        b"To: " + recipient.encode() + b"\r\n",
        _header("Subject", rendered.subject),
        b"Date: " + email.utils.format_datetime(now or datetime.now(UTC)).encode() + b"\r\n",
        b"Message-ID: " + email.utils.make_msgid(domain=_domain(mail_from)).encode() + b"\r\n",
        # RFC 3834: tells auto-responders not to answer.
        b"Auto-Submitted: auto-generated\r\n",
    ]
    # Machine-readable tags for mail filters and support tools (e.g. "declined-full").
    if kind:
        head.append(_header("X-Course-Signup-Kind", kind.lower().replace("_", "-")))
    if registration_id:
        head.append(_header("X-Course-Signup-Registration", single_line(registration_id, max_chars=64)))
    head.append(b"MIME-Version: 1.0\r\n")
    head.append(f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n\r\n'.encode())
    delimiter = f"--{boundary}\r\n".encode()
    parts = [
        delimiter,
        b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n',
        _quoted_printable(rendered.text),
        b"\r\n",
        delimiter,
        b'Content-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n',
        _quoted_printable(rendered.html),
        b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    return b"".join(head + parts)
