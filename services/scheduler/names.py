"""Resource names of the scheduler: ``tasks/{task}`` and ``tasks/{task}/subtasks/{subtask}``."""

from __future__ import annotations

import re

from services.runtime import invalid_argument

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def task_name(task_id: str) -> str:
    """``tasks/{task}``."""
    return f"tasks/{task_id}"


def subtask_name(task_id: str, key: str) -> str:
    """``tasks/{task}/subtasks/{key}``."""
    return f"tasks/{task_id}/subtasks/{key}"


def parse_task(name: str, field: str = "name") -> str:
    """The task id in ``tasks/{task}``; INVALID_ARGUMENT naming ``field`` otherwise."""
    parts = name.split("/")
    if len(parts) != 2 or parts[0] != "tasks" or not ID_PATTERN.match(parts[1]):
        raise invalid_argument([(field, f"must be tasks/{{task}}, got {name[:100]!r}")])
    return parts[1]


def parse_subtask(name: str, field: str = "name") -> tuple[str, str]:
    """(task id, key) of ``tasks/{task}/subtasks/{key}``; INVALID_ARGUMENT naming ``field`` otherwise."""
    parts = name.split("/")
    if (
        len(parts) != 4
        or parts[0] != "tasks"
        or parts[2] != "subtasks"
        or not ID_PATTERN.match(parts[1])
        or not ID_PATTERN.match(parts[3])
    ):
        raise invalid_argument([(field, f"must be tasks/{{task}}/subtasks/{{subtask}}, got {name[:100]!r}")])
    return parts[1], parts[3]


def try_parse_subtask(name: str) -> tuple[str, str] | None:
    """Like :func:`parse_subtask` but None instead of an error."""
    parts = name.split("/")
    if len(parts) == 4 and parts[0] == "tasks" and parts[2] == "subtasks":
        return parts[1], parts[3]
    return None
