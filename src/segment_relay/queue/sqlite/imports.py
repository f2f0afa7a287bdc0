"""Backfill on the SQLite queue (docs/operations.md, "Importing archives"): imported messages
wait apart from the queue and are fed into it while live calls are not waiting."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from ...records import NewMessage
from .database import Q


class Imports:
    """The import half of SqliteQueue (see queue/protocol.py)."""

    # The queue's own (SqliteQueue, GroupCommit): a mixin names what it uses.
    _write: Callable[..., Any]
    _one: Callable[..., Any]
    _added: Callable[[int], None]
    _dedup_window_s: float

    async def stage_imports(self, rows: Sequence[NewMessage]) -> int:
        since = time.time() - self._dedup_window_s
        # A messageId repeated in `rows` counts once, at its first place.
        first: dict[tuple[str, str], NewMessage] = {}
        for row in rows:
            first.setdefault((row.source, row.message_id), row)
        params = [{**row._asdict(), "since": since} for row in first.values()]

        def stage(raw: sqlite3.Connection) -> int:
            staged = raw.executemany(Q["stage_import"], params).rowcount
            raw.executemany(Q["remember_import"], params)
            return max(staged, 0)

        staged: int = await self._write(stage)
        return staged

    async def feed_imports(self, limit: int) -> int:
        def feed(raw: sqlite3.Connection) -> int:
            [(last,)] = raw.execute(Q["import_chunk_end"], {"limit": limit}).fetchall()
            if last is None:
                return 0
            moved = raw.execute(Q["feed_imports"], {"last": last}).rowcount
            raw.execute(Q["fed_imports"], {"last": last})
            return max(moved, 0)

        moved: int = await self._write(feed)
        self._added(moved)
        return moved

    async def imports_waiting(self) -> int:
        row = await self._one("count_imports")
        return int(row[0])
