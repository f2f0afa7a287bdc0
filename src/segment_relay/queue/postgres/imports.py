"""Backfill on the PostgreSQL queue (docs/operations.md, "Importing archives"): imported
messages wait apart from the queue and are fed into it while live calls are not waiting."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from ...records import NewMessage
from .database import Database, Q, message_rows


class Imports:
    """The import half of PostgresQueue (see queue/protocol.py)."""

    # The queue's own (PostgresQueue, GroupCommit): a mixin names what it uses.
    _db: Database
    _dedup_window_s: float
    _added: Callable[[int], None]

    async def stage_imports(self, rows: Sequence[NewMessage]) -> int:
        now = time.time()
        since = now - self._dedup_window_s
        async with self._db.connection() as conn:
            staged: Any = await conn.fetchval(Q["stage_imports"], *message_rows(rows), since, now)
        return int(staged)

    async def feed_imports(self, limit: int) -> int:
        async with self._db.connection() as conn, conn.transaction():
            # Its transaction id first, as every path that takes a seq (docs/queue.md, "Reads
            # that skip").
            await conn.fetchval(Q["take_xid"])
            status = await conn.execute(Q["feed_imports"], limit, time.time())
        moved = int(status.split()[-1])
        self._added(moved)
        return moved

    async def imports_waiting(self) -> int:
        async with self._db.connection() as conn:
            return int(await conn.fetchval(Q["count_imports"]))
