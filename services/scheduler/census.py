"""The census: this replica's agents published for the global view, and READY work nobody can take flagged.

Each replica writes its agents to a Redis hash every ``unschedulable_check_s``; from everyone's agents it marks
the READY subtasks waiting longest that no connected agent could ever run (the dashboard shows why).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import cast

from . import allocation, store
from .replica import AGENTS_KEY, Replica

UNSCHEDULABLE_TEXT: dict[int, str] = {
    allocation.NO_MATCHING_TOOL: "no connected agent has a tool that can run this subtask",
    allocation.NO_MATCHING_LABELS: "no connected agent has the required labels",
    allocation.NO_PRIVACY_FIT: "no connected agent accepts sensitive work",
    allocation.NO_AGENTS: "no agent is connected",
}


async def census(replica: Replica) -> None:
    """Publish this replica's agents for the global view and flag READY work nobody can take."""
    while True:
        await asyncio.sleep(replica.settings.unschedulable_check_s)
        stamp = time.time()
        mine = {
            s.worker: json.dumps(
                {
                    "tools": {str(k): v for k, v in s.tools.items()},
                    "labels": s.labels,
                    "privacy": s.privacy_level,
                    "slots": s.capacity,
                    "used": len(s.outstanding),
                    "replica": replica.settings.replica_id,
                    "at": stamp,
                }  # fmt: skip
            )
            for s in replica.sessions.values()
        }
        agents: list[allocation.AgentView] = []
        try:
            if mine:
                await replica.redis.hset(AGENTS_KEY, mapping=cast("dict[str | bytes, bytes | str]", mine))  # type: ignore[arg-type]
            everyone = cast("dict[bytes, bytes]", await replica.redis.hgetall(AGENTS_KEY))
            stale = []
            for worker, raw in everyone.items():
                info = json.loads(raw)
                if info["at"] < stamp - 3 * replica.settings.unschedulable_check_s - replica.settings.lease_ttl_s:
                    stale.append(worker)
                    continue
                agents.append(
                    allocation.AgentView(
                        worker=worker.decode(),
                        tools={int(k): v for k, v in info["tools"].items()},
                        free_slots=info["slots"],
                        labels=info["labels"],
                        privacy_level=info["privacy"],
                    )  # fmt: skip
                )
            if stale:
                await replica.redis.hdel(AGENTS_KEY, *stale)
        except Exception:
            agents = [s.view() for s in replica.sessions.values()]
        async with replica.db.begin() as conn:
            sample = await store.ready_sample(conn, replica.settings.census_sample)
            marks = []
            for raw_cand in sample:
                cand = allocation.candidate_of(raw_cand)
                code = allocation.unschedulable(cand, agents)
                marks.append((cand.task_id, cand.key, code or 0, UNSCHEDULABLE_TEXT.get(code or 0, "")))
            await store.set_unschedulable(conn, marks)
