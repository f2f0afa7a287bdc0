"""Group commit, the part of ingest every queue backend shares (docs/queue.md).

Concurrent requests share one transaction: whatever is pending is committed as soon as the
previous commit is done (a fixed collection window made closed-loop clients move in
lock-step). A request's `enqueue` returns only once its transaction committed, so the
receiver answers 200 for calls that are on disk. A backend subclasses GroupCommit and says
how one group of requests is committed (`_commit`) and what its failures mean
(`_commit_error`).
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import NamedTuple

from ..errors import StoreError, StoreFullError
from ..records import NewMessage
from .session_rows import ExpiryWatch

log = logging.getLogger(__name__)
Group = tuple[list[NewMessage], "asyncio.Future[int]"]


class Committed(NamedTuple):
    """What one group commit stored."""

    # Each request's count of new messages (the rest repeated an accepted messageId).
    counts: list[int]
    # session_start / session_end rows written with them, and how many of those started.
    session_rows: int
    started: int
    # The earliest expiry among the sessions written (None: none written).
    earliest_expiry: float | None


class GroupCommit(ABC):
    """The commit loop, backpressure and the counts the relay reports, for one backend."""

    def __init__(self, *, max_pending: int, pending: int, commits_at_once: int = 1) -> None:
        self._max_pending = max_pending
        # How many group commits may be in flight together. One: each takes whatever queued
        # while the previous one ran. More lets a server with several backends work on them
        # in parallel (PostgreSQL); requests in different commits are concurrent, so their
        # relative order is free (a call answered before another is sent is committed first).
        self._commits_at_once = commits_at_once
        self._pending_count = pending
        self._queue: list[Group] = []
        self._queued = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._closing = False
        self.new_work = asyncio.Event()
        self.expiry = ExpiryWatch()
        # Why the latest commit failed (None once one succeeds): /ready.
        self.commit_error: str | None = None
        self.sessions_started = 0
        self.sessions_ended = 0
        # Commits with session activity, and those that read the sessions (a cache missed).
        self.session_commits = self.session_commits_read = 0

    @abstractmethod
    async def _commit(self, groups: list[list[NewMessage]]) -> Committed:
        """Store the groups' messages, with the session events they cause, in one
        transaction; raise to fail every request of the commit."""

    @abstractmethod
    def _commit_error(self, exc: Exception) -> StoreError:
        """What a failed commit means for the requests that waited for it."""

    @property
    def pending_count(self) -> int:
        """Messages in the queue, as counted by this process (never below 0: on PostgreSQL a
        relay that only forwards removes what others added since the count was read)."""
        return max(self._pending_count, 0)

    @property
    def unavailable(self) -> str | None:
        """Why the latest commit failed, if it did: /ready answers 503 with it."""
        return self.commit_error

    def _start_committer(self) -> None:
        self._committer = asyncio.create_task(self._commit_loop(), name="queue-group-commit")

    async def _stop_committer(self) -> None:
        """Commit what is queued and stop the commit loop."""
        self._closing = True
        self._queued.set()
        try:
            if self._committer is not None:
                await self._committer
        finally:
            self._committer = None

    def _added(self, count: int) -> None:
        """`count` messages entered the queue outside a group commit (session ends, replays)."""
        self._pending_count += count
        if count:
            self.new_work.set()

    def _removed(self, count: int) -> None:
        self._pending_count -= count

    async def enqueue(self, messages: list[NewMessage]) -> int:
        """Commit `messages` durably; return how many were new (not duplicates).

        Returns only after the transaction holding them committed. Raises StoreFullError when
        the queue is over `max_pending` or the database is full, StoreError when it cannot
        be written.
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
        # A cancelled request (client gone) cancels only its future: the commit goes on, and
        # the committer skips futures that are already done.
        return await future

    async def _commit_loop(self) -> None:
        running: set[asyncio.Task[None]] = set()
        while True:
            await self._queued.wait()
            self._queued.clear()
            running = {task for task in running if not task.done()}
            if self._queue and len(running) >= self._commits_at_once:
                # Every commit slot is busy: what queues meanwhile goes with the next one.
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                self._queued.set()
                continue
            groups, self._queue = self._queue, []
            if groups and self._commits_at_once == 1:
                # In this task: a task per commit would hand the event loop over once more
                # per commit (bench/ingest.py on SQLite: single calls 0.46x -> 0.33x).
                await self._commit_groups(groups)
            elif groups:
                running.add(asyncio.create_task(self._commit_groups(groups), name="queue-commit"))
            if self._closing and not self._queue:
                await asyncio.gather(*running)
                return

    async def _commit_groups(self, groups: list[Group]) -> None:
        try:
            done = await self._commit([ms for ms, _ in groups])
        except Exception as exc:  # noqa: BLE001 - every waiting request must get an answer
            error = self._commit_error(exc)
            log.error(  # noqa: TRY400 - a full disk or a lost connection needs no traceback
                "queue commit failed: %s", error, extra={"action": "commit_failed"}
            )
            self.commit_error = str(error)
            for _, future in groups:
                if not future.done():
                    future.set_exception(error)
            return
        self.commit_error = None
        for (_, future), count in zip(groups, done.counts, strict=True):
            if not future.done():
                future.set_result(count)
        self._pending_count += sum(done.counts) + done.session_rows
        self.sessions_started += done.started
        self.sessions_ended += done.session_rows - done.started
        if done.started and done.earliest_expiry is not None:
            self.expiry.opened(done.earliest_expiry)
        if sum(done.counts) or done.session_rows:
            self.new_work.set()
