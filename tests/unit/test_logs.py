"""Logs are structured and never carry a secret."""

from __future__ import annotations

import io
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.runtime.logs import JsonFormatter, TextFormatter, configure_logging, redact

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2Vycy8xIn0.c2lnbmF0dXJlLWJ5dGVz"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"authorization: Bearer {JWT}", JWT),
        ("issued maw_pat_0123456789abcdefXYZ for alice", "maw_pat_0123456789abcdefXYZ"),
        ("login password=hunter2 ok", "hunter2"),
        ('{"token": "s3cr3t-value"}', "s3cr3t-value"),
        ("DATABASE_URL=postgresql://maw:pa55word@db:5432/maw", "pa55word"),
        ("api_key: abcdef123", "abcdef123"),
    ],
)
def test_redact_masks_secrets(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out
    assert "[REDACTED]" in out


def test_redact_leaves_ordinary_text_alone() -> None:
    text = "task tasks/7 moved RUNNING -> SUCCEEDED in 1.2s on workers/gpu-box"
    assert redact(text) == text


@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=8, max_size=40))
def test_any_value_after_password_is_masked(value: str) -> None:
    cleaned = value.replace('"', "").replace("'", "").replace(",", "").replace("}", "")
    if len(cleaned) < 8:
        return
    assert cleaned not in redact(f"password={cleaned}")


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "maw.test", "levelname": "INFO", "levelno": 20, "msg": message})
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_carry_extras_and_no_secret() -> None:
    line = JsonFormatter().format(_record("enrolled %s", rpc="/maw.registry.v1.EnrollmentService/EnrollAgent"))
    entry = json.loads(line)
    assert entry["level"] == "info"
    assert entry["rpc"] == "/maw.registry.v1.EnrollmentService/EnrollAgent"
    secret_line = JsonFormatter().format(_record("credential maw_agt_supersecretvalue123 issued"))
    assert "supersecretvalue" not in secret_line
    json.loads(secret_line)  # still valid JSON after redaction


def test_text_lines_are_readable_and_redacted() -> None:
    line = TextFormatter().format(_record(f"token {JWT}", peer="ipv4:127.0.0.1:5"))
    assert "maw.test" in line
    assert "peer=ipv4:127.0.0.1:5" in line
    assert JWT not in line


def test_configured_logging_stamps_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    configure_logging("registry", "INFO", "json")
    try:
        logging.getLogger("maw.test").info("hello")
    finally:
        logging.getLogger().handlers.clear()
    assert json.loads(stream.getvalue().strip())["service"] == "registry"
