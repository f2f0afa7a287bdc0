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
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from .errors import StoreError, StoreFullError
from .records import DeadLetter, Failure, NewMessage, QueuedMessage, QueueStats
from .sessions import SessionEvent, SessionRules, SessionState

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


_SESSION_COLUMNS = "user_key, source, started_at, last_activity, expires_at, ids, context"


def _session_from_row(row: Sequence[Any]) -> SessionState:
    return SessionState(
        user_key=row[0],
        source=row[1],
        started_at=row[2],
        last_activity=row[3],
        expires_at=row[4],
        ids=orjson.loads(row[5]),
        context=None if row[6] is None else orjson.loads(row[6]),
    )


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
        sessions: SessionRules | None = None,
    ) -> None:
        self._conn = conn
        self._rules = sessions
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
        # Set when a session opens: the session timer recomputes its next deadline.
        self.sessions_changed = asyncio.Event()

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
        sessions: SessionRules | None = None,
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
            sessions=sessions,
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
                expanded = await self._apply_sessions(groups)
                # Each request's messages go in one executemany, so its stored count is known;
                # all of them share the one commit.
                for rows, session_rows in expanded:
                    params = [m.params(self._dedup_window_s) for m in rows]
                    cursor = await self._conn.executemany(_INSERT, params)
                    # rowcount counts the messages inserted, not the dedup rows of the trigger;
                    # the session events inserted with them are not the client's messages.
                    counts.append(max(cursor.rowcount, 0) - session_rows)
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
        self._pending_count += stored + sum(n for _, n in expanded)
        if stored:
            self.new_work.set()

    # --- sessions -------------------------------------------------------------------------------

    async def _apply_sessions(
        self, groups: list[tuple[list[NewMessage], asyncio.Future[int]]]
    ) -> list[tuple[list[NewMessage], int]]:
        """Each group's rows with the session events they cause, and how many those are.

        Runs inside the commit's transaction: the session rows are written with the calls.
        """
        rules = self._rules
        plain = [(messages, 0) for messages, _ in groups]
        if rules is None:
            return plain
        activities = [
            (m, a)
            for messages, _ in groups
            for m in messages
            if m.message is not None
            and (a := rules.activity(m.message, m.source, m.user_key, m.received_at)) is not None
        ]
        if not activities:
            return plain
        seen = await self._already_accepted([m for m, _ in activities])
        states = await self._sessions_of({a.user_key for _, a in activities})
        by_message = {id(m): a for m, a in activities}
        changed: dict[str, SessionState] = {}
        opened = False
        expanded: list[tuple[list[NewMessage], int]] = []
        for messages, _ in groups:
            rows: list[NewMessage] = []
            for message in messages:
                activity = by_message.get(id(message))
                key = (message.source, message.message_id)
                if activity is not None and key not in seen:
                    seen.add(key)
                    events, state = rules.on_activity(states.get(activity.user_key), activity)
                    if state is not None:
                        states[activity.user_key] = changed[activity.user_key] = state
                    rows.extend(NewMessage.session_event(e, message.received_at) for e in events)
                    opened = opened or any(e.kind == "session_start" for e in events)
                rows.append(message)
            expanded.append((rows, len(rows) - len(messages)))
        await self._save_sessions(changed.values())
        if opened:
            self.sessions_changed.set()
        return expanded

    async def _already_accepted(self, messages: list[NewMessage]) -> set[tuple[str, str]]:
        """(source, messageId) of these messages already accepted within the dedup window."""
        pairs = orjson.dumps([[m.source, m.message_id] for m in messages]).decode()
        since = min(m.received_at for m in messages) - self._dedup_window_s
        async with self._conn.execute(
            "SELECT d.source, d.message_id FROM json_each(?) AS j JOIN dedup AS d "
            "ON d.source = json_extract(j.value, '$[0]') "
            "AND d.message_id = json_extract(j.value, '$[1]') "
            "WHERE d.received_at >= ?",
            (pairs, since),
        ) as cursor:
            return {(str(r[0]), str(r[1])) for r in await cursor.fetchall()}

    async def _sessions_of(self, users: set[str]) -> dict[str, SessionState]:
        async with self._conn.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions "
            "WHERE user_key IN (SELECT value FROM json_each(?))",
            (orjson.dumps(sorted(users)).decode(),),
        ) as cursor:
            return {r[0]: _session_from_row(r) for r in await cursor.fetchall()}

    async def _save_sessions(self, states: Iterable[SessionState]) -> None:
        rows = [
            (
                s.user_key,
                s.source,
                s.started_at,
                s.last_activity,
                s.expires_at,
                orjson.dumps(s.ids),
                None if s.context is None else orjson.dumps(s.context),
            )
            for s in states
        ]
        if rows:
            await self._conn.executemany(
                f"INSERT OR REPLACE INTO sessions ({_SESSION_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    async def expire_sessions(self, now: float, limit: int = 1000) -> int:
        """Close up to `limit` sessions idle at wall-clock `now`; return how many were closed.

        Their session_end events are enqueued in the same transaction that deletes them.
        """
        async with self._write_lock:
            try:
                async with self._conn.execute(
                    f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE expires_at <= ? "
                    "ORDER BY expires_at LIMIT ?",
                    (now, limit),
                ) as cursor:
                    due = [_session_from_row(r) for r in await cursor.fetchall()]
                if not due:
                    return 0
                rows = [NewMessage.session_event(SessionEvent("session_end", s), now) for s in due]
                await self._conn.executemany(
                    _INSERT, [m.params(self._dedup_window_s) for m in rows]
                )
                await self._conn.executemany(
                    "DELETE FROM sessions WHERE user_key = ?", [(s.user_key,) for s in due]
                )
                await self._conn.commit()
            except sqlite3.Error:
                await self._rollback()
                raise
        self._pending_count += len(due)
        self.new_work.set()
        return len(due)

    async def session_stats(self) -> tuple[int, float | None]:
        """Open sessions and the earliest wall-clock expiry among them."""
        async with self._conn.execute("SELECT COUNT(*), MIN(expires_at) FROM sessions") as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0]), None if row[1] is None else float(row[1])

    async def next_session_expiry(self) -> float | None:
        """The earliest wall-clock expiry of an open session, or None."""
        async with self._conn.execute(
            "SELECT expires_at FROM sessions ORDER BY expires_at LIMIT 1"
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else float(row[0])

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
