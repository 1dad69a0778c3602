"""AIP-160 filters, parsed into a small typed tree: never interpolated into SQL, never ``eval``-ed.

The grammar is the subset maw's List and Watch calls document::

    expr       := and ("OR" and)*
    and        := unary (["AND"] unary)*
    unary      := ("NOT" | "-") unary | "(" expr ")" | comparison
    comparison := field op value        op := = != < <= > >= :
    field      := name ("." name)*      value := "quoted string" | bare word

Each list call passes a :class:`Schema` naming its fields and their types; unknown fields, wrong types
and malformed input give INVALID_ARGUMENT on ``filter``. Values are converted to Python values once, at
parse time; :func:`matches` evaluates the tree on a record, and stores translate it into bound SQL.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.descriptor import EnumDescriptor

from services.runtime.errors import MawError, invalid_argument

MAX_FILTER_LENGTH = 2000
MAX_TERMS = 50
MAX_DEPTH = 16
OPERATORS = ("<=", ">=", "!=", "=", "<", ">", ":")


@dataclass(frozen=True)
class FieldType:
    """How one filterable field is typed: ``str``, ``bool``, ``int``, ``time`` or ``enum``."""

    kind: str
    enum_values: Mapping[str, int] | None = None
    prefix_map: bool = False  # `labels.<key>`: any key under the field


Schema = Mapping[str, FieldType]


def enum_values(descriptor: EnumDescriptor) -> dict[str, int]:
    """A proto enum's values by both spellings, ``ROLE_ADMIN`` and ``ADMIN`` (the UNSPECIFIED value left out)."""
    prefix = descriptor.values_by_number[0].name.removesuffix("UNSPECIFIED")
    out: dict[str, int] = {}
    for value in descriptor.values:
        if value.number:
            out[value.name] = value.number
            out[value.name.removeprefix(prefix)] = value.number
    return out


@dataclass(frozen=True)
class Comparison:
    """``field op value`` with ``value`` already converted to the field's type."""

    field: str
    op: str
    value: Any
    wildcard: bool = False  # a string value ending in `*`: prefix match


@dataclass(frozen=True)
class Not:
    """Negation."""

    item: Node


@dataclass(frozen=True)
class And:
    """Conjunction."""

    items: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    """Disjunction."""

    items: tuple[Node, ...]


