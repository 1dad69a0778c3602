"""The filterable fields of each registry listing, and how a resource answers for each field."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC
from typing import Any

from maw.common.v1 import machine_pb2, work_pb2
from maw.registry.v1 import resources_pb2 as res

from . import filtering

F = filtering.FieldType
_ROLE = filtering.enum_values(res.Role.DESCRIPTOR)
_STATE = filtering.enum_values(res.TokenState.DESCRIPTOR)

USERS: filtering.Schema = {
    "role": F("enum", _ROLE),
    "disabled": F("bool"),
    "display_name": F("str"),
    "email": F("str"),
}
API_TOKENS: filtering.Schema = {
    "state": F("enum", _STATE),
    "role": F("enum", _ROLE),
    "display_name": F("str"),
    "expire_time": F("time"),
}
ENROLLMENT_TOKENS: filtering.Schema = {
    "state": F("enum", _STATE),
    "creator": F("str"),
    "labels": F("str", prefix_map=True),
    "expire_time": F("time"),
}
WORKERS: filtering.Schema = {
    "status": F("enum", filtering.enum_values(res.WorkerStatus.DESCRIPTOR)),
    "labels": F("str", prefix_map=True),
    "effective_labels": F("str", prefix_map=True),
    "tools.kind": F("enum", filtering.enum_values(machine_pb2.ToolKind.DESCRIPTOR)),
    "privacy_level": F("enum", filtering.enum_values(work_pb2.PrivacyLevel.DESCRIPTOR)),
    "draining": F("bool"),
    "disabled": F("bool"),
    "hostname": F("str"),
}
ACTIVITY: filtering.Schema = {
    "verb": F("str"),
    "resource": F("str"),
    "task": F("str"),
    "subtask": F("str"),
    "worker": F("str"),
    "actor.name": F("str"),
    "actor.kind": F("enum", filtering.enum_values(res.ActorKind.DESCRIPTOR)),
    "level": F("enum", filtering.enum_values(res.ActivityLevel.DESCRIPTOR)),
    "service": F("str"),
    "time": F("time"),
    "sequence": F("int"),
}


def user_lookup(user: res.User) -> Callable[[str], Any]:
    """The filter fields of a user."""
    return lambda field: getattr(user, field)


def api_token_lookup(token: res.ApiToken) -> Callable[[str], Any]:
    """The filter fields of an API token."""

    def get(field: str) -> Any:
        if field == "expire_time":
            return token.expire_time.ToDatetime(tzinfo=UTC) if token.HasField("expire_time") else None
        return getattr(token, field)

    return get


def enrollment_token_lookup(token: res.EnrollmentToken) -> Callable[[str], Any]:
    """The filter fields of an enrollment token."""

    def get(field: str) -> Any:
        if field.startswith("labels."):
            return token.labels.get(field.removeprefix("labels."))
        if field == "expire_time":
            return token.expire_time.ToDatetime(tzinfo=UTC)
        return getattr(token, field)

    return get


def worker_lookup(worker: res.Worker) -> Callable[[str], Any]:
    """The filter fields of a worker."""

    def get(field: str) -> Any:
        if field.startswith("labels."):
            return worker.labels.get(field.removeprefix("labels."))
        if field.startswith("effective_labels."):
            return worker.effective_labels.get(field.removeprefix("effective_labels."))
        if field == "tools.kind":
            return [t.kind for t in worker.tools]
        return getattr(worker, field)

    return get
