"""Backfill on the SQLite queue (docs/operations.md, "Importing archives"): imported messages
wait apart from the queue and are fed into it while live calls are not waiting."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from ...errors import StoreError, StoreFullError
from ...records import NewMessage
from .database import Q


class Imports:
    """The import half of SqliteQueue (see queue/protocol.py)."""

    # The queue's own (SqliteQueue, GroupCommit): a mixin names what it uses.
    _write: Callable[..., Any]
    _one: Callable[..., Any]
    _added: Callable[[int], None]
    _commit_error: Callable[[Exception], StoreError]
    _dedup_window_s: float

    async def stage_imports(self, rows: Sequence[NewMessage]) -> int:
        since = time.time() - self._dedup_window_s
        # A messageId repeated in `rows` counts once, at its first place.
        first: dict[tuple[str, str], NewMessage] = {}
        for row in rows:
            first.setdefault((row.source, row.message_id), row)
        params = [{**row._asdict(), "since": since} for row in first.values()]

        def stage(raw: sqlite3.Connection) -> int:
            [(used, most)] = raw.execute(Q["queue_pages"]).fetchall()
            if used > most // 2:
                raise StoreFullError(
                    "the queue is over half of queue.max_size: the import stops here, so that "
                    "live calls keep room; run it again once the relay has sent these"
                )
            staged = raw.executemany(Q["stage_import"], params).rowcount
            raw.executemany(Q["remember_import"], params)
            raw.executemany(Q["dedup_import"], params)
            return max(staged, 0)

        return await self._guarded(stage)

    async def feed_imports(self, limit: int) -> int:
        now = time.time()

        def feed(raw: sqlite3.Connection) -> int:
            [(last,)] = raw.execute(Q["import_chunk_end"], {"limit": limit}).fetchall()
            if last is None:
                return 0
            moved = raw.execute(Q["feed_imports"], {"last": last, "now": now}).rowcount
            raw.execute(Q["fed_imports"], {"last": last})
            return max(moved, 0)

        moved = await self._guarded(feed)
        self._added(moved)
        return moved

    async def _guarded(self, fn: Callable[[sqlite3.Connection], int]) -> int:
        """`fn` as one transaction; the database's errors as StoreError, as ingest's."""
        try:
            done: int = await self._write(fn)
        except sqlite3.Error as exc:
            raise self._commit_error(exc) from exc
        return done

    async def imports_waiting(self) -> int:
        row = await self._one("count_imports")
        return int(row[0])
