"""The SQLite queue: one relay process on one VM (docs/queue.md).

With database.py (the file, its schema and its errors), the only module of this backend that
runs SQL (kept by name in `queries.sql`; the schema is in `migrations/`). Accepted calls are
committed here before the receiver answers 200, in group commits (queue/ingest.py), so a hop
to the SQLite thread is paid per transaction, not per message. The forwarder reads due rows
in acceptance order and acks, reschedules or dead-letters them. One process owns the file
(lockfile.py), so every claim is its own.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import orjson

from ...errors import StoreError, StoreFullError
from ...records import (
    DeadLetter,
    DueRead,
    Failure,
    Instance,
    NewMessage,
    QueuedMessage,
    QueueStats,
    Refusal,
)
from ...sessions import Activity, SessionEvent, SessionRules, SessionState
from ..ingest import Committed, GroupCommit
from ..protocol import Retry
from ..session_rows import Expansion, SessionCache, expand, session_activities
from .database import Q, connect, is_full
from .imports import Imports
from .lockfile import LockFile

log = logging.getLogger(__name__)
T = TypeVar("T")
# How the statement `commit_sessions` says that it refused a commit (see session_commit).
_REFUSED = "segment-relay: "


def _insert(raw: sqlite3.Connection, rows: list[NewMessage], array: str) -> tuple[int, int]:
    """Insert `rows` (`array`, see insert_messages) on the SQLite thread. Returns how many
    were inserted (the others were repeats) and, when some were repeats, the last seq."""
    inserted = max(raw.execute(Q["insert_messages"], (array,)).rowcount, 0) if rows else 0
    last = 0
    if inserted < len(rows):
        [(last,)] = raw.execute("SELECT last_insert_rowid()").fetchall()
    return inserted, int(last)


def _transaction(raw: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run `fn` as one transaction on `raw` (the SQLite thread): committed, or rolled back if
    it raises."""
    raw.execute("BEGIN IMMEDIATE")
    try:
        result = fn(raw)
        raw.execute("COMMIT")
    except BaseException:
        if raw.in_transaction:
            raw.execute("ROLLBACK")
        raise
    return result


