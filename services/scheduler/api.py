"""TaskService: tasks and subtasks created, read, changed, retried, cancelled and watched (thin: translate,
validate, call the store or the engine, map errors)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc
from maw.common.v1 import work_pb2
from maw.evaluator.v1 import resources_pb2 as epb
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from maw.scheduler.v1 import task_service_pb2_grpc as tpb_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import already_exists, failed_precondition, invalid_argument, not_found, replay
from services.runtime.principal import current_principal

from . import _convert as conv
from . import dag, store, voting
from .engine import Engine
from .events import LOG_KIND, EventLog
from .names import ID_PATTERN, parse_subtask, parse_task, task_name
from .settings import SchedulerSettings
from .states import TERMINAL_TASK, SubtaskState, TaskState
from .templates import BUILTIN, BY_TASK_TYPE
from .wire import now_utc

Ctx = grpc.aio.ServicerContext[Any, Any]
MAX_DESCRIPTION = 100 * 1024
MAX_BATCH = 1000
TASK_FILTER = {"state": "state", "creator": "creator", "priority": "priority"}
TASK_ENUMS = {
    "state": {s.name: int(s) for s in TaskState},
    "priority": {v.name.removeprefix("PRIORITY_"): v.number for v in work_pb2.Priority.DESCRIPTOR.values if v.number},
}
SUBTASK_FILTER = {"state": "state", "worker": "worker", "key": "key"}
SUBTASK_ENUMS = {"state": {s.name: int(s) for s in SubtaskState}}


def _creator() -> str:
    return current_principal().name


def _enum_ok(value: int, enum: Any) -> bool:
    return value in enum.values()


def _limit_problems(limits: work_pb2.TimeLimits, prefix: str) -> list[tuple[str, str]]:
    """Time limits must not be negative (zero means none) and fit in a year."""
    problems = []
    for field in ("queue_wait", "attempt", "total", "no_progress"):
        seconds = getattr(limits, field).ToTimedelta().total_seconds()
        if not 0 <= seconds <= 366 * 86400:
            problems.append((f"{prefix}.{field}", "must be between 0 (no limit) and one year"))
    return problems


def _check_task_fields(task: spb.Task) -> list[tuple[str, str]]:
    problems = []
    if not task.description.strip():
        problems.append(("task.description", "must not be empty"))
    if len(task.description.encode()) > MAX_DESCRIPTION:
        problems.append(("task.description", f"at most {MAX_DESCRIPTION} bytes"))
    if len(task.display_name) > dag.MAX_DISPLAY_NAME:
        problems.append(("task.display_name", f"at most {dag.MAX_DISPLAY_NAME} characters"))
    if not _enum_ok(task.priority, work_pb2.Priority):
        problems.append(("task.priority", f"unknown priority {task.priority}"))
    if not _enum_ok(task.privacy_level, work_pb2.PrivacyLevel):
        problems.append(("task.privacy_level", f"unknown privacy level {task.privacy_level}"))
    if not _enum_ok(task.checkpoint_frequency, work_pb2.CheckpointFrequency):
        problems.append(("task.checkpoint_frequency", f"unknown frequency {task.checkpoint_frequency}"))
    if not _enum_ok(task.type, spb.TaskType):
        problems.append(("task.type", f"unknown task type {task.type}"))
    if not 0 <= task.max_concurrency <= 10_000:
        problems.append(("task.max_concurrency", "must be 0-10000 (0: no limit)"))
    if not 0 <= task.max_attempts <= dag.MAX_ATTEMPTS_LIMIT:
        problems.append(("task.max_attempts", f"must be 0-{dag.MAX_ATTEMPTS_LIMIT} (0: the default)"))
    for i, tool in enumerate(task.tool_preferences):
        if tool.kind not in dag.KNOWN_TOOLS:
            problems.append((f"task.tool_preferences[{i}].kind", f"unknown tool kind {tool.kind}"))
    for k, v in list(task.labels.items()) + list(task.required_labels.items()):
        if not k or len(k) > 63 or len(v) > 63:
            problems.append(("task.labels", "label keys are 1-63 characters, values at most 63"))
            break
    problems += _limit_problems(task.time_limits, "task.time_limits")
    if len(task.requirements) > 100 or any(len(r) > 2000 for r in task.requirements):
        problems.append(("task.requirements", "at most 100 requirements of 2000 characters each"))
    return problems


class TaskService(tpb_grpc.TaskServiceServicer):
    """Tasks and subtasks."""

    def __init__(self, settings: SchedulerSettings, db: AsyncEngine, engine: Engine) -> None:
        self.settings = settings
        self.db = db
        self.engine = engine

    # -- create ----------------------------------------------------------------------------------------

    async def _plan(self, request: tpb.CreateTaskRequest) -> tuple[list[spb.SubtaskSpec], str, str]:
        """The subtask specs of the request's plan, the template name used, and the field to blame."""
        which = request.WhichOneof("plan")
        if which == "graph":
            return list(request.graph.subtasks), "", "graph.subtasks"
        name = request.template or (BY_TASK_TYPE[request.task.type].name if request.task.type in BY_TASK_TYPE else "")
        name = name or "templates/develop-feature"
        if name in BUILTIN:
            return [conv.spec_from_step(s) for s in BUILTIN[name].steps], name, "template"
        template_id = name.removeprefix("templates/")
        if not name.startswith("templates/") or not ID_PATTERN.match(template_id):
            raise invalid_argument([("template", "must be templates/{template}")])
        async with self.db.connect() as conn:
            saved = await store.get_template(conn, template_id)
        if saved is None:
            raise not_found("maw.scheduler.v1.Template", name)
        template = spb.Template.FromString(saved[0])
        return list(template.steps), name, "template"

    async def CreateTask(self, request: tpb.CreateTaskRequest, context: Ctx) -> tpb.CreateTaskResponse:
        problems = _check_task_fields(request.task)
        if request.task_id and not ID_PATTERN.match(request.task_id):
            problems.append(("task_id", "must match [a-z0-9][a-z0-9-]{0,62}"))
        if len(request.request_id) > 128:
            problems.append(("request_id", "at most 128 characters"))
        if problems:
            raise invalid_argument(problems)
        specs, template, blame = await self._plan(request)
        steps = [conv.step_from_spec(spec) for spec in specs]
        prefix = "graph.subtasks" if blame == "graph.subtasks" else "template.steps"
        problems = dag.validate(steps, prefix)
        for i, spec in enumerate(specs):
            problems += _limit_problems(spec.time_limits, f"{prefix}[{i}].time_limits")
        if problems:
            raise invalid_argument(problems)
        creator = _creator()
        if request.request_id:
            async with self.db.connect() as conn:
                earlier = await store.find_task_by_request(conn, creator, request.request_id)
            if earlier is not None:
                return await self._created(earlier.id)
        task_id = request.task_id or uuid.uuid4().hex[:16]
        task = spb.Task()
        task.CopyFrom(request.task)
        task.template = template
        task.priority = task.priority or work_pb2.PRIORITY_NORMAL
        task.privacy_level = task.privacy_level or work_pb2.PRIVACY_LEVEL_NORMAL
        task.checkpoint_frequency = task.checkpoint_frequency or work_pb2.CHECKPOINT_FREQUENCY_MEDIUM
        task.display_name = task.display_name or task.description.strip().splitlines()[0][:80]
        preferred = task.tool_preferences[0].kind if task.tool_preferences else None
        max_attempts = task.max_attempts or self.settings.default_max_attempts
        after = dag.dependents(steps)
        subtask_rows = []
        for ordinal, (step, given) in enumerate(zip(steps, specs, strict=True)):
            spec = spb.SubtaskSpec()
            spec.CopyFrom(given)  # everything the caller said, time and resource limits included
            limits = spec.time_limits if spec.HasField("time_limits") else task.time_limits
            if not step.tool_kind and preferred is not None:
                spec.preferred_tool.kind = preferred
            spec.complexity = spec.complexity or 3
            subtask_rows.append(
                {
                    "task_id": task_id,
                    "key": step.key,
                    "ordinal": ordinal,
                    "body": spec.SerializeToString(),
                    "state": int(SubtaskState.PENDING if step.dependencies else SubtaskState.READY),
                    "max_attempts": step.max_attempts or max_attempts,
                    "priority": step.priority,
                    "task_priority": int(task.priority),
                    "tool_kind": int(spec.preferred_tool.kind),
                    "privacy_level": int(task.privacy_level),
                    "required_labels": json.dumps({**task.required_labels, **step.required_labels}),
                    "dependencies": step.dependencies,
                    "dependents": after[step.key],
                    "attempt_limit_s": limits.attempt.ToTimedelta().total_seconds(),
                    "queue_wait_limit_s": limits.queue_wait.ToTimedelta().total_seconds(),
                    "total_limit_s": limits.total.ToTimedelta().total_seconds(),
                    "deps_remaining": len(step.dependencies),
                }  # fmt: skip
            )
        subtask_rows = voting.expand(task, subtask_rows)  # competing solutions when the task's policy votes
        if request.validate_only:
            task.name = task_name(task_id)
            task.subtask_count = len(subtask_rows)
            task.state = spb.TASK_STATE_PENDING
            return tpb.CreateTaskResponse(task=task)
        # AFTER_DECOMPOSITION asked by the task: it waits from the start, so nothing runs before a person confirms
        # the plan at the checkpoint the evaluator opens when the task registers (docs/evaluation.md).
        confirm_plan = epb.CHECKPOINT_TRIGGER_AFTER_DECOMPOSITION in task.policy.triggers
        task_row = {
            "id": task_id, "creator": creator, "request_id": request.request_id or None,
            "body": task.SerializeToString(), "priority": int(task.priority),
            "state": int(TaskState.WAITING_CHECKPOINT if confirm_plan else TaskState.PENDING),
            "max_concurrency": task.max_concurrency, "labels": json.dumps(dict(task.labels)),
            "subtask_count": len(subtask_rows),
        }  # fmt: skip
        try:
            async with self.db.begin() as conn:
                if await store.get_task(conn, task_id) is not None:
                    raise already_exists("maw.scheduler.v1.Task", task_name(task_id))
                await store.insert_task(conn, task_row, subtask_rows)
                events = EventLog()
                rows = await store.get_subtasks(conn, task_id)
                events.add(
                    task_id,
                    tpb.TaskEvent(
                        subtasks_added=tpb.SubtasksAdded(
                            subtasks=[conv.subtask_message(r) for r in rows], reason="planned"
                        )
                    ),
                )
                touched = await events.flush(conn)
        except Exception as exc:
            if request.request_id and "tasks_creator_request_id_key" in str(exc):
                async with self.db.connect() as conn:
                    earlier = await store.find_task_by_request(conn, creator, request.request_id)
                if earlier is not None:  # a concurrent retry of the same request won the race
                    return await self._created(earlier.id)
            raise
        await self.engine.after_commit(touched, True)
        return await self._created(task_id)

    async def _created(self, task_id: str) -> tpb.CreateTaskResponse:
        async with self.db.connect() as conn:
            row = await store.get_task(conn, task_id)
            subs = await store.get_subtasks(conn, task_id)
        assert row is not None
        return tpb.CreateTaskResponse(task=conv.task_message(row), subtasks=[conv.subtask_message(s) for s in subs])

    # -- read ----------------------------------------------------------------------------------------------

    async def _task(self, name: str, field: str = "name") -> store.TaskRow:
        task_id = parse_task(name, field)
        async with self.db.connect() as conn:
            row = await store.get_task(conn, task_id)
        if row is None:
            raise not_found("maw.scheduler.v1.Task", name)
        return row

    async def GetTask(self, request: tpb.GetTaskRequest, context: Ctx) -> tpb.GetTaskResponse:
        row = await self._task(request.name)
        async with self.db.connect() as conn:
            subs = await store.get_subtasks(conn, row.id)
        counts: dict[int, int] = {}
        for s in subs:
            counts[s.state] = counts.get(s.state, 0) + 1
        return tpb.GetTaskResponse(task=conv.task_message(row, counts))

    async def ListTasks(self, request: tpb.ListTasksRequest, context: Ctx) -> tpb.ListTasksResponse:
        size = conv.page_size(request.page_size)
        if request.order_by and request.order_by.strip() not in ("create_time desc", "create_time DESC"):
            raise invalid_argument([("order_by", "only 'create_time desc' is supported")])
        where, params = conv.parse_filter(request.filter, TASK_FILTER, TASK_ENUMS)
        after = None
        if request.page_token:
            token = conv.decode_token(request.page_token)
            try:
                after = (datetime.fromisoformat(token["t"]), str(token["id"]))
            except (KeyError, ValueError, TypeError):
                raise invalid_argument([("page_token", "not a page token this server issued")]) from None
            if token.get("f") != request.filter:
                raise invalid_argument([("page_token", "was issued for a different filter")])
        async with self.db.connect() as conn:
            rows = await store.list_tasks(conn, where, params, size + 1, after)
            total = await store.count_tasks(conn, where, params)
        more = len(rows) > size
        rows = rows[:size]
        next_token = ""
        if more:
            last = rows[-1]
            next_token = conv.encode_token({"t": conv.time_key(last.create_time), "id": last.id, "f": request.filter})
        return tpb.ListTasksResponse(
            tasks=[conv.task_message(r) for r in rows], next_page_token=next_token, total_size=total
        )

    async def GetSubtask(self, request: tpb.GetSubtaskRequest, context: Ctx) -> tpb.GetSubtaskResponse:
        task_id, key = parse_subtask(request.name)
        async with self.db.connect() as conn:
            rows = await store.get_subtasks(conn, task_id, [key])
            results = await store.latest_results(conn, task_id, [key])
        if not rows:
            raise not_found("maw.scheduler.v1.Subtask", request.name)
        return tpb.GetSubtaskResponse(subtask=conv.subtask_message(rows[0], results.get(key)))

    async def ListSubtasks(self, request: tpb.ListSubtasksRequest, context: Ctx) -> tpb.ListSubtasksResponse:
        row = await self._task(request.parent, "parent")
        size = conv.page_size(request.page_size)
        if request.order_by:
            raise invalid_argument([("order_by", "subtasks are listed in plan order")])
        where, params = conv.parse_filter(request.filter, SUBTASK_FILTER, SUBTASK_ENUMS)
        after = -1
        if request.page_token:
            token = conv.decode_token(request.page_token)
            if not isinstance(token.get("o"), int) or token.get("f") != request.filter:
                raise invalid_argument([("page_token", "not a page token for this listing")])
            after = token["o"]
        async with self.db.connect() as conn:
            subs = await store.page_subtasks(conn, row.id, where, params, after, size + 1)
            results = await store.latest_results(conn, row.id, [s.key for s in subs[:size]])
        more = len(subs) > size
        subs = subs[:size]
        next_token = conv.encode_token({"o": subs[-1].ordinal, "f": request.filter}) if more else ""
        return tpb.ListSubtasksResponse(
            subtasks=[conv.subtask_message(s, results.get(s.key)) for s in subs], next_page_token=next_token
        )

    # -- change ----------------------------------------------------------------------------------------------

    async def UpdateTask(self, request: tpb.UpdateTaskRequest, context: Ctx) -> tpb.UpdateTaskResponse:
        row = await self._task(request.task.name, "task.name")
        allowed = {"display_name", "labels", "priority", "max_concurrency"}
        paths = list(request.update_mask.paths)
        if not paths:
            raise invalid_argument([("update_mask", f"name the fields to change: {', '.join(sorted(allowed))}")])
        bad = [p for p in paths if p not in allowed]
        if bad:
            raise invalid_argument([("update_mask", f"cannot update {', '.join(bad)}")])
        problems = [p for p in _check_task_fields(request.task) if p[0].split(".")[1] in paths]
        if request.task.etag and request.task.etag != conv.task_message(row).etag:
            raise failed_precondition("ETAG_MISMATCH", request.task.name, "the task changed since it was read")
        if problems:
            raise invalid_argument(problems)
        body = spb.Task.FromString(row.body)
        fields: dict[str, Any] = {}
        if "display_name" in paths:
            body.display_name = request.task.display_name
        if "labels" in paths:
            body.labels.clear()
            body.labels.update(request.task.labels)
            fields["labels"] = json.dumps(dict(request.task.labels))
        if "max_concurrency" in paths:
            fields["max_concurrency"] = request.task.max_concurrency
        async with self.db.begin() as conn:
            if "priority" in paths:
                await store.set_priorities(conn, [row.id], request.task.priority or work_pb2.PRIORITY_NORMAL)
            if "labels" in fields:
                await store.set_labels(conn, row.id, fields.pop("labels"))
            await store.update_task(conn, row.id, body=body.SerializeToString(), **fields)
        self.engine.poke()
        return tpb.UpdateTaskResponse(task=conv.task_message(await self._task(request.task.name, "task.name")))

    async def _batch(self, names: list[str], field: str) -> list[str]:
        if not names:
            raise invalid_argument([(field, "name at least one task")])
        if len(names) > MAX_BATCH:
            raise invalid_argument([(field, f"at most {MAX_BATCH} tasks per call")])
        ids = [parse_task(n, f"{field}[{i}]") for i, n in enumerate(names)]
        async with self.db.connect() as conn:
            rows = await store.list_tasks(conn, "id = ANY(:ids)", {"ids": ids}, len(ids) + 1, None)
            found = {r.id: r for r in rows}
        missing = [names[i] for i, t in enumerate(ids) if t not in found]
        if missing:
            raise not_found("maw.scheduler.v1.Task", missing[0])
        return list(dict.fromkeys(ids))

    async def CancelTask(self, request: tpb.CancelTaskRequest, context: Ctx) -> tpb.CancelTaskResponse:
        if len(request.reason) > 1000:
            raise invalid_argument([("reason", "at most 1000 characters")])
        row = await self._task(request.name)
        tasks = await self.engine.cancel_tasks([row.id], request.reason or "cancelled")
        return tpb.CancelTaskResponse(task=conv.task_message(tasks[row.id]))

    async def BatchCancelTasks(
        self, request: tpb.BatchCancelTasksRequest, context: Ctx
    ) -> tpb.BatchCancelTasksResponse:
        if len(request.reason) > 1000:
            raise invalid_argument([("reason", "at most 1000 characters")])
        ids = await self._batch(list(request.names), "names")
        tasks = await self.engine.cancel_tasks(ids, request.reason or "cancelled")
        return tpb.BatchCancelTasksResponse(tasks=[conv.task_message(tasks[i]) for i in ids])

    async def BatchUpdateTaskPriority(
        self, request: tpb.BatchUpdateTaskPriorityRequest, context: Ctx
    ) -> tpb.BatchUpdateTaskPriorityResponse:
        if request.priority not in (1, 2, 3, 4):
            raise invalid_argument([("priority", "must be LOW, NORMAL, HIGH or URGENT")])
        ids = await self._batch(list(request.names), "names")
        async with self.db.begin() as conn:
            await store.set_priorities(conn, ids, int(request.priority))
            rows = await store.lock_tasks(conn, ids)
        self.engine.poke()
        return tpb.BatchUpdateTaskPriorityResponse(tasks=[conv.task_message(rows[i]) for i in ids])

    async def RetrySubtask(self, request: tpb.RetrySubtaskRequest, context: Ctx) -> tpb.RetrySubtaskResponse:
        task_id, key = parse_subtask(request.name)
        creator = _creator()
        async with self.db.connect() as conn:
            if earlier := await replay.recall(
                conn, "RetrySubtask", creator, request.request_id, tpb.RetrySubtaskResponse
            ):
                return earlier
        events = EventLog()
        async with self.db.begin() as conn:
            task = await store.get_task(conn, task_id, lock=True)
            if task is None:
                raise not_found("maw.scheduler.v1.Task", task_name(task_id))
            subs = {s.key: s for s in await store.get_subtasks(conn, task_id, lock=True)}
            if key not in subs:
                raise not_found("maw.scheduler.v1.Subtask", request.name)
            target = subs[key]
            retryable = (SubtaskState.FAILED, SubtaskState.CANCELLED, SubtaskState.BLOCKED)
            if target.state not in retryable or task.state == TaskState.SUCCEEDED:
                raise failed_precondition(
                    "NOT_RETRYABLE", request.name,
                    f"only a failed, cancelled or blocked subtask of an unfinished task can be retried"
                    f" (it is {SubtaskState(target.state).name})",
                )  # fmt: skip
            # The subtask and every cancelled step downstream of it run again.
            reopen = [key]
            queue = list(target.dependents)
            while queue:
                nxt = queue.pop()
                if nxt not in reopen and subs[nxt].state in retryable:
                    reopen.append(nxt)
                    queue.extend(subs[nxt].dependents)
            changes = []
            failed = cancelled = 0
            for k in reopen:
                s = subs[k]
                # The retried subtask's own dependencies already succeeded (or it would not have run).
                remaining = 0 if k == key else sum(subs[d].state != SubtaskState.SUCCEEDED for d in s.dependencies)
                new = SubtaskState.READY if remaining == 0 else SubtaskState.PENDING
                failed += s.state == SubtaskState.FAILED
                cancelled += s.state == SubtaskState.CANCELLED
                changes.append(
                    {
                        "task_id": task_id,
                        "key": k,
                        "state": int(new),
                        "failures": 0,
                        "deps_remaining": remaining,
                        "worker": None,
                        "end_time": None,
                        "next_attempt_time": None,
                        "ready_time": now_utc(),
                        "state_message": request.reason[:500] or "retried",
                    }  # fmt: skip
                )
                events.subtask_state(task_id, k, s.state, new, s.attempt, None, request.reason[:500] or "retried")
            await store.set_subtask_states(conn, changes)
            fields: dict[str, Any] = {
                "failed_count": max(0, task.failed_count - failed),
                "cancelled_count": max(0, task.cancelled_count - cancelled),
            }
            if task.state in TERMINAL_TASK:
                fields.update(state=int(TaskState.RUNNING), state_message="a subtask is retried", end_time=None)
                events.task_state(task, task.state, TaskState.RUNNING, "a subtask is retried")
            await store.update_task(conn, task_id, **fields)
            touched = await events.flush(conn)
            row = (await store.get_subtasks(conn, task_id, [key]))[0]
            response = tpb.RetrySubtaskResponse(subtask=conv.subtask_message(row))
            await replay.keep(conn, "RetrySubtask", creator, request.request_id, response)
        await self.engine.after_commit(touched, True)
        return response

    # -- watch ------------------------------------------------------------------------------------------------

    async def WatchTask(self, request: tpb.WatchTaskRequest, context: Ctx) -> AsyncIterator[tpb.WatchTaskResponse]:
        row = await self._task(request.name)
        if request.after_sequence < 0:
            raise invalid_argument([("after_sequence", "must not be negative")])
        wanted = set()
        for i, name in enumerate(request.subtasks):
            parse_subtask(name, f"subtasks[{i}]")
            wanted.add(name)
        after = request.after_sequence
        signal = asyncio.Event()
        self.engine.task_listeners[row.id].add(signal)
        try:
            while True:
                signal.clear()  # before reading: a notification during the read is not lost
                async with self.db.connect() as conn:
                    batch = await store.read_events(conn, row.id, after, 500)
                events = []
                for sequence, kind, body in batch:
                    after = sequence
                    if kind == LOG_KIND and not request.include_logs:
                        continue
                    event = tpb.TaskEvent.FromString(body)
                    if wanted and not _mentions(event, wanted):
                        continue
                    events.append(event)
                if events:
                    yield tpb.WatchTaskResponse(events=events)
                if len(batch) == 500:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(signal.wait(), timeout=2.0)  # poll too: Redis may be down
        finally:
            listeners = self.engine.task_listeners.get(row.id)
            if listeners is not None:
                listeners.discard(signal)
                if not listeners:
                    del self.engine.task_listeners[row.id]


def _mentions(event: tpb.TaskEvent, names: set[str]) -> bool:
    kind = event.WhichOneof("kind")
    if kind == "subtask_state_changed":
        return event.subtask_state_changed.subtask.name in names
    if kind == "subtask_progress":
        return event.subtask_progress.subtask in names
    if kind == "subtask_log_chunk":
        return event.subtask_log_chunk.subtask in names
    return True
