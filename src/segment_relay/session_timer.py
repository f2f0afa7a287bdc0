"""The one idle-session timer for all users.

It sleeps until the earliest session expiry (bounded by a poll interval, so a wall-clock jump
cannot strand it), closes the sessions due in batches, and is woken when a session opens.
Sessions that went idle while the daemon was down are closed by its first tick at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .errors import StoreError
from .queue.protocol import Queue
from .waiting import first_set

log = logging.getLogger(__name__)
POLL_S = 60.0
QUEUE_RETRY_S = 5.0
BATCH = 1000


class SessionTimer:
    """Closes idle sessions through the store, on the injected wall clock."""

    def __init__(
        self, store: Queue, clock: Callable[[], float] = time.time, poll_s: float = POLL_S
    ) -> None:
        self.store = store
        self.clock = clock
        self.poll_s = poll_s

    async def tick(self) -> int:
        """Close every session due now; return how many were closed."""
        closed = 0
        while True:
            count = await self.store.expire_sessions(self.clock(), BATCH)
            closed += count
            if count < BATCH:
                break
        if closed:
            log.info("closed %d idle sessions", closed, extra={"action": "sessions_closed"})
        return closed

    async def run(self, stop: asyncio.Event) -> None:
        """Tick at every expiry until `stop` is set.

        A session opened meanwhile wakes it only if it expires before the deadline it waits
        for (a new session's expiry is now plus the timeout, so that happens only when no
        session was open). While the timer ticks and reads its deadline, every session
        opened wakes it: the read may not see them.
        """
        changed = self.store.expiry.changed
        while not stop.is_set():
            self.store.expiry.watch(None)
            try:
                await self.tick()
                deadline = await self.store.next_session_expiry()
            except StoreError as exc:
                # The queue's database went away: the sessions wait there; try again soon.
                log.warning("cannot close idle sessions: %s", exc, extra={"action": "queue_down"})
                deadline = self.clock() + QUEUE_RETRY_S
            while not stop.is_set():
                self.store.expiry.watch(deadline)
                timeout = (
                    self.poll_s
                    if deadline is None
                    else min(self.poll_s, max(0.0, deadline - self.clock()))
                )
                if not await first_set(stop, changed, timeout_s=timeout):
                    break  # the deadline (or the poll interval) came: tick
                changed.clear()
                opened = self.store.expiry.take_opened()
                if opened is not None and (deadline is None or opened < deadline):
                    deadline = opened
