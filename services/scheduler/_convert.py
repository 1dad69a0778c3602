"""Proto ⇄ domain/rows for the scheduler's API (private to this package)."""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime
from typing import Any

from google.protobuf import json_format, struct_pb2
from maw.common.v1 import machine_pb2, work_pb2
from maw.scheduler.v1 import resources_pb2 as spb

from services.runtime import invalid_argument

from . import store
from .dag import StepSpec
from .events import progress_of
from .wire import ts

__all__ = ["ts"]
from .names import subtask_name, task_name
from .templates import BuiltinTemplate

MAX_PAGE = 500
DEFAULT_PAGE = 50


def step_from_spec(spec: spb.SubtaskSpec) -> StepSpec:
    """The domain view of a SubtaskSpec."""
    return StepSpec(
        key=spec.key,
        display_name=spec.display_name,
        description=spec.description,
        type=spec.type,
        dependencies=list(spec.dependencies),
        complexity=spec.complexity,
        priority=spec.priority,
        tool_kind=spec.preferred_tool.kind,
        model=spec.preferred_tool.model,
        required_labels=dict(spec.required_labels),
        max_attempts=spec.max_attempts,
        tool_options=json_format.MessageToDict(spec.tool_options),
    )


def spec_from_step(step: StepSpec) -> spb.SubtaskSpec:
    """A SubtaskSpec for a domain step."""
    options = struct_pb2.Struct()
    options.update(step.tool_options)
    return spb.SubtaskSpec(
        key=step.key,
        display_name=step.display_name,
        description=step.description,
        type=step.type,  # type: ignore[arg-type]
        dependencies=step.dependencies,
        complexity=step.complexity,
        priority=step.priority,
        preferred_tool=machine_pb2.ToolChoice(kind=step.tool_kind, model=step.model),  # type: ignore[arg-type]
        required_labels=step.required_labels,
        max_attempts=step.max_attempts,
        tool_options=options,
    )


def builtin_template(t: BuiltinTemplate) -> spb.Template:
    """The Template message of a built-in."""
    return spb.Template(
        name=t.name,
        display_name=t.display_name,
        description=t.description,
        task_type=t.task_type,  # type: ignore[arg-type]
        steps=[spec_from_step(s) for s in t.steps],
        built_in=True,
    )


def task_message(row: store.TaskRow, states: dict[int, int] | None = None) -> spb.Task:
    """The Task message: stored inputs plus live state."""
    task = spb.Task.FromString(row.body)
    task.name = task_name(row.id)
    task.state = row.state  # type: ignore[assignment]
    task.state_message = row.state_message
    task.priority = row.priority  # type: ignore[assignment]
    task.max_concurrency = row.max_concurrency
    task.labels.clear()
    task.labels.update(row.labels)
    task.subtask_count = row.subtask_count
    task.progress_percent = progress_of(row)
    task.creator = row.creator
    task.last_event_sequence = row.last_event_sequence
    for field, value in (
        ("create_time", row.create_time),
        ("start_time", row.start_time),
        ("end_time", row.end_time),
        ("update_time", row.update_time),
    ):
        stamp = ts(value)
        if stamp is not None:
            getattr(task, field).CopyFrom(stamp)
    task.etag = str(int(row.update_time.timestamp() * 1e6))
    if states:
        task.subtask_state_counts.extend(
            spb.SubtaskStateCount(state=s, count=n)  # type: ignore[arg-type]
            for s, n in sorted(states.items())
        )
    return task


