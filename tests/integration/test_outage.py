"""A long destination outage, driven by the clock rather than slept through, with a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segment_relay.service import FORWARDER, STORE
from segment_relay.testing import FakeInfinario, Reply
from support import make_config, post, running_fake, running_relay

T0 = 1_709_294_400.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def track(n: int) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": "u1",
        "event": "e",
        "messageId": f"m{n}",
        "timestamp": "2024-03-01T12:00:00Z",
        "properties": {"n": n},
    }


async def test_hours_of_outage_and_a_restart_lose_nothing(tmp_path: Path) -> None:
    clock = Clock(T0)
    up = False
    fake = FakeInfinario()
    fake.responder = lambda commands: Reply() if up else Reply(status=503)
    config_extra: dict[str, Any] = {
        "destination": {"retry": {"backoff_initial": "30s", "backoff_max": "10m"}}
    }
    async with running_fake(fake) as (_, api):
        config = make_config(tmp_path / "q.db", api.url, **config_extra)
        async with running_relay(config, clock=clock) as relay:
            assert (await post(relay.url, "/v1/batch", {"batch": [track(n) for n in range(10)]}))[
                0
            ] == 200
            forwarder, store = relay.app[FORWARDER], relay.app[STORE]
            # Three hours of outage, ten minutes at a time: each time the backlog is due, it
            # is tried, refused and put back with a longer (capped) backoff.
            for _ in range(18):
                await forwarder.drain(until_empty=False)
                clock.now += 600
            stats = await store.stats(clock.now)
            assert (stats.pending, stats.dead_letters) == (10, {})
            [row] = await store.due(clock.now, (), 1)
            assert row.attempts >= 10
        # The relay restarts during the outage; the API comes back an hour later.
        async with running_relay(config, clock=clock) as relay:
            clock.now += 3600
            up = True
            await relay.app[FORWARDER].drain()
            assert relay.app[STORE].pending_count == 0
    assert [c["data"]["properties"]["n"] for c in fake.accepted] == list(range(10))
    assert sum(r.reply_status == 503 for r in fake.requests) >= 18
