"""Structured logging: one JSON object per line in production, a readable line on a terminal.

Every record carries the service name and, inside a traced call, the OpenTelemetry trace and span ids,
so a log line can be found from a trace and back. A redaction filter masks anything that looks like a
credential before it is formatted, as a last line of defence behind "never log a secret".
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

_SECRET_PATTERNS = (
    # JWTs (three base64url segments, the first one a JSON header).
    re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}"),
    # maw's own opaque secrets carry a recognisable prefix (api, refresh, enrollment, agent, service).
    re.compile(r"\bmaw_(?:pat|agt|enr|rft|svc)_[A-Za-z0-9_-]{8,}"),
    # key=value / "key": "value" pairs whose key names a secret.
    re.compile(
        r"(?i)((?:password|passwd|secret|token|credential|authorization|api[_-]?key)[\"']?\s*[:=]\s*[\"']?)"
        r"([^\s\"',}]+)"
    ),
    # URLs with a password in them.
    re.compile(r"(?<=://)([^:/@\s]+):([^@/\s]+)(?=@)"),
)
_REDACTED = "[REDACTED]"
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def redact(text: str) -> str:
    """Mask every substring of ``text`` that looks like a secret."""
    text = _SECRET_PATTERNS[0].sub(_REDACTED, text)
    text = _SECRET_PATTERNS[1].sub(_REDACTED, text)
    text = _SECRET_PATTERNS[2].sub(lambda m: m.group(1) + _REDACTED, text)
    return _SECRET_PATTERNS[3].sub(lambda m: m.group(1) + ":" + _REDACTED, text)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class _Context(logging.Filter):
    """Adds service name and trace ids to every record."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self._service
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; secrets redacted."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str))


class TextFormatter(logging.Formatter):
    """A terminal line: time, level, logger, message, then key=value extras; secrets redacted."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items() if k != "service")
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line += "  " + extras
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def configure_logging(service: str, level: str = "INFO", fmt: str = "auto") -> None:
    """Route all logging of this process to stderr in the chosen format."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_Context(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
