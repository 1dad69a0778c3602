"""The scheduler's core loop over real gRPC, PostgreSQL and Redis: plans, DAG order, leases, results."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from maw.agent.v1 import agent_service_pb2 as apb
from maw.common.v1 import machine_pb2, work_pb2
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from maw.scheduler.v1 import task_service_pb2_grpc as tpb_grpc

from deploy.local import Stack
from services.runtime.errors import details_from_trailers
from tests.integration.clients import Metadata, ScriptedAgent, enroll, eventually

CLAUDE, GEMINI, SHELL, TEST = (
    machine_pb2.TOOL_KIND_CLAUDE_CODE,
    machine_pb2.TOOL_KIND_GEMINI_CLI,
    machine_pb2.TOOL_KIND_SHELL,
    machine_pb2.TOOL_KIND_TEST,
)


@pytest.fixture(scope="module")
def tasks(channels: dict[str, grpc.aio.Channel]) -> tpb_grpc.TaskServiceAsyncStub:
    return tpb_grpc.TaskServiceStub(channels["scheduler"])


@pytest.fixture
async def agents(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata
) -> AsyncIterator[list[ScriptedAgent]]:
    """Agents a test starts with :func:`connect`; all stopped afterwards."""
    started: list[ScriptedAgent] = []
    yield started
    for agent in started:
        await agent.stop()


async def connect(
    stack: Stack,
    channels: dict[str, grpc.aio.Channel],
    admin: Metadata,
    started: list[ScriptedAgent],
    tools: list[machine_pb2.ToolKind.ValueType],
    **kwargs: object,
) -> ScriptedAgent:
    worker, credential = await enroll(
        channels["registry"],
        admin,
        f"w-{uuid.uuid4().hex[:8]}",
        tools,
        labels=kwargs.pop("labels", None),  # type: ignore[arg-type]
    )
    agent = ScriptedAgent(f"127.0.0.1:{stack.ports.scheduler}", worker, credential, tools, **kwargs)  # type: ignore[arg-type]
    await agent.start()
    started.append(agent)
    return agent


def graph(*steps: tuple[str, list[str]], tool: int = TEST) -> tpb.SubtaskGraph:
    return tpb.SubtaskGraph(
        subtasks=[
            spb.SubtaskSpec(key=k, dependencies=deps, preferred_tool=machine_pb2.ToolChoice(kind=tool))  # type: ignore[arg-type]
            for k, deps in steps
        ]
    )


def new_task(description: str = "test work", **fields: object) -> spb.Task:
    return spb.Task(description=description, **fields)  # type: ignore[arg-type]


async def state_of(tasks: tpb_grpc.TaskServiceAsyncStub, admin: Metadata, name: str) -> int:
    reply = await tasks.GetTask(tpb.GetTaskRequest(name=name), metadata=admin, timeout=5)
    state: int = reply.task.state
    return state


async def watch_all(
    tasks: tpb_grpc.TaskServiceAsyncStub, admin: Metadata, name: str, after: int = 0
) -> list[tpb.TaskEvent]:
    """Events of a finished task from ``after`` on (the stream is cut once it is idle)."""
    events: list[tpb.TaskEvent] = []
    call = tasks.WatchTask(tpb.WatchTaskRequest(name=name, after_sequence=after), metadata=admin)
    try:
        while True:
            reply = await asyncio.wait_for(call.read(), 3)
            if not isinstance(reply, tpb.WatchTaskResponse):
                break
            events.extend(reply.events)
    except TimeoutError:
        pass
    finally:
        call.cancel()
    return events


def _violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = details_from_trailers(err.trailing_metadata())
    assert status is not None
    fields = []
    for any_msg in status.details:
        bad = error_details_pb2.BadRequest()
        if any_msg.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


async def test_template_task_runs_to_completion_in_dag_order_on_two_agents(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub,
    agents: list[ScriptedAgent],
) -> None:  # fmt: skip
    a = await connect(stack, channels, admin, agents, [CLAUDE], slots=1)
    b = await connect(stack, channels, admin, agents, [CLAUDE, GEMINI], slots=1)
    created = await tasks.CreateTask(
        tpb.CreateTaskRequest(task=new_task("Add a /health endpoint"), template="templates/develop-feature"),
        metadata=admin,
        timeout=10,
    )
    name = created.task.name
    assert [s.key for s in created.subtasks] == ["generate-code", "review-code", "generate-tests", "document"]
    assert "Add a /health endpoint" in created.subtasks[0].description or created.subtasks[0].display_name

    async def done() -> bool:
        return await state_of(tasks, admin, name) == spb.TASK_STATE_SUCCEEDED

    await eventually(done, 20, "the task to succeed")
    events = await watch_all(tasks, admin, name)
    sequences = [e.sequence for e in events]
    assert sequences == list(range(1, len(events) + 1)), "events are numbered without gaps"
    finished = {
        e.subtask_state_changed.subtask.key: e.sequence
        for e in events
        if e.WhichOneof("kind") == "subtask_state_changed"
        and e.subtask_state_changed.subtask.state == spb.SUBTASK_STATE_SUCCEEDED
    }
    started = {
        e.subtask_state_changed.subtask.key: e.sequence
        for e in events
        if e.WhichOneof("kind") == "subtask_state_changed"
        and e.subtask_state_changed.subtask.state == spb.SUBTASK_STATE_ASSIGNED
    }
    assert set(finished) == {"generate-code", "review-code", "generate-tests", "document"}
    assert started["review-code"] > finished["generate-code"]
    assert started["generate-tests"] > finished["generate-code"]
    assert started["document"] > max(finished["review-code"], finished["generate-tests"])
    assert a.assignments and b.assignments, "both agents took part"
    prompts = {x.key: x for x in a.assignments + b.assignments}
    assert "Add a /health endpoint" in prompts["generate-code"].prompt
    assert [d.key for d in prompts["document"].context.dependencies] == ["review-code", "generate-tests"]
    assert prompts["document"].context.dependencies[0].summary == "did review-code"
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds[0] == "subtasks_added" and kinds[-1] == "task_state_changed"


async def test_watch_resumes_after_a_sequence_with_nothing_missed(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub,
    agents: list[ScriptedAgent],
) -> None:  # fmt: skip
    await connect(stack, channels, admin, agents, [TEST])
    created = await tasks.CreateTask(
        tpb.CreateTaskRequest(task=new_task(), graph=graph(("a", []), ("b", ["a"]), ("c", ["b"]))),
        metadata=admin,
        timeout=10,
    )

    async def done() -> bool:
        return await state_of(tasks, admin, created.task.name) == spb.TASK_STATE_SUCCEEDED

    await eventually(done, 20, "the task to succeed")
    everything = await watch_all(tasks, admin, created.task.name)
    tail = await watch_all(tasks, admin, created.task.name, after=4)
    assert [e.sequence for e in tail] == [e.sequence for e in everything if e.sequence > 4]
    assert [e.SerializeToString() for e in tail] == [e.SerializeToString() for e in everything[4:]]


@pytest.mark.parametrize(
    ("plan", "field"),
    [
        (graph(("a", ["b"]), ("b", ["a"])), "graph.subtasks"),
        (graph(("a", ["a"])), "graph.subtasks[0].dependencies[0]"),
        (graph(("a", ["ghost"])), "graph.subtasks[0].dependencies[0]"),
        (graph(("a", []), ("a", [])), "graph.subtasks[1].key"),
        (graph(("Bad Key!", [])), "graph.subtasks[0].key"),
        (graph(("a", []), tool=99), "graph.subtasks[0].preferred_tool.kind"),
        (tpb.SubtaskGraph(), "graph.subtasks"),
    ],
    ids=["cycle", "self", "dangling", "duplicate", "bad-key", "unknown-tool", "empty"],
)
async def test_bad_plans_are_refused_naming_the_field_and_nothing_is_written(
    admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub, plan: tpb.SubtaskGraph, field: str
) -> None:
    before = (await tasks.ListTasks(tpb.ListTasksRequest(), metadata=admin, timeout=5)).total_size
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tasks.CreateTask(tpb.CreateTaskRequest(task=new_task(), graph=plan), metadata=admin, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in _violations(err.value)
    after = (await tasks.ListTasks(tpb.ListTasksRequest(), metadata=admin, timeout=5)).total_size
    assert after == before


async def test_a_cycle_is_reported_with_its_path(admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub) -> None:
    plan = graph(("a", []), ("b", ["a", "d"]), ("c", ["b"]), ("d", ["c"]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tasks.CreateTask(tpb.CreateTaskRequest(task=new_task(), graph=plan), metadata=admin, timeout=5)
    assert "b -> d -> c -> b" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("task", "field"),
    [
        (spb.Task(description=""), "task.description"),
        (spb.Task(description="x" * (100 * 1024 + 1)), "task.description"),
        (spb.Task(description="x", priority=9), "task.priority"),  # type: ignore[arg-type]
        (spb.Task(description="x", max_attempts=99), "task.max_attempts"),
    ],
    ids=["empty", "huge", "priority", "attempts"],
)
async def test_bad_task_fields_are_refused_naming_the_field(
    admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub, task: spb.Task, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tasks.CreateTask(tpb.CreateTaskRequest(task=task, graph=graph(("a", []))), metadata=admin, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in _violations(err.value)


async def test_unknown_ids_are_not_found(admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub) -> None:
    for call in (
        tasks.GetTask(tpb.GetTaskRequest(name="tasks/nope"), metadata=admin, timeout=5),
        tasks.CancelTask(tpb.CancelTaskRequest(name="tasks/nope"), metadata=admin, timeout=5),
        tasks.GetSubtask(tpb.GetSubtaskRequest(name="tasks/nope/subtasks/a"), metadata=admin, timeout=5),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tasks.GetTask(tpb.GetTaskRequest(name="projects/x"), metadata=admin, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_create_task_is_idempotent_by_request_id(admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub) -> None:
    request = tpb.CreateTaskRequest(task=new_task(), graph=graph(("a", [])), request_id=uuid.uuid4().hex)
    first, second = await asyncio.gather(
        tasks.CreateTask(request, metadata=admin, timeout=10), tasks.CreateTask(request, metadata=admin, timeout=10)
    )
    again = await tasks.CreateTask(request, metadata=admin, timeout=10)
    assert first.task.name == second.task.name == again.task.name


async def test_results_duplicate_and_foreign_are_answered_per_item(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub,
    agents: list[ScriptedAgent],
) -> None:  # fmt: skip
    holder = await connect(stack, channels, admin, agents, [SHELL], behaviour=lambda a: None)
    other = await connect(stack, channels, admin, agents, [CLAUDE])
    created = await tasks.CreateTask(
        tpb.CreateTaskRequest(task=new_task(), graph=graph(("only", []), tool=SHELL)), metadata=admin, timeout=10
    )
    await eventually(lambda: holder.assignments, what="the assignment")
    lease = holder.assignments[0].lease
    result = apb.Result(lease=lease, outcome=work_pb2.OUTCOME_SUCCEEDED, summary="done")
    other.send(apb.ConnectRequest(results=apb.ResultBatch(results=[result])))
    await eventually(lambda: other.acks, what="the foreign ack")
    assert (other.acks[0].disposition, other.acks[0].code) == (apb.RESULT_DISPOSITION_NOT_HELD, 7)
    holder.send(apb.ConnectRequest(results=apb.ResultBatch(results=[result])))
    holder.send(apb.ConnectRequest(results=apb.ResultBatch(results=[result])))
    await eventually(lambda: len(holder.acks) == 2, what="both acks")
    first, again = holder.acks
    assert first.disposition == apb.RESULT_DISPOSITION_ACCEPTED
    assert again.disposition == apb.RESULT_DISPOSITION_DUPLICATE and again.result_id == first.result_id
    assert await state_of(tasks, admin, created.task.name) == spb.TASK_STATE_SUCCEEDED
    with psycopg.connect(stack.database_url) as conn:
        count = conn.execute(
            "SELECT count(*) FROM scheduler.results WHERE task_id = %s", (created.task.name.split("/")[1],)
        ).fetchone()
    assert count == (1,)


async def test_expired_lease_goes_to_another_agent_and_the_old_attempt_is_stale(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub,
    agents: list[ScriptedAgent],
) -> None:  # fmt: skip
    crashing = await connect(stack, channels, admin, agents, [SHELL], behaviour=lambda a: None)
    created = await tasks.CreateTask(
        tpb.CreateTaskRequest(task=new_task(), graph=graph(("only", []), tool=SHELL)), metadata=admin, timeout=10
    )
    await eventually(lambda: crashing.assignments, what="the first attempt")
    first = crashing.assignments[0].lease
    await crashing.stop()  # the agent dies without a word
    rescuer = await connect(stack, channels, admin, agents, [SHELL])
    await eventually(lambda: rescuer.acks, timeout=20, what="the second attempt to finish")
    assert rescuer.assignments[0].lease.attempt == first.attempt + 1
    assert await state_of(tasks, admin, created.task.name) == spb.TASK_STATE_SUCCEEDED
    # The first agent comes back with its old result: refused as stale, nothing changes.
    back = ScriptedAgent(crashing.target, crashing.worker, crashing.credential, [SHELL])
    back.held = [apb.HeldAssignment(lease=first, state=apb.HELD_STATE_FINISHED)]
    await back.start()
    agents.append(back)
    assert back.welcome is not None and [lease.attempt for lease in back.welcome.released] == [first.attempt]
    back.send(
        apb.ConnectRequest(
            results=apb.ResultBatch(results=[apb.Result(lease=first, outcome=work_pb2.OUTCOME_SUCCEEDED)])
        )
    )
    await eventually(lambda: back.acks, what="the stale ack")
    assert (back.acks[0].disposition, back.acks[0].code) == (apb.RESULT_DISPOSITION_STALE, 9)
    with psycopg.connect(stack.database_url) as conn:
        rows = conn.execute(
            "SELECT attempt, outcome FROM scheduler.results WHERE task_id = %s", (created.task.name.split("/")[1],)
        ).fetchall()
    assert rows == [(first.attempt + 1, work_pb2.OUTCOME_SUCCEEDED)]


async def test_cancelling_a_task_reaches_the_running_agent(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub,
    agents: list[ScriptedAgent],
) -> None:  # fmt: skip
    busy = await connect(stack, channels, admin, agents, [SHELL], behaviour=lambda a: None)
    created = await tasks.CreateTask(
        tpb.CreateTaskRequest(task=new_task(), graph=graph(("a", []), ("b", ["a"]), tool=SHELL)),
        metadata=admin,
        timeout=10,
    )
    await eventually(lambda: busy.assignments, what="the assignment")
    loop = asyncio.get_running_loop()
    asked = loop.time()
    reply = await tasks.CancelTask(
        tpb.CancelTaskRequest(name=created.task.name, reason="changed my mind"), metadata=admin, timeout=5
    )
    assert reply.task.state == spb.TASK_STATE_CANCELLED
    await eventually(lambda: busy.cancels, timeout=5, what="the Cancel")
    assert loop.time() - asked < 1.0
    assert busy.cancels[0].lease == busy.assignments[0].lease
    subs = await tasks.ListSubtasks(tpb.ListSubtasksRequest(parent=created.task.name), metadata=admin, timeout=5)
    assert {s.state for s in subs.subtasks} == {spb.SUBTASK_STATE_CANCELLED}
    again = await tasks.CancelTask(tpb.CancelTaskRequest(name=created.task.name), metadata=admin, timeout=5)
    assert again.task.state == spb.TASK_STATE_CANCELLED


async def test_work_no_agent_can_take_says_why(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub,
    agents: list[ScriptedAgent],
) -> None:  # fmt: skip
    await connect(stack, channels, admin, agents, [TEST])
    plan = tpb.SubtaskGraph(subtasks=[spb.SubtaskSpec(key="gpu-work", required_labels={"gpu": "a100"})])
    created = await tasks.CreateTask(tpb.CreateTaskRequest(task=new_task(), graph=plan), metadata=admin, timeout=10)
    name = created.subtasks[0].name

    async def flagged() -> bool:
        sub = (await tasks.GetSubtask(tpb.GetSubtaskRequest(name=name), metadata=admin, timeout=5)).subtask
        return sub.unschedulable_reason.code == spb.UNSCHEDULABLE_CODE_NO_MATCHING_LABELS

    await eventually(flagged, 15, "the unschedulable reason")
    await tasks.CancelTask(tpb.CancelTaskRequest(name=created.task.name), metadata=admin, timeout=5)


async def test_an_agent_cannot_speak_for_another_worker(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata
) -> None:
    _, credential = await enroll(channels["registry"], admin, f"w-{uuid.uuid4().hex[:8]}", [TEST])
    other, _ = await enroll(channels["registry"], admin, f"w-{uuid.uuid4().hex[:8]}", [TEST])
    impostor = ScriptedAgent(f"127.0.0.1:{stack.ports.scheduler}", other, credential, [TEST])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await impostor.start()
    await impostor.stop()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


_keys = st.text(alphabet="abcdefgh-", min_size=0, max_size=6)
_specs = st.builds(
    spb.SubtaskSpec,
    key=_keys,
    dependencies=st.lists(_keys, max_size=3),
    complexity=st.integers(-3, 9),
    priority=st.integers(-5, 2000),
    max_attempts=st.integers(-1, 30),
    type=st.integers(0, 12),
    preferred_tool=st.builds(machine_pb2.ToolChoice, kind=st.integers(0, 9)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=st.lists(_specs, max_size=6),
    description=st.text(max_size=50),
    priority=st.integers(-2, 6),
    labels=st.dictionaries(st.text(max_size=70), st.text(max_size=70), max_size=2),
)
async def test_create_task_fuzz_never_makes_the_server_fail(
    admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub, specs: list[spb.SubtaskSpec], description: str,
    priority: int, labels: dict[str, str],
) -> None:  # fmt: skip
    request = tpb.CreateTaskRequest(
        task=spb.Task(description=description, priority=priority, labels=labels),  # type: ignore[arg-type]
        graph=tpb.SubtaskGraph(subtasks=specs),
        validate_only=True,
    )
    try:
        await tasks.CreateTask(request, metadata=admin, timeout=10)
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()


async def test_connected_agents_are_online_in_the_registry_and_transitions_reach_the_activity_log(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub,
    agents: list[ScriptedAgent],
) -> None:  # fmt: skip
    from maw.registry.v1 import (
        activity_service_pb2,
        activity_service_pb2_grpc,
        worker_service_pb2,
        worker_service_pb2_grpc,
    )
    from maw.registry.v1 import resources_pb2 as rpb

    agent = await connect(stack, channels, admin, agents, [TEST], slots=3)
    workers = worker_service_pb2_grpc.WorkerServiceStub(channels["registry"])

    async def online() -> bool:
        got = await workers.GetWorker(worker_service_pb2.GetWorkerRequest(name=agent.worker), metadata=admin, timeout=5)
        return got.worker.status == rpb.WORKER_STATUS_ONLINE and got.worker.declared_slots == 3

    await eventually(online, 15, "the worker to be ONLINE in the registry")
    created = await tasks.CreateTask(
        tpb.CreateTaskRequest(task=new_task(), graph=graph(("a", []), ("b", ["a"]))), metadata=admin, timeout=10
    )
    activity = activity_service_pb2_grpc.ActivityServiceStub(channels["registry"])

    async def logged() -> bool:
        listed = await activity.ListActivity(
            activity_service_pb2.ListActivityRequest(filter=f'task = "{created.task.name}"', page_size=100),
            metadata=admin,
            timeout=5,
        )
        verbs = [e.verb for e in listed.activity_entries]
        return "task.succeeded" in verbs and verbs.count("subtask.succeeded") == 2

    await eventually(logged, 20, "the task's transitions in the activity log")

    async def counted() -> bool:
        got = await workers.GetWorker(worker_service_pb2.GetWorkerRequest(name=agent.worker), metadata=admin, timeout=5)
        return [(s.tool, s.finished_count, s.success_rate) for s in got.worker.tool_stats] == [(TEST, 2, 1.0)]

    await eventually(counted, 15, "the worker's per-tool statistics")
    await agent.stop()

    async def offline() -> bool:
        got = await workers.GetWorker(worker_service_pb2.GetWorkerRequest(name=agent.worker), metadata=admin, timeout=5)
        return got.worker.status == rpb.WORKER_STATUS_OFFLINE

    await eventually(offline, 15, "the worker to go OFFLINE once its stream closed")


async def test_batch_priority_and_batch_cancel_change_many_tasks_at_once(
    admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub
) -> None:
    names = [
        (
            await tasks.CreateTask(
                tpb.CreateTaskRequest(task=new_task(), graph=graph(("a", []), tool=SHELL)), metadata=admin, timeout=10
            )
        ).task.name  # fmt: skip
        for _ in range(3)
    ]
    raised = await tasks.BatchUpdateTaskPriority(
        tpb.BatchUpdateTaskPriorityRequest(names=names, priority=work_pb2.PRIORITY_URGENT), metadata=admin, timeout=5
    )
    assert [t.priority for t in raised.tasks] == [work_pb2.PRIORITY_URGENT] * 3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tasks.BatchCancelTasks(
            tpb.BatchCancelTasksRequest(names=[*names, "tasks/missing"]), metadata=admin, timeout=5
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert all([await state_of(tasks, admin, n) != spb.TASK_STATE_CANCELLED for n in names]), "all or nothing"
    cancelled = await tasks.BatchCancelTasks(tpb.BatchCancelTasksRequest(names=names), metadata=admin, timeout=5)
    assert {t.state for t in cancelled.tasks} == {spb.TASK_STATE_CANCELLED}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tasks.BatchUpdateTaskPriority(
            tpb.BatchUpdateTaskPriorityRequest(names=names, priority=7),  # type: ignore[arg-type]
            metadata=admin,
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority" in _violations(err.value)


async def test_list_tasks_filters_and_pages_without_repeats(
    admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub
) -> None:
    label = uuid.uuid4().hex[:8]
    made = set()
    for _ in range(5):
        reply = await tasks.CreateTask(
            tpb.CreateTaskRequest(task=new_task(labels={"run": label}), graph=graph(("a", []), tool=SHELL)),
            metadata=admin,
            timeout=10,
        )
        made.add(reply.task.name)
    seen: list[str] = []
    token = ""
    while True:
        page = await tasks.ListTasks(
            tpb.ListTasksRequest(filter=f'labels.run = "{label}"', page_size=2, page_token=token), metadata=admin
        )
        seen += [t.name for t in page.tasks]
        assert page.total_size == 5
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(made) and len(seen) == 5
    for bad in ("state = NOPE", "1 = 1; DROP TABLE tasks", "labels.x = 'a' OR 1=1"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await tasks.ListTasks(tpb.ListTasksRequest(filter=bad), metadata=admin, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await tasks.BatchCancelTasks(tpb.BatchCancelTasksRequest(names=sorted(made)), metadata=admin, timeout=5)


async def test_a_failed_subtask_fails_its_task_and_retry_runs_it_and_its_dependents_again(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub,
    agents: list[ScriptedAgent],
) -> None:  # fmt: skip
    failing = {"on": True}

    def behaviour(a: apb.Assignment) -> apb.Result:
        outcome = work_pb2.OUTCOME_FAILED if failing["on"] and a.key == "a" else work_pb2.OUTCOME_SUCCEEDED
        return apb.Result(lease=a.lease, outcome=outcome, error_message="boom" if outcome == 2 else "")

    await connect(stack, channels, admin, agents, [SHELL], behaviour=behaviour)
    plan = tpb.SubtaskGraph(
        subtasks=[
            spb.SubtaskSpec(key="a", max_attempts=2, preferred_tool=machine_pb2.ToolChoice(kind=SHELL)),
            spb.SubtaskSpec(key="b", dependencies=["a"], preferred_tool=machine_pb2.ToolChoice(kind=SHELL)),
        ]
    )
    created = await tasks.CreateTask(tpb.CreateTaskRequest(task=new_task(), graph=plan), metadata=admin, timeout=10)

    async def failed() -> bool:
        return await state_of(tasks, admin, created.task.name) == spb.TASK_STATE_FAILED

    await eventually(failed, 20, "the task to fail after 2 attempts")
    sub = (await tasks.GetSubtask(tpb.GetSubtaskRequest(name=created.subtasks[0].name), metadata=admin)).subtask
    assert (sub.state, sub.attempt) == (spb.SUBTASK_STATE_FAILED, 2)
    failing["on"] = False
    request = tpb.RetrySubtaskRequest(name=sub.name, reason="flaky network", request_id=uuid.uuid4().hex)
    retried = await tasks.RetrySubtask(request, metadata=admin, timeout=5)
    again = await tasks.RetrySubtask(request, metadata=admin, timeout=5)
    assert retried.subtask.state == spb.SUBTASK_STATE_READY and again == retried

    async def succeeded() -> bool:
        return await state_of(tasks, admin, created.task.name) == spb.TASK_STATE_SUCCEEDED

    await eventually(succeeded, 20, "the retried task to succeed")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tasks.RetrySubtask(tpb.RetrySubtaskRequest(name=sub.name), metadata=admin, timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_saved_templates_are_validated_used_and_built_ins_are_read_only(
    channels: dict[str, grpc.aio.Channel], admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub
) -> None:
    from maw.scheduler.v1 import template_service_pb2 as tmpb
    from maw.scheduler.v1 import template_service_pb2_grpc as tmpb_grpc

    templates = tmpb_grpc.TemplateServiceStub(channels["scheduler"])
    listed = await templates.ListTemplates(tmpb.ListTemplatesRequest(filter="built_in = true"), metadata=admin)
    assert len(listed.templates) == 6
    tid = f"t-{uuid.uuid4().hex[:8]}"
    steps = [spb.SubtaskSpec(key="lint"), spb.SubtaskSpec(key="ship", dependencies=["lint"])]
    made = await templates.CreateTemplate(
        tmpb.CreateTemplateRequest(template=spb.Template(display_name="lint then ship", steps=steps), template_id=tid),
        metadata=admin,
    )
    assert made.template.name == f"templates/{tid}"
    task = await tasks.CreateTask(tpb.CreateTaskRequest(task=new_task(), template=made.template.name), metadata=admin)
    assert [s.key for s in task.subtasks] == ["lint", "ship"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await templates.CreateTemplate(
            tmpb.CreateTemplateRequest(
                template=spb.Template(display_name="bad", steps=[spb.SubtaskSpec(key="x", dependencies=["x"])])
            ),
            metadata=admin,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "template.steps[0].dependencies[0]" in _violations(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await templates.DeleteTemplate(tmpb.DeleteTemplateRequest(name="templates/bug-fix"), metadata=admin)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await templates.DeleteTemplate(tmpb.DeleteTemplateRequest(name=made.template.name), metadata=admin)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await templates.GetTemplate(tmpb.GetTemplateRequest(name=made.template.name), metadata=admin)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await tasks.CancelTask(tpb.CancelTaskRequest(name=task.task.name), metadata=admin)


async def test_a_viewer_can_read_but_not_create_or_cancel(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub
) -> None:
    from maw.registry.v1 import resources_pb2 as rpb
    from maw.registry.v1 import user_service_pb2, user_service_pb2_grpc

    from tests.integration.clients import login as log_in

    users = user_service_pb2_grpc.UserServiceStub(channels["registry"])
    name = f"viewer{uuid.uuid4().hex[:6]}"
    await users.CreateUser(
        user_service_pb2.CreateUserRequest(
            user=rpb.User(display_name="V", role=rpb.ROLE_VIEWER), user_id=name, password="a long enough password 1"
        ),
        metadata=admin,
    )
    viewer = await log_in(channels["registry"], name, "a long enough password 1")
    await tasks.ListTasks(tpb.ListTasksRequest(), metadata=viewer, timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tasks.CreateTask(tpb.CreateTaskRequest(task=new_task(), graph=graph(("a", []))), metadata=viewer)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _limits(**seconds: float) -> work_pb2.TimeLimits:
    limits = work_pb2.TimeLimits()
    for name, value in seconds.items():
        getattr(limits, name).FromTimedelta(__import__("datetime").timedelta(seconds=value))
    return limits


async def test_the_scheduler_enforces_queue_wait_total_and_attempt_time_limits(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub,
    agents: list[ScriptedAgent],
) -> None:  # fmt: skip
    hanging = await connect(stack, channels, admin, agents, [SHELL], behaviour=lambda a: None)
    waits = tpb.SubtaskGraph(
        subtasks=[spb.SubtaskSpec(key="nobody-can", required_labels={"gpu": "h100"}, time_limits=_limits(queue_wait=1))]
    )
    runs = tpb.SubtaskGraph(
        subtasks=[
            spb.SubtaskSpec(
                key="too-long",
                preferred_tool=machine_pb2.ToolChoice(kind=SHELL),
                time_limits=_limits(total=1.5, attempt=42),
            )
        ]
    )
    waiting = await tasks.CreateTask(tpb.CreateTaskRequest(task=new_task(), graph=waits), metadata=admin)
    running = await tasks.CreateTask(tpb.CreateTaskRequest(task=new_task(), graph=runs), metadata=admin)
    await eventually(lambda: hanging.assignments, what="the long one to start")
    given = hanging.assignments[0]
    allowed = given.attempt_deadline.ToDatetime() - given.lease_deadline.ToDatetime()
    assert 38 < allowed.total_seconds() + 2 < 46, "the attempt deadline follows the subtask's own attempt limit"

    async def both_failed() -> bool:
        states = [await state_of(tasks, admin, t.task.name) for t in (waiting, running)]
        return states == [spb.TASK_STATE_FAILED, spb.TASK_STATE_FAILED]

    await eventually(both_failed, 15, "both limits to be enforced")
    for created, reason in ((waiting, "queue-wait time limit reached"), (running, "total time limit reached")):
        events = await watch_all(tasks, admin, created.task.name)
        failures = [
            e.subtask_state_changed.reason
            for e in events
            if e.WhichOneof("kind") == "subtask_state_changed"
            and e.subtask_state_changed.subtask.state == spb.SUBTASK_STATE_FAILED
        ]
        assert failures == [reason]
    await eventually(lambda: hanging.cancels, what="the Cancel of the overdue attempt")
    assert hanging.cancels[0].reason == apb.CANCEL_REASON_TIME_LIMIT
    assert hanging.cancels[0].lease == given.lease


async def test_negative_time_limits_are_refused_naming_the_field(
    admin: Metadata, tasks: tpb_grpc.TaskServiceAsyncStub
) -> None:
    bad = spb.SubtaskSpec(key="a", time_limits=_limits(attempt=-5))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tasks.CreateTask(
            tpb.CreateTaskRequest(task=new_task(), graph=tpb.SubtaskGraph(subtasks=[bad])), metadata=admin, timeout=5
        )
    assert "graph.subtasks[0].time_limits.attempt" in _violations(err.value)
