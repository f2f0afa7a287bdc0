"""Which users' messages this relay forwards: buckets and their leases (docs/queue.md).

Pure: no SQL here, times passed in. Users hash into BUCKETS buckets; each bucket is leased to
one live relay, which alone forwards its users' messages (so their order holds) and closes
their sessions. The store renews and takes leases on the database's clock; this class keeps
what the last renewal said, and until when (on this process's monotonic clock) it may be
trusted: a lease renewed at t is good until t + lease on the database's clock, and t here
came before the database's now, so a bucket is never taken for good by this process after
another could have taken it over.
"""

from __future__ import annotations

import math
import time
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

BUCKETS = 64


def lease_clock() -> float:
    """The clock leases are trusted by: CLOCK_BOOTTIME where there is one, which goes on
    while the machine is suspended (CLOCK_MONOTONIC stops), so that a relay that wakes up
    knows its leases ran out."""
    return (
        time.clock_gettime(time.CLOCK_BOOTTIME)
        if hasattr(time, "CLOCK_BOOTTIME")
        else time.monotonic()
    )


def bucket_of(user_key: str) -> int:
    """The user's bucket: the same in every relay and every release."""
    return zlib.crc32(user_key.encode()) % BUCKETS


def share(buckets: int, forwarders: int) -> int:
    """How many buckets one of `forwarders` live relays aims to hold."""
    return math.ceil(buckets / max(forwarders, 1))


@dataclass
class Leases:
    """This relay's leases as last renewed."""

    lease_s: float
    # bucket -> epoch of the leases held.
    held: dict[int, int] = field(default_factory=dict)
    # Until when (time.monotonic()) the leases held may be used.
    valid_until: float = 0.0
    # Buckets being given up (bucket -> when that began): no longer read from, released once
    # the batches claimed before have had time to finish.
    draining: dict[int, float] = field(default_factory=dict)
    # Changes whenever a bucket is lost, given up or taken (see Queue.claims).
    changes: int = 0
    # Batches in flight per bucket (a batch counts once in each of its users' buckets): a
    # bucket being given up is released only once they have ended.
    sending: Counter[int] = field(default_factory=Counter)

    def renewed(self, held: Iterable[tuple[int, int]], sent_at: float) -> list[int]:
        """Take the leases a renewal sent at `sent_at` returned; return the buckets lost."""
        now_held = dict(held)
        lost = [b for b in self.held if now_held.get(b) != self.held[b]]
        self.held = now_held
        self.valid_until = sent_at + self.lease_s * 0.9
        for bucket in lost:
            self.draining.pop(bucket, None)
        if lost:
            self.changes += 1
        return lost

    def gained(self, taken: Iterable[tuple[int, int]]) -> list[int]:
        """Add buckets just acquired; return them."""
        new = dict(taken)
        self.held.update(new)
        if new:
            self.changes += 1
        return sorted(new)

    def expired(self, now: float) -> bool:
        """Whether the leases could not be renewed in time: nothing may be sent from them."""
        return now >= self.valid_until

    def usable(self, now: float) -> list[int]:
        """The buckets whose messages may be claimed now."""
        if self.expired(now):
            return []
        return sorted(b for b in self.held if b not in self.draining)

    def drain(self, target: int, now: float) -> None:
        """Begin to give up what is held over `target` (the highest buckets first)."""
        excess = len(self.held) - target
        keep = [b for b in sorted(self.held) if b not in self.draining]
        for bucket in reversed(keep):
            if excess <= len(self.draining):
                break
            self.draining[bucket] = now
            self.changes += 1

    def to_release(self, now: float, after_s: float) -> list[int]:
        """The buckets drained for `after_s` with no batch in flight, or drained for a whole
        lease (a batch retried that long is its new owner's to send again): ready to be
        released."""
        ready = [
            b
            for b, since in self.draining.items()
            if now - since >= self.lease_s or (now - since >= after_s and not self.sending[b])
        ]
        for bucket in ready:
            del self.draining[bucket]
            self.held.pop(bucket, None)
        return sorted(ready)

    def lose_all(self) -> None:
        if self.held:
            self.changes += 1
        self.held.clear()
        self.draining.clear()
        self.valid_until = 0.0
