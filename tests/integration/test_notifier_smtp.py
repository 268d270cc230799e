"""The notifier's SMTP pool against real servers: reuse, STARTTLS + AUTH, SMTPUTF8, hangs, outages, 421."""

from __future__ import annotations

import asyncio
import pathlib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from services.notifier.adapters.smtp import SmtpMailer
from services.notifier.adapters.templates import TemplateRenderer
from services.notifier.domain.messages import compose_message, validate_recipient
from services.notifier.domain.model import (
    Notification,
    NotificationKind,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from tests.helpers import free_port

MAIL_FROM = "Course Sign-up <no-reply@course-signup.example>"


class CountingHandler:
    """Records deliveries with their MAIL options, and how many sessions said EHLO."""

    def __init__(self) -> None:
        self.greetings = 0
        self.deliveries: list[tuple[list[str], list[str]]] = []

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        self.greetings += 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.deliveries.append((list(envelope.rcpt_tos), list(envelope.mail_options)))
        return "250 OK"


def _message(recipient: str) -> Any:
    notification = Notification("reg-1", NotificationKind.ENROLLED, recipient, "pt-BR", "João", "c1", "Física")
    return compose_message(TemplateRenderer().render(notification), mail_from=MAIL_FROM,
                           recipient=validate_recipient(recipient))


def _mailer(port: int, **options: Any) -> SmtpMailer:
    return SmtpMailer(host="127.0.0.1", port=port, mail_from=MAIL_FROM, **{"timeout_seconds": 5, **options})


def _server(handler: CountingHandler, **options: Any) -> tuple[Controller, int]:
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, **options)
    controller.start()
    return controller, port


@pytest.fixture
def certificate(tmp_path: pathlib.Path) -> Iterator[tuple[pathlib.Path, pathlib.Path]]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    yield cert, key


def test_many_messages_share_a_few_reused_connections() -> None:
    handler = CountingHandler()
    controller, port = _server(handler)

    async def send_all() -> None:
        mailer = _mailer(port, max_connections=2)
        await asyncio.gather(*(mailer.send(_message(f"s{i}@example.com"), f"s{i}@example.com")
                               for i in range(30)))
        await mailer.close()

    try:
        asyncio.run(send_all())
    finally:
        controller.stop()
    assert len(handler.deliveries) == 30
    assert handler.greetings <= 2


def test_a_connection_the_server_closed_while_idle_is_replaced_transparently() -> None:
    handler = CountingHandler()
    controller, port = _server(handler, timeout=0.3)

    async def send_twice() -> None:
        mailer = _mailer(port, max_connections=1)
        await mailer.send(_message("a@example.com"), "a@example.com")
        await asyncio.sleep(0.8)  # the server's idle timeout closes the pooled connection
        await mailer.send(_message("b@example.com"), "b@example.com")
        await mailer.close()

    try:
        asyncio.run(send_twice())
    finally:
        controller.stop()
    assert [rcpts for rcpts, _ in handler.deliveries] == [["a@example.com"], ["b@example.com"]]
    assert handler.greetings == 2


def test_starttls_and_auth_are_used_when_configured(certificate: tuple[pathlib.Path, pathlib.Path]) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))
    logins: list[bytes] = []

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert session.ssl is not None, "AUTH only after STARTTLS"
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"mailer", b"s3cret")
        logins.append(data.login)
        return AuthResult(success=ok, handled=False)

    handler = CountingHandler()
    controller, port = _server(handler, tls_context=server_tls, require_starttls=True, auth_required=True,
                               auth_require_tls=True, authenticator=authenticate)

    async def send(password: str) -> None:
        mailer = _mailer(port, starttls=True, username="mailer", password=password, tls_context=client_tls)
        try:
            await mailer.send(_message("ana@example.com"), "ana@example.com")
        finally:
            await mailer.close()

    try:
        asyncio.run(send("s3cret"))
        assert [rcpts for rcpts, _ in handler.deliveries] == [["ana@example.com"]]
        # Bad credentials are an operator's problem: retried, not the message's permanent failure.
        with pytest.raises(TransientDeliveryError, match="authentication"):
            asyncio.run(send("wrong"))
        assert len(handler.deliveries) == 1
        # Without STARTTLS this server refuses the mail.
        with pytest.raises((TransientDeliveryError, PermanentDeliveryError)):
            asyncio.run(_send_plain(port))
    finally:
        controller.stop()
    assert set(logins) == {b"mailer"} and len(logins) >= 2


