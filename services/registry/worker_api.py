"""WorkerService: the worker catalog, read, changed and watched."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from maw.common.v1 import work_pb2
from maw.registry.v1 import resources_pb2 as res
from maw.registry.v1 import worker_service_pb2 as worker_pb
from maw.registry.v1 import worker_service_pb2_grpc as worker_grpc
from sqlalchemy.ext.asyncio import AsyncSession

from services.runtime import replay
from services.runtime.errors import (
    MawError,
    invalid_argument,
    not_found,
)

from . import activity_log, convert, filtering, filters, presence, store, validation
from ._servicing import Context, caller, check_etag, paged, peer_of, update_mask
from .convert import now, ts
from .feeds import ACTIVITY_FEED, WORKER_FEED
from .registry import Registry


class WorkerServicer(worker_grpc.WorkerServiceServicer):
    """The worker catalog."""

    def __init__(self, registry: Registry) -> None:
        self.r = registry

    async def _load(self, session: AsyncSession, name: str, field: str = "name", *, lock: bool = False) -> store.Worker:
        worker_id = validation.name_id(name, "workers", validation.WORKER_ID, field)
        row = await session.get(store.Worker, worker_id, with_for_update=lock)
        if row is None or row.deleted:
            raise not_found("Worker", name)
        return row

    async def _pb(self, row: store.Worker) -> res.Worker:
        found = await self.r.presence_store.reports([row.id])
        return convert.worker_pb(row, found.get(row.id))

    async def GetWorker(self, request: worker_pb.GetWorkerRequest, context: Context) -> worker_pb.GetWorkerResponse:
        async with self.r.sessions() as session:
            row = await self._load(session, request.name)
        return worker_pb.GetWorkerResponse(worker=await self._pb(row))

    async def ListWorkers(
        self, request: worker_pb.ListWorkersRequest, context: Context
    ) -> worker_pb.ListWorkersResponse:
        size = validation.page_size(request.page_size)
        tree = filtering.parse(request.filter, filters.WORKERS)
        column, desc = validation.order_by(
            request.order_by,
            {"name": "name", "display_name": "display_name", "last_heartbeat_time": "last_heartbeat_time"},
            "name",
        )
        async with self.r.sessions() as session:
            sequence = await store.last_sequence(session, store.WorkerEvent)
            rows = await store.catalog(session)
        live = await self.r.presence_store.reports([r.id for r in rows])
        workers = [convert.worker_pb(r, live.get(r.id)) for r in rows]
        workers = [w for w in workers if filtering.matches(tree, filters.worker_lookup(w))]
        workers.sort(
            key=lambda w: (
                w.last_heartbeat_time.ToJsonString() if column == "last_heartbeat_time" else str(getattr(w, column)),
                w.name,
            ),
            reverse=desc,
        )
        page, token = paged(workers, size, request.page_token, f"{request.filter}|{request.order_by}")
        return worker_pb.ListWorkersResponse(workers=page, next_page_token=token, sequence=sequence)

    async def UpdateWorker(
        self, request: worker_pb.UpdateWorkerRequest, context: Context
    ) -> worker_pb.UpdateWorkerResponse:
        paths = update_mask(
            list(request.update_mask.paths),
            {"display_name", "labels", "privacy_level", "draining", "disabled", "capacity_slots"},
            {f.name for f in res.Worker.DESCRIPTOR.fields}
            - {"display_name", "labels", "privacy_level", "draining", "disabled", "capacity_slots"},
        )
        spec = request.worker
        display = validation.display_name(spec.display_name, "worker.display_name")
        labels = validation.labels(spec.labels, "worker.labels") if "labels" in paths else {}
        if "privacy_level" in paths and spec.privacy_level not in (
            work_pb2.PRIVACY_LEVEL_NORMAL,
            work_pb2.PRIVACY_LEVEL_SENSITIVE,
        ):
            raise invalid_argument([("worker.privacy_level", "PRIVACY_LEVEL_NORMAL or PRIVACY_LEVEL_SENSITIVE")])
        if "capacity_slots" in paths and not 0 <= spec.capacity_slots <= 1024:
            raise invalid_argument([("worker.capacity_slots", "between 0 and 1024")])
        validation.request_id(request.request_id)
        method = "UpdateWorker"
        cut = False
        async with self.r.sessions() as session, session.begin():
            first = await replay.recall(
                session, method, caller().name, request.request_id, worker_pb.UpdateWorkerResponse
            )
            if first is not None:
                return first
            row = await self._load(session, spec.name, "worker.name", lock=True)
            check_etag(spec.etag, row.version, "worker", spec.name)
            if "display_name" in paths:
                row.display_name = display
            if "labels" in paths:
                row.labels = labels
            if "privacy_level" in paths:
                row.privacy_level = spec.privacy_level
            if "draining" in paths:
                row.draining = spec.draining
            if "capacity_slots" in paths:
                row.capacity_slots = spec.capacity_slots
            if "disabled" in paths:
                cut = spec.disabled and not row.disabled
                row.disabled = spec.disabled
            row.version += 1
            row.update_time = now()
            live = await self.r.presence_store.reports([row.id])
            await activity_log.worker_event(session, row, presence.EventType.UPDATED, live.get(row.id))
            await activity_log.append(
                session, "worker.updated", resource=spec.name, worker=spec.name, summary=f"worker {row.id} updated",
                details={"fields": sorted(paths)}, peer=peer_of(context),
            )  # fmt: skip
            answer = worker_pb.UpdateWorkerResponse(worker=convert.worker_pb(row, live.get(row.id)))
            await replay.keep(session, method, caller().name, request.request_id, answer)
        if cut:
            await self.r.auth.revocations.publish([spec.name])
        await self.r.feeds.publish(ACTIVITY_FEED, WORKER_FEED)
        return answer

    async def DeleteWorker(
        self, request: worker_pb.DeleteWorkerRequest, context: Context
    ) -> worker_pb.DeleteWorkerResponse:
        worker_id = validation.name_id(request.name, "workers", validation.WORKER_ID, "name")
        validation.request_id(request.request_id)
        async with self.r.sessions() as session, session.begin():
            row = await session.get(store.Worker, worker_id, with_for_update=True)
            if row is None:
                raise not_found("Worker", request.name)
            if row.deleted:
                return worker_pb.DeleteWorkerResponse()
            check_etag(request.etag, row.version, "worker", request.name)
            row.deleted = True
            row.credential_hash = None
            row.revoke_time = row.revoke_time or now()
            row.version += 1
            row.update_time = now()
            await activity_log.worker_event(session, row, presence.EventType.REMOVED)
            await activity_log.append(
                session, "worker.deleted", resource=request.name, worker=request.name,
                summary=f"worker {worker_id} deleted and its credential revoked", peer=peer_of(context),
            )  # fmt: skip
        await self.r.auth.revocations.publish([request.name])
        await self.r.feeds.publish(ACTIVITY_FEED, WORKER_FEED)
        return worker_pb.DeleteWorkerResponse()

    async def RevokeWorker(
        self, request: worker_pb.RevokeWorkerRequest, context: Context
    ) -> worker_pb.RevokeWorkerResponse:
        if len(request.reason) > 500:
            raise invalid_argument([("reason", "at most 500 characters")])
        validation.request_id(request.request_id)
        async with self.r.sessions() as session, session.begin():
            row = await self._load(session, request.name, lock=True)
            if row.revoke_time is None:
                row.revoke_time = now()
                row.version += 1
                row.update_time = now()
                await activity_log.worker_event(session, row, presence.EventType.UPDATED)
                await activity_log.append(
                    session, "worker.revoked", resource=request.name, worker=request.name,
                    level=res.ACTIVITY_LEVEL_WARNING, summary=f"worker {row.id} revoked",
                    details={"reason": request.reason}, peer=peer_of(context),
                )  # fmt: skip
            answer = worker_pb.RevokeWorkerResponse(worker=convert.worker_pb(row, None))
        await self.r.auth.revocations.publish([request.name])
        await self.r.feeds.publish(ACTIVITY_FEED, WORKER_FEED)
        return answer

    async def WatchWorkers(
        self, request: worker_pb.WatchWorkersRequest, context: Context
    ) -> AsyncIterator[worker_pb.WatchWorkersResponse]:
        if request.after_sequence < 0:
            raise invalid_argument([("after_sequence", "must not be negative")])
        tree = filtering.parse(request.filter, filters.WORKERS)
        async with self.r.sessions() as session:
            head = await store.last_sequence(session, store.WorkerEvent)
            floor = await store.first_sequence(session, store.WorkerEvent)
            rows = await store.catalog(session)
        if request.after_sequence and floor and request.after_sequence < floor - 1:
            raise MawError(grpc.StatusCode.OUT_OF_RANGE, "after_sequence is older than the retained change log")
        live = await self.r.presence_store.reports([r.id for r in rows])
        matching = {
            f"workers/{r.id}"
            for r in rows
            if filtering.matches(tree, filters.worker_lookup(convert.worker_pb(r, live.get(r.id))))
        }
        last = request.after_sequence or head
        while True:
            async with self.r.sessions() as session:
                events = await store.worker_events_after(session, last, 500)
            out: list[worker_pb.WorkerEvent] = []
            for event in events:
                last = event.sequence
                snapshot = res.Worker.FromString(event.snapshot)
                kind = event.type
                if tree is not None:
                    was = snapshot.name in matching
                    now_matches = kind != presence.EventType.REMOVED and filtering.matches(
                        tree, filters.worker_lookup(snapshot)
                    )
                    if now_matches:
                        matching.add(snapshot.name)
                        kind = presence.EventType.ADDED if not was else kind
                    elif was:
                        matching.discard(snapshot.name)
                        kind, snapshot = presence.EventType.REMOVED, res.Worker(name=snapshot.name)
                    else:
                        continue
                out.append(
                    worker_pb.WorkerEvent(
                        sequence=event.sequence,
                        type=kind,  # type: ignore[arg-type]
                        worker=snapshot,
                        time=ts(event.time),
                    )
                )
            if out:
                yield worker_pb.WatchWorkersResponse(events=out)
            if len(events) < 500:
                await self.r.feeds.wait(WORKER_FEED, 1.0)
