"""One relay at a time across replicas, without a transaction held open while the relay calls another service.

A relay holds a PostgreSQL session-level advisory lock on a connection of its own in AUTOCOMMIT mode, so the
lock lives exactly as long as that connection and no transaction stays open for it (nothing "idle in
transaction", no snapshot pinned while an RPC waits). Each round the holder checks that its connection is
still there; when the connection or PostgreSQL goes away the lock is gone with it and any replica may take it.
Two replicas can then briefly both relay the same batch: every relay is idempotent on the receiving side
(entry and update ids), so that repeats a batch and never loses one.
"""

from __future__ import annotations

import contextlib

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import store


class RelayLock:
    """A session-level advisory lock on a dedicated autocommit connection."""

    def __init__(self, db: AsyncEngine, key: int) -> None:
        self.db = db
        self.key = key
        self._conn: AsyncConnection | None = None

    async def held(self) -> bool:
        """True while this replica holds the lock (taking it when free)."""
        if self._conn is not None:
            try:
                await store.still_connected(self._conn)
                return True
            except Exception:  # the connection went away, and the lock with it
                await self.release()
        conn = await self.db.connect()
        try:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            if await store.try_session_lock(conn, self.key):
                self._conn = conn
                return True
        except BaseException:
            await conn.close()
            raise
        await conn.close()
        return False

    async def release(self) -> None:
        """Give the lock up (closing its connection ends the session that holds it)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()  # never back to the pool still holding the lock
            with contextlib.suppress(Exception):
                await conn.close()
