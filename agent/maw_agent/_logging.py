"""Logs to stderr (and optionally a rotated file), readable in a terminal or one JSON object per line; secrets masked.

The credential is masked literally wherever it would appear, and anything shaped like a maw secret or
a bearer token is masked too, as a last line of defence behind "never log a secret".
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["configure_logging"]

_REDACTED = "[REDACTED]"
_PATTERNS = (
    re.compile(r"\bmaw_(?:pat|agt|enr|rft)_[A-Za-z0-9_-]{8,}"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}"),
)


class _Redacting(logging.Formatter):
    def __init__(self, secrets: list[str], as_json: bool) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._secrets = [secret for secret in secrets if secret]
        self._json = as_json

    def format(self, record: logging.LogRecord) -> str:
        if self._json:
            entry = {
                "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
            if record.exc_info:
                entry["exception"] = self.formatException(record.exc_info)
            text = json.dumps(entry)
        else:
            text = super().format(record)
        return redact(text, self._secrets)


def redact(text: str, secrets: list[str]) -> str:
    """Mask the given secrets and anything shaped like a credential."""
    for secret in secrets:
        text = text.replace(secret, _REDACTED)
    text = _PATTERNS[0].sub(_REDACTED, text)
    text = _PATTERNS[1].sub(lambda match: match.group(1) + _REDACTED, text)
    return _PATTERNS[2].sub(_REDACTED, text)


def configure_logging(level: str, fmt: str, secrets: list[str], log_file: Path | None = None) -> None:
    """Send every log record to stderr (and to ``log_file``, rotated, when given), secrets masked."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.expanduser().parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(log_file.expanduser(), maxBytes=10 << 20, backupCount=3))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    for handler in handlers:
        handler.setFormatter(_Redacting(secrets, as_json=fmt == "json"))
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("grpc").setLevel(max(logging.getLevelName(level), logging.WARNING))
