"""Assignments: everything a claimed attempt needs to run, built from the stored plan and its dependencies' results."""

from __future__ import annotations

from typing import cast

from maw.agent.v1 import agent_service_pb2 as apb
from maw.common.v1 import machine_pb2, work_pb2
from maw.scheduler.v1 import resources_pb2 as spb
from sqlalchemy.ext.asyncio import AsyncConnection

from . import store
from .dag import StepSpec
from .names import subtask_name, task_name
from .templates import prompt_for
from .wire import lease_of, ts


async def assignments(conn: AsyncConnection, rows: list[store.SubtaskRow], max_diff_bytes: int) -> list[apb.Assignment]:
    """Everything each claimed attempt needs to run, built from the stored plan."""
    task_bodies: dict[str, spb.Task] = {}
    for task_id in {r.task_id for r in rows}:
        t = await store.get_task(conn, task_id)
        task_bodies[task_id] = spb.Task.FromString(t.body) if t else spb.Task()
    dep_outputs: dict[str, dict[str, bytes]] = {}
    for task_id in {r.task_id for r in rows if r.dependencies}:
        keys = sorted({d for r in rows if r.task_id == task_id for d in r.dependencies})
        dep_outputs[task_id] = await store.latest_results(conn, task_id, keys)
    out = []
    for row in rows:
        task = task_bodies[row.task_id]
        spec = spb.SubtaskSpec.FromString(row.body)
        deps = []
        for dep in row.dependencies:
            body = dep_outputs.get(row.task_id, {}).get(dep)
            res = spb.SubtaskResult.FromString(body) if body else spb.SubtaskResult()
            deps.append(
                apb.DependencyOutput(
                    subtask=subtask_name(row.task_id, dep),
                    key=dep,
                    summary=res.summary,
                    diff=res.diff,
                    output=res.output[:16_384],
                )  # fmt: skip
            )
        limits = spec.time_limits if spec.HasField("time_limits") else task.time_limits
        out.append(
            apb.Assignment(
                lease=lease_of(row.task_id, row.key, row.attempt),
                lease_deadline=ts(row.lease_expire_time),
                attempt_deadline=ts(row.attempt_deadline),
                key=row.key,
                display_name=spec.display_name,
                type=spec.type,
                tool=machine_pb2.ToolChoice(
                    kind=cast("machine_pb2.ToolKind.ValueType", row.tool), model=spec.preferred_tool.model
                ),
                tool_options=spec.tool_options,
                prompt=prompt_for(step_of(spec), task.display_name, task.description, list(task.requirements))
                + feedback_note(row),
                context=apb.TaskContext(
                    task=task_name(row.task_id),
                    display_name=task.display_name,
                    description=task.description,
                    requirements=task.requirements,
                    dependencies=deps,
                ),
                workspace=task.workspace,
                time_limits=limits,
                resource_limits=spec.resource_limits,
                privacy_level=task.privacy_level,
                priority=task.priority,
                max_diff_bytes=max_diff_bytes,
            )
        )
    return out


def feedback_note(row: store.SubtaskRow) -> str:
    """Feedback given for the task's future work (DecideCheckpoint apply_to_future), to add to the prompt.

    A correction subtask carries its own feedback in its instructions already.
    """
    if not row.feedback or row.corrects:
        return ""
    lines = ["", "", "Feedback from the people reviewing this task; follow it in this step too:"]
    for raw in row.feedback:
        fb = work_pb2.Feedback.FromString(bytes(raw))
        kind = work_pb2.FeedbackType.Name(fb.type).removeprefix("FEEDBACK_TYPE_")
        files = f" (see {', '.join(fb.reference_files)})" if fb.reference_files else ""
        lines.append(f"- [{kind}] {fb.text}{files}")
    return "\n".join(lines)


def step_of(spec: spb.SubtaskSpec) -> StepSpec:
    """The plan step a stored subtask spec came from, as prompts are written for it."""
    return StepSpec(key=spec.key, display_name=spec.display_name, description=spec.description)
