"""EnrollmentService: enrollment tokens and EnrollAgent."""

from __future__ import annotations

import secrets
from datetime import timedelta

from maw.common.v1 import work_pb2
from maw.registry.v1 import enrollment_service_pb2 as enroll_pb
from maw.registry.v1 import enrollment_service_pb2_grpc as enroll_grpc

from services.runtime import replay
from services.runtime.auth import (
    AGENT_CREDENTIAL_PREFIX,
    ENROLLMENT_TOKEN_PREFIX,
    new_secret,
    secret_hash,
)
from services.runtime.errors import (
    already_exists,
    invalid_argument,
    not_found,
    unauthenticated,
)
from services.runtime.principal import Principal, PrincipalKind

from . import activity_log, convert, credentials, filtering, filters, presence, store, validation
from ._servicing import Context, caller, paged, peer_of
from .convert import now
from .credentials import TokenState
from .feeds import ACTIVITY_FEED, WORKER_FEED
from .registry import Registry

MAX_ENROLLMENT_DAYS = 30
MAX_ENROLLMENT_USES = 10_000


class EnrollmentServicer(enroll_grpc.EnrollmentServiceServicer):
    """Enrollment tokens and EnrollAgent."""

    def __init__(self, registry: Registry) -> None:
        self.r = registry

    async def CreateEnrollmentToken(
        self, request: enroll_pb.CreateEnrollmentTokenRequest, context: Context
    ) -> enroll_pb.CreateEnrollmentTokenResponse:
        spec = request.enrollment_token
        moment = now()
        bad = []
        if not 1 <= spec.max_uses <= MAX_ENROLLMENT_USES:
            bad.append(("enrollment_token.max_uses", f"between 1 and {MAX_ENROLLMENT_USES}"))
        if not spec.HasField("expire_time"):
            bad.append(("enrollment_token.expire_time", "required"))
        else:
            expiry = convert.from_ts(spec.expire_time)
            if not moment < expiry <= moment + timedelta(days=MAX_ENROLLMENT_DAYS):
                bad.append(("enrollment_token.expire_time", f"in the future, at most {MAX_ENROLLMENT_DAYS} days ahead"))
        if spec.privacy_level not in work_pb2.PrivacyLevel.values():
            bad.append(("enrollment_token.privacy_level", "not a PrivacyLevel"))
        if bad:
            raise invalid_argument(bad)
        display = validation.display_name(spec.display_name, "enrollment_token.display_name")
        labels = validation.labels(spec.labels, "enrollment_token.labels")
        validation.request_id(request.request_id)
        method = "CreateEnrollmentToken"
        async with self.r.sessions() as session, session.begin():
            first = await replay.recall(
                session, method, caller().name, request.request_id, enroll_pb.CreateEnrollmentTokenResponse
            )
            if first is not None:
                return first
            secret = new_secret(ENROLLMENT_TOKEN_PREFIX)
            row = store.EnrollmentToken(
                id=secrets.token_hex(6), display_name=display, max_uses=spec.max_uses, use_count=0,
                expire_time=convert.from_ts(spec.expire_time), labels=labels,
                privacy_level=spec.privacy_level or work_pb2.PRIVACY_LEVEL_NORMAL, secret_hash=secret_hash(secret),
                secret_prefix=credentials.secret_prefix(secret), creator=caller().name, create_time=moment,
                revoke_time=None,
            )  # fmt: skip
            session.add(row)
            token_pb = convert.enrollment_pb(row, moment)
            await activity_log.append(
                session, "enrollment_token.created", resource=token_pb.name,
                summary=f"enrollment token {display!r} created ({spec.max_uses} use(s))", peer=peer_of(context),
            )  # fmt: skip
            await replay.keep(
                session,
                method,
                caller().name,
                request.request_id,
                enroll_pb.CreateEnrollmentTokenResponse(enrollment_token=token_pb),
            )
        await self.r.feeds.publish(ACTIVITY_FEED)
        return enroll_pb.CreateEnrollmentTokenResponse(enrollment_token=token_pb, secret=secret)

    async def GetEnrollmentToken(
        self, request: enroll_pb.GetEnrollmentTokenRequest, context: Context
    ) -> enroll_pb.GetEnrollmentTokenResponse:
        token_id = validation.name_id(request.name, "enrollmentTokens", validation.TOKEN_ID, "name")
        async with self.r.sessions() as session:
            row = await session.get(store.EnrollmentToken, token_id)
            if row is None:
                raise not_found("EnrollmentToken", request.name)
            workers = await store.enrolled_by(session, [token_id])
        return enroll_pb.GetEnrollmentTokenResponse(
            enrollment_token=convert.enrollment_pb(row, now(), workers.get(token_id, []))
        )

    async def ListEnrollmentTokens(
        self, request: enroll_pb.ListEnrollmentTokensRequest, context: Context
    ) -> enroll_pb.ListEnrollmentTokensResponse:
        size = validation.page_size(request.page_size)
        tree = filtering.parse(request.filter, filters.ENROLLMENT_TOKENS)
        _, desc = validation.order_by(request.order_by, {"create_time": "create_time"}, "create_time desc")
        async with self.r.sessions() as session:
            rows = await store.enrollment_tokens(session)
            workers = await store.enrolled_by(session, [r.id for r in rows])
        moment = now()
        tokens = [convert.enrollment_pb(r, moment, workers.get(r.id, [])) for r in rows]

        tokens = [t for t in tokens if filtering.matches(tree, filters.enrollment_token_lookup(t))]
        tokens.sort(key=lambda t: (t.create_time.ToDatetime(), t.name), reverse=desc)
        page, token = paged(tokens, size, request.page_token, f"{request.filter}|{request.order_by}")
        return enroll_pb.ListEnrollmentTokensResponse(enrollment_tokens=page, next_page_token=token)

    async def RevokeEnrollmentToken(
        self, request: enroll_pb.RevokeEnrollmentTokenRequest, context: Context
    ) -> enroll_pb.RevokeEnrollmentTokenResponse:
        token_id = validation.name_id(request.name, "enrollmentTokens", validation.TOKEN_ID, "name")
        validation.request_id(request.request_id)
        async with self.r.sessions() as session, session.begin():
            row = await session.get(store.EnrollmentToken, token_id, with_for_update=True)
            if row is None:
                raise not_found("EnrollmentToken", request.name)
            if row.revoke_time is None:
                row.revoke_time = now()
                await activity_log.append(
                    session, "enrollment_token.revoked", resource=request.name, summary="enrollment token revoked",
                    peer=peer_of(context),
                )  # fmt: skip
            workers = await store.enrolled_by(session, [token_id])
            answer = enroll_pb.RevokeEnrollmentTokenResponse(
                enrollment_token=convert.enrollment_pb(row, now(), workers.get(token_id, []))
            )
        await self.r.feeds.publish(ACTIVITY_FEED)
        return answer

    async def EnrollAgent(
        self, request: enroll_pb.EnrollAgentRequest, context: Context
    ) -> enroll_pb.EnrollAgentResponse:
        bad = []
        if not request.token:
            bad.append(("token", "required"))
        if request.worker_id and not validation.WORKER_ID.fullmatch(request.worker_id):
            bad.append(("worker_id", "1–63 lower case letters, digits or hyphens"))
        if not request.hostname or len(request.hostname) > 253 or any(ord(c) < 33 for c in request.hostname):
            bad.append(("hostname", "required: the machine's hostname, at most 253 characters"))
        for field, value in (("agent_version", request.agent_version), ("platform", request.platform)):
            if len(value) > 100:
                bad.append((field, "at most 100 characters"))
        if len(request.tools) > 64:
            bad.append(("tools", "at most 64 tools"))
        if bad:
            raise invalid_argument(bad)
        display = validation.display_name(request.display_name, "display_name")
        validation.request_id(request.request_id)
        worker_id = request.worker_id or _worker_id_from(request.hostname)
        moment = now()
        async with self.r.sessions() as session, session.begin():
            token = await store.enrollment_token_by_hash(session, secret_hash(request.token))
            if token is None:
                raise unauthenticated("invalid enrollment token", "ENROLLMENT_INVALID")
            credential = credentials.derived_secret(
                AGENT_CREDENTIAL_PREFIX, request.token, "enroll", request.request_id
            )
            if request.request_id:
                earlier = await store.enrollment_of(session, token.id, request.request_id)
                if earlier is not None:
                    fresh = (moment - earlier.create_time).total_seconds() < credentials.RETRY_WINDOW_S
                    if fresh and earlier.credential_hash == secret_hash(credential) and earlier.revoke_time is None:
                        return enroll_pb.EnrollAgentResponse(
                            worker=convert.worker_pb(earlier, None), agent_credential=credential
                        )
                    raise unauthenticated("invalid enrollment token", "ENROLLMENT_INVALID")
            state = credentials.token_state(
                moment, token.revoke_time, token.expire_time, token.use_count, token.max_uses
            )
            if state != TokenState.ACTIVE:
                raise unauthenticated("invalid enrollment token", "ENROLLMENT_INVALID")
            if await session.get(store.Worker, worker_id) is not None:
                raise already_exists("Worker", f"workers/{worker_id}")
            token.use_count += 1
            row = store.Worker(
                id=worker_id, display_name=display or request.hostname, hostname=request.hostname,
                agent_version=request.agent_version, platform=request.platform, tools=convert.tools_json(request.tools),
                labels=dict(token.labels), agent_labels={}, privacy_level=token.privacy_level, capacity_slots=0,
                declared_slots=0, draining=False, disabled=False, deleted=False,
                credential_hash=secret_hash(credential),
                enrollment_token_id=token.id, enroll_request_id=request.request_id or None, tool_stats=[],
                heartbeat_interval_ms=0, session_id="", create_time=moment, update_time=moment, revoke_time=None,
                connect_time=None, last_heartbeat_time=None, version=1,
            )  # fmt: skip
            session.add(row)
            await session.flush()
            await activity_log.worker_event(session, row, presence.EventType.ADDED)
            await activity_log.append(
                session, "worker.enrolled", resource=f"workers/{worker_id}", worker=f"workers/{worker_id}",
                summary=f"worker {worker_id} enrolled", details={"enrollment_token": f"enrollmentTokens/{token.id}"},
                peer=peer_of(context), actor=Principal(PrincipalKind.AGENT, f"workers/{worker_id}"), api_token="",
            )  # fmt: skip
            answer = enroll_pb.EnrollAgentResponse(worker=convert.worker_pb(row, None), agent_credential=credential)
        await self.r.feeds.publish(ACTIVITY_FEED, WORKER_FEED)
        return answer


def _worker_id_from(hostname: str) -> str:
    base = "".join(c if c.isalnum() else "-" for c in hostname.lower().split(".")[0]).strip("-")
    base = "-".join(part for part in base.split("-") if part)[:63] or "worker"
    return base if validation.WORKER_ID.fullmatch(base) else "worker"
