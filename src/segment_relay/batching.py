"""Pure forwarding policy: which due messages make a batch, and how long to back off.

No I/O and no clock reads: callers pass the rows and `now`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from .config import RetryConfig
from .records import QueuedMessage

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
