"""Pure forwarding policy: which due messages make a batch, and how long to back off.

No I/O and no clock reads: callers pass the rows and `now`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import RetryConfig
from .records import DueRead, QueuedMessage

_RANDOM = random.Random()
CUSTOMER_UPDATES = frozenset({"identify", "alias", "group"})


@dataclass(frozen=True)
class Selection:
    """A batch to send now, or the time to look again when it should linger."""

    batch: list[QueuedMessage]
    wait_until: float | None = None


def select_batch(
    rows: Sequence[QueuedMessage], batch_size: int, linger_s: float, now: float
) -> Selection:
    """Take up to `batch_size` rows in order, keeping each user's commands in order.

    A customer update (identify, alias, group) is never batched with commands of the same
    user: a per-command `retry` could otherwise reorder it. A batch that is not full waits
    until its oldest row has lingered `linger_s`, so that calls arriving together travel
    together.
    """
    batch: list[QueuedMessage] = []
    users_in_batch: set[str] = set()
    closed_users: set[str] = set()
    for row in rows:
        user = row.user_key
        if user in closed_users:
            continue
        if row.type in CUSTOMER_UPDATES:
            closed_users.add(user)
            if user in users_in_batch:
                continue
        batch.append(row)
        users_in_batch.add(user)
        if len(batch) >= batch_size:
            return Selection(batch)
    if not batch:
        return Selection([])
    oldest = min(r.received_at if r.attempts == 0 else r.next_attempt_at for r in batch)
    if oldest + linger_s > now:
        return Selection([], wait_until=oldest + linger_s)
    return Selection(batch)


def durable_delay(attempts: int, retry: RetryConfig, rand: random.Random | None = None) -> float:
    """Seconds until the next try of a message that failed `attempts` times (>= 1).

    Exponential from `backoff_initial` doubling per attempt, capped at `backoff_max`, with
    jitter in [50%, 100%] so that messages failed together do not all return together.
    """
    base = retry.backoff_initial_s * (2.0 ** min(max(attempts - 1, 0), 32))
    capped = min(base, retry.backoff_max_s)
    fraction = (rand or _RANDOM).random()
    return capped * (0.5 + 0.5 * fraction)


@dataclass
class Coverage:
    """What the forwarder's reads of the queue have shown, so that a read can skip it.

    Every message with a seq up to `seq` is not due or belongs to a user in `users`. While
    all of those users have a batch in flight, a read may start after `seq`. Without this, a
    user with a long backlog and a batch in flight made each read step over that whole backlog
    to find nothing else (one user's 20,000 queued messages cost the SQLite reader thread
    100 us per message forwarded).
    """

    seq: int = 0
    users: set[str] = field(default_factory=set)
    # The replay count of the last read (DueRead.replayed).
    replayed: int | None = None

    def after(self, busy: set[str]) -> int:
        """Where a read with these users busy may start."""
        return self.seq if self.users <= busy else 0

    def forget(self) -> None:
        """Something may have made a message up to `seq` due (a retry's time came)."""
        self.seq, self.users = 0, set()

    def note_replays(self, read: DueRead, after: int) -> bool:
        """Take in `read`'s replay count; return whether the read (started at `after`) may have
        stepped over messages that came back: dead letters replayed (by the CLI, another
        process) under their old seqs. A changed count also forgets what earlier reads showed."""
        replayed, self.replayed = self.replayed, read.replayed
        if replayed is None or replayed == read.replayed:
            return False
        # What earlier reads showed no longer holds; a read from the start is still whole.
        self.forget()
        return after != 0

    def update(self, read: DueRead, after: int, busy: set[str], limit: int) -> None:
        """Take in what `read` showed: up to `read.looked`, the messages it did not return are
        not due or are busy users'."""
        if not after and len(read.rows) < limit:
            # It looked at the whole queue: what was known before adds nothing.
            self.seq, self.users = read.looked, set(busy)
        else:
            # Up to the old `seq` the old users still cover it: they are all kept.
            self.seq = max(self.seq, read.looked)
            self.users |= busy
        self.users.update(r.user_key for r in read.rows)
