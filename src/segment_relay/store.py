"""The SQLite queue: the only module that speaks SQL.

Accepted calls are committed here before the receiver answers 200. Concurrent requests share
one transaction (group commit: whatever is pending is committed as soon as the previous commit
is done), so a hop to the SQLite thread is paid per transaction, not per message. The
forwarder reads due rows in acceptance order and acks, reschedules or dead-letters them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Self

import aiosqlite
import orjson

from .errors import StoreError, StoreFullError

log = logging.getLogger(__name__)

_INSERT = """
INSERT INTO messages (source, message_id, user_key, type, body, received_at)
SELECT :source, :message_id, :user_key, :type, :body, :received_at
WHERE NOT EXISTS (
    SELECT 1 FROM dedup
    WHERE source = :source AND message_id = :message_id AND received_at >= :dedup_since
)
"""
_DUE = """
SELECT {columns} FROM messages AS m
WHERE m.next_attempt_at <= :now
  AND m.user_key NOT IN (SELECT value FROM json_each(:busy))
  AND NOT EXISTS (
      SELECT 1 FROM messages AS earlier
      WHERE earlier.user_key = m.user_key AND earlier.seq < m.seq
        AND earlier.next_attempt_at > 0 AND earlier.next_attempt_at > :now
  )
ORDER BY m.seq
LIMIT :limit
"""
_ROW_COLUMNS = (
    "seq, source, message_id, user_key, type, body, received_at, attempts, "
    "next_attempt_at, first_attempt_at, last_error"
)
_DUE = _DUE.format(columns=", ".join(f"m.{c.strip()}" for c in _ROW_COLUMNS.split(",")))


@dataclass(frozen=True)
class NewMessage:
    """An accepted message on its way into the queue."""

    source: str
    message_id: str
    user_key: str
    type: str
    body: bytes
    received_at: float


@dataclass(frozen=True)
class QueuedMessage:
    """A message row in the queue."""

    seq: int
    source: str
    message_id: str
    user_key: str
    type: str
    body: bytes
    received_at: float
    attempts: int
    next_attempt_at: float
    first_attempt_at: float | None
    last_error: str | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Self:
        return cls(*row)


@dataclass(frozen=True)
class DeadLetter:
    """A message that left the queue without being delivered, and why."""

    id: int
    seq: int
    source: str
    message_id: str
    user_key: str
    type: str
    body: bytes
    received_at: float
    reason: str
    detail: str
    response_status: int | None
    response_body: str | None
    attempts: int
    first_attempt_at: float | None
    last_attempt_at: float

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Self:
        return cls(*row)


@dataclass(frozen=True)
class Failure:
    """Why a message is dead-lettered."""

    reason: str
    detail: str = ""
    response_status: int | None = None
    response_body: str | None = None


@dataclass(frozen=True)
class QueueStats:
    """What `segment-relay status` shows."""

    pending: int
    in_backoff: int
    oldest_received_at: float | None
    dead_letters: dict[str, int]
    counters: dict[str, int]


def _is_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "full" in str(exc).lower()


class _LockFile:
    """An exclusive lock beside the database, so a second daemon refuses to share it."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"the queue {self.path.with_suffix('')} is in use by another segment-relay process"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Store:
    """The durable queue. Open with `await Store.open(...)`, close with `await store.close()`."""

    def __init__(
        self,
        conn: aiosqlite.Connection,
        lock: _LockFile | None,
        *,
        dedup_window_s: float,
        max_pending: int,
        pending: int,
    ) -> None:
        self._conn = conn
        self._lock = lock
        self._dedup_window_s = dedup_window_s
        self._max_pending = max_pending
        self._pending_count = pending
        self._write_lock = asyncio.Lock()
        self._queue: list[tuple[list[NewMessage], asyncio.Future[int]]] = []
        self._queued = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._closing = False
        # Set after every commit that stored something: the forwarder waits on it.
        self.new_work = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        synchronous: str = "full",
        dedup_window_s: float = 86400.0,
        max_pending: int = 10_000_000,
        exclusive: bool = True,
    ) -> Store:
        """Open (creating when missing) the queue at `path`.

        `exclusive` takes the daemon's lock: a second process that asks for it gets StoreError.
        Raises StoreError when the file is not a usable database.
        """
        db_path = Path(path)
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the queue directory {db_path.parent}: {exc.strerror}"
            ) from exc
        lock = _LockFile(db_path) if exclusive else None
        if lock:
            lock.acquire()
        try:
            conn = await aiosqlite.connect(db_path)
        except sqlite3.Error as exc:
            if lock:
                lock.release()
            raise StoreError(f"cannot open the queue {db_path}: {exc}") from exc
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute(
                f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}"
            )
            await conn.execute("PRAGMA busy_timeout=5000")
            schema = resources.files(__package__).joinpath("sql/schema.sql").read_text("utf-8")
            await conn.executescript(schema)
            await conn.commit()
            async with conn.execute("SELECT COUNT(*) FROM messages") as cursor:
                row = await cursor.fetchone()
        except sqlite3.DatabaseError as exc:
            await conn.close()
            if lock:
                lock.release()
            raise StoreError(
                f"the queue {db_path} is not a usable SQLite database ({exc}); "
                "move it aside to start with an empty queue, or restore it from a backup"
            ) from exc
        store = cls(
            conn,
            lock,
            dedup_window_s=dedup_window_s,
            max_pending=max_pending,
            pending=int(row[0]) if row else 0,
        )
        store._committer = asyncio.create_task(store._commit_loop(), name="store-group-commit")
        return store

    async def close(self) -> None:
        """Commit what is queued, stop the committer and close the database."""
        self._closing = True
        self._queued.set()
        if self._committer is not None:
            await self._committer
            self._committer = None
        await self._conn.close()
        if self._lock:
            self._lock.release()

    # --- ingest: group commit -------------------------------------------------------------------

    async def enqueue(self, messages: list[NewMessage]) -> int:
        """Commit `messages` durably; return how many were new (not duplicates).

        Returns only after the transaction holding them committed. Raises StoreFullError when
        the queue is over `max_pending` or SQLite reports the disk full.
        """
        if not messages:
            return 0
        if self._closing:
            raise StoreError("the queue is closing")
        if self._pending_count + len(messages) > self._max_pending:
            raise StoreFullError(
                f"the queue holds {self._pending_count} messages (queue.max_pending)"
            )
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((messages, future))
        self._queued.set()
        return await asyncio.shield(future)

    async def _commit_loop(self) -> None:
        while True:
            await self._queued.wait()
            self._queued.clear()
            groups, self._queue = self._queue, []
            if groups:
                await self._commit_groups(groups)
            if self._closing and not self._queue:
                return

    async def _commit_groups(
        self, groups: list[tuple[list[NewMessage], asyncio.Future[int]]]
    ) -> None:
        counts: list[int] = []
        try:
            async with self._write_lock:
                # Each request's messages go in one executemany, so its stored count is known;
                # all of them share the one commit.
                for messages, _ in groups:
                    params = [
                        {**m.__dict__, "dedup_since": m.received_at - self._dedup_window_s}
                        for m in messages
                    ]
                    cursor = await self._conn.executemany(_INSERT, params)
                    # rowcount counts the messages inserted, not the dedup rows of the trigger.
                    counts.append(max(cursor.rowcount, 0))
                await self._conn.commit()
        except Exception as exc:  # noqa: BLE001 - every waiting request must get an answer
            await self._rollback()
            full = isinstance(exc, sqlite3.Error) and _is_full(exc)
            error = (
                StoreFullError(f"the queue database is full: {exc}")
                if full
                else StoreError(str(exc))
            )
            log.error(  # noqa: TRY400 - a full disk needs no traceback
                "queue commit failed: %s", exc, extra={"action": "commit_failed"}
            )
            for _, future in groups:
                if not future.done():
                    future.set_exception(error)
            return
        stored = 0
        for (_, future), count in zip(groups, counts, strict=True):
            stored += count
            if not future.done():
                future.set_result(count)
        self._pending_count += stored
        if stored:
            self.new_work.set()

    async def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            await self._conn.rollback()

    # --- forwarding -----------------------------------------------------------------------------

    async def due(self, now: float, busy_users: Iterable[str], limit: int) -> list[QueuedMessage]:
        """Up to `limit` messages that may be sent now, in acceptance order.

        A message is due when its retry time has come, no earlier message of its user waits
        for a retry, and its user is not in `busy_users` (users with a batch in flight).
        """
        async with self._conn.execute(
            _DUE, {"now": now, "busy": orjson.dumps(list(busy_users)).decode(), "limit": limit}
        ) as cursor:
            return [QueuedMessage.from_row(r) for r in await cursor.fetchall()]

    async def next_retry_at(self) -> float | None:
        """When the earliest message in backoff becomes due, or None."""
        async with self._conn.execute(
            "SELECT MIN(next_attempt_at) FROM messages WHERE next_attempt_at > 0"
        ) as cursor:
            row = await cursor.fetchone()
        return float(row[0]) if row and row[0] is not None else None

    async def settle(
        self,
        *,
        acked: Iterable[int] = (),
        retry: Iterable[tuple[int, float, str, bool]] = (),
        dead: Iterable[tuple[QueuedMessage, Failure]] = (),
        now: float,
        counters: dict[str, int] | None = None,
        names: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Write the outcome of a send in one transaction.

        `acked`: seqs delivered (deleted). `retry`: (seq, next_attempt_at, error,
        counts_attempt). `dead`: messages moved to the dead-letter table. `counters` are added
        to the persistent counters and `names` (kind, name) to the project's known names, in the
        same transaction.
        """
        acked_rows = [(s,) for s in acked]
        retry_rows = [
            (next_at, error, int(counts), now, seq) for seq, next_at, error, counts in retry
        ]
        dead_rows = list(dead)
        name_rows = list(names)
        async with self._write_lock:
            try:
                if acked_rows:
                    await self._conn.executemany("DELETE FROM messages WHERE seq = ?", acked_rows)
                if retry_rows:
                    await self._conn.executemany(
                        "UPDATE messages SET next_attempt_at = ?, last_error = ?, "
                        "attempts = attempts + ?, first_attempt_at = COALESCE(first_attempt_at, ?) "
                        "WHERE seq = ?",
                        retry_rows,
                    )
                if dead_rows:
                    await self._insert_dead(dead_rows, now)
                if name_rows:
                    await self._conn.executemany(
                        "INSERT OR IGNORE INTO project_names (kind, name) VALUES (?, ?)", name_rows
                    )
                if counters:
                    await self._conn.executemany(
                        "INSERT INTO counters (name, value) VALUES (?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                        list(counters.items()),
                    )
                await self._conn.commit()
            except sqlite3.Error:
                await self._rollback()
                raise
        self._pending_count -= len(acked_rows) + len(dead_rows)

    async def _insert_dead(self, rows: list[tuple[QueuedMessage, Failure]], now: float) -> None:
        await self._conn.executemany(
            "INSERT INTO dead_letters (seq, source, message_id, user_key, type, body, received_at, "
            "reason, detail, response_status, response_body, attempts, first_attempt_at, "
            "last_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    m.seq,
                    m.source,
                    m.message_id,
                    m.user_key,
                    m.type,
                    m.body,
                    m.received_at,
                    f.reason,
                    f.detail,
                    f.response_status,
                    f.response_body,
                    m.attempts + 1,
                    m.first_attempt_at if m.first_attempt_at is not None else now,
                    now,
                )
                for m, f in rows
            ],
        )
        await self._conn.executemany(
            "DELETE FROM messages WHERE seq = ?", [(m.seq,) for m, _ in rows]
        )

    # --- inspection -----------------------------------------------------------------------------

    @property
    def pending_count(self) -> int:
        """Messages in the queue, as counted by this process."""
        return self._pending_count

    async def stats(self, now: float) -> QueueStats:
        """Queue depth, backoff, oldest message, dead letters by reason, persistent counters."""
        async with self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(next_attempt_at > ?), 0), MIN(received_at) "
            "FROM messages",
            (now,),
        ) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        async with self._conn.execute(
            "SELECT reason, COUNT(*) FROM dead_letters GROUP BY reason"
        ) as cursor:
            dead = {str(r[0]): int(r[1]) for r in await cursor.fetchall()}
        async with self._conn.execute("SELECT name, value FROM counters") as cursor:
            counters = {str(r[0]): int(r[1]) for r in await cursor.fetchall()}
        return QueueStats(int(row[0]), int(row[1]), row[2], dead, counters)

    async def dead_letters(self, limit: int = 100, reason: str | None = None) -> list[DeadLetter]:
        """Dead letters, oldest first, optionally only those with `reason`."""
        where, args = ("WHERE reason = ?", (reason, limit)) if reason else ("", (limit,))
        async with self._conn.execute(
            f"SELECT * FROM dead_letters {where} ORDER BY id LIMIT ?", args
        ) as cursor:
            return [DeadLetter.from_row(r) for r in await cursor.fetchall()]

    async def project_names(self) -> list[tuple[str, str]]:
        """(kind, name) of every event type and customer property key sent to the project."""
        async with self._conn.execute("SELECT kind, name FROM project_names") as cursor:
            return [(str(r[0]), str(r[1])) for r in await cursor.fetchall()]

    async def prune_dedup(self, now: float) -> int:
        """Forget messageIds older than the dedup window; return how many were forgotten."""
        async with self._write_lock:
            cursor = await self._conn.execute(
                "DELETE FROM dedup WHERE received_at < ?", (now - self._dedup_window_s,)
            )
            await self._conn.commit()
        return cursor.rowcount
