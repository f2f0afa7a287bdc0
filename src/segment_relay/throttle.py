"""A log line that a client could make repeat for every request, at most once per interval
per kind (pure: the clock is passed in)."""

from __future__ import annotations

import time
from collections.abc import Callable


class Throttle:
    """Lets one event per key through every `interval_s`; counts the ones it held back."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def let_through(self, key: str) -> int | None:
        """None: hold this one back. Else, how many of `key` were held back since the last
        one let through."""
        now = self._clock()
        if now < self._next.get(key, now):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._next[key] = now + self.interval_s
        return self._held.pop(key, 0)
