"""The Registry: what all servicers of one process share, its background jobs and the first admin."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from redis.asyncio import Redis
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.runtime.auth import Authenticator
from services.runtime.config import ServiceSettings
from services.runtime.principal import Principal, PrincipalKind

from . import activity_log, credentials, presence, store
from .convert import now
from .credentials import Role
from .feeds import WORKER_FEED, Feeds
from .presence_store import PresenceStore

_log = logging.getLogger("maw.registry")

# Answers to calls with a request id are kept this long for retries.
REQUEST_RETENTION = timedelta(days=1)


@dataclass
class Registry:
    """State shared by all registry servicers in one process."""

    settings: ServiceSettings
    sessions: async_sessionmaker[AsyncSession]
    redis: Redis
    auth: Authenticator
    feeds: Feeds
    presence_store: PresenceStore = field(init=False)
    api_token_uses: dict[str, datetime] = field(default_factory=dict)
    heartbeats: dict[str, datetime] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.presence_store = PresenceStore(self.redis)

    async def sweep_presence(self) -> None:
        """Workers whose presence key expired go OFFLINE: one UPDATED event each (one replica wins the SREM)."""
        expired = await self.presence_store.expired()
        if not expired:
            return
        async with self.sessions() as session, session.begin():
            for row in await store.workers(session, expired):
                await activity_log.worker_event(session, row, presence.EventType.UPDATED)
        await self.feeds.publish(WORKER_FEED)

    async def flush(self) -> None:
        """Write buffered API-token last-use times and heartbeat times in one batch each."""
        uses, self.api_token_uses = self.api_token_uses, {}
        beats, self.heartbeats = self.heartbeats, {}
        if not uses and not beats:
            return
        try:
            async with self.sessions() as session, session.begin():
                await store.touch_api_tokens(session, uses)
                await store.touch_heartbeats(session, beats)
        except Exception:  # keep the times for the next round rather than lose them
            _log.warning("could not flush last-use/heartbeat times; will retry", exc_info=True)
            for key, value in uses.items():
                self.api_token_uses.setdefault(key, value)
            for key, value in beats.items():
                self.heartbeats.setdefault(key, value)

    async def forget_old_requests(self) -> None:
        """Request-id answers are kept for a day."""
        async with self.sessions() as session, session.begin():
            await store.forget_requests(session, now() - REQUEST_RETENTION)

    def every(self, seconds: float, job: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``job`` every ``seconds`` until stop."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(seconds)
                try:
                    await job()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    _log.warning("background job %s failed", name, exc_info=True)

        self._tasks.append(asyncio.create_task(loop(), name=name))

    async def stop(self) -> None:
        """Stop background jobs and write what is buffered."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()
        await self.feeds.stop()

    async def ensure_admin(self) -> None:
        """On the very first start, create user ``admin`` (password from MAW_ADMIN_PASSWORD or generated)."""
        async with self.sessions() as session:
            if await store.any_user(session):
                return
        given = self.settings.admin_password.get_secret_value()
        password = given or secrets.token_urlsafe(18)
        hashed = await asyncio.to_thread(credentials.hash_password, password)
        moment = now()
        admin = Principal(PrincipalKind.SERVICE, "services/registry")
        try:
            async with self.sessions() as session, session.begin():
                session.add(
                    store.User(id="admin", display_name="Administrator", email=None, role=int(Role.ADMIN),
                               disabled=False, password_hash=hashed, version=1, create_time=moment,
                               update_time=moment, last_login_time=None)
                )  # fmt: skip
                await activity_log.append(
                    session, "user.created", resource="users/admin", summary="first admin created", actor=admin,
                    api_token="",
                )  # fmt: skip
        except IntegrityError:
            return  # another replica created it first
        if not given:
            # Shown once, on the terminal only, and never again (the hash alone is kept).
            sys.stderr.write(f"\nmaw: first admin created: user `admin`, password {password}\n\n")
            sys.stderr.flush()
