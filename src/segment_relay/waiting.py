"""One wait for whichever comes first of several asyncio events and a timeout
(docs/architecture.md, "One wait": "new work, timer or stop" is one wait, never a loop of
polls)."""

from __future__ import annotations

import asyncio


async def first_set(*events: asyncio.Event, timeout_s: float | None = None) -> bool:
    """Wait until one of `events` is set or `timeout_s` passes; return whether one was set."""
    if any(event.is_set() for event in events):
        return True
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        done, _ = await asyncio.wait(
            waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)
