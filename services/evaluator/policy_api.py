"""maw.evaluator.v1.PolicyService: the default policy and each task's policy. Thin."""

from __future__ import annotations

import re
import uuid
from typing import Any

import grpc
from maw.evaluator.v1 import policy_service_pb2 as ppb
from maw.evaluator.v1 import policy_service_pb2_grpc as ppb_grpc
from maw.evaluator.v1 import resources_pb2 as epb
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import invalid_argument
from services.runtime.errors import MawError, not_found, permission_denied
from services.runtime.principal import current_principal

from . import policies, store
from .api_common import Ctx
from .judge import Judge
from .verdict_context import (
    new_verdict,
    now_ts,
)


class PolicyService(ppb_grpc.PolicyServiceServicer):
    """The default policy and each task's policy (a task's changes reach the scheduler as PolicyChanged)."""

    def __init__(self, db: AsyncEngine, judge: Judge) -> None:
        self.db = db
        self.judge = judge

    @staticmethod
    def _check_name(name: str, field: str) -> None:
        if name != policies.DEFAULT_NAME and not re.match(r"^tasks/[a-z0-9][a-z0-9-]{0,62}/policy$", name):
            raise invalid_argument([(field, "must be policies/default or tasks/{task}/policy")])

    async def _get(self, conn: Any, name: str) -> epb.Policy:
        stored = await store.get_policy(conn, name)
        if stored is not None:
            return epb.Policy.FromString(stored.body)
        if name == policies.DEFAULT_NAME:
            return policies.default_policy()
        raise not_found("maw.evaluator.v1.Policy", name)

    async def GetPolicy(self, request: ppb.GetPolicyRequest, context: Ctx) -> ppb.GetPolicyResponse:
        self._check_name(request.name, "name")
        async with self.db.connect() as conn:
            return ppb.GetPolicyResponse(policy=await self._get(conn, request.name))

    async def UpdatePolicy(self, request: ppb.UpdatePolicyRequest, context: Ctx) -> ppb.UpdatePolicyResponse:
        name = request.policy.name
        self._check_name(name, "policy.name")
        if name == policies.DEFAULT_NAME and current_principal().role != "admin":
            raise permission_denied("only an admin may change policies/default", "ADMIN_ONLY")
        fields = list(request.update_mask.paths)
        settable = {"weights", "acceptance_threshold", "review_threshold", "max_correction_cycles",
                    "checkpoint_frequency", "triggers", "time_budget", "peer_review", "voting", "scorers"}  # fmt: skip
        bad = [(f"update_mask.paths[{i}]", "not an updatable field") for i, p in enumerate(fields) if p not in settable]
        if not fields:
            bad.append(("update_mask", "name the fields to change"))
        if bad:
            raise invalid_argument(bad)
        problems = policies.problems(request.policy)
        if problems:
            raise invalid_argument(problems)
        async with self.db.begin() as conn:
            current = await self._get(conn, name)
            if request.policy.etag and request.policy.etag != current.etag:
                raise MawError(grpc.StatusCode.ABORTED, "the policy changed since you read it (etag mismatch)")
            for path in fields:
                current.ClearField(path)  # type: ignore[arg-type]
                value = getattr(request.policy, path)
                if path in ("weights", "triggers", "scorers"):
                    getattr(current, path).extend(value)
                elif path in ("time_budget", "peer_review", "voting"):
                    getattr(current, path).CopyFrom(value)
                else:
                    setattr(current, path, value)
            if current.review_threshold < current.acceptance_threshold:
                raise invalid_argument([("policy.review_threshold", "must not be below acceptance_threshold")])
            current.etag = uuid.uuid4().hex[:16]
            current.update_time.CopyFrom(now_ts())
            await store.put_policy(conn, name, current.SerializeToString(), current.etag)
            if name != policies.DEFAULT_NAME:  # the scheduler's copy (ERROR, BEFORE_FINAL_ACCEPT) follows, in order
                task_id = name.removeprefix("tasks/").removesuffix("/policy")
                changed = new_verdict(f"tasks/{task_id}", "", 0, "", "")
                changed.policy_changed.policy.CopyFrom(current)
                await store.enqueue(conn, store.VERDICTS, [(task_id, changed.SerializeToString())])
        if name != policies.DEFAULT_NAME:
            self.judge.poke(store.VERDICTS)
        return ppb.UpdatePolicyResponse(policy=current)


__all__ = ["PolicyService"]
