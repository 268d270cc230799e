"""Registration ids that prove they were issued, without any database write.

An id is `reg_` + base32(16-byte nonce + 10-byte HMAC tag of the nonce). A status
look-up can then tell an id this service issued (PENDING until decided) from one it
never issued (NOT_FOUND) and from garbage (INVALID_ARGUMENT). With a client
request_id the nonce is derived from it and from the sign-up it names (the course and
the student's address, the identity enrollment decides on): a retried Register maps to
the same id and the duplicate command is absorbed downstream (AIP-155), while another
sign-up sent with the same request_id, by mistake or by someone guessing it, gets an id
of its own instead of being merged into the first and silently dropped.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import secrets

PREFIX = "reg_"
_NONCE = 16
_TAG = 10
ENCODED_LENGTH = len(PREFIX) + len(base64.b32encode(b"\0" * (_NONCE + _TAG)).rstrip(b"="))


class IdCheck(enum.Enum):
    ISSUED = "issued"
    NOT_ISSUED = "not_issued"
    MALFORMED = "malformed"


class RegistrationIds:
    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(secret.encode()).digest()

    def _tag(self, nonce: bytes) -> bytes:
        return hmac.new(self._key, b"registration-id:" + nonce, hashlib.sha256).digest()[:_TAG]

    def issue(self, request_id: str = "", *, course_id: str = "", email: str = "") -> str:
        """A new id; with a request_id, the same one for the same request_id, course and
        address (compared as enrollment compares them: case-insensitively)."""
        if request_id:
            # JSON keeps the parts apart whatever characters a request_id holds.
            sign_up = json.dumps([request_id, course_id, email.strip().lower()]).encode()
            nonce = hmac.new(self._key, b"request-id:" + sign_up, hashlib.sha256).digest()[:_NONCE]
        else:
            nonce = secrets.token_bytes(_NONCE)
        raw = base64.b32encode(nonce + self._tag(nonce)).decode().rstrip("=").lower()
        return PREFIX + raw

    @staticmethod
    def canonical(registration_id: str) -> str:
        """The spelling `issue` gives an id that may have been copied in another case.

        Base32 is case-insensitive, and ids travel through forms and spreadsheets that
        change case; a look-up by another spelling must find the decision recorded under
        the issued one (else it would answer PENDING forever)."""
        given = registration_id.strip() if len(registration_id) <= 2 * ENCODED_LENGTH else registration_id
        return given.lower() if given.isascii() else given

    def check(self, registration_id: str) -> IdCheck:
        """Whether this exact spelling was issued (pass it through `canonical` first)."""
        if len(registration_id) != ENCODED_LENGTH or not registration_id.startswith(PREFIX) \
                or not registration_id.islower():
            return IdCheck.MALFORMED
        body = registration_id[len(PREFIX):].upper()
        try:
            raw = base64.b32decode(body + "=" * (-len(body) % 8))
        except (binascii.Error, ValueError):
            return IdCheck.MALFORMED
        if base64.b32encode(raw).decode().rstrip("=") != body:
            return IdCheck.MALFORMED  # non-canonical spelling (stray padding bits)
        nonce, tag = raw[:_NONCE], raw[_NONCE:]
        return IdCheck.ISSUED if hmac.compare_digest(tag, self._tag(nonce)) else IdCheck.NOT_ISSUED
