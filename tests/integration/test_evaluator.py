"""The judgement loop over real services: results judged, corrected, escalated and decided by people."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from maw.agent.v1 import agent_service_pb2 as apb
from maw.common.v1 import machine_pb2, work_pb2
from maw.evaluator.v1 import checkpoint_service_pb2 as cpb
from maw.evaluator.v1 import checkpoint_service_pb2_grpc as cpb_grpc
from maw.evaluator.v1 import evaluation_service_pb2 as evpb
from maw.evaluator.v1 import evaluation_service_pb2_grpc as evpb_grpc
from maw.evaluator.v1 import policy_service_pb2 as ppb
from maw.evaluator.v1 import policy_service_pb2_grpc as ppb_grpc
from maw.evaluator.v1 import resources_pb2 as epb
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from maw.scheduler.v1 import task_service_pb2_grpc as tpb_grpc
from maw.scheduler.v1 import verdict_service_pb2 as vpb
from maw.scheduler.v1 import verdict_service_pb2_grpc as vpb_grpc

from deploy.local import Stack
from services.runtime.errors import details_from_trailers
from tests.integration.clients import Metadata, ScriptedAgent, bearer, enroll, eventually

CLAUDE = machine_pb2.TOOL_KIND_CLAUDE_CODE

WEAK = """diff --git a/app.py b/app.py
new file mode 100644
--- /dev/null
+++ b/app.py
@@ -0,0 +1,3 @@
+API_KEY = "AKIAABCDEFGHIJKLMNOP"
+def handler(x)
+    return eval(x)
"""

GOOD = """diff --git a/app.py b/app.py
new file mode 100644
--- /dev/null
+++ b/app.py
@@ -0,0 +1,2 @@
+def add(a: int, b: int) -> int:
+    return a + b
diff --git a/tests/test_app.py b/tests/test_app.py
new file mode 100644
--- /dev/null
+++ b/tests/test_app.py
@@ -0,0 +1,5 @@
+from app import add
+
+
+def test_add() -> None:
+    assert add(1, 2) == 3
"""


def diff_result(assignment: apb.Assignment, diff: str) -> apb.Result:
    """A stand-in AI tool's result: a summary and the change as a unified diff."""
    return apb.Result(
        lease=assignment.lease,
        outcome=work_pb2.OUTCOME_SUCCEEDED,
        summary=f"changed app.py for {assignment.key}",
        diff=work_pb2.Diff(unified_diff=diff, files=[work_pb2.FileChange(path="app.py")]),
    )


def scripted(diffs: list[str]) -> Callable[[apb.Assignment], apb.Result]:
    """Answers the n-th assignment with the n-th diff (the last one repeats)."""
    calls: list[int] = []

    def behaviour(assignment: apb.Assignment) -> apb.Result:
        calls.append(1)
        return diff_result(assignment, diffs[min(len(calls), len(diffs)) - 1])

    return behaviour


async def start_agent(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, started: list[ScriptedAgent],
    behaviour: Callable[[apb.Assignment], apb.Result],
) -> ScriptedAgent:  # fmt: skip
    worker, credential = await enroll(channels["registry"], admin, f"ev-{uuid.uuid4().hex[:8]}", [CLAUDE])
    agent = ScriptedAgent(f"127.0.0.1:{stack.ports.scheduler}", worker, credential, [CLAUDE], behaviour=behaviour)
    await agent.start()
    started.append(agent)
    return agent


async def create(channels: dict[str, grpc.aio.Channel], admin: Metadata, policy: epb.Policy | None = None) -> str:
    graph = tpb.SubtaskGraph(
        subtasks=[
            spb.SubtaskSpec(
                key="implement",
                display_name="Implement",
                type=work_pb2.SUBTASK_TYPE_CODE_GENERATION,
                preferred_tool=machine_pb2.ToolChoice(kind=CLAUDE),
            )
        ]
    )
    task = spb.Task(description="Add an adder", policy=policy)
    created = await tpb_grpc.TaskServiceStub(channels["scheduler"]).CreateTask(
        tpb.CreateTaskRequest(task=task, graph=graph), metadata=admin, timeout=10
    )
    return created.task.name


async def task_state(channels: dict[str, grpc.aio.Channel], admin: Metadata, name: str) -> int:
    reply = await tpb_grpc.TaskServiceStub(channels["scheduler"]).GetTask(
        tpb.GetTaskRequest(name=name), metadata=admin, timeout=10
    )
    return reply.task.state


async def reaches(
    channels: dict[str, grpc.aio.Channel], admin: Metadata, name: str, state: int, timeout: float = 30.0, what: str = ""
) -> None:
    """Wait until the task is in ``state`` (AssertionError saying ``what`` after ``timeout`` seconds)."""

    async def there() -> bool:
        return await task_state(channels, admin, name) == state

    await eventually(there, timeout, what or f"the task to be in state {state}")


