"""What every evaluator servicer shares: the context type, names, AIP-160 filters, enum words and page tokens."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import grpc
from google.protobuf.descriptor import EnumDescriptor

from services.runtime import invalid_argument

Ctx = grpc.aio.ServicerContext[Any, Any]

TASK = re.compile(r"^tasks/([a-z0-9][a-z0-9-]{0,62})$")
SUBTASK = re.compile(r"^tasks/([a-z0-9][a-z0-9-]{0,62})/subtasks/([a-z0-9_-]{1,63})$")
MAX_PAGE, DEFAULT_PAGE = 1000, 100
_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_CLAUSE = re.compile(r'^\s*([a-z_]+)\s*=\s*(?:"([^"]*)"|([A-Za-z0-9_/-]+))\s*$')


class ProtoEnum(Protocol):
    """A generated proto enum (its descriptor lists the values)."""

    DESCRIPTOR: EnumDescriptor


class Keyed(Protocol):
    """A listed row: its keyset position is (create time, id)."""

    @property
    def create_time(self) -> datetime: ...

    @property
    def id(self) -> str: ...


def name_id(name: str, prefix: str, field: str = "name") -> str:
    """`{prefix}{id}` → id; INVALID_ARGUMENT on ``field`` otherwise."""
    ident = name.removeprefix(prefix)
    if not name.startswith(prefix) or not _ID.match(ident):
        raise invalid_argument([(field, f"must be {prefix}{{id}}")])
    return ident


def parse_filter(text: str, allowed: Mapping[str, str]) -> dict[str, Any]:
    """`a = "x" AND b = Y` over ``allowed`` fields → {column: value}; anything else is INVALID_ARGUMENT."""
    out: dict[str, Any] = {}
    if not text.strip():
        return out
    for clause in re.split(r"\s+AND\s+", text.strip()):
        match = _CLAUSE.match(clause)
        if not match or match.group(1) not in allowed:
            raise invalid_argument(
                [("filter", f"supported: {' AND '.join(f'{k} = ...' for k in allowed)}; got {clause!r}")]
            )
        out[allowed[match.group(1)]] = match.group(2) if match.group(2) is not None else match.group(3)
    return out


def enum_words(enum: ProtoEnum, prefix: str) -> dict[str, int]:
    """A proto enum's values by name without ``prefix`` (UNSPECIFIED left out), from its descriptor."""
    return {v.name.removeprefix(prefix): v.number for v in enum.DESCRIPTOR.values if v.number}


def enum_filter(where: dict[str, Any], column: str, words: Mapping[str, int], *prefixes: str) -> None:
    """Replace a filtered enum word (with or without one of ``prefixes``) by its number; INVALID_ARGUMENT if unknown."""
    if column in where:
        word = str(where[column]).upper()
        for prefix in prefixes:
            word = word.removeprefix(prefix)
        if word not in words:
            raise invalid_argument([("filter", f"{column} is one of {', '.join(words)}")])
        where[column] = int(words[word])


def check_order(order_by: str, default: str, described: str = "") -> None:
    """The only order a list supports is ``default``; INVALID_ARGUMENT for any other."""
    if order_by.strip() not in ("", default):
        raise invalid_argument([("order_by", f"supported: {described or default}")])


def page_of(request_size: int, token: str) -> tuple[int, tuple[datetime, str] | None]:
    """(page size, keyset position after which the page starts) of a List request."""
    if request_size < 0:
        raise invalid_argument([("page_size", "must be 0 or more")])
    size = min(request_size or DEFAULT_PAGE, MAX_PAGE)
    if not token:
        return size, None
    try:
        when, ident = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        return size, (datetime.fromisoformat(when), ident)
    except Exception as exc:
        raise invalid_argument([("page_token", "not a token this list returned")]) from exc


def next_token(rows: Sequence[Keyed], size: int) -> str:
    """The token of the page after ``rows`` (empty when this page was the last)."""
    if len(rows) < size:
        return ""
    last = rows[-1]
    return base64.urlsafe_b64encode(f"{last.create_time.isoformat()}|{last.id}".encode()).decode()


__all__ = [
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "SUBTASK",
    "TASK",
    "Ctx",
    "Keyed",
    "ProtoEnum",
    "check_order",
    "enum_filter",
    "enum_words",
    "name_id",
    "next_token",
    "page_of",
    "parse_filter",
]