class SqliteQueue(Imports, GroupCommit):
    """The SQLite queue (a Queue, see queue/protocol.py). Open with `await
    SqliteQueue.open(...)`, close with `await queue.close()`."""

    def __init__(
        self,
        conn: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        path: Path,
        lock: LockFile | None,
        *,
        dedup_window_s: float,
        max_pending: int,
        pending: int,
        sessions: SessionRules | None = None,
        session_cache: int = 0,
    ) -> None:
        # Two connections, each with its own thread: writes on one; the forwarder's and the
        # operator's reads on the other, so they never wait behind a commit (WAL lets both run).
        self._conn = conn
        self._reader = reader
        super().__init__(max_pending=max_pending, pending=pending)
        self._path = path
        self._lock = lock
        self._rules = sessions
        self._cache = SessionCache(session_cache)
        self._dedup_window_s = dedup_window_s

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
        create: bool | None = None,
        sessions: SessionRules | None = None,
        session_cache: int = 10_000,
        max_size: int = 0,
    ) -> SqliteQueue:
        """Open the queue at `path`, creating it and its directory when missing, but for a
        command that only reads or administers the queue (not `exclusive`, unless `create`):
        that gets StoreError naming the path, and nothing is created.

        `session_cache`: how many sessions to hold on the event loop (see SessionCache).

        `exclusive` takes the daemon's lock: a second process that asks for it gets StoreError.
        `max_size` caps the file (bytes); past it commits fail as a full disk would.
        Raises StoreError when the file is not a usable database, or was upgraded by a newer
        relay.
        """
        db_path = Path(path)
        create = exclusive if create is None else create
        if not create and not await asyncio.to_thread(db_path.is_file):
            raise StoreError(
                f"no queue at {db_path}: is queue.path the relay's? (a relative path is "
                "relative to the config file's directory)"
            )
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the queue directory {db_path.parent}: {exc.strerror}"
            ) from exc
        lock = LockFile(db_path) if exclusive else None
        if lock:
            lock.acquire()
        try:
            conn, pending = await connect(db_path, synchronous, max_size)
        except StoreError:
            if lock:
                lock.release()
            raise
        reader = await aiosqlite.connect(db_path, isolation_level=None)
        await reader.execute("PRAGMA busy_timeout=5000")
        store = cls(
            conn,
            reader,
            db_path,
            lock,
            dedup_window_s=dedup_window_s,
            max_pending=max_pending,
            pending=pending,
            sessions=sessions,
            session_cache=session_cache,
        )
        store._start_committer()
        return store

    @property
    def where(self) -> str:
        return str(self._path)

    @property
    def poll_s(self) -> float:
        """Only a replay by the CLI arrives without a wake-up: every 5 s."""
        return 5.0

    @property
    def claims(self) -> int:
        """Always 0: this process owns the whole queue."""
        return 0

    async def close(self) -> None:
        """Commit what is queued, stop the committer and close the database."""
        try:
            await self._stop_committer()
        finally:
            # Whatever happened above, the SQLite thread must stop or the process cannot exit.
            await self._conn.close()
            await self._reader.close()
            if self._lock:
                self._lock.release()

    async def _write(
        self, fn: Callable[[sqlite3.Connection], T], *, own_transaction: bool = False
    ) -> T:
        """Run `fn` as one transaction in the SQLite thread, committed or rolled back there.

        `own_transaction`: `fn` commits its writes itself (a single statement commits by
        itself, or it calls `_transaction`).

        One hop per transaction (docs/queue.md, "SQLite"): under load each hop waits for a turn of
        the event loop, so a transaction of several awaited statements costs several turns.
        aiosqlite runs the functions it is given one at a time on its own thread, so these
        transactions never interleave; reads through the async API see them whole.
        """

        # aiosqlite's thread keeps the function it ran and its result until its next job, and
        # what they alone held would be freed there, under Python's lock (1 us per message).
        # Handed over in lists that are empty by then, both are freed on the event loop.
        job = [fn]

        def run() -> list[T]:
            raw: sqlite3.Connection = self._conn._conn  # noqa: SLF001 - used only on its own thread
            step = job.pop()
            return [step(raw) if own_transaction else _transaction(raw, step)]

        done: list[T] = await self._conn._execute(run)  # type: ignore[no-untyped-call]  # noqa: SLF001
        return done.pop()

    async def _one(self, query: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        rows = list(await self._reader.execute_fetchall(Q[query], params))
        return rows[0] if rows else None

    # --- ingest: group commit -------------------------------------------------------------------

    def _commit_error(self, exc: Exception) -> StoreError:
        if is_full(exc):
            return StoreFullError(f"the queue database is full: {exc}")
        return StoreError(str(exc))

    async def _commit(self, batches: list[list[NewMessage]]) -> Committed:
        """Store the groups' messages with the session events they cause, in one transaction.

        Without session activity it is one statement. With it, see `_session_write`. Either
        way it is one hop to the SQLite thread: under load each hop waits for a turn of the
        busy event loop.
        """
        activities = session_activities([m for ms in batches for m in ms]) if self._rules else {}
        if activities:
            self.session_commits += 1
            try:
                expansion, rows, inserted, last = await self._write(
                    self._session_write(batches, activities), own_transaction=True
                )
            except BaseException:
                self._cache.clear()  # what SQLite holds now is not known here
                raise
            self._cache.written(expansion.changed)
        else:
            expansion = Expansion([(ms, 0) for ms in batches], [], 0)
            # The rows are ready here, so the SQLite thread only runs the statement and never
            # waits for Python's lock in the middle.
            rows, array = self._insertion(expansion)
            inserted, last = await self._write(
                lambda raw: _insert(raw, rows, array), own_transaction=True
            )
        session_rows = sum(n for _, n in expansion.groups)
        stored = {id(m) for m in rows}
        if inserted < len(rows):
            # Some were duplicates of earlier commits (rare): the inserted rows are the last
            # `inserted` seqs, since that transaction was the only writer.
            found = await self._reader.execute_fetchall(
                Q["inserted_since"], (last - inserted, last)
            )
            new = {(str(r[0]), str(r[1])) for r in found}
            stored = {id(m) for m in rows if (m.source, m.message_id) in new}
        counts = [sum(id(m) in stored for m in messages) for messages in batches]
        earliest = min((s.expires_at for s in expansion.changed), default=None)
        return Committed(counts, session_rows, expansion.started, earliest)

    def _session_write(
        self, batches: list[list[NewMessage]], activities: dict[int, Activity]
    ) -> Callable[[sqlite3.Connection], tuple[Expansion, list[NewMessage], int, int]]:
        """Apply the rules to a commit with session activity; return the SQLite thread's part.

        The rules run here, on the event loop, on the sessions the cache holds (a user it
        does not hold is taken to have none), and the SQLite thread runs one statement. That
        statement refuses the commit if a session is not as assumed or a messageId is a
        repeat (see `session_commit` in migrations/); the sessions and repeats are then read
        in a transaction on that thread and the rules run again there, on what was read.
        """
        rules = self._rules
        assert rules is not None  # there is session activity

        def read_and_write(raw: sqlite3.Connection) -> tuple[Expansion, list[NewMessage], int, int]:
            self.session_commits_read += 1  # only this thread writes it
            seen, states = self._session_inputs(raw, batches, activities)
            expansion = expand(rules, batches, activities, seen, states)
            rows, array = self._insertion(expansion)
            if expansion.changed:
                # The one statement that writes sessions, here with nothing assumed or inserted.
                saved = orjson.dumps(expansion.saved()).decode()
                raw.execute(Q["commit_sessions"], ("[]", saved, "[]"))
            return (expansion, rows, *_insert(raw, rows, array))

        if not self._cache.capacity:
            return lambda raw: _transaction(raw, read_and_write)
        users = {a.user_key for a in activities.values()}
        states = self._cache.assumed(users)
        assumed = [
            [u, s.started_at, s.last_activity, s.expires_at] if (s := states.get(u)) else [u]
            for u in users
        ]
        guess = expand(rules, batches, activities, set(), states)
        rows, array = self._insertion(guess)
        params = (orjson.dumps(assumed).decode(), orjson.dumps(guess.saved()).decode(), array)

        def write(raw: sqlite3.Connection) -> tuple[Expansion, list[NewMessage], int, int]:
            try:
                raw.execute(Q["commit_sessions"], params)
            except sqlite3.IntegrityError as exc:
                if not str(exc).startswith(_REFUSED):
                    raise
                return _transaction(raw, read_and_write)
            return guess, rows, len(rows), 0

        return write

    def _insertion(self, expansion: Expansion) -> tuple[list[NewMessage], str]:
        """The expansion's rows without repeats, and those as the insert_messages array."""
        rows = NewMessage.without_repeats([m for ms, _ in expansion.groups for m in ms])
        return rows, self._array(rows)

    def _array(self, rows: list[NewMessage]) -> str:
        """`rows` as the JSON array the insert_messages statement takes."""
        return orjson.dumps([m.row(self._dedup_window_s) for m in rows]).decode()

    # --- sessions -------------------------------------------------------------------------------

    @property
    def session_rules(self) -> SessionRules | None:
        """The session rules the commits apply (None: sessions are off)."""
        return self._rules

    def _session_inputs(
        self,
        raw: sqlite3.Connection,
        batches: list[list[NewMessage]],
        activities: dict[int, Activity],
    ) -> tuple[set[tuple[str, str]], dict[str, SessionState]]:
        """What the session rules need, in one statement: which active messages were accepted
        before within the dedup window (those with a messageId the relay made cannot be, and
        are left out), and their users' sessions."""
        active = [
            m for messages in batches for m in messages if id(m) in activities and not m.fresh_id
        ]
        pairs = orjson.dumps([[m.source, m.message_id] for m in active]).decode()
        since = min((m.received_at for m in active), default=0.0) - self._dedup_window_s
        users = orjson.dumps(sorted({a.user_key for a in activities.values()})).decode()
        [(accepted, sessions)] = raw.execute(
            Q["session_inputs"], {"pairs": pairs, "since": since, "users": users}
        ).fetchall()
        seen = {(str(r[0]), str(r[1])) for r in orjson.loads(accepted)}
        return seen, {r[0]: SessionState.from_row(r) for r in orjson.loads(sessions)}

    async def expire_sessions(self, now: float, limit: int = 1000) -> int:
        """Close up to `limit` sessions idle at wall-clock `now`; return how many were closed.
        Their session_end events are enqueued in the same transaction that deletes them."""

        def expire(raw: sqlite3.Connection) -> list[str]:
            found = raw.execute(Q["expired_sessions"], (now, limit)).fetchall()
            due = [SessionState.from_row(r) for r in found]
            rows = [NewMessage.session_event(SessionEvent("session_end", s), now) for s in due]
            if rows:
                raw.execute(Q["insert_messages"], (self._array(rows),))
            raw.executemany(Q["delete_session"], [(s.user_key,) for s in due])
            return [s.user_key for s in due]

        users = await self._write(expire)
        self._cache.forget(users)
        self.sessions_ended += len(users)
        self._added(len(users))
        return len(users)

    async def session_stats(self) -> tuple[int, float | None]:
        """Open sessions and the earliest wall-clock expiry among them."""
        count, earliest = await self._one("session_stats")
        return int(count), None if earliest is None else float(earliest)

    async def next_session_expiry(self) -> float | None:
        """The earliest wall-clock expiry of an open session, or None."""
        return (await self.session_stats())[1]

    # --- forwarding -----------------------------------------------------------------------------

    async def due(self, now: float, busy_users: Iterable[str], limit: int) -> list[QueuedMessage]:
        """Up to `limit` messages that may be sent now, in acceptance order.

        A message is due when its retry time has come, no earlier message of its user waits
        for a retry, and its user is not in `busy_users` (users with a batch in flight).
        """
        return (await self.read_due(now, busy_users, limit)).rows

    async def read_due(
        self, now: float, busy_users: Iterable[str], limit: int, after: int = 0
    ) -> DueRead:
        """The due messages (as `due`) with a seq above `after`, how far the read looked and
        the count of replays (see DueRead)."""
        busy = orjson.dumps(list(busy_users)).decode()
        found, highest, replayed = await self._one(
            "due_messages", {"now": now, "busy": busy, "limit": limit, "after": after}
        )
        rows = [
            QueuedMessage.claimed(r, 0) for r in sorted(orjson.loads(found), key=lambda r: r[0])
        ]
        looked = rows[-1].seq if len(rows) >= limit else int(highest)
        return DueRead(rows, looked, int(replayed))

    async def next_retry_at(self) -> float | None:
        """When the earliest message in backoff becomes due, or None."""
        (earliest,) = await self._one("next_retry_at")
        return None if earliest is None else float(earliest)

    async def settle(
        self,
        *,
        acked: Iterable[QueuedMessage] = (),
        retry: Iterable[Retry] = (),
        dead: Iterable[tuple[QueuedMessage, Failure]] = (),
        now: float,
        counters: dict[str, int] | None = None,
        names: Iterable[tuple[str, str]] = (),
    ) -> int:
        """Write the outcome of a send in one transaction; return 0 (one process owns the
        queue: no outcome is ever another's to write).

        `acked`: messages delivered (deleted). `retry`: (message, next_attempt_at, error,
        counts_attempt). `dead`: messages moved to the dead-letter table. `counters` are added
        to the persistent counters and `names` (kind, name) to the project's known names, in the
        same transaction.
        """
        acked_seqs = [m.seq for m in acked]
        retry_rows = [[m.seq, at, error, int(counts)] for m, at, error, counts in retry]
        dead_rows = [
            [m.seq, f.reason, f.detail, f.response_status, f.response_body] for m, f in dead
        ]
        settlement = (
            orjson.dumps(acked_seqs).decode(),
            orjson.dumps(retry_rows).decode(),
            orjson.dumps(dead_rows).decode(),
            orjson.dumps(list(names)).decode(),
            orjson.dumps(counters or {}).decode(),
            now,
        )
        # One statement (the `settle` trigger does the rest): one step of SQLite, autocommit.
        await self._write(lambda raw: raw.execute(Q["settle"], settlement), own_transaction=True)
        self._removed(len(acked_seqs) + len(dead_rows))
        return 0

    def sending(self, rows: Iterable[QueuedMessage]) -> None:
        """Nothing to do: no other process takes this queue's users."""

    def done_sending(self, rows: Iterable[QueuedMessage]) -> None:
        """Nothing to do (see sending)."""

    async def project_names(self) -> list[tuple[str, str]]:
        """(kind, name) of every event type and customer property key sent to the project."""
        rows = await self._reader.execute_fetchall(Q["project_names"])
        return [(str(r[0]), str(r[1])) for r in rows]

    # --- inspection and administration ----------------------------------------------------------

    async def instances(self) -> list[Instance]:
        """None: one process owns a SQLite queue."""
        return []

    async def note_destination(self, report: str) -> None:
        await self._write(lambda raw: raw.execute(Q["note_destination"], (report,)))

    async def destinations(self) -> list[tuple[str, str]]:
        rows = await self._reader.execute_fetchall(Q["destinations"])
        return [(str(r[0]), str(r[1])) for r in rows]

    async def retry_now(self, now: float) -> int:
        def due_now(raw: sqlite3.Connection) -> int:
            moved = max(raw.execute(Q["retry_now"], (now,)).rowcount, 0)
            raw.execute(Q["count_replayed"], (moved,))
            return moved

        moved = await self._write(due_now)
        self.new_work.set()
        return moved

    async def stats(self, now: float) -> QueueStats:
        """Queue depth, backoff, oldest message, dead letters by reason, persistent counters."""
        pending, in_backoff, oldest = await self._one("queue_stats", (now,))
        dead = await self._reader.execute_fetchall(Q["dead_letter_counts"])
        counters = await self._reader.execute_fetchall(Q["counters"])
        return QueueStats.of(pending, in_backoff, oldest, dead, counters)

    async def dead_letters(
        self, limit: int = 100, reason: str | None = None, after: int = 0
    ) -> list[DeadLetter]:
        """Dead letters with id > `after`, oldest first, optionally only those with `reason`."""
        rows = await self._reader.execute_fetchall(
            Q["dead_letters"], {"reason": reason, "after": after, "limit": limit}
        )
        return [DeadLetter.from_row(r) for r in rows]

    async def dead_letter(self, dead_id: int) -> DeadLetter | None:
        """One dead letter by id, or None."""
        row = await self._one("dead_letter", (dead_id,))
        return None if row is None else DeadLetter.from_row(row)

    async def replay(self, dead_ids: Iterable[int], now: float) -> int:
        """Move dead letters back to the queue in their original order; return how many."""
        ids = list(dead_ids)

        def replay(raw: sqlite3.Connection) -> int:
            cursor = raw.executemany(Q["replay_message"], [{"id": i, "now": now} for i in ids])
            raw.executemany(Q["delete_dead_letter"], [(i,) for i in ids])
            moved = max(cursor.rowcount, 0)
            raw.execute(Q["count_replayed"], (moved,))
            return moved

        moved = await self._write(replay)
        self._added(moved)
        self.new_work.set()  # the forwarder looks again even if none moved
        return moved

    async def keep_refused(self, refusals: Sequence[Refusal]) -> None:
        rows = [r._asdict() for r in refusals]
        try:
            await self._write(lambda raw: raw.executemany(Q["insert_refused"], rows))
        except sqlite3.Error as exc:
            raise self._commit_error(exc) from exc

    async def fix_dead_letter(self, dead_id: int, message: NewMessage, detail: str) -> bool:
        fields = {
            "id": dead_id,
            "message_id": message.message_id,
            "user_key": message.user_key,
            "type": message.type,
            "body": message.body,
            "detail": detail,
        }
        return await self._write(lambda raw: raw.execute(Q["fix_dead_letter"], fields).rowcount > 0)

    async def purge_dead_letters(self, older_than: float) -> int:
        """Delete dead letters whose last attempt is before `older_than`; return how many."""
        return await self._write(
            lambda raw: max(raw.execute(Q["purge_dead_letters"], (older_than,)).rowcount, 0)
        )

    async def prune_dedup(self, now: float) -> int:
        """Forget messageIds older than the dedup window; return how many were forgotten."""
        since = now - self._dedup_window_s
        return await self._write(
            lambda raw: max(raw.execute(Q["prune_dedup"], (since,)).rowcount, 0)
        )