async def subtasks(channels: dict[str, grpc.aio.Channel], admin: Metadata, name: str) -> dict[str, spb.Subtask]:
    reply = await tpb_grpc.TaskServiceStub(channels["scheduler"]).ListSubtasks(
        tpb.ListSubtasksRequest(parent=name), metadata=admin, timeout=10
    )
    return {s.key: s for s in reply.subtasks}


async def evaluations(channels: dict[str, grpc.aio.Channel], admin: Metadata, name: str) -> list[epb.Evaluation]:
    reply = await evpb_grpc.EvaluationServiceStub(channels["evaluator"]).ListEvaluations(
        evpb.ListEvaluationsRequest(filter=f'task = "{name}"'), metadata=admin, timeout=10
    )
    return list(reply.evaluations)


async def open_checkpoints(channels: dict[str, grpc.aio.Channel], admin: Metadata, name: str) -> list[epb.Checkpoint]:
    reply = await cpb_grpc.CheckpointServiceStub(channels["evaluator"]).ListCheckpoints(
        cpb.ListCheckpointsRequest(filter=f'state = OPEN AND task = "{name}"'), metadata=admin, timeout=10
    )
    return list(reply.checkpoints)


def violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = details_from_trailers(err.trailing_metadata())
    assert status is not None
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


async def test_a_weak_result_is_corrected_with_the_feedback_and_then_accepted(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent]
) -> None:
    agent = await start_agent(stack, channels, admin, agents, scripted([WEAK, GOOD]))
    name = await create(channels, admin)

    await reaches(channels, admin, name, spb.TASK_STATE_SUCCEEDED, 30, "the corrected task to succeed")
    keys = [a.key for a in agent.assignments]
    assert keys == ["implement", "implement-fix-1"]
    fix = agent.assignments[1]
    assert fix.type == work_pb2.SUBTASK_TYPE_CODE_FIX
    assert "app.py:2" in fix.prompt and "syntax" in fix.prompt.lower(), "the findings travel with the correction"
    assert "aws-access-key" in fix.prompt, "the secret finding travels too"
    assert "+def handler(x)" in fix.prompt, "the previous diff is part of the correction"
    subs = await subtasks(channels, admin, name)
    assert subs["implement"].state == subs["implement-fix-1"].state == spb.SUBTASK_STATE_SUCCEEDED
    first, second = await evaluations(channels, admin, name)
    assert (first.verdict, first.grade) == (epb.VERDICT_CORRECT, epb.GRADE_FAIL)
    assert first.overall_score < 3
    quality = next(d for d in first.dimensions if d.dimension == epb.DIMENSION_CODE_QUALITY)
    assert quality.measured and any(f.path == "app.py" and f.line == 2 for f in quality.evidence)
    completeness = next(d for d in first.dimensions if d.dimension == epb.DIMENSION_COMPLETENESS)
    assert not completeness.measured and completeness.weight == 0, "unmeasured dimensions do not count"
    assert abs(sum(d.weight for d in first.dimensions) - 1.0) < 1e-3, "measured weights are normalised"
    assert second.verdict == epb.VERDICT_ACCEPT and second.overall_score >= 7
    assert second.subtask == f"{name}/subtasks/implement-fix-1" and second.correction_cycle == 1


