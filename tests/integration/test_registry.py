"""The registry over the real mesh: tokens, revocation, enrollment, presence, activity, bad input, no leaks."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from google.rpc import error_details_pb2
from maw.agent.v1 import agent_service_pb2, agent_service_pb2_grpc
from maw.registry.v1 import (
    activity_intake_service_pb2,
    activity_intake_service_pb2_grpc,
    activity_service_pb2,
    activity_service_pb2_grpc,
    auth_service_pb2,
    auth_service_pb2_grpc,
    enrollment_service_pb2,
    enrollment_service_pb2_grpc,
    resources_pb2,
    user_service_pb2,
    user_service_pb2_grpc,
    worker_intake_service_pb2,
    worker_intake_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)
from maw.scheduler.v1 import task_service_pb2, task_service_pb2_grpc

from deploy.local import Stack
from services.runtime.errors import details_from_trailers
from tests.integration.conftest import bearer

# Every secret this module sees; the last tests grep the logs and the activity log for them.
SEEN_SECRETS: set[str] = set()


def _keep(secret: str) -> str:
    SEEN_SECRETS.add(secret)
    return secret


async def _fails(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    assert err.value.code() == code, err.value.details()
    return err.value


def _violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = details_from_trailers(err.trailing_metadata())
    assert status is not None
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


@pytest.fixture(scope="module")
def auth(channels: dict[str, grpc.aio.Channel]) -> auth_service_pb2_grpc.AuthServiceAsyncStub:
    return auth_service_pb2_grpc.AuthServiceStub(channels["registry"])


@pytest.fixture(scope="module")
def users(channels: dict[str, grpc.aio.Channel]) -> user_service_pb2_grpc.UserServiceAsyncStub:
    return user_service_pb2_grpc.UserServiceStub(channels["registry"])


@pytest.fixture(scope="module")
def enrollment(channels: dict[str, grpc.aio.Channel]) -> enrollment_service_pb2_grpc.EnrollmentServiceAsyncStub:
    return enrollment_service_pb2_grpc.EnrollmentServiceStub(channels["registry"])


@pytest.fixture(scope="module")
def workers(channels: dict[str, grpc.aio.Channel]) -> worker_service_pb2_grpc.WorkerServiceAsyncStub:
    return worker_service_pb2_grpc.WorkerServiceStub(channels["registry"])


@pytest.fixture(scope="module")
def activity(channels: dict[str, grpc.aio.Channel]) -> activity_service_pb2_grpc.ActivityServiceAsyncStub:
    return activity_service_pb2_grpc.ActivityServiceStub(channels["registry"])


async def _api_token(auth: auth_service_pb2_grpc.AuthServiceAsyncStub, admin: str, role: int = 1) -> tuple[str, str]:
    reply = await auth.CreateApiToken(
        auth_service_pb2.CreateApiTokenRequest(api_token=resources_pb2.ApiToken(display_name="test", role=role)),  # type: ignore[arg-type]
        metadata=bearer(admin),
        timeout=10,
    )
    return reply.api_token.name, _keep(reply.secret)


async def _enroll(
    enrollment: enrollment_service_pb2_grpc.EnrollmentServiceAsyncStub, admin: str, worker_id: str, max_uses: int = 1
) -> tuple[str, str]:
    spec = resources_pb2.EnrollmentToken(display_name="t", max_uses=max_uses, labels={"site": "garage"})
    spec.expire_time.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    token = await enrollment.CreateEnrollmentToken(
        enrollment_service_pb2.CreateEnrollmentTokenRequest(enrollment_token=spec), metadata=bearer(admin), timeout=10
    )
    agent = await enrollment.EnrollAgent(
        enrollment_service_pb2.EnrollAgentRequest(token=token.secret, worker_id=worker_id, hostname=worker_id),
        timeout=10,
    )
    return _keep(token.secret), _keep(agent.agent_credential)


# -- tokens ------------------------------------------------------------------------------------------------------


async def test_login_then_refresh_rotates_and_a_retry_with_the_same_request_id_gets_the_same_token(
    stack: Stack, auth: auth_service_pb2_grpc.AuthServiceAsyncStub
) -> None:
    login = await auth.Login(auth_service_pb2.LoginRequest(username="admin", password=stack.admin_password), timeout=30)
    first = _keep(login.tokens.refresh_token)
    assert first.startswith("maw_rft_")
    request = auth_service_pb2.RefreshTokenRequest(refresh_token=first, request_id=str(uuid.uuid4()))
    rotated = await auth.RefreshToken(request, timeout=10)
    again = await auth.RefreshToken(request, timeout=10)
    assert rotated.tokens.refresh_token == again.tokens.refresh_token != first
    _keep(rotated.tokens.refresh_token)
    who = await auth.WhoAmI(auth_service_pb2.WhoAmIRequest(), metadata=bearer(rotated.tokens.access_token), timeout=10)
    assert who.principal == "users/admin"
    assert who.auth_method == auth_service_pb2.AUTH_METHOD_ACCESS_TOKEN


async def test_reusing_a_used_refresh_token_is_refused_and_revokes_the_whole_family(
    stack: Stack, auth: auth_service_pb2_grpc.AuthServiceAsyncStub
) -> None:
    login = await auth.Login(auth_service_pb2.LoginRequest(username="admin", password=stack.admin_password), timeout=30)
    first = _keep(login.tokens.refresh_token)
    rotated = await auth.RefreshToken(auth_service_pb2.RefreshTokenRequest(refresh_token=first), timeout=10)
    _keep(rotated.tokens.refresh_token)
    await _fails(
        auth.RefreshToken(auth_service_pb2.RefreshTokenRequest(refresh_token=first), timeout=10),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    # The descendant dies with the family, and so does every access token of the session, at once.
    await _fails(
        auth.RefreshToken(auth_service_pb2.RefreshTokenRequest(refresh_token=rotated.tokens.refresh_token), timeout=10),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    await _fails(
        auth.WhoAmI(auth_service_pb2.WhoAmIRequest(), metadata=bearer(rotated.tokens.access_token), timeout=10),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_wrong_password_and_unknown_user_get_the_same_unauthenticated_answer(
    auth: auth_service_pb2_grpc.AuthServiceAsyncStub,
) -> None:
    wrong = await _fails(
        auth.Login(auth_service_pb2.LoginRequest(username="admin", password="not-the-password"), timeout=30),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    unknown = await _fails(
        auth.Login(auth_service_pb2.LoginRequest(username="nobody-here", password="not-the-password"), timeout=30),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert wrong.details() == unknown.details()


async def test_repeated_failed_logins_of_one_user_get_resource_exhausted_with_retry_info(
    auth: auth_service_pb2_grpc.AuthServiceAsyncStub,
    users: user_service_pb2_grpc.UserServiceAsyncStub,
    admin_token: str,
) -> None:
    password = _keep("brute-force-target-password")
    await users.CreateUser(
        user_service_pb2.CreateUserRequest(
            user_id="brute",
            user=resources_pb2.User(role=resources_pb2.ROLE_VIEWER),
            password=password,
            request_id=str(uuid.uuid4()),
        ),
        metadata=bearer(admin_token),
        timeout=30,
    )
    for _ in range(10):
        await _fails(
            auth.Login(auth_service_pb2.LoginRequest(username="brute", password="wrong-guess-123"), timeout=30),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    err = await _fails(
        auth.Login(auth_service_pb2.LoginRequest(username="brute", password=password), timeout=30),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    status = details_from_trailers(err.trailing_metadata())
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status.details)
    assert retry.retry_delay.seconds + retry.retry_delay.nanos > 0


async def test_a_revoked_api_token_fails_at_once_in_every_service(
    channels: dict[str, grpc.aio.Channel], auth: auth_service_pb2_grpc.AuthServiceAsyncStub, admin_token: str
) -> None:
    name, secret = await _api_token(auth, admin_token)
    tasks = task_service_pb2_grpc.TaskServiceStub(channels["scheduler"])

    async def scheduler_code() -> grpc.StatusCode:
        try:
            await tasks.ListTasks(task_service_pb2.ListTasksRequest(), metadata=bearer(secret), timeout=10)
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    assert await scheduler_code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    who = await auth.WhoAmI(auth_service_pb2.WhoAmIRequest(), metadata=bearer(secret), timeout=10)
    assert (who.auth_method, who.api_token, who.role) == (auth_service_pb2.AUTH_METHOD_API_TOKEN, name, 1)
    await auth.RevokeApiToken(auth_service_pb2.RevokeApiTokenRequest(name=name), metadata=bearer(admin_token))
    # Cached as valid in the scheduler a moment ago; the revocation message drops it there too.
    await asyncio.sleep(0.2)
    assert await scheduler_code() == grpc.StatusCode.UNAUTHENTICATED
    await _fails(
        auth.WhoAmI(auth_service_pb2.WhoAmIRequest(), metadata=bearer(secret), timeout=10),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_an_api_token_cannot_outrank_its_owner(
    auth: auth_service_pb2_grpc.AuthServiceAsyncStub, viewer_token: str
) -> None:
    err = await _fails(
        auth.CreateApiToken(
            auth_service_pb2.CreateApiTokenRequest(
                api_token=resources_pb2.ApiToken(display_name="x", role=resources_pb2.ROLE_ADMIN)
            ),
            metadata=bearer(viewer_token),
            timeout=10,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert _violations(err) == ["api_token.role"]
    listed = await auth.ListApiTokens(auth_service_pb2.ListApiTokensRequest(), metadata=bearer(viewer_token))
    assert list(listed.api_tokens) == []


# -- streams are cut on revocation ---------------------------------------------------------------------------


async def test_revoking_an_api_token_ends_its_open_watch_stream_with_permission_denied(
    auth: auth_service_pb2_grpc.AuthServiceAsyncStub,
    activity: activity_service_pb2_grpc.ActivityServiceAsyncStub,
    admin_token: str,
) -> None:
    name, secret = await _api_token(auth, admin_token)
    stream = activity.WatchActivity(activity_service_pb2.WatchActivityRequest(), metadata=bearer(secret), timeout=20)
    await asyncio.sleep(0.3)
    await auth.RevokeApiToken(auth_service_pb2.RevokeApiTokenRequest(name=name), metadata=bearer(admin_token))
    started = asyncio.get_running_loop().time()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert asyncio.get_running_loop().time() - started < 3


async def test_revoking_a_worker_cuts_its_agent_stream_on_the_scheduler(
    channels: dict[str, grpc.aio.Channel],
    enrollment: enrollment_service_pb2_grpc.EnrollmentServiceAsyncStub,
    workers: worker_service_pb2_grpc.WorkerServiceAsyncStub,
    admin_token: str,
) -> None:
    _, credential = await _enroll(enrollment, admin_token, "cut-me")
    agent = agent_service_pb2_grpc.AgentServiceStub(channels["scheduler"])

    async def silent() -> AsyncIterator[agent_service_pb2.ConnectRequest]:
        await asyncio.sleep(30)
        return
        yield agent_service_pb2.ConnectRequest()

    stream = agent.Connect(silent(), metadata=bearer(credential), timeout=20)
    await asyncio.sleep(0.5)
    await workers.RevokeWorker(
        worker_service_pb2.RevokeWorkerRequest(name="workers/cut-me", reason="test"), metadata=bearer(admin_token)
    )
    started = asyncio.get_running_loop().time()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stream.read()
        await stream.read()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert asyncio.get_running_loop().time() - started < 5
    # And it can never come back.
    again = agent.Connect(silent(), metadata=bearer(credential), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await again.read()
    assert refused.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


# -- enrollment, catalog, presence --------------------------------------------------------------------------------


async def test_a_one_time_enrollment_token_enrolls_once_and_then_is_refused_with_nothing_written(
    enrollment: enrollment_service_pb2_grpc.EnrollmentServiceAsyncStub,
    workers: worker_service_pb2_grpc.WorkerServiceAsyncStub,
    admin_token: str,
) -> None:
    token, _ = await _enroll(enrollment, admin_token, "once-only")
    await _fails(
        enrollment.EnrollAgent(
            enrollment_service_pb2.EnrollAgentRequest(token=token, worker_id="twice", hostname="twice"), timeout=10
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    await _fails(
        workers.GetWorker(worker_service_pb2.GetWorkerRequest(name="workers/twice"), metadata=bearer(admin_token)),
        grpc.StatusCode.NOT_FOUND,
    )
    enrolled = await workers.GetWorker(
        worker_service_pb2.GetWorkerRequest(name="workers/once-only"), metadata=bearer(admin_token)
    )
    assert enrolled.worker.labels["site"] == "garage"


async def test_watch_workers_resumes_from_a_listing_without_a_gap_and_presence_drives_status(
    stack: Stack,
    channels: dict[str, grpc.aio.Channel],
    enrollment: enrollment_service_pb2_grpc.EnrollmentServiceAsyncStub,
    workers: worker_service_pb2_grpc.WorkerServiceAsyncStub,
    admin_token: str,
) -> None:
    listed = await workers.ListWorkers(worker_service_pb2.ListWorkersRequest(), metadata=bearer(admin_token))
    await _enroll(enrollment, admin_token, "watched")
    intake = worker_intake_service_pb2_grpc.WorkerIntakeServiceStub(channels["registry"])
    service = bearer(stack.service_credential("scheduler"))
    report = worker_intake_service_pb2.WorkerReport(
        worker="workers/watched",
        session_id="s1",
        report_sequence=1,
        connection_state=worker_intake_service_pb2.CONNECTION_STATE_CONNECTED,
        hostname="watched",
        declared_slots=2,
        heartbeat_interval=duration_pb2.Duration(seconds=5),
    )
    report.last_heartbeat_time.GetCurrentTime()
    reply = await intake.ReportWorkers(
        worker_intake_service_pb2.ReportWorkersRequest(reports=[report]), metadata=service
    )
    assert reply.workers[0].status == resources_pb2.WORKER_STATUS_ONLINE
    stream = workers.WatchWorkers(
        worker_service_pb2.WatchWorkersRequest(after_sequence=listed.sequence),
        metadata=bearer(admin_token),
        timeout=10,
    )
    seen: list[tuple[int, str, int]] = []
    async for batch in stream:
        seen += [(e.type, e.worker.name, e.worker.status) for e in batch.events if e.worker.name == "workers/watched"]
        if len(seen) >= 2:
            break
    stream.cancel()
    assert seen[0][:2] == (worker_service_pb2.WORKER_EVENT_TYPE_ADDED, "workers/watched")
    assert seen[1] == (
        worker_service_pb2.WORKER_EVENT_TYPE_UPDATED,
        "workers/watched",
        resources_pb2.WORKER_STATUS_ONLINE,
    )
    report.report_sequence = 2
    report.connection_state = worker_intake_service_pb2.CONNECTION_STATE_DISCONNECTED
    reply = await intake.ReportWorkers(
        worker_intake_service_pb2.ReportWorkersRequest(reports=[report]), metadata=service
    )
    assert reply.workers[0].status == resources_pb2.WORKER_STATUS_OFFLINE
    online = await workers.ListWorkers(
        worker_service_pb2.ListWorkersRequest(filter="status = ONLINE AND labels.site = garage"),
        metadata=bearer(admin_token),
    )
    assert "workers/watched" not in [w.name for w in online.workers]


async def test_activity_intake_is_idempotent_by_entry_id_and_list_filters_by_verb_prefix(
    stack: Stack, channels: dict[str, grpc.aio.Channel], activity: activity_service_pb2_grpc.ActivityServiceAsyncStub,
    admin_token: str,
) -> None:  # fmt: skip
    intake = activity_intake_service_pb2_grpc.ActivityIntakeServiceStub(channels["registry"])
    entry_id = f"scheduler-{uuid.uuid4()}"
    record = activity_intake_service_pb2.ActivityRecord(
        entry_id=entry_id,
        entry=resources_pb2.ActivityEntry(verb="task.created", resource="tasks/idem", task="tasks/idem"),
    )
    request = activity_intake_service_pb2.AppendActivityRequest(records=[record])
    service = bearer(stack.service_credential("scheduler"))
    for _ in range(2):
        reply = await intake.AppendActivity(request, metadata=service, timeout=10)
        assert list(reply.entry_ids) == [entry_id]
    listed = await activity.ListActivity(
        activity_service_pb2.ListActivityRequest(filter='task = "tasks/idem" AND verb = "task.*"'),
        metadata=bearer(admin_token),
    )
    assert [(e.verb, e.service, e.actor.name) for e in listed.activity_entries] == [
        ("task.created", "scheduler", "scheduler")
    ]
    err = await _fails(
        intake.AppendActivity(
            activity_intake_service_pb2.AppendActivityRequest(
                records=[
                    activity_intake_service_pb2.ActivityRecord(
                        entry_id="x", entry=resources_pb2.ActivityEntry(verb="task.created", service="evaluator")
                    )
                ]
            ),
            metadata=service,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert _violations(err) == ["records[0].entry.service"]


# -- bad input: a precise status, nothing written -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"user_id": "", "user": {"role": 1}, "password": "long-enough-password"}, "user_id"),
        ({"user_id": "x" * 64, "user": {"role": 1}, "password": "long-enough-password"}, "user_id"),
        ({"user_id": "Bad_Name", "user": {"role": 1}, "password": "long-enough-password"}, "user_id"),
        ({"user_id": "no-role", "user": {"role": 0}, "password": "long-enough-password"}, "user.role"),
        ({"user_id": "bad-role", "user": {"role": 9}, "password": "long-enough-password"}, "user.role"),
        ({"user_id": "short-pw", "user": {"role": 1}, "password": "short"}, "password"),
        ({"user_id": "long-name", "user": {"role": 1, "display_name": "n" * 201}, "password": "long-enough-pw"},
         "user.display_name"),
    ],
)  # fmt: skip
async def test_create_user_with_bad_input_names_the_field_and_writes_nothing(
    users: user_service_pb2_grpc.UserServiceAsyncStub, admin_token: str, request_fields: dict[str, object], field: str
) -> None:
    from google.protobuf import json_format

    request = json_format.ParseDict(request_fields, user_service_pb2.CreateUserRequest())
    err = await _fails(
        users.CreateUser(request, metadata=bearer(admin_token), timeout=30), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert _violations(err) == [field]
    listed = await users.ListUsers(user_service_pb2.ListUsersRequest(page_size=1000), metadata=bearer(admin_token))
    assert f"users/{request.user_id}" not in [u.name for u in listed.users]


@pytest.mark.parametrize(
    "hostile",
    [
        'verb = "x\'; DROP TABLE activity; --"',
        'verb = "%" OR 1=1',
        'task = "tasks/t1") OR (1 = 1',
        'actor.name = "\\\\" AND sequence > 0 --',
        "level >= WARNING; DELETE FROM activity",
        "unknown_field = 1",
        "(" * 40 + "verb = x" + ")" * 40,
    ],
)
async def test_hostile_filters_are_invalid_argument_or_matched_literally_never_executed(
    activity: activity_service_pb2_grpc.ActivityServiceAsyncStub, admin_token: str, hostile: str
) -> None:
    before = await activity.ListActivity(activity_service_pb2.ListActivityRequest(), metadata=bearer(admin_token))
    try:
        reply = await activity.ListActivity(
            activity_service_pb2.ListActivityRequest(filter=hostile), metadata=bearer(admin_token)
        )
        assert list(reply.activity_entries) == []  # the metacharacters were data: nothing matched
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _violations(err) == ["filter"]
    after = await activity.ListActivity(activity_service_pb2.ListActivityRequest(), metadata=bearer(admin_token))
    assert after.sequence >= before.sequence > 0


async def test_unknown_ids_and_malformed_names_get_not_found_and_invalid_argument(
    users: user_service_pb2_grpc.UserServiceAsyncStub,
    workers: worker_service_pb2_grpc.WorkerServiceAsyncStub,
    enrollment: enrollment_service_pb2_grpc.EnrollmentServiceAsyncStub,
    auth: auth_service_pb2_grpc.AuthServiceAsyncStub,
    admin_token: str,
) -> None:
    md = bearer(admin_token)
    await _fails(
        users.GetUser(user_service_pb2.GetUserRequest(name="users/ghost"), metadata=md), grpc.StatusCode.NOT_FOUND
    )
    await _fails(
        workers.GetWorker(worker_service_pb2.GetWorkerRequest(name="workers/ghost"), metadata=md),
        grpc.StatusCode.NOT_FOUND,
    )
    await _fails(
        enrollment.GetEnrollmentToken(
            enrollment_service_pb2.GetEnrollmentTokenRequest(name="enrollmentTokens/abc123"), metadata=md
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await _fails(
        auth.RevokeApiToken(auth_service_pb2.RevokeApiTokenRequest(name="users/admin/apiTokens/ffff"), metadata=md),
        grpc.StatusCode.NOT_FOUND,
    )
    for name in ("", "workers/", "workers/UPPER", "tasks/x", "workers/" + "a" * 64):
        err = await _fails(
            workers.GetWorker(worker_service_pb2.GetWorkerRequest(name=name), metadata=md),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert _violations(err) == ["name"]
    err = await _fails(
        workers.UpdateWorker(
            worker_service_pb2.UpdateWorkerRequest(
                worker=resources_pb2.Worker(name="workers/once-only", status=resources_pb2.WORKER_STATUS_ONLINE),
                update_mask=field_mask_pb2.FieldMask(paths=["status"]),
            ),
            metadata=md,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert _violations(err) == ["update_mask.paths[0]"]


async def test_the_last_admin_cannot_be_demoted(
    users: user_service_pb2_grpc.UserServiceAsyncStub, admin_token: str
) -> None:
    await _fails(
        users.UpdateUser(
            user_service_pb2.UpdateUserRequest(
                user=resources_pb2.User(name="users/admin", role=resources_pb2.ROLE_VIEWER),
                update_mask=field_mask_pb2.FieldMask(paths=["role"]),
            ),
            metadata=bearer(admin_token),
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


# -- no secret leaks ------------------------------------------------------------------------------------------------


async def test_no_secret_appears_in_any_service_log_or_activity_entry(
    stack: Stack, activity: activity_service_pb2_grpc.ActivityServiceAsyncStub, admin_token: str, viewer_token: str,
    operator_token: str,
) -> None:  # fmt: skip
    secrets = {s for s in SEEN_SECRETS if len(s) >= 12}
    secrets |= {stack.admin_password, admin_token, viewer_token, operator_token}
    secrets |= {stack.service_credential(s) for s in ("registry", "scheduler", "evaluator")}
    secrets |= {"fixture-viewer-password-long", "fixture-operator-password-long"}
    assert len(secrets) > 10
    await asyncio.sleep(0.5)  # let the services' last lines reach their log files
    logs = {path.name: path.read_text(errors="replace") for path in stack.log_dir.glob("*.log")}
    assert {"registry.log", "scheduler.log", "evaluator.log"} <= set(logs)
    leaks = [(name, secret[:10]) for name, text in logs.items() for secret in secrets if secret in text]
    assert leaks == []
    entries = []
    page = ""
    while True:
        reply = await activity.ListActivity(
            activity_service_pb2.ListActivityRequest(page_size=1000, page_token=page), metadata=bearer(admin_token)
        )
        entries += [str(e) for e in reply.activity_entries]
        page = reply.next_page_token
        if not page:
            break
    assert any("auth.login" in e for e in entries)
    assert [secret[:10] for secret in secrets if any(secret in e for e in entries)] == []