Node = Comparison | Not | And | Or

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<op><=|>=|!=|=|<|>|:)
      | (?P<paren>[()])
      | (?P<word>[^\s()=<>!:"']+)
    )""",
    re.VERBOSE,
)


def _bad(why: str) -> MawError:
    return invalid_argument([("filter", why)])


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise _bad(f"unexpected character at position {pos}")
        kind = match.lastgroup or ""
        out.append((kind, match.group(kind)))
        pos = match.end()
    return out


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]], schema: Schema) -> None:
        self.tokens = tokens
        self.pos = 0
        self.schema = schema
        self.terms = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise _bad("unexpected end of filter")
        self.pos += 1
        return token

    def expr(self, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise _bad("too deeply nested")
        items = [self.conjunction(depth)]
        while self.peek() == ("word", "OR"):
            self.take()
            items.append(self.conjunction(depth))
        return items[0] if len(items) == 1 else Or(tuple(items))

    def conjunction(self, depth: int) -> Node:
        items = [self.unary(depth)]
        while (token := self.peek()) is not None and token not in (("word", "OR"), ("paren", ")")):
            if token == ("word", "AND"):
                self.take()
            items.append(self.unary(depth))
        return items[0] if len(items) == 1 else And(tuple(items))

    def unary(self, depth: int) -> Node:
        token = self.take()
        if token in (("word", "NOT"), ("word", "-")):
            return Not(self.unary(depth + 1))
        if token == ("paren", "("):
            inner = self.expr(depth + 1)
            if self.take() != ("paren", ")"):
                raise _bad("missing closing parenthesis")
            return inner
        if token[0] != "word":
            raise _bad(f"expected a field name, got {token[1]!r}")
        return self.comparison(token[1])

    def comparison(self, name: str) -> Comparison:
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise _bad(f"more than {MAX_TERMS} comparisons")
        op_kind, op = self.take()
        if op_kind != "op":
            raise _bad(f"expected an operator after {name!r}")
        kind, raw = self.take()
        if kind == "string":
            value, quoted = _unquote(raw), True
        elif kind == "word":
            value, quoted = raw, False
        else:
            raise _bad(f"expected a value after {name} {op}")
        return _typed(name, op, value, quoted, self.schema)


def _unquote(raw: str) -> str:
    body = raw[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


def _field_type(name: str, schema: Schema) -> FieldType:
    if name in schema:
        return schema[name]
    head, _, rest = name.partition(".")
    ftype = schema.get(head)
    if ftype is not None and ftype.prefix_map and rest and re.fullmatch(r"[A-Za-z0-9_./-]{1,63}", rest):
        return ftype
    raise _bad(f"unknown field {name!r}; known: {', '.join(sorted(schema))}")


def _typed(name: str, op: str, value: str, quoted: bool, schema: Schema) -> Comparison:
    ftype = _field_type(name, schema)
    if op == ":" and ftype.kind != "str":
        raise _bad(f"`:` applies to text fields only, not {name!r}")
    if ftype.kind == "str":
        if value.endswith("*") and op in ("=", "!="):
            return Comparison(name, op, value[:-1], wildcard=True)
        return Comparison(name, op, value)
    if ftype.kind == "bool":
        if value.lower() not in ("true", "false") or op not in ("=", "!="):
            raise _bad(f"{name} takes `= true` or `= false`")
        return Comparison(name, op, value.lower() == "true")
    if ftype.kind == "int":
        if not re.fullmatch(r"-?\d{1,18}", value):
            raise _bad(f"{name} takes an integer, not {value!r}")
        return Comparison(name, op, int(value))
    if ftype.kind == "time":
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise _bad(f"{name} takes an RFC 3339 time, not {value!r}") from exc
        return Comparison(name, op, moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    if ftype.kind == "enum":
        values = ftype.enum_values or {}
        number = values.get(value.upper())
        if number is None:
            raise _bad(f"{name} takes one of {', '.join(sorted(values))}, not {value!r}")
        return Comparison(name, op, number)
    raise _bad(f"field {name!r} cannot be filtered")  # pragma: no cover - schemas name known kinds


def parse(text: str, schema: Schema) -> Node | None:
    """The filter tree of ``text`` (None for an empty filter); INVALID_ARGUMENT on ``filter`` otherwise."""
    if len(text) > MAX_FILTER_LENGTH:
        raise _bad(f"longer than {MAX_FILTER_LENGTH} characters")
    tokens = _tokens(text)
    if not tokens:
        return None
    parser = _Parser(tokens, schema)
    tree = parser.expr(0)
    if parser.peek() is not None:
        raise _bad(f"unexpected {parser.peek()[1]!r}")  # type: ignore[index]
    return tree


def _compare(actual: Any, cmp: Comparison) -> bool:
    if isinstance(actual, list | tuple | set | frozenset):
        return any(_compare(item, cmp) for item in actual)
    expected = cmp.value
    if actual is None:
        return cmp.op == "!="
    if cmp.wildcard:
        hit = str(actual).startswith(str(expected))
        return hit if cmp.op == "=" else not hit
    if cmp.op == ":":
        return str(expected).lower() in str(actual).lower()
    try:
        if cmp.op == "=":
            return bool(actual == expected)
        if cmp.op == "!=":
            return bool(actual != expected)
        if cmp.op == "<":
            return bool(actual < expected)
        if cmp.op == "<=":
            return bool(actual <= expected)
        if cmp.op == ">":
            return bool(actual > expected)
        return bool(actual >= expected)
    except TypeError:
        return False


def matches(tree: Node | None, lookup: Callable[[str], Any]) -> bool:
    """Whether a record, whose field values ``lookup`` returns, satisfies ``tree``."""
    if tree is None:
        return True
    if isinstance(tree, Comparison):
        return _compare(lookup(tree.field), tree)
    if isinstance(tree, Not):
        return not matches(tree.item, lookup)
    if isinstance(tree, And):
        return all(matches(item, lookup) for item in tree.items)
    return any(matches(item, lookup) for item in tree.items)


__all__ = ["And", "Comparison", "FieldType", "Node", "Not", "Or", "Schema", "enum_values", "matches", "parse"]