async def _send_plain(port: int) -> None:
    mailer = _mailer(port)
    try:
        await mailer.send(_message("ana@example.com"), "ana@example.com")
    finally:
        await mailer.close()


def test_internationalized_address_goes_out_with_smtputf8() -> None:
    handler = CountingHandler()
    controller, port = _server(handler, enable_SMTPUTF8=True)
    try:
        asyncio.run(_send_one(port, "joão@exemplo.com.br"))
    finally:
        controller.stop()
    ((recipients, options),) = handler.deliveries
    assert recipients == ["joão@exemplo.com.br"]
    assert "SMTPUTF8" in [option.upper() for option in options]


def test_internationalized_address_fails_permanently_on_a_server_without_smtputf8() -> None:
    handler = CountingHandler()
    controller, port = _server(handler, enable_SMTPUTF8=False)
    try:
        with pytest.raises(PermanentDeliveryError, match="SMTPUTF8"):
            asyncio.run(_send_one(port, "joão@exemplo.com.br"))
    finally:
        controller.stop()
    assert handler.deliveries == []


def test_an_ascii_mailbox_at_an_internationalised_domain_goes_out_in_ascii_without_smtputf8() -> None:
    # Registration normalises x19@xn--bcher-kva.example to x19@bücher.example; both forms
    # are deliverable by a server without SMTPUTF8 once the domain is written in IDNA.
    handler = CountingHandler()
    controller, port = _server(handler, enable_SMTPUTF8=False)
    try:
        for address in ("x19@bücher.example", "x19@xn--bcher-kva.example"):
            recipient = validate_recipient(address)
            assert recipient == "x19@xn--bcher-kva.example"
            message = _message(address)
            assert message.isascii() and b"To: x19@xn--bcher-kva.example\r\n" in message
            asyncio.run(_send_raw(port, message, recipient))
    finally:
        controller.stop()
    assert [recipients for recipients, _ in handler.deliveries] == [["x19@xn--bcher-kva.example"]] * 2
    assert not any("SMTPUTF8" in option.upper() for _, options in handler.deliveries for option in options)


async def _send_raw(port: int, message: bytes, recipient: str) -> None:
    mailer = _mailer(port)
    try:
        await mailer.send(message, recipient)
    finally:
        await mailer.close()


async def _send_one(port: int, recipient: str) -> None:
    mailer = _mailer(port)
    try:
        await mailer.send(_message(recipient), recipient)
    finally:
        await mailer.close()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts TCP connections and never says a word (no greeting): a hung mail server."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(2)
        for connection in accepted:
            connection.close()
        listener.close()


def test_a_server_that_never_greets_costs_one_timeout_and_is_a_transient_failure(silent_server: int) -> None:
    async def send() -> float:
        mailer = SmtpMailer(host="127.0.0.1", port=silent_server, mail_from=MAIL_FROM, timeout_seconds=0.4)
        started = time.monotonic()
        try:
            with pytest.raises(TransientDeliveryError, match="timed out"):
                await mailer.send(_message("ana@example.com"), "ana@example.com")
            return time.monotonic() - started
        finally:
            await mailer.close()

    assert asyncio.run(send()) >= 0.35  # it waited for the greeting up to the timeout


class HangingDataHandler(CountingHandler):
    """Answers everything but the first DATA, which it never answers."""

    def __init__(self) -> None:
        super().__init__()
        self.hung = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.hung == 0:
            self.hung += 1
            await asyncio.sleep(30)  # cancelled when the server stops
        return await super().handle_DATA(server, session, envelope)


def test_a_send_stuck_in_data_times_out_and_its_connection_is_not_reused() -> None:
    handler = HangingDataHandler()
    controller, port = _server(handler)

    async def send_twice() -> float:
        mailer = _mailer(port, max_connections=1, timeout_seconds=0.4)
        started = time.monotonic()
        try:
            with pytest.raises(TransientDeliveryError, match="timed out"):
                await mailer.send(_message("a@example.com"), "a@example.com")
            elapsed = time.monotonic() - started
            await mailer.send(_message("b@example.com"), "b@example.com")
            return elapsed
        finally:
            await mailer.close()

    try:
        elapsed = asyncio.run(send_twice())
    finally:
        controller.stop()
    assert elapsed >= 0.35  # the stuck DATA was waited for up to the timeout
    assert [rcpts for rcpts, _ in handler.deliveries] == [["b@example.com"]]
    assert handler.greetings == 2, "the stuck connection was dropped, a fresh one carried the next message"