async def test_three_failed_corrections_escalate_and_a_person_corrects_then_approves(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    operator_token: str, viewer_token: str,
) -> None:  # fmt: skip
    agent = await start_agent(stack, channels, admin, agents, scripted([WEAK]))
    name = await create(channels, admin)
    stub = cpb_grpc.CheckpointServiceStub(channels["evaluator"])

    async def escalated() -> list[epb.Checkpoint]:
        return await open_checkpoints(channels, admin, name)

    await eventually(escalated, 60, "the escalation checkpoint")
    (checkpoint,) = await escalated()
    assert checkpoint.trigger == epb.CHECKPOINT_TRIGGER_ESCALATION
    assert [a.key for a in agent.assignments] == ["implement"] + [f"implement-fix-{i}" for i in (1, 2, 3)]
    assert checkpoint.subtasks == [f"{name}/subtasks/implement-fix-3"]
    await eventually(lambda: task_state(channels, admin, name), 10)
    assert await task_state(channels, admin, name) == spb.TASK_STATE_WAITING_CHECKPOINT
    detail = await stub.GetCheckpoint(cpb.GetCheckpointRequest(name=checkpoint.name), metadata=admin, timeout=10)
    (subject,) = detail.subjects
    assert "def handler(x)" in subject.diff.unified_diff and subject.evaluation.verdict == epb.VERDICT_ESCALATE
    assert len(subject.history) == 3 and len(subject.previous_feedback) >= 3

    # A viewer may not decide; CORRECT needs words: each a precise error, and the checkpoint stays OPEN.
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stub.DecideCheckpoint(
            cpb.DecideCheckpointRequest(name=checkpoint.name, decision=epb.CHECKPOINT_DECISION_APPROVE),
            metadata=bearer(viewer_token), timeout=10,
        )  # fmt: skip
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as wordless:
        await stub.DecideCheckpoint(
            cpb.DecideCheckpointRequest(name=checkpoint.name, decision=epb.CHECKPOINT_DECISION_CORRECT),
            metadata=bearer(operator_token), timeout=10,
        )  # fmt: skip
    assert wordless.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(wordless.value) == ["feedback"]
    assert [c.name for c in await open_checkpoints(channels, admin, name)] == [checkpoint.name]

    # The person's words go back to the agent in a new correction.
    words = "Use a dict of handlers instead of eval, and read the key from the environment"
    decided = await stub.DecideCheckpoint(
        cpb.DecideCheckpointRequest(
            name=checkpoint.name,
            decision=epb.CHECKPOINT_DECISION_CORRECT,
            feedback=[work_pb2.Feedback(type=work_pb2.FEEDBACK_TYPE_WRONG_APPROACH, text=words,
                                        reference_files=["app.py"])],
            request_id=uuid.uuid4().hex,
        ),
        metadata=bearer(operator_token), timeout=10,
    )  # fmt: skip
    assert decided.checkpoint.state == epb.CHECKPOINT_STATE_CORRECTED
    assert decided.checkpoint.decision.decided_by == "users/fixture-operator"
    await eventually(lambda: len(agent.assignments) == 5, 30, "the person's correction")
    assert agent.assignments[4].key == "implement-fix-4" and words in agent.assignments[4].prompt

    # Deciding the closed checkpoint again is refused and changes nothing.
    with pytest.raises(grpc.aio.AioRpcError) as closed:
        await stub.DecideCheckpoint(
            cpb.DecideCheckpointRequest(name=checkpoint.name, decision=epb.CHECKPOINT_DECISION_APPROVE),
            metadata=bearer(operator_token), timeout=10,
        )  # fmt: skip
    assert closed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    again = await stub.GetCheckpoint(cpb.GetCheckpointRequest(name=checkpoint.name), metadata=admin, timeout=10)
    assert again.checkpoint.state == epb.CHECKPOINT_STATE_CORRECTED

    # Still weak after the limit: a second checkpoint; approving it completes the task.
    async def second() -> list[epb.Checkpoint]:
        return [c for c in await open_checkpoints(channels, admin, name) if c.name != checkpoint.name]

    await eventually(second, 30, "the second checkpoint")
    (last,) = await second()
    await stub.DecideCheckpoint(
        cpb.DecideCheckpointRequest(name=last.name, decision=epb.CHECKPOINT_DECISION_APPROVE, comment="ship it"),
        metadata=bearer(operator_token), timeout=10,
    )  # fmt: skip

    await reaches(channels, admin, name, spb.TASK_STATE_SUCCEEDED, 30, "the approved task to succeed")
    subs = await subtasks(channels, admin, name)
    assert {k: s.state for k, s in subs.items()} == {
        k: spb.SUBTASK_STATE_SUCCEEDED for k in ["implement"] + [f"implement-fix-{i}" for i in range(1, 5)]
    }


async def test_internal_rpcs_refuse_people_and_policies_refuse_out_of_range_scores(
    channels: dict[str, grpc.aio.Channel], admin: Metadata
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await vpb_grpc.VerdictServiceStub(channels["scheduler"]).DeliverVerdicts(
            vpb.DeliverVerdictsRequest(verdicts=[vpb.Verdict(verdict_id="x", task="tasks/t")]),
            metadata=admin, timeout=10,
        )  # fmt: skip
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    policies = ppb_grpc.PolicyServiceStub(channels["evaluator"])
    before = await policies.GetPolicy(ppb.GetPolicyRequest(name="policies/default"), metadata=admin, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await policies.UpdatePolicy(
            ppb.UpdatePolicyRequest(
                policy=epb.Policy(name="policies/default", acceptance_threshold=11.0, scorers=["nope"]),
                update_mask=field_mask_pb2.FieldMask(paths=["acceptance_threshold", "scorers"]),
            ),
            metadata=admin, timeout=10,
        )  # fmt: skip
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(bad.value) == ["policy.acceptance_threshold", "policy.scorers[0]"]
    after = await policies.GetPolicy(ppb.GetPolicyRequest(name="policies/default"), metadata=admin, timeout=10)
    assert after.policy == before.policy
