"""The PostgreSQL queue: any number of relays on one database (docs/queue.md).

With database.py (connections, schema, errors), the only module of this backend that runs
SQL (kept by name in `queries.sql`; the schema is in `migrations/`). Every relay accepts
calls: group commits (queue/ingest.py) insert them with their dedup rows and session events,
whichever relay takes them. Forwarding is partitioned: users hash into buckets (leases.py),
each leased to one live relay, which alone reads its users' messages, writes their outcomes
and closes their sessions, each such write fenced by the lease's epoch. A relay that dies
stops renewing; after `queue.lease` the others take its buckets over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import asyncpg
import orjson

from ...config import QueueConfig
from ...errors import StoreError, StoreFullError
from ...records import (
    DueRead,
    Failure,
    NewMessage,
    QueuedMessage,
)
from ...sessions import Activity, SessionEvent, SessionRules, SessionState
from ...waiting import first_set
from ..ingest import Committed, GroupCommit
from ..protocol import Retry
from ..session_rows import Expansion, expand, session_activities
from .admin import Administration
from .database import Database, Q, message_rows
from .horizon import Horizon
from .imports import Imports
from .leases import BUCKETS, Leases, bucket_of, lease_clock, share

log = logging.getLogger(__name__)
SESSION_TYPES = frozenset({"session_start", "session_end"})
# The hot tables are vacuumed by the relay holding bucket 0 once they hold this many dead
# rows, checked this often (see PostgresQueue.vacuum).
VACUUM_DEAD_ROWS = 10_000
# How often an idle forwarder reads its buckets for calls other relays took (PostgresQueue.poll_s).
POLL_S = 0.5
VACUUM_CHECK_S = 5.0
# Group commits in flight together (queue/ingest.py): each on its own connection and backend,
# so that the server's cores share the inserts and the relay has calls to parse while commits
# wait for the disk (bench/pg.py, 4 against 2, interleaved: single calls 1.16x, 100-call
# batches 1.07x; see docs/queue.md).
COMMITS_AT_ONCE = 4


def _claim(message: QueuedMessage, outcome: str, **fields: Any) -> dict[str, Any]:
    """A claimed message as an object of the settle statement's JSON array: its seq, bucket,
    lease and outcome, with the fields of that outcome (a retry's at, error and counts; a
    dead letter's failure)."""
    return {
        "seq": message.seq,
        "bucket": bucket_of(message.user_key),
        "lease": message.lease,
        "outcome": outcome,
        **fields,
    }


def _session_columns(states: Sequence[SessionState]) -> tuple[list[Any], ...]:
    return (
        [s.user_key for s in states],
        [bucket_of(s.user_key) for s in states],
        [s.source for s in states],
        [s.started_at for s in states],
        [s.last_activity for s in states],
        [s.expires_at for s in states],
        [orjson.dumps(s.ids).decode() for s in states],
        [s.context for s in states],
    )


class PostgresQueue(Imports, GroupCommit, Administration):
    """The PostgreSQL queue (a Queue, see queue/protocol.py). Open with `await
    PostgresQueue.open(config)`, close with `await queue.close()`."""

    def __init__(
        self,
        db: Database,
        config: QueueConfig,
        *,
        pending: int,
        sessions: SessionRules | None,
        member: bool,
        forwarding: bool,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(
            max_pending=config.max_pending,
            pending=pending,
            # Two connections left for the leases, the upkeep and the CLI's commands.
            commits_at_once=max(1, min(COMMITS_AT_ONCE, config.pool_size - 2)),
        )
        # The monotonic clock the leases are trusted by (injected by tests).
        self._clock = clock
        self._db = db
        self._rules = sessions
        self._dedup_window_s = config.dedup_window_s
        self._member = member
        self._forwarding = forwarding
        self.instance_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._leases = Leases(config.lease_s)
        self._horizon = Horizon()
        self._replayed = 0  # the replay count the last read saw (DueRead.replayed)
        self._keeper: asyncio.Task[None] | None = None
        self._janitor: asyncio.Task[None] | None = None
        self._stop_keeping = asyncio.Event()
        # Outcomes and session ends not written because the lease had passed to another relay.
        self.fenced = 0

    @classmethod
    async def open(
        cls,
        config: QueueConfig,
        *,
        sessions: SessionRules | None = None,
        member: bool = True,
        forwarding: bool = True,
        clock: Callable[[], float] = lease_clock,
        create: bool | None = None,
    ) -> PostgresQueue:
        """Connect, upgrade the schema and, for a relay (`member`), join the relays sharing
        the database and take a share of the buckets (`forwarding`). Only a relay creates
        the schema in a database that has none, unless `create` says otherwise.

        Raises StoreError naming queue.url (never its password) when the database cannot be
        reached or refuses the login, or was upgraded by a newer relay.
        """
        db, pending = await Database.open(
            config, outcomes=forwarding, analyze=member, create=member if create is None else create
        )
        queue = cls(
            db,
            config,
            pending=pending,
            sessions=sessions,
            member=member,
            forwarding=forwarding,
            clock=clock,
        )
        if member:
            try:
                await queue.renew(first=True)
            except BaseException:
                await db.close(config.lease_s)
                raise
            queue._keeper = asyncio.create_task(queue._keep_leases(), name="queue-leases")
            # Also on a receive-only relay: the others remove what it adds.
            queue._janitor = asyncio.create_task(queue._upkeep(), name="queue-upkeep")
        queue._start_committer()
        return queue

    @property
    def where(self) -> str:
        return self._db.where

    @property
    def unavailable(self) -> str | None:
        return self._db.down or self.commit_error

    @property
    def session_rules(self) -> SessionRules | None:
        return self._rules

    @property
    def poll_s(self) -> float:
        """Calls another relay took for this relay's users wake nobody here (there is no
        LISTEN/NOTIFY: see docs/queue.md), so an idle forwarder reads every POLL_S."""
        return POLL_S

    @property
    def claims(self) -> int:
        """Changes whenever messages read before may no longer be this relay's to send: a
        lease lost or given up, or the leases not renewed in time."""
        return self._leases.changes * 2 + self._leases.expired(self._clock())

    def sending(self, rows: Iterable[QueuedMessage]) -> None:
        """A batch of `rows` is in flight: their buckets are not given up until it ends."""
        self._leases.sending.update({bucket_of(user) for user in {r.user_key for r in rows}})

    def done_sending(self, rows: Iterable[QueuedMessage]) -> None:
        self._leases.sending.subtract({bucket_of(user) for user in {r.user_key for r in rows}})

    async def close(self) -> None:
        """Commit what is queued, give the buckets up at once, close the connections."""
        try:
            await self._stop_committer()
            self._stop_keeping.set()
            if self._janitor is not None:
                self._janitor.cancel()  # a VACUUM under way is not waited for
            for task in (self._keeper, self._janitor):
                if task is not None:
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await task
            if self._member:
                with contextlib.suppress(StoreError):
                    async with self._db.connection() as conn:
                        await conn.execute(Q["leave"], self.instance_id)
                self._leases.lose_all()
        finally:
            await self._db.close(self._leases.lease_s)

    # --- ingest ---------------------------------------------------------------------------------

    def _commit_error(self, exc: Exception) -> StoreError:
        if isinstance(exc, StoreError):
            return exc
        if isinstance(exc, asyncpg.DiskFullError):
            return StoreFullError(f"the queue database is full: {exc}")
        return StoreError(f"the queue database {self._db.where} refused the commit: {exc}")

    async def _commit(self, batches: list[list[NewMessage]]) -> Committed:
        """Store the groups' messages with their session events in one transaction.

        Without session activity it is one statement (insert_calls). With it, the users'
        sessions are locked and read, the rules run, and the rows and sessions are written,
        in one transaction: a user's calls taken by two relays at once are applied one after
        the other.
        """
        messages = [m for ms in batches for m in ms]
        activities = session_activities(messages) if self._rules else {}
        calls = NewMessage.without_repeats(messages)
        async with self._db.connection() as conn:
            if activities:
                async with conn.transaction():
                    expansion, new = await self._session_commit(conn, batches, activities, calls)
            else:
                expansion = Expansion([(ms, 0) for ms in batches], [], 0)
                left_out = [
                    calls[r[0] - 1]
                    for r in await conn.fetch(
                        Q["insert_calls"], *message_rows(calls), self._dedup_window_s
                    )
                ]
                if not left_out and len(calls) == len(messages):
                    # The usual commit: every call was new.
                    return Committed([len(ms) for ms in batches], 0, 0, None)
                new = {(m.source, m.message_id) for m in calls}
                new -= {(m.source, m.message_id) for m in left_out}
        stored_ids = {id(m) for m in calls if (m.source, m.message_id) in new}
        counts = [sum(id(m) in stored_ids for m in ms) for ms in batches]
        session_rows = sum(n for _, n in expansion.groups)
        earliest = min((s.expires_at for s in expansion.changed), default=None)
        return Committed(counts, session_rows, expansion.started, earliest)

    async def _session_commit(
        self,
        conn: asyncpg.Connection,
        batches: list[list[NewMessage]],
        activities: dict[int, Activity],
        calls: list[NewMessage],
    ) -> tuple[Expansion, set[tuple[str, str]]]:
        """A commit with session activity, inside its transaction; returns the expansion and
        the (source, messageId) of the calls that were new."""
        rules = self._rules
        assert rules is not None  # there is session activity
        self.session_commits += 1
        self.session_commits_read += 1
        users = sorted({a.user_key for a in activities.values()})
        await conn.execute(Q["lock_users"], users)
        # A messageId the relay made cannot repeat one: no dedup row (as insert_calls).
        sent = [m for m in calls if not m.fresh_id]
        recorded = await conn.fetch(
            Q["record_ids"],
            [m.source for m in sent],
            [m.message_id for m in sent],
            [m.received_at for m in sent],
            self._dedup_window_s,
        )
        new = {(r[0], r[1]) for r in recorded}
        new.update((m.source, m.message_id) for m in calls if m.fresh_id)
        states = {
            r[0]: SessionState.from_row(r) for r in await conn.fetch(Q["lock_sessions"], users)
        }
        seen = {(m.source, m.message_id) for m in calls} - new
        expansion = expand(rules, batches, activities, seen, states)
        rows: list[NewMessage] = []
        taken: set[tuple[str, str]] = set()
        for group, _ in expansion.groups:
            for m in group:
                key = (m.source, m.message_id)
                if m.type in SESSION_TYPES or (key in new and key not in taken):
                    taken.add(key)
                    rows.append(m)
        await conn.execute(Q["insert_messages"], *message_rows(rows))
        if expansion.changed:
            await conn.execute(Q["save_sessions"], *_session_columns(expansion.changed))
        return expansion, new

    # --- leases ---------------------------------------------------------------------------------

    async def _keep_leases(self) -> None:
        """Renew the leases (and take or give up buckets) every third of `queue.lease`, on a
        fixed cadence however long a renewal took."""
        interval = self._leases.lease_s / 3
        due = self._clock() + interval
        while not self._stop_keeping.is_set():
            await first_set(self._stop_keeping, timeout_s=max(0.0, due - self._clock()))
            due += interval
            if self._stop_keeping.is_set():
                break
            try:
                await self.renew()
            except Exception:  # a bug here must not silently stop the renewals
                log.exception("lease renewal failed", extra={"action": "lease_failed"})

    async def renew(self, *, first: bool = False) -> None:
        """One renewal: membership, leases held, a fair share taken or given up. (The
        `first`, at start, wakes nobody: the forwarder and the session timer start after.)"""
        sent_at = self._clock()
        lease_s = self._leases.lease_s
        gained: list[int] = []
        released: list[int] = []
        try:
            async with self._db.connection() as conn:
                await conn.execute(
                    Q["join"],
                    self.instance_id,
                    socket.gethostname(),
                    os.getpid(),
                    self._forwarding,
                    lease_s,
                )
                held = await conn.fetch(Q["renew"], self.instance_id, lease_s)
                lost = self._leases.renewed(((r[0], r[1]) for r in held), sent_at)
                if self._forwarding:
                    target = share(BUCKETS, await conn.fetchval(Q["forwarders"]))
                    if len(self._leases.held) < target:
                        taken = await conn.fetch(
                            Q["acquire"],
                            self.instance_id,
                            lease_s,
                            target - len(self._leases.held),
                        )
                        gained = self._leases.gained((r[0], r[1]) for r in taken)
                    elif len(self._leases.held) > target:
                        self._leases.drain(target, self._clock())
                    released = self._leases.to_release(self._clock(), lease_s / 3)
                    if released:
                        await conn.execute(Q["release"], self.instance_id, released)
        except StoreError as exc:
            if not self._leases.expired(self._clock()):
                log.warning("cannot renew the leases: %s", exc, extra={"action": "lease_failed"})
            return
        if lost:
            log.warning("lost buckets %s to another relay", lost, extra={"action": "buckets_lost"})
        if gained or released:
            log.info(
                "buckets: took %s, gave up %s; holding %d",
                gained,
                released,
                len(self._leases.held),
                extra={"action": "buckets_changed"},
            )
        if gained and not first:
            # Their messages and sessions are this relay's now: the forwarder and the session
            # timer look at once.
            self.new_work.set()
            self.expiry.opened(0.0)

    async def _upkeep(self) -> None:
        """Every VACUUM_CHECK_S: count the queue (for queue.max_pending: other relays add and
        remove messages too) and, on the relay holding bucket 0, vacuum (see `vacuum`)."""
        while not self._stop_keeping.is_set():
            await first_set(self._stop_keeping, timeout_s=VACUUM_CHECK_S)
            if self._stop_keeping.is_set():
                break
            try:
                async with self._db.connection() as conn:
                    self._pending_count = int(await conn.fetchval(Q["count_messages"]))
                if 0 in self._usable():
                    await self.vacuum()
            except StoreError as exc:
                log.warning("queue upkeep failed: %s", exc, extra={"action": "upkeep_failed"})
            except Exception:  # a bug here must not silently stop the upkeep
                log.exception("queue upkeep failed", extra={"action": "upkeep_failed"})

    async def vacuum(self) -> list[str]:
        """VACUUM each table with more dead rows than VACUUM_DEAD_ROWS; return those.

        A queue deletes what it delivers: without a vacuum its space is never reused and its
        tables and indexes grow with every message ever sent (bench/pg_soak.py: 869 MiB after
        1,000,000 messages with autovacuum off, as on this project's machines). The relay
        does not count on autovacuum: one relay checks every VACUUM_CHECK_S, from the
        statistics that autovacuum reads too.
        """
        async with self._db.connection() as conn:
            found = await conn.fetch(Q["dead_rows"], VACUUM_DEAD_ROWS)
            tables = [str(r[0]) for r in found]
            for table in tables:
                # A name from the fixed list in dead_rows, never from input.
                await conn.execute(f"VACUUM (ANALYZE) {table}", timeout=None)
        if tables:
            log.debug("vacuumed %s", ", ".join(tables), extra={"action": "vacuumed"})
        return tables

    def _usable(self) -> list[int]:
        return self._leases.usable(self._clock())

    async def _fence(
        self, conn: asyncpg.Connection, claims: Iterable[tuple[int, int]]
    ) -> set[tuple[int, int]]:
        """The (bucket, epoch) of `claims` still this relay's, locked to the transaction's end."""
        pairs = sorted(set(claims))
        if not pairs:
            return set()
        found = await conn.fetch(
            Q["fence"], self.instance_id, [b for b, _ in pairs], [e for _, e in pairs]
        )
        held = {r[0] for r in found}
        return {(b, e) for b, e in pairs if b in held}

    # --- forwarding -----------------------------------------------------------------------------

    async def due(self, now: float, busy_users: Iterable[str], limit: int) -> list[QueuedMessage]:
        return (await self.read_due(now, busy_users, limit)).rows

    async def read_due(
        self, now: float, busy_users: Iterable[str], limit: int, after: int = 0
    ) -> DueRead:
        """The due messages of this relay's buckets with a seq above `after`, how far the
        read saw everything (horizon.py) and the count of replays (see DueRead)."""
        buckets = self._usable()
        if not buckets:
            return DueRead([], 0, self._replayed)
        epochs = self._leases.held
        async with self._db.connection(outcome=True) as conn:
            found = await conn.fetch(
                Q["due_messages"],
                self.instance_id,
                buckets,
                now,
                list(busy_users),
                limit,
                after,
                self._horizon.wants_xid(self._clock()),
            )
        xmin, xid, allocated, replayed = found[0][:4]
        self._replayed = replayed
        rows = [QueuedMessage.claimed(r[4:15], epochs[r[15]]) for r in found if r[4] is not None]
        last_seq = rows[-1].seq if len(rows) >= limit else None
        return DueRead(rows, self._horizon.looked(xmin, xid, allocated, last_seq), replayed)

    async def next_retry_at(self) -> float | None:
        async with self._db.connection() as conn:
            earliest = await conn.fetchval(Q["next_retry_at"], self._usable())
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
        """Write the outcome of a send in one transaction, for the messages whose lease is
        still this relay's; return how many were not (their new owner sends them again)."""
        # One JSON parameter, not an array per column: asyncpg encodes an array element by
        # element (see database.message_rows).
        claims = [
            *(_claim(m, "a") for m in acked),
            *(_claim(m, "r", at=at, error=error, counts=int(counts))
              for m, at, error, counts in retry),
            *(_claim(m, "d", reason=f.reason, detail=f.detail, status=f.response_status,
                     response=f.response_body)
              for m, f in dead),
        ]  # fmt: skip
        names, counters = list(names), counters or {}
        if not (claims or names or counters):
            return 0
        async with self._db.connection(outcome=True) as conn:
            gone, settled = await conn.fetchrow(
                Q["settle"],
                self.instance_id,
                orjson.dumps(claims).decode(),
                now,
                [k for k, _ in names],
                [n for _, n in names],
                list(counters),
                list(counters.values()),
            )
        fenced = len(claims) - int(settled)
        if fenced:
            self.fenced += fenced
            log.warning(
                "the outcome of %d messages was not written: their bucket's lease passed to "
                "another relay, which sends them again",
                fenced,
                extra={"action": "outcome_fenced"},
            )
        self._removed(int(gone))
        return fenced

    async def project_names(self) -> list[tuple[str, str]]:
        async with self._db.connection() as conn:
            rows = await conn.fetch(Q["project_names"])
        return [(str(r[0]), str(r[1])) for r in rows]

    # --- sessions -------------------------------------------------------------------------------

    async def expire_sessions(self, now: float, limit: int = 1000) -> int:
        """Close up to `limit` idle sessions of this relay's buckets, each session_end queued
        in the transaction that deletes the session (so it is queued exactly once)."""
        held = dict(self._leases.held)
        if not held or self._leases.expired(self._clock()):
            return 0
        async with self._db.connection(outcome=True) as conn, conn.transaction():
            # The fence's row locks give the transaction its id before it takes seqs
            # (horizon.py relies on that).
            valid = await self._fence(conn, held.items())
            if not valid:
                return 0
            found = await conn.fetch(Q["expired_sessions"], sorted(b for b, _ in valid), now, limit)
            due = [SessionState.from_row(r) for r in found]
            rows = [NewMessage.session_event(SessionEvent("session_end", s), now) for s in due]
            if rows:
                await conn.execute(Q["insert_messages"], *message_rows(rows))
                await conn.execute(Q["delete_sessions"], [s.user_key for s in due])
        self.sessions_ended += len(due)
        self._added(len(due))
        return len(due)

    async def session_stats(self) -> tuple[int, float | None]:
        async with self._db.connection() as conn:
            count, earliest = await conn.fetchrow(Q["session_stats"], self._usable())
        return int(count), None if earliest is None else float(earliest)

    async def next_session_expiry(self) -> float | None:
        async with self._db.connection() as conn:
            earliest = await conn.fetchval(Q["next_session_expiry"], self._usable())
        return None if earliest is None else float(earliest)

    # --- administration (the rest: admin.py) -----------------------------------------------------

    async def replay(self, dead_ids: Iterable[int], now: float) -> int:
        async with self._db.connection() as conn:
            status = await conn.execute(Q["replay"], list(dead_ids), now, self.instance_id)
        moved = int(status.split()[-1])
        self._added(moved)
        self.new_work.set()
        return moved
