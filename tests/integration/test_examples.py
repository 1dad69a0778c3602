"""examples/: the dashboard's generated TypeScript client used from Node, through the gateway."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import grpc
from maw.scheduler.v1 import resources_pb2, task_service_pb2, task_service_pb2_grpc

from deploy.local.dashboard import DASHBOARD, ROOT, build
from deploy.local.stack import Stack
from tests.integration.conftest import bearer


async def test_node_example_lists_workers_creates_a_task_and_watches_it_to_the_end(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin_token: str
) -> None:
    await asyncio.to_thread(build)  # generates dashboard/src/gen, which the example imports
    run = await asyncio.to_thread(
        subprocess.run,
        [
            str(DASHBOARD / "node_modules" / ".bin" / "tsx"),
            "--tsconfig",
            "examples/node/tsconfig.json",
            "examples/node/watch_task.mts",
            "--cancel-after-events",
            "1",
        ],
        cwd=ROOT,
        env=os.environ | {"MAW_GATEWAY": f"http://127.0.0.1:{stack.ports.gateway}", "MAW_TOKEN": admin_token},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert isinstance(lines[0]["workers"], list)
    created = lines[1]["created"]
    assert lines[1]["subtasks"] == ["first", "second"]
    events = [line for line in lines if "event" in line]
    assert events[0]["event"] == "subtasksAdded"
    assert [int(e["sequence"]) for e in events] == sorted(int(e["sequence"]) for e in events)
    assert events[-1] == {"sequence": events[-1]["sequence"], "event": "taskStateChanged", "state": "CANCELLED"}
    assert lines[-1] == {"done": created}
    # The task the example made is the one the server holds, cancelled by the example.
    reply = await task_service_pb2_grpc.TaskServiceStub(channels["scheduler"]).GetTask(
        task_service_pb2.GetTaskRequest(name=created), metadata=bearer(admin_token), timeout=10
    )
    assert reply.task.state == resources_pb2.TASK_STATE_CANCELLED
