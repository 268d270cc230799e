"""Pseudonyms of personal data in logs: keyed by the service's LOG_PSEUDONYM_KEY."""

from __future__ import annotations

import hashlib
import io
import json
import logging

import pytest

from libs import logs


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level, key = root.handlers[:], root.level, logs._pseudonym_key
    yield
    root.handlers[:], logs._pseudonym_key = handlers, key
    root.setLevel(level)


def test_pseudonyms_depend_on_the_configured_key_and_correlate_under_one_key():
    logs.configure_logging("test", "INFO", "first-key-0123456789abcdef")
    first = logs.pseudonym("Ada@Example.com")
    assert first == logs.pseudonym(" ada@example.com ")  # one student, one tag
    assert "ada" not in first
    logs.configure_logging("test", "INFO", "second-key-0123456789abcdef")
    assert logs.pseudonym("ada@example.com") != first
    logs.configure_logging("test", "INFO", "first-key-0123456789abcdef")
    assert logs.pseudonym("ada@example.com") == first  # every instance with the key agrees
    # The key earlier versions wrote in the source no longer gives the same tag.
    public = hashlib.blake2b(b"ada@example.com", digest_size=6, key=b"course-signup-logs").hexdigest()
    assert first != "pii:" + public


def test_log_lines_are_json_with_the_service_name():
    logs.configure_logging("stats", "INFO", "a-key-0123456789abcdef")
    stream = io.StringIO()
    logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
    logging.getLogger("x").info("hello", extra={"student": logs.pseudonym("ada@example.com")})
    entry = json.loads(stream.getvalue())
    assert (entry["service"], entry["message"]) == ("stats", "hello")
    assert entry["student"].startswith("pii:") and "ada" not in stream.getvalue()
