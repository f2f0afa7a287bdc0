"""waiting.first_set: one wait for whichever event is set first, or the timeout."""

from __future__ import annotations

import asyncio

from segment_relay.waiting import first_set


def _waits_left() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def test_an_event_set_while_waiting_ends_the_wait() -> None:
    a, b = asyncio.Event(), asyncio.Event()
    asyncio.get_running_loop().call_soon(b.set)
    assert await first_set(a, b, timeout_s=30)
    await asyncio.sleep(0)  # let the cancelled wait on `a` finish cancelling
    assert not _waits_left()


async def test_an_event_already_set_returns_at_once() -> None:
    a, b = asyncio.Event(), asyncio.Event()
    a.set()
    assert await first_set(a, b)  # no timeout: it would hang if it waited


async def test_the_timeout_ends_the_wait_when_no_event_is_set() -> None:
    a = asyncio.Event()
    assert not await first_set(a, timeout_s=0)
    await asyncio.sleep(0)
    assert not _waits_left()
