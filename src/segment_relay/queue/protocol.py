"""What a queue does: the seam between the relay and its queue backends (docs/queue.md).

The receiver, the forwarder, the session timer, the operator endpoints and the CLI use a queue
only through this Protocol. `queue/sqlite` (one process on one VM) and `queue/postgres`
(several relays on one database) are its two implementations; one contract suite
(tests/contract) runs against both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Protocol

from ..records import (
    DeadLetter,
    DueRead,
    Failure,
    Instance,
    NewMessage,
    QueuedMessage,
    QueueStats,
    Refusal,
)
from ..sessions import SessionRules
from .session_rows import ExpiryWatch

# A retry: the claimed message, when it is due again (wall clock), the error, and whether it
# counts as an attempt.
Retry = tuple[QueuedMessage, float, str, bool]


class Queue(Protocol):
    """The durable queue of accepted calls, their sessions and their dead letters."""

    # Set after every commit that stored something: the forwarder waits on it.
    new_work: asyncio.Event
    # Wakes the session timer for a session that expires before its deadline.
    expiry: ExpiryWatch
    sessions_started: int
    sessions_ended: int
    session_commits: int
    session_commits_read: int

    @property
    def where(self) -> str:
        """Where the queue is, for people: a path, or a URL without its password."""

    @property
    def unavailable(self) -> str | None:
        """Why the queue cannot take calls now (full, unreachable), or None: /ready."""

    @property
    def pending_count(self) -> int:
        """Messages in the queue as this process counts them (cheap, approximate)."""

    @property
    def poll_s(self) -> float:
        """How often an idle forwarder looks at the queue for work no wake-up told it of (a
        replay by the CLI; with several relays, calls another relay took for its users)."""

    @property
    def claims(self) -> int:
        """A number that changes whenever the buckets this process sends from change (a
        lease lost, given up or taken): rows read ahead may be another's now, and what
        earlier reads showed says nothing of a bucket taken over."""

    @property
    def session_rules(self) -> SessionRules | None:
        """The session rules the commits apply (None: sessions are off)."""

    async def close(self) -> None:
        """Commit what is queued, give up what this process holds, close."""

    # --- ingest ---------------------------------------------------------------------------------

    async def enqueue(self, messages: list[NewMessage]) -> int:
        """Commit `messages` (with the session events they cause) durably; return how many
        were new (not repeats of a messageId within the dedup window).

        Returns only once they are committed. StoreFullError past `queue.max_pending` or
        when the database is full; StoreError when it cannot be written.
        """

    # --- forwarding -----------------------------------------------------------------------------

    async def read_due(
        self, now: float, busy_users: Iterable[str], limit: int, after: int = 0
    ) -> DueRead:
        """Up to `limit` messages this process may send now, in acceptance order: due, no
        earlier message of their user waiting for a retry, users not in `busy_users`.
        `after`: a seq below which the caller knows nothing else is due (see DueRead)."""

    async def due(self, now: float, busy_users: Iterable[str], limit: int) -> list[QueuedMessage]:
        """The rows of `read_due` from the start."""

    async def next_retry_at(self) -> float | None:
        """When the earliest message in backoff this process may send becomes due."""

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
        """Write the outcome of a send in one transaction: `acked` leave the queue, `retry`
        wait, `dead` move to the dead letters; `counters` and `names` are added with them.
        Messages claimed under a lease this process no longer holds are left as they are:
        returns how many (their new owner sends them again)."""

    def sending(self, rows: Iterable[QueuedMessage]) -> None:
        """A batch of `rows` is in flight (their users' part of the queue is not handed to
        another relay before it ends)."""

    def done_sending(self, rows: Iterable[QueuedMessage]) -> None:
        """The batch `sending` was told of has ended (its outcome written or not)."""

    async def project_names(self) -> list[tuple[str, str]]:
        """(kind, name) of every event type and customer property key sent to the project."""

    # --- sessions -------------------------------------------------------------------------------

    async def expire_sessions(self, now: float, limit: int = 1000) -> int:
        """Close up to `limit` sessions idle at wall-clock `now` that this process may close;
        their session_end events are queued in the same transaction. Returns how many."""

    async def session_stats(self) -> tuple[int, float | None]:
        """Open sessions, and the earliest expiry among those this process may close."""

    async def next_session_expiry(self) -> float | None:
        """The earliest expiry among the sessions this process may close, or None."""

    # --- inspection and administration ----------------------------------------------------------

    async def stats(self, now: float) -> QueueStats:
        """Queue depth, backoff, oldest message, dead letters by reason, counters."""

    async def instances(self) -> list[Instance]:
        """The live relays sharing this queue and what each holds (empty: one process)."""

    async def note_destination(self, report: str) -> None:
        """Record this relay's view of the destination (JSON), for `status`."""

    async def destinations(self) -> list[tuple[str, str]]:
        """Each relay's view of the destination: (relay id, JSON); the id is "" on SQLite."""

    async def retry_now(self, now: float) -> int:
        """Make every message waiting for a retry at `now` due now; return how many."""

    async def dead_letters(
        self, limit: int = 100, reason: str | None = None, after: int = 0
    ) -> list[DeadLetter]:
        """Dead letters with id > `after`, oldest first, optionally only those with `reason`."""

    async def dead_letter(self, dead_id: int) -> DeadLetter | None:
        """One dead letter by id, or None."""

    async def replay(self, dead_ids: Iterable[int], now: float) -> int:
        """Move dead letters back to the queue in their original order; return how many. A
        message refused at ingest (DeadLetter.refused) stays: it needs a fix first. A fixed
        one takes its place after everything queued."""

    async def keep_refused(self, refusals: Sequence[Refusal]) -> None:
        """Keep messages refused at ingest as dead letters (committed on return)."""

    async def fix_dead_letter(self, dead_id: int, message: NewMessage, detail: str) -> bool:
        """Replace a dead letter's message with `message` (validated by the caller), its
        reason becoming "fixed" with `detail`; False when there is no such dead letter."""

    async def purge_dead_letters(self, older_than: float) -> int:
        """Delete dead letters last tried before `older_than`; return how many."""

    async def prune_dedup(self, now: float) -> int:
        """Forget messageIds older than the dedup window; return how many."""

    # --- backfill (docs/operations.md, "Importing archives") ------------------------------------

    async def stage_imports(self, rows: Sequence[NewMessage]) -> int:
        """Keep imported messages apart from the queue, in order (committed on return); return
        how many. A messageId imported before (ever), or accepted live within the dedup
        window, is left out."""

    async def feed_imports(self, limit: int) -> int:
        """Move up to `limit` of the oldest imported messages into the queue; return how many.
        The relay calls it while live calls are not waiting."""

    async def imports_waiting(self) -> int:
        """Imported messages not yet moved into the queue."""
