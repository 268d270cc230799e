"""Sends messages over a small pool of reused SMTP connections (aiosmtplib).

At most `max_connections` connections exist; each carries one message at a time and
is kept open for the next one (a new connection per email costs about half the
throughput). STARTTLS and AUTH happen on connect when configured. Each send has one
deadline covering connect and transfer. A connection that failed or timed out is
closed rather than reused; a reused connection the server had meanwhile dropped is
replaced once, transparently. aiosmtplib errors become the domain's transient or
permanent delivery errors: 4xx and connection trouble are transient, 5xx permanent.
Messages arrive as bytes (domain.messages.compose_message); an address outside ASCII
makes the transaction ask for SMTPUTF8, and a server without it is a permanent failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import re
import socket
import ssl
from dataclasses import dataclass

import aiosmtplib

from services.notifier.domain.model import PermanentDeliveryError, TransientDeliveryError

log = logging.getLogger(__name__)


# What may not appear in an address on a MAIL or RCPT command line (aiosmtplib's own rule,
# plus the angle brackets that delimit it): controls, whitespace, "<", ">".
_ENVELOPE_UNSAFE = re.compile(r"[\x00-\x20\x7f<>]")
_LINE_ENDS = re.compile(rb"\r\n|\n|\r(?!\n)")


def _transmitted_size(message: bytes) -> int:
    """The message's size as DATA sends it (CRLF line ends, ending in CRLF), for SIZE=."""
    size = len(message)
    crlf = message.count(b"\r\n")
    if crlf != message.count(b"\n") or crlf != message.count(b"\r"):
        size = len(_LINE_ENDS.sub(b"\r\n", message))
        return size if message.endswith((b"\n", b"\r")) else size + 2
    return size if message.endswith(b"\r\n") else size + 2


def _reply_error(code: int, message: str) -> TransientDeliveryError | PermanentDeliveryError:
    reason = f"{code} {message}".strip()
    if 500 <= code < 600:
        return PermanentDeliveryError(reason)
    return TransientDeliveryError(reason)


@dataclass
class _Checkout:
    """The connection one send is using, and whether it may serve the next send."""

    connection: aiosmtplib.SMTP | None
    reusable: bool = False