def subtask_message(row: store.SubtaskRow, result: bytes | None = None) -> spb.Subtask:
    """The Subtask message: its spec plus live state (and its current result, when given)."""
    spec = spb.SubtaskSpec.FromString(row.body)
    sub = spb.Subtask(
        name=subtask_name(row.task_id, row.key),
        key=row.key,
        display_name=spec.display_name,
        description=spec.description,
        type=spec.type,
        state=row.state,  # type: ignore[arg-type]
        dependencies=[subtask_name(row.task_id, d) for d in row.dependencies],
        complexity=spec.complexity,
        priority=spec.priority,
        preferred_tool=spec.preferred_tool,
        tool=machine_pb2.ToolChoice(kind=row.tool) if row.tool else None,  # type: ignore[arg-type]
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        worker=row.worker or "",
        progress_percent=row.progress_percent,
        progress_message=row.progress_message,
        required_labels=dict(row.required_labels),
        time_limits=spec.time_limits,
        state_message=row.state_message,
        evaluation=row.evaluation,
        evaluation_score=row.evaluation_score,
        grade=row.grade,  # type: ignore[arg-type]
        correction_cycle=row.correction_cycle,
        corrects=subtask_name(row.task_id, row.corrects) if row.corrects else "",
        review_of=subtask_name(row.task_id, row.review_of) if row.review_of else "",
        solution_of=subtask_name(row.task_id, row.solution_of) if row.solution_of else "",
        checkpoint=row.checkpoint,
        feedback=[work_pb2.Feedback.FromString(bytes(b)) for b in row.feedback],
    )
    if row.unschedulable_code:
        sub.unschedulable_reason.CopyFrom(
            spb.UnschedulableReason(
                code=row.unschedulable_code,  # type: ignore[arg-type]
                message=row.unschedulable_message,
                since=ts(row.unschedulable_since),
            )
        )
    for field, value in (
        ("lease_expire_time", row.lease_expire_time),
        ("next_attempt_time", row.next_attempt_time),
        ("create_time", row.create_time),
        ("ready_time", row.ready_time),
        ("start_time", row.start_time),
        ("end_time", row.end_time),
        ("update_time", row.update_time),
    ):
        stamp = ts(value)
        if stamp is not None:
            getattr(sub, field).CopyFrom(stamp)
    if result:
        sub.result.CopyFrom(spb.SubtaskResult.FromString(result))
    return sub


def page_size(value: int, field: str = "page_size") -> int:
    """AIP-158: 0 means the default; negative is an error; large values are capped."""
    if value < 0:
        raise invalid_argument([(field, "must not be negative")])
    return min(value or DEFAULT_PAGE, MAX_PAGE)


def encode_token(payload: dict[str, Any]) -> str:
    """An opaque page token."""
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


def decode_token(token: str, field: str = "page_token") -> dict[str, Any]:
    """The payload of a page token from :func:`encode_token`."""
    try:
        payload = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, UnicodeDecodeError):
        raise invalid_argument([(field, "not a page token this server issued")]) from None
    if not isinstance(payload, dict):
        raise invalid_argument([(field, "not a page token this server issued")])
    return payload


_TERM = re.compile(
    r'^\s*(?P<field>[a-z_]+(?:\.[A-Za-z0-9_.-]+)?)\s*(?P<op>=|!=)\s*(?P<value>"[^"]*"|[A-Za-z0-9_./-]+)\s*$'
)


def parse_filter(text: str, allowed: dict[str, str], enums: dict[str, dict[str, int]]) -> tuple[str, dict[str, Any]]:
    """A small AIP-160 subset: ``field = value`` terms joined by AND; values are always bound.

    ``allowed`` maps a filter field to its SQL column (a ``labels.`` prefix means a JSON label);
    ``enums`` maps fields whose values are enum names to their numbers.
    """
    if not text.strip():
        return "", {}
    clauses: list[str] = []
    params: dict[str, Any] = {}
    for i, term in enumerate(re.split(r"\s+AND\s+", text.strip())):
        m = _TERM.match(term)
        if not m:
            raise invalid_argument([("filter", f"cannot parse {term[:80]!r}; use field = value [AND ...]")])
        name, op, value = m.group("field"), m.group("op"), m.group("value").strip('"')
        sql_op = "=" if op == "=" else "<>"
        if name.startswith("labels."):
            params[f"lk{i}"], params[f"lv{i}"] = name[len("labels.") :], value
            clause = f"labels ->> :lk{i} = :lv{i}"
            clauses.append(clause if op == "=" else f"NOT ({clause})")
            continue
        if name not in allowed:
            raise invalid_argument([("filter", f"unknown field {name!r}; known: {', '.join(sorted(allowed))}")])
        if name in enums:
            names = enums[name]
            key = value.upper()
            if key not in names:
                raise invalid_argument([("filter", f"unknown {name} {value!r}")])
            params[f"v{i}"] = names[key]
        else:
            params[f"v{i}"] = value
        clauses.append(f"{allowed[name]} {sql_op} :v{i}")
    return " AND ".join(clauses), params


def time_key(value: datetime) -> str:
    """A datetime as it goes into a page token."""
    return value.isoformat()
