"""The activity-log records the evaluator writes about checkpoints (opened, decided, rolled back)."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2
from maw.evaluator.v1 import resources_pb2 as epb
from maw.registry.v1 import activity_intake_service_pb2 as aipb
from maw.registry.v1 import resources_pb2 as rpb


def checkpoint_activity(
    cp: epb.Checkpoint, who: str, word: str, when: Any = None, comment: str | None = None
) -> aipb.ActivityRecord:
    """The activity-log record of a checkpoint opened, decided or rolled back by ``who`` (``word``)."""
    comment = cp.decision.comment if comment is None else comment
    details = struct_pb2.Struct()
    details.update({"checkpoint": cp.name, "decision": word, "comment": comment[:2000]})
    entry = rpb.ActivityEntry(
        time=cp.close_time if when is None else when,
        actor=rpb.Actor(kind=rpb.ACTOR_KIND_USER, name=who),
        verb=f"checkpoint.{word}",
        resource=cp.name,
        task=cp.task,
        level=rpb.ACTIVITY_LEVEL_INFO,
        summary=f"{who} {word} {cp.name}" + (f": {comment}" if comment else ""),
        details=details,
        service="evaluator",
    )
    entry.summary = entry.summary[:2000]
    ident = cp.name.removeprefix("checkpoints/")
    kind = "opened" if word == "opened" else "decision"
    return aipb.ActivityRecord(entry_id=f"evaluator-{kind}-{ident}", entry=entry)


__all__ = ["checkpoint_activity"]
