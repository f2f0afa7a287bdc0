"""What `status` and `dead-letters` do on the PostgreSQL queue: a part of PostgresQueue,
kept out of store.py (ingest, forwarding, leases). Its SQL is in `queries.sql`."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg

from ...errors import StoreError
from ...records import DeadLetter, Instance, NewMessage, QueueStats, Refusal
from .database import Database, Q
from .leases import bucket_of


class Administration:
    """Inspection and administration of the queue (see queue/protocol.py)."""

    _db: Database
    _dedup_window_s: float
    instance_id: str
    new_work: asyncio.Event

    async def stats(self, now: float) -> QueueStats:
        async with self._db.connection() as conn:
            pending, in_backoff, oldest = await conn.fetchrow(Q["queue_stats"], now)
            dead = await conn.fetch(Q["dead_letter_counts"])
            counters = await conn.fetch(Q["counters"])
        return QueueStats.of(pending, in_backoff, oldest, dead, counters)

    async def instances(self) -> list[Instance]:
        async with self._db.connection() as conn:
            rows = await conn.fetch(Q["instances"])
        return [Instance(r[0], r[1], r[2], r[3], r[4], list(r[5]), r[6]) for r in rows]

    async def dead_letters(
        self, limit: int = 100, reason: str | None = None, after: int = 0
    ) -> list[DeadLetter]:
        async with self._db.connection() as conn:
            rows = await conn.fetch(Q["dead_letters"], reason, after, limit)
        return [DeadLetter.from_row(tuple(r)) for r in rows]

    async def dead_letter(self, dead_id: int) -> DeadLetter | None:
        async with self._db.connection() as conn:
            row = await conn.fetchrow(Q["dead_letter"], dead_id)
        return None if row is None else DeadLetter.from_row(tuple(row))

    async def purge_dead_letters(self, older_than: float) -> int:
        async with self._db.connection() as conn:
            status = await conn.execute(Q["purge_dead_letters"], older_than)
        return int(status.split()[-1])

    async def prune_dedup(self, now: float) -> int:
        async with self._db.connection() as conn:
            status = await conn.execute(Q["prune_dedup"], now - self._dedup_window_s)
        return int(status.split()[-1])

    async def note_destination(self, report: str) -> None:
        async with self._db.connection(outcome=True) as conn:
            await conn.execute(Q["note_destination"], self.instance_id, report)

    async def destinations(self) -> list[tuple[str, str]]:
        async with self._db.connection() as conn:
            rows = await conn.fetch(Q["destinations"])
        return [(str(r[0]), str(r[1])) for r in rows]

    async def retry_now(self, now: float) -> int:
        async with self._db.connection() as conn:
            moved = int(await conn.fetchval(Q["retry_now"], self.instance_id, now))
        self.new_work.set()
        return moved

    async def keep_refused(self, refusals: Sequence[Refusal]) -> None:
        if not refusals:
            return
        columns = list(zip(*refusals, strict=True))
        try:
            async with self._db.connection() as conn:
                await conn.execute(
                    Q["insert_refused"], [bucket_of(r.user_key) for r in refusals], *columns
                )
        except asyncpg.PostgresError as exc:
            raise StoreError(f"the queue database refused the dead letters: {exc}") from exc

    async def fix_dead_letter(self, dead_id: int, message: NewMessage, detail: str) -> bool:
        m = message
        async with self._db.connection() as conn:
            status = await conn.execute(
                Q["fix_dead_letter"],
                dead_id,
                bucket_of(m.user_key),
                m.message_id,
                m.user_key,
                m.type,
                m.body,
                detail,
            )
        return int(status.split()[-1]) > 0