class SmtpMailer:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        mail_from: str,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = False,
        timeout_seconds: float = 10.0,
        max_connections: int = 4,
        local_hostname: str | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._username = username or None
        self._password = password if username else None
        self._starttls = starttls
        self._timeout = timeout_seconds
        # None: the system's trusted CAs, certificates verified.
        self._tls_context = tls_context
        self.max_connections = max_connections
        self.envelope_sender = email.utils.parseaddr(mail_from)[1] or mail_from
        if _ENVELOPE_UNSAFE.search(self.envelope_sender) or not self.envelope_sender:
            raise ValueError("the sender address cannot go on an SMTP command line")
        self._envelope_sender_ascii = self.envelope_sender.isascii()
        # socket.getfqdn() may wait on DNS; aiosmtplib would call it on every connect.
        self._local_hostname = local_hostname or socket.gethostname() or "localhost"
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[aiosmtplib.SMTP] = []
        self._closed = False
        # Connections carrying a message now (the pool's use, for metrics).
        self.busy = 0

    async def send(self, message: bytes, recipient: str) -> None:
        """Delivers `message` to exactly `recipient` (the envelope never reads the headers)."""
        async with self._slots:
            if self._closed:
                raise TransientDeliveryError("mailer is shutting down")
            checkout = _Checkout(self._idle.pop() if self._idle else None)
            self.busy += 1
            try:
                async with asyncio.timeout(self._timeout):
                    await self._send_on(checkout, message, recipient)
            except TimeoutError as error:
                self._discard(checkout.connection)
                raise TransientDeliveryError(f"SMTP timed out after {self._timeout}s") from error
            except BaseException:
                if checkout.reusable:
                    await self._give_back(checkout.connection)
                else:
                    self._discard(checkout.connection)
                raise
            finally:
                self.busy -= 1
            await self._give_back(checkout.connection)

    async def _send_on(self, checkout: _Checkout, message: bytes, recipient: str) -> None:
        reused = checkout.connection is not None and checkout.connection.is_connected
        if not reused:
            self._discard(checkout.connection)
            checkout.connection = await self._connect()
        try:
            await self._transfer(checkout, message, recipient)
        except aiosmtplib.SMTPServerDisconnected:
            if not reused:
                raise TransientDeliveryError("SMTP server closed the connection") from None
            # The server dropped the idle connection (idle timeout): use a fresh one, once.
            self._discard(checkout.connection)
            checkout.connection = None
            checkout.connection = await self._connect()
            try:
                await self._transfer(checkout, message, recipient)
            except aiosmtplib.SMTPServerDisconnected:
                raise TransientDeliveryError("SMTP server closed the connection") from None

    async def _open_connection(self) -> aiosmtplib.SMTP:
        connection = aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            username=self._username,
            password=self._password,
            start_tls=self._starttls,
            timeout=self._timeout,
            local_hostname=self._local_hostname,
            tls_context=self._tls_context if self._starttls else None,
        )
        try:
            await connection.connect()
            if connection.is_ehlo_or_helo_needed:
                # Greet now, so each message's options can depend on the server's extensions.
                try:
                    await connection.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await connection.helo()
        except BaseException:
            # A failed STARTTLS or AUTH leaves the socket open.
            self._discard(connection)
            raise
        return connection

    async def _connect(self) -> aiosmtplib.SMTP:
        try:
            return await self._open_connection()
        except aiosmtplib.SMTPAuthenticationError as error:
            # Wrong credentials are the operator's to fix, not the message's fault.
            raise TransientDeliveryError(f"SMTP authentication failed: {error.code} {error.message}") from error
        except aiosmtplib.SMTPResponseException as error:
            raise TransientDeliveryError(f"SMTP connect refused: {error.code} {error.message}") from error
        except (aiosmtplib.SMTPException, OSError) as error:
            raise TransientDeliveryError(f"SMTP connect failed: {type(error).__name__}: {error}") from error

    async def _transfer(self, checkout: _Checkout, message: bytes, recipient: str) -> None:
        """One mail transaction: MAIL, RCPT, DATA, each awaiting its reply (aiosmtplib reads
        one reply per command written, so commands cannot be pipelined over it).

        Written with aiosmtplib's command layer rather than `sendmail`, which parses both
        addresses with email.utils on every message (about a tenth of the notifier's CPU
        per email): the envelope sender is checked once, in __init__, and the recipient,
        already one validated address, is refused here if it holds anything that has a
        meaning on an SMTP command line.
        """
        connection = checkout.connection
        if connection is None:
            raise TransientDeliveryError("no SMTP connection")
        if _ENVELOPE_UNSAFE.search(recipient) or not recipient:
            checkout.reusable = True
            raise PermanentDeliveryError("address rejected before sending: unsafe characters in the recipient")
        options = []
        encoding = "ascii"
        if not (recipient.isascii() and self._envelope_sender_ascii):
            if not connection.supports_extension("smtputf8"):
                checkout.reusable = True
                raise PermanentDeliveryError("SMTP server cannot take this message: SMTPUTF8 is not supported")
            options.append(b"SMTPUTF8")
            encoding = "utf-8"
        if not message.isascii() and connection.supports_extension("8bitmime"):
            options.append(b"BODY=8BITMIME")
        if connection.supports_extension("size"):
            options.insert(0, b"SIZE=%d" % _transmitted_size(message))
        try:
            reply = await connection.execute_command(
                b"MAIL", b"FROM:<" + self.envelope_sender.encode(encoding) + b">", *options)
            if reply.code != 250:
                raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, self.envelope_sender)
            reply = await connection.execute_command(b"RCPT", b"TO:<" + recipient.encode(encoding) + b">")
            if reply.code not in (250, 251):
                raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, recipient)
            await connection.data(message)
        except aiosmtplib.SMTPServerDisconnected:
            raise
        except aiosmtplib.SMTPResponseException as error:
            # 421: the server is closing the connection. Otherwise reset the transaction,
            # so the connection can carry the next message.
            checkout.reusable = error.code != 421 and await self._reset(connection)
            raise _reply_error(error.code, error.message) from error
        except ValueError as error:
            # aiosmtplib refuses command arguments with control characters.
            checkout.reusable = await self._reset(connection)
            raise PermanentDeliveryError(f"address rejected before sending: {error}") from error
        except (aiosmtplib.SMTPException, OSError) as error:
            raise TransientDeliveryError(f"SMTP failed: {type(error).__name__}: {error}") from error

    @staticmethod
    async def _reset(connection: aiosmtplib.SMTP) -> bool:
        """RSET after a refused command; whether the connection is fit for another message."""
        try:
            return (await connection.rset()).code == 250
        except (aiosmtplib.SMTPException, OSError):
            return False

    async def _give_back(self, connection: aiosmtplib.SMTP | None) -> None:
        if connection is None:
            return
        if self._closed:
            await self._quit(connection)
        else:
            self._idle.append(connection)

    @staticmethod
    def _discard(connection: aiosmtplib.SMTP | None) -> None:
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    async def _quit(self, connection: aiosmtplib.SMTP) -> None:
        try:
            async with asyncio.timeout(2.0):
                await connection.quit()
        except Exception:  # noqa: BLE001 - closing anyway
            self._discard(connection)

    async def close(self) -> None:
        """Says QUIT on every idle connection; a send in progress quits its own when done."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(connection) for connection in idle))
