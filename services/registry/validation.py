"""Checks of caller input shared by the registry's RPCs: ids, names, texts, labels, paging.

Each check raises INVALID_ARGUMENT naming the request field, before anything is read or written.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping

from services.runtime.errors import MawError, invalid_argument

USER_ID = re.compile(r"[a-z][a-z0-9-]{0,62}")
WORKER_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
TOKEN_ID = re.compile(r"[a-z0-9]{1,63}")
EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,190}\.[^@\s.]{1,63}")
MAX_DISPLAY_NAME = 200
MIN_PASSWORD = 12
MAX_PASSWORD = 1024
MAX_LABELS = 64
LABEL_KEY = re.compile(r"[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?")
MAX_LABEL_VALUE = 128
MAX_REQUEST_ID = 128
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


def name_id(value: str, collection: str, pattern: re.Pattern[str], field: str) -> str:
    """The ``{id}`` of ``{collection}/{id}``; INVALID_ARGUMENT on ``field`` when malformed."""
    if not value:
        raise invalid_argument([(field, f"required: `{collection}/{{id}}`")])
    prefix = collection + "/"
    if not value.startswith(prefix) or not pattern.fullmatch(value[len(prefix) :]):
        raise invalid_argument([(field, f"not a valid name of the form `{collection}/{{id}}`")])
    return value[len(prefix) :]


def user_id(value: str, field: str) -> str:
    """Check a login name (``{user}`` of ``users/{user}``)."""
    if not USER_ID.fullmatch(value):
        raise invalid_argument([(field, "1–63 lower case letters, digits or hyphens, starting with a letter")])
    return value


def display_name(value: str, field: str, *, required: bool = False) -> str:
    """Check a display name: at most 200 characters, no control characters."""
    if required and not value.strip():
        raise invalid_argument([(field, "required")])
    if len(value) > MAX_DISPLAY_NAME:
        raise invalid_argument([(field, f"at most {MAX_DISPLAY_NAME} characters")])
    if any(ord(c) < 32 for c in value):
        raise invalid_argument([(field, "must not contain control characters")])
    return value.strip()


def email(value: str, field: str) -> str | None:
    """Check an e-mail address (empty means none)."""
    if not value:
        return None
    if len(value) > 254 or not EMAIL.fullmatch(value):
        raise invalid_argument([(field, "not an e-mail address")])
    return value.lower()


def password(value: str, field: str) -> str:
    """Check a new password's length."""
    if len(value) < MIN_PASSWORD:
        raise invalid_argument([(field, f"at least {MIN_PASSWORD} characters")])
    if len(value) > MAX_PASSWORD:
        raise invalid_argument([(field, f"at most {MAX_PASSWORD} characters")])
    return value


def labels(values: Mapping[str, str], field: str) -> dict[str, str]:
    """Check a label map: bounded size, DNS-like keys, short values."""
    if len(values) > MAX_LABELS:
        raise invalid_argument([(field, f"at most {MAX_LABELS} labels")])
    bad = [
        (f"{field}[{k!r}]", "key: lower case letters, digits, `_ . -`, 1–63 characters")
        for k in values
        if not LABEL_KEY.fullmatch(k)
    ]
    bad += [(f"{field}[{k!r}]", f"value: at most {MAX_LABEL_VALUE} characters") for k, v in values.items()
            if len(v) > MAX_LABEL_VALUE]  # fmt: skip
    if bad:
        raise invalid_argument(bad)
    return dict(values)


def request_id(value: str, field: str = "request_id") -> str:
    """Check an idempotency key (empty allowed: no idempotency)."""
    if len(value) > MAX_REQUEST_ID or any(ord(c) < 33 for c in value):
        raise invalid_argument([(field, f"at most {MAX_REQUEST_ID} printable characters")])
    return value


def page_size(value: int) -> int:
    """Check and cap a page size (0 → default)."""
    if value < 0:
        raise invalid_argument([("page_size", "must not be negative")])
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _query_key(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()[:16]


def page_token(token: str, query: str) -> int:
    """The position a page token stands for; INVALID_ARGUMENT when forged or from another query."""
    if not token:
        return 0
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)))
        position = int(data["p"])
        same = data["q"] == _query_key(query)
    except (ValueError, KeyError, TypeError):
        raise invalid_argument([("page_token", "not a page token of this listing")]) from None
    if not same or position < 0:
        raise invalid_argument([("page_token", "belongs to a different filter or order")])
    return position


def next_page_token(position: int, query: str) -> str:
    """An opaque token for the page that starts at ``position`` of ``query``."""
    raw = json.dumps({"p": position, "q": _query_key(query)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def order_by(value: str, allowed: Mapping[str, str], default: str) -> tuple[str, bool]:
    """``(field, descending)`` from an AIP-132 order_by naming one of ``allowed``."""
    text = value.strip() or default
    parts = text.split()
    if len(parts) not in (1, 2) or parts[0] not in allowed or (len(parts) == 2 and parts[1] not in ("asc", "desc")):
        raise invalid_argument([("order_by", f"one of {', '.join(sorted(allowed))}, optionally `desc`")])
    return allowed[parts[0]], len(parts) == 2 and parts[1] == "desc"


def too_many(field: str, limit: int) -> MawError:
    """INVALID_ARGUMENT for a batch above ``limit`` items."""
    return invalid_argument([(field, f"at most {limit} items per call")])
