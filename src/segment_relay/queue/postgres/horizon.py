"""Up to which seq a read of the PostgreSQL queue saw everything (docs/queue.md, "Reads
that skip").

Pure: no SQL here. The forwarder skips what earlier reads showed (batching.Coverage): without
that, a user with a long backlog and a batch in flight makes every read step over the whole
backlog to find nothing else (bench/pg.py: PostgreSQL's CPU per call forwarded grew with the
backlog). But a seq is handed out before its transaction commits, so a read can see seq 150
while seq 100 is not committed yet; a later read that starts after 150 would step over 100,
and send that user's later calls before it.

So a read trusts only seqs that every transaction which could still commit them has ended
for. Each read reports its snapshot's `xmin` (the oldest transaction id still running) and
the sequence's last value, read after the snapshot was taken; a read takes a transaction id
of its own (`pg_current_xact_id()`) at most every XID_EVERY_S. Every path that takes a seq
has its transaction id first (its insert is joined with `pg_current_xact_id()`, or it locks
a row first), so a seq handed out by the time one read read the sequence belongs to a
transaction id below the id a later read takes. A snapshot taken after that read committed
lists every transaction below its id that still runs: once such a snapshot's `xmin` is above
that id, those transactions have all ended, and the seqs up to the earlier read's value are
committed or never will be. (A snapshot's `xmax` would not do: it is the latest completed id
+ 1, and a transaction newer than that which still runs is left out of `xmin`.) The sequence
must hand out one value at a time: a cached sequence would break this.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

# Reads remembered while their seqs wait to be trusted (each newer one covers the older).
PENDING = 8
# A read takes a transaction id at most this often (each is a write to commit, and an id
# spent); the reads between still show how far the others' ids have ended.
XID_EVERY_S = 0.1


@dataclass
class Horizon:
    # Every seq up to it has been committed or will never be.
    trusted: int = 0
    # (seq value, xid): the seqs up to the value are trusted once a read's xmin passes xid.
    _pending: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=PENDING))
    # The sequence's last value at the previous read.
    _allocated: int | None = None
    _xid_at: float = -math.inf

    def wants_xid(self, tick: float) -> bool:
        """Whether the read about to go at `tick` (monotonic) is to take a transaction id."""
        if tick - self._xid_at < XID_EVERY_S:
            return False
        self._xid_at = tick
        return True

    def read(self, xmin: int, xid: int | None, allocated: int) -> int:
        """Take in one read's snapshot's xmin, the read's own transaction id (None: it took
        none) and the sequence's last value (read during it); return up to which seq that
        read saw every message that will ever have one."""
        if self._allocated is not None and xid is not None:
            self._pending.append((self._allocated, xid))
        self._allocated = allocated
        while self._pending and self._pending[0][1] < xmin:
            self.trusted = max(self.trusted, self._pending.popleft()[0])
        return self.trusted

    def looked(self, xmin: int, xid: int | None, allocated: int, last_seq: int | None) -> int:
        """DueRead.looked for a read: up to `last_seq` when it stopped at its limit there,
        else as far as it saw everything."""
        trusted = self.read(xmin, xid, allocated)
        return trusted if last_seq is None else min(trusted, last_seq)