def test_a_server_that_is_down_is_a_transient_failure_at_once() -> None:
    with socket.socket() as placeholder:  # bound, not listening: the connection is refused
        placeholder.bind(("127.0.0.1", 0))
        port = int(placeholder.getsockname()[1])
        with pytest.raises(TransientDeliveryError, match="connect failed"):
            asyncio.run(_send_one(port, "ana@example.com"))


class ClosingOnceHandler(CountingHandler):
    """Replies 421 (closing the channel) to the first RCPT, then accepts."""

    def __init__(self) -> None:
        super().__init__()
        self.rcpts = 0

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        self.rcpts += 1
        if self.rcpts == 1:
            return "421 4.3.2 Service shutting down, closing channel"
        envelope.rcpt_tos.append(address)
        return "250 OK"


def test_421_is_transient_and_the_next_message_goes_over_a_new_connection() -> None:
    handler = ClosingOnceHandler()
    controller, port = _server(handler)

    async def send_twice() -> None:
        mailer = _mailer(port, max_connections=1)
        try:
            with pytest.raises(TransientDeliveryError, match="421"):
                await mailer.send(_message("a@example.com"), "a@example.com")
            await mailer.send(_message("a@example.com"), "a@example.com")
        finally:
            await mailer.close()

    try:
        asyncio.run(send_twice())
    finally:
        controller.stop()
    assert [rcpts for rcpts, _ in handler.deliveries] == [["a@example.com"]]
    assert handler.greetings == 2


@pytest.mark.parametrize("recipient", ["a b@example.com", "a>@example.com", "a@example.com>\r\nRCPT TO:<b@evil.test",
                                       "<a@example.com>", "a\x00@example.com", ""])
def test_a_recipient_unsafe_on_the_command_line_is_refused_before_sending_and_the_connection_stays_usable(
    recipient: str,
) -> None:
    handler = CountingHandler()
    controller, port = _server(handler)

    async def run() -> None:
        mailer = _mailer(port, max_connections=1)
        await mailer.send(_message("first@example.com"), "first@example.com")
        with pytest.raises(PermanentDeliveryError, match="rejected before sending"):
            await mailer.send(_message("first@example.com"), recipient)
        await mailer.send(_message("second@example.com"), "second@example.com")
        await mailer.close()

    try:
        asyncio.run(run())
    finally:
        controller.stop()
    assert [rcpt_tos for rcpt_tos, _ in handler.deliveries] == [["first@example.com"], ["second@example.com"]]
    assert handler.greetings == 1


def test_a_refused_recipient_resets_the_transaction_and_the_next_message_uses_the_same_connection() -> None:
    class Refusing(CountingHandler):
        async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                              rcpt_options: list[str]) -> str:
            if address.startswith("refused"):
                return "550 5.1.1 no such mailbox"
            envelope.rcpt_tos.append(address)
            return "250 OK"

    handler = Refusing()
    controller, port = _server(handler)

    async def run() -> None:
        mailer = _mailer(port, max_connections=1)
        with pytest.raises(PermanentDeliveryError, match="550"):
            await mailer.send(_message("refused@example.com"), "refused@example.com")
        await mailer.send(_message("ok@example.com"), "ok@example.com")
        await mailer.close()

    try:
        asyncio.run(run())
    finally:
        controller.stop()
    assert [rcpt_tos for rcpt_tos, _ in handler.deliveries] == [["ok@example.com"]]
    assert handler.greetings == 1


@pytest.mark.parametrize("message", [b"a\r\nb\r\n", b"a\r\nb", b"a\nb\n", b"a\rb", b"a\r\n\nb\r", b""])
def test_the_size_announced_is_the_size_data_transmits(message: bytes) -> None:
    from aiosmtplib.protocol import normalize_message_line_endings

    from services.notifier.adapters.smtp import _transmitted_size

    assert _transmitted_size(message) == len(normalize_message_line_endings(message))
