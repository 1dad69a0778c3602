"""kill -9 of the evaluator between receiving a result and its verdict being acknowledged: exactly once;
kill -9 of the scheduler while results wait in its outbox for the evaluator: nothing lost, nothing doubled.

The evaluator runs as its own process (the session stack's); the test restarts it with the TEST ONLY
setting MAW_TEST_HOLD_VERDICTS (services/evaluator/settings.py), which parks the verdict relay either
before it delivers or after the scheduler applied a verdict but before the outbox row is removed. The
test kills it -9 right there, starts it normally, and checks the verdict took effect once.
"""

from __future__ import annotations

import asyncio

import grpc
import psycopg
import pytest
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb

from deploy.local import Stack
from tests.integration.clients import Metadata, ScriptedAgent, eventually
from tests.integration.test_evaluator import GOOD, WEAK, create, reaches, scripted, start_agent, subtasks


async def _restart_evaluator(stack: Stack, hold: str = "") -> None:
    stack.children.pop("evaluator").kill()
    await _start(stack, "evaluator", stack.ports.evaluator, hold)


async def _start(stack: Stack, name: str, port: int, hold: str = "") -> None:
    saved = dict(stack.extra_env)
    if hold:
        stack.extra_env["MAW_TEST_HOLD_VERDICTS"] = hold
    try:
        for attempt in range(3):
            stack.start_service(name, wait=False)  # forked from the loop's thread, never a worker thread
            try:
                await asyncio.to_thread(stack.wait_serving, name, port)
                return
            except RuntimeError:
                # Forking this many-threaded test process (gRPC) rarely crashes the child before exec
                # (SIGSEGV in preexec_fn); that is the harness, not the service: spawn it again.
                if attempt == 2:
                    raise
                stack.children.pop(name).stop()
    finally:
        stack.extra_env = saved


def _query(stack: Stack, sql: str, *args: object) -> list[tuple[object, ...]]:
    with psycopg.connect(stack.database_url) as conn:
        return conn.execute(sql, args).fetchall()


@pytest.mark.slow
@pytest.mark.parametrize("hold", ["before_delivery", "after_delivery"])
async def test_a_verdict_survives_kill_9_of_the_evaluator_and_applies_exactly_once(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent], hold: str
) -> None:
    await _restart_evaluator(stack, hold)
    try:
        await start_agent(stack, channels, admin, agents, scripted([WEAK, GOOD]))
        name = await create(channels, admin)
        task_id = name.removeprefix("tasks/")

        def verdict_waits() -> bool:
            return bool(_query(stack, "SELECT 1 FROM evaluator.outbox WHERE target = 1 AND task_id = %s", task_id))

        await eventually(verdict_waits, 30, "the CORRECT verdict in the evaluator's outbox")
        if hold == "after_delivery":
            await eventually(lambda: _corrections(stack, task_id) == 1, 30, "the scheduler to apply it")
        else:
            await asyncio.sleep(0.5)
            subs = await subtasks(channels, admin, name)
            assert subs["implement"].state == spb.SUBTASK_STATE_EVALUATING, "nothing delivered yet"
    finally:
        await _restart_evaluator(stack)  # kill -9 at the held point, then start normally

    await reaches(channels, admin, name, spb.TASK_STATE_SUCCEEDED, 30, "the task to finish after the restart")
    assert _corrections(stack, task_id) == 1, "one correction subtask: the verdict applied once"
    applied = _query(
        stack, "SELECT disposition FROM scheduler.applied_verdicts WHERE task_id = %s ORDER BY apply_time", task_id
    )
    assert applied == [(1,), (1,)], "CORRECT then ACCEPT, each recorded once as APPLIED"
    transitions = _query(
        stack,
        "SELECT count(*) FROM scheduler.task_events WHERE task_id = %s AND kind = %s",
        task_id,
        tpb.TaskEvent.SUBTASKS_ADDED_FIELD_NUMBER,
    )
    assert transitions == [(2,)], "the plan, then exactly one correction"
    assert not _query(stack, "SELECT 1 FROM evaluator.outbox WHERE task_id = %s", task_id), "outbox drained"


def _corrections(stack: Stack, task_id: str) -> int:
    rows = _query(stack, "SELECT count(*) FROM scheduler.subtasks WHERE task_id = %s AND corrects <> ''", task_id)
    count = rows[0][0]
    assert isinstance(count, int)
    return count


@pytest.mark.slow
async def test_results_awaiting_evaluation_survive_kill_9_of_the_scheduler_and_apply_once(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent]
) -> None:
    stack.children.pop("evaluator").kill()  # away: the committed result waits in the scheduler's outbox
    try:
        await start_agent(stack, channels, admin, agents, scripted([WEAK]))
        name = await create(channels, admin)
        task_id = name.removeprefix("tasks/")

        def waits_in_outbox() -> bool:
            return bool(_query(stack, "SELECT 1 FROM scheduler.evaluation_outbox WHERE task_id = %s", task_id))

        await eventually(waits_in_outbox, 30, "the result in the scheduler's evaluation outbox")
        stack.children.pop("scheduler").kill()
        await _start(stack, "scheduler", stack.ports.scheduler)
        assert waits_in_outbox(), "the outbox row survived kill -9"
    finally:
        await _start(stack, "evaluator", stack.ports.evaluator)
    await start_agent(stack, channels, admin, agents, scripted([GOOD]))  # the first agent's stream died with it

    await reaches(channels, admin, name, spb.TASK_STATE_SUCCEEDED, 45, "the task to finish after both restarts")
    assert _corrections(stack, task_id) == 1, "the weak result was judged once: one correction"
    judged = _query(stack, "SELECT count(*) FROM evaluator.results WHERE task_id = %s", task_id)
    assert judged == [(2,)], "the original result and the correction's, each received once"
    applied = _query(stack, "SELECT disposition FROM scheduler.applied_verdicts WHERE task_id = %s", task_id)
    assert applied == [(1,), (1,)], "CORRECT then ACCEPT, each applied once"
    assert not waits_in_outbox() and not _query(stack, "SELECT 1 FROM evaluator.outbox WHERE task_id = %s", task_id)
