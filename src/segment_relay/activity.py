"""What the forwarder did, told as one log line an interval instead of one line a batch
(docs/operations.md, "Logs"). Pure: the clock is passed in."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

SUMMARY_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Summary:
    """The outcomes of the batches sent over `seconds`."""

    seconds: float
    delivered: int
    retried: int
    dead_lettered: Counter[str]

    def __str__(self) -> str:
        dead = sum(self.dead_lettered.values())
        reasons = ", ".join(f"{why}: {n}" for why, n in sorted(self.dead_lettered.items()))
        return (
            f"forwarded in the last {self.seconds:.0f}s: {self.delivered} delivered, "
            f"{self.retried} to retry, {dead} dead-lettered" + (f" ({reasons})" if reasons else "")
        )

    def fields(self) -> dict[str, object]:
        """The counts as a JSON log line's fields."""
        return {
            "interval_s": round(self.seconds, 1),
            "delivered": self.delivered,
            "retried": self.retried,
            "dead_lettered": dict(self.dead_lettered),
        }


class Activity:
    """Counts outcomes; `due()` hands out a Summary once an interval has passed since the
    last one, when anything happened."""

    def __init__(
        self, interval_s: float = SUMMARY_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._start = clock()
        self._reset()

    def _reset(self) -> None:
        self._delivered = self._retried = 0
        self._dead: Counter[str] = Counter()

    def add(self, *, delivered: int, retried: int, dead_lettered: Counter[str]) -> None:
        """Outcomes written: of a batch sent, or of messages expired or the mapping refused."""
        self._delivered += delivered
        self._retried += retried
        self._dead.update(dead_lettered)

    def due(self) -> Summary | None:
        now = self._clock()
        if now - self._start < self.interval_s:
            return None
        return self.flush()

    def flush(self) -> Summary | None:
        """The summary of what was counted since the last one (None: nothing happened)."""
        now = self._clock()
        summary = (
            Summary(now - self._start, self._delivered, self._retried, self._dead)
            if self._delivered or self._retried or self._dead
            else None
        )
        self._start = now
        self._reset()
        return summary
