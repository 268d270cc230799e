"""JSON logs on stderr for every service, and the one way to mention personal data in them.

Emails, names and birth dates never go into logs in clear: `pseudonym()` gives a short
keyed hash that lets an operator correlate lines about one student without the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sys
import time
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# The key of pseudonym(): the service's LOG_PSEUDONYM_KEY once configure_logging ran;
# until then (library use, tests) a random one of this process's own.
_pseudonym_key = secrets.token_bytes(32)


def configure_logging(service: str, level: str = "INFO", pseudonym_key: str | None = None) -> None:
    global _pseudonym_key
    if pseudonym_key:
        _pseudonym_key = hashlib.sha256(pseudonym_key.encode()).digest()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "aiosmtpd", "mail.log"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def pseudonym(value: str) -> str:
    """A stable, non-reversible tag for personal data in logs (e.g. an email)."""
    digest = hashlib.blake2b(value.strip().lower().encode(), digest_size=6, key=_pseudonym_key)
    return "pii:" + digest.hexdigest()
