"""Notifier emails: every kind in every locale, and hostile input that must stay inert.

The message bytes are written by domain.messages.compose_message, not by the standard
library's generator, so they are checked here the way a mail server would see them:
parsed back by the standard library, header by header, line by line.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.notifier.adapters.templates import TemplateRenderer
from services.notifier.domain.messages import (
    InvalidRecipient,
    compose_message,
    resolve_locale,
    validate_recipient,
)
from services.notifier.domain.model import Notification, NotificationKind

MAIL_FROM = "Course Sign-up <no-reply@course-signup.example>"
HOSTILE_NAME = "Eve\r\nBcc: attacker@evil.test <script>alert(1)</script>"

renderer = TemplateRenderer()


def _notification(kind: NotificationKind, locale: str = "en", **changes: str) -> Notification:
    fields = {
        "registration_id": "reg-123",
        "kind": kind,
        "recipient": "ana@example.com",
        "locale": locale,
        "name": "Ana Souza",
        "course_id": "c-physics",
        "course_name": "Physics 101",
    }
    fields.update(changes)
    return Notification(**fields)  # type: ignore[arg-type]


def _raw(notification: Notification, mail_from: str = MAIL_FROM) -> bytes:
    return compose_message(renderer.render(notification), mail_from=mail_from,
                           recipient=validate_recipient(notification.recipient),
                           kind=notification.kind.value, registration_id=notification.registration_id)


def _parse(raw: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert not parsed.defects, parsed.defects
    return parsed


def _sent_form(notification: Notification) -> EmailMessage:
    """The message as a mail server would receive and parse it."""
    return _parse(_raw(notification))


def _header_names(raw: bytes) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    return [line.split(b":", 1)[0].decode() for line in head.split(b"\r\n") if not line.startswith((b" ", b"\t"))]


EXPECTED_HEADERS = ["From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", "X-Course-Signup-Kind",
                    "X-Course-Signup-Registration", "MIME-Version", "Content-Type"]


def _parts(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


@pytest.mark.parametrize("locale", ["en", "pt-BR"])
@pytest.mark.parametrize("kind", list(NotificationKind))
def test_every_kind_renders_subject_text_and_html_in_each_locale(kind: NotificationKind, locale: str) -> None:
    rendered = renderer.render(_notification(kind, locale))

    assert rendered.subject and "\n" not in rendered.subject
    assert "Physics 101" in rendered.subject
    for body in (rendered.text, rendered.html):
        assert "Ana Souza" in body
        assert "Physics 101" in body
        assert "reg-123" in body
    assert rendered.html.lstrip().startswith("<!DOCTYPE html>")
    assert f'lang="{locale}"' in rendered.html

    message = _sent_form(_notification(kind, locale))
    assert message.get_content_type() == "multipart/alternative"
    assert message["Subject"] == rendered.subject
    assert message["To"] == "ana@example.com"
    assert message["From"] == MAIL_FROM
    assert message["Date"] and message["Message-ID"]
    text, html = _parts(message)
    assert "Ana Souza" in text and "Ana Souza" in html


@pytest.mark.parametrize("kind", list(NotificationKind))
def test_portuguese_differs_from_english_for_every_kind(kind: NotificationKind) -> None:
    english = renderer.render(_notification(kind, "en"))
    portuguese = renderer.render(_notification(kind, "pt-BR"))
    assert english.subject != portuguese.subject
    assert "Olá Ana Souza" in portuguese.text
    assert "Hello Ana Souza" in english.text


def test_each_kind_has_its_own_subject() -> None:
    subjects = {renderer.render(_notification(kind)).subject for kind in NotificationKind}
    assert len(subjects) == len(NotificationKind)


def test_received_email_gives_the_registration_id_and_what_happens_next() -> None:
    english = renderer.render(_notification(NotificationKind.RECEIVED, "en"))
    assert "registration id is reg-123" in english.text
    assert "What happens next" in english.text
    portuguese = renderer.render(_notification(NotificationKind.RECEIVED, "pt-BR"))
    assert "inscrição é reg-123" in portuguese.text
    assert "Próximos passos" in portuguese.text


@pytest.mark.parametrize("requested", ["pt-BR", "pt_br", "PT-br", " pt-BR "])
def test_brazilian_portuguese_is_recognised_in_any_spelling(requested: str) -> None:
    assert resolve_locale(requested) == "pt-BR"


@pytest.mark.parametrize("requested", ["", "en", "fr", "pt-PT", "de-DE", "../../etc/passwd"])
def test_any_other_locale_falls_back_to_english(requested: str) -> None:
    assert resolve_locale(requested) == "en"
    fallback = renderer.render(_notification(NotificationKind.ENROLLED, requested))
    assert fallback == renderer.render(_notification(NotificationKind.ENROLLED, "en"))


def test_missing_course_name_falls_back_to_the_course_id_and_missing_name_to_a_plain_greeting() -> None:
    rendered = renderer.render(_notification(NotificationKind.ENROLLED, name="", course_name=""))
    assert "c-physics" in rendered.subject
    assert rendered.text.startswith("Hello,")


def test_hostile_name_adds_no_header_no_recipient_and_is_escaped_in_html() -> None:
    notification = _notification(
        NotificationKind.RECEIVED, name=HOSTILE_NAME,
        course_name='Math\r\nCc: other@evil.test\n"quoted" <b>bold</b>',
    )
    message = _sent_form(notification)

    assert message["Bcc"] is None and message["Cc"] is None
    addresses = email.utils.getaddresses(
        [str(v) for header in ("To", "Cc", "Bcc") for v in message.get_all(header, [])]
    )
    assert addresses == [("", "ana@example.com")]
    raw_headers = message.as_bytes().split(b"\n\n", 1)[0]
    assert b"\nBcc:" not in raw_headers and b"\nCc:" not in raw_headers
    assert "\n" not in message["Subject"] and "\r" not in message["Subject"]
    assert "Math Cc: other@evil.test" in message["Subject"]

    text, html = _parts(message)
    assert "<script>" not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;bold&lt;/b&gt;" in html
    # In plain text it is just text, on one line.
    assert "Hello Eve Bcc: attacker@evil.test <script>alert(1)</script>," in text


@pytest.mark.parametrize("separator", ["\u2028", "\u0085", "\x0b", "\x00", "\u202e"])
def test_unicode_line_breaks_and_controls_never_reach_the_subject(separator: str) -> None:
    rendered = renderer.render(_notification(NotificationKind.ENROLLED, course_name=f"Art{separator}Bcc: x@evil.test"))
    assert separator not in rendered.subject
    assert "Art Bcc: x@evil.test" in rendered.subject


@pytest.mark.parametrize("address", [
    "not-an-address",
    "ana@example.com, eve@evil.test",
    "ana@example.com\r\nRCPT TO:<eve@evil.test>",
    "Ana <ana@example.com>",
    "",
])
def test_anything_but_one_plain_address_is_an_invalid_recipient(address: str) -> None:
    with pytest.raises(InvalidRecipient):
        validate_recipient(address)


def test_internationalized_address_is_kept_and_encoded_for_smtputf8() -> None:
    notification = _notification(NotificationKind.ENROLLED, "pt-BR", recipient="joão@exemplo.com.br")
    raw = _raw(notification)
    # RFC 6532: with SMTPUTF8 the address goes in the header as UTF-8, not encoded.
    assert "To: joão@exemplo.com.br\r\n".encode() in raw
    assert _parse(raw)["To"] == "joão@exemplo.com.br"


def test_a_message_to_an_ascii_address_is_7_bit_with_crlf_lines_of_at_most_78_characters() -> None:
    raw = _raw(_notification(NotificationKind.WAITLISTED, "pt-BR", name="João Ção " * 20,
                             course_name="Física Avançada " * 20))
    assert raw.isascii()
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    assert _header_names(raw) == EXPECTED_HEADERS


def test_long_and_non_ascii_subjects_fold_and_decode_back_exactly() -> None:
    for course_name in ["Física Avançada " * 30, "x" * 150 + " y", "Art =?utf-8?b?RXZl?= history"]:
        notification = _notification(NotificationKind.ENROLLED, course_name=course_name)
        message = _sent_form(notification)
        assert message["Subject"] == renderer.render(notification).subject


def test_text_that_looks_like_mime_structure_stays_inside_its_part() -> None:
    notification = _notification(NotificationKind.ENROLLED, name="--=_boundary", course_name=".\r\n.\r\n--x--")
    message = _sent_form(notification)
    assert [part.get_content_type() for part in message.iter_parts()] == ["text/plain", "text/html"]
    text, html = _parts(message)
    assert "Hello --=_boundary," in text
    assert "--=_boundary" in html


def test_a_header_value_cannot_add_a_header() -> None:
    raw = _raw(_notification(NotificationKind.RECEIVED, registration_id="reg-1\r\nBcc: eve@evil.test"))
    assert _header_names(raw) == EXPECTED_HEADERS
    assert _parse(raw)["X-Course-Signup-Registration"] == "reg-1 Bcc: eve@evil.test"


def test_a_recipient_that_was_not_validated_is_refused_rather_than_written() -> None:
    for address in ["ana@example.com\r\nBcc: eve@evil.test", "ana@example.com, eve@evil.test", "<ana@example.com>"]:
        with pytest.raises(InvalidRecipient):
            compose_message(renderer.render(_notification(NotificationKind.ENROLLED)), mail_from=MAIL_FROM,
                            recipient=address)


def test_a_non_ascii_sender_name_is_encoded_once_by_the_standard_library() -> None:
    raw = _raw(_notification(NotificationKind.ENROLLED), mail_from="Inscrições <no-reply@course-signup.example>")
    assert raw.isascii()
    assert _parse(raw)["From"] == "Inscrições <no-reply@course-signup.example>"


printable_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=300)


@settings(max_examples=300, deadline=None)
@given(name=printable_text, course_name=printable_text, kind=st.sampled_from(list(NotificationKind)),
       locale=st.sampled_from(["en", "pt-BR"]))
def test_any_name_or_course_name_gives_the_same_headers_one_recipient_and_the_rendered_parts(
    name: str, course_name: str, kind: NotificationKind, locale: str
) -> None:
    notification = _notification(kind, locale, name=name, course_name=course_name)
    raw = _raw(notification)
    assert _header_names(raw) == EXPECTED_HEADERS
    message = _parse(raw)
    assert email.utils.getaddresses(message.get_all("To", [])) == [("", "ana@example.com")]
    rendered = renderer.render(notification)
    assert message["Subject"] == rendered.subject
    text, html = _parts(message)
    assert text.replace("\r\n", "\n") == rendered.text
    assert html.replace("\r\n", "\n") == rendered.html
