"""Destination outages and pauses, driven by an injected clock rather than slept through
(destination.py; docs/architecture.md, "Outages")."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import yaml

from segment_relay.config import parse_config
from segment_relay.destination import State
from segment_relay.service import FORWARDER, STORE
from segment_relay.testing import FakeInfinario, Reply
from support import config_dict, make_config, post, running_fake, running_relay

T0 = 1_709_294_400.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def track(n: int, user: str = "u1") -> dict[str, Any]:
    return {
        "type": "track",
        "userId": user,
        "event": "e",
        "messageId": f"m{n}",
        "timestamp": "2024-03-01T12:00:00Z",
        "properties": {"n": n},
    }


class Outage:
    """A fake API that answers `status` until `up` is set."""

    def __init__(self, status: int) -> None:
        self.up = False
        self.fake = FakeInfinario()
        self.fake.responder = lambda commands: Reply() if self.up else Reply(status=status)


def delivered(fake: FakeInfinario) -> list[tuple[str, int]]:
    return [
        (c["data"]["customer_ids"]["registered"], c["data"]["properties"]["n"])
        for c in fake.accepted
    ]


async def test_hours_of_outage_and_a_restart_lose_nothing_and_charge_nothing(
    tmp_path: Path,
) -> None:
    clock = Clock(T0)
    outage = Outage(503)
    fake = outage.fake
    async with running_fake(fake) as (_, api):
        config = make_config(tmp_path / "q.db", api.url)
        async with running_relay(config, clock=clock) as relay:
            assert (await post(relay.url, "/v1/batch", {"batch": [track(n) for n in range(10)]}))[
                0
            ] == 200
            forwarder, store = relay.app[FORWARDER], relay.app[STORE]
            # Three hours of outage, ten minutes at a time: one probe each time.
            for _ in range(18):
                await forwarder.drain(until_empty=False)
                clock.now += 600
            destination = forwarder.state.destination
            assert (destination.state, destination.since) == (State.DOWN, T0)
            assert "503" in destination.last_error
            stats = await store.stats(clock.now)
            assert (stats.pending, stats.in_backoff, stats.dead_letters) == (10, 0, {})
            rows = await store.due(clock.now, (), 10)
            assert [r.attempts for r in rows] == [0] * 10  # the outage charged no message
        # The relay restarts during the outage; the API comes back an hour later.
        async with running_relay(config, clock=clock) as relay:
            clock.now += 3600
            outage.up = True
            await relay.app[FORWARDER].drain()
            assert relay.app[STORE].pending_count == 0
    assert [n for _, n in delivered(fake)] == list(range(10))
    # One request when it went down (2 quick tries), then one a probe.
    assert sum(r.reply_status == 503 for r in fake.requests) == 2 + 17


async def test_an_outage_of_hours_ends_within_one_probe_interval_in_every_users_order(
    tmp_path: Path,
) -> None:
    clock = Clock(T0)
    outage = Outage(502)
    fake = outage.fake
    async with running_fake(fake) as (_, api):
        config = make_config(tmp_path / "q.db", api.url, destination={"max_age": "1d"})
        async with running_relay(config, clock=clock) as relay:
            forwarder = relay.app[FORWARDER]
            destination = forwarder.state.destination
            for n in range(3):  # 3 calls each of 20 users, acked one after another
                batch = [track(n * 20 + u, f"u{u}") for u in range(20)]
                assert (await post(relay.url, "/v1/batch", {"batch": batch}))[0] == 200
            await forwarder.drain(until_empty=False)
            assert destination.state is State.DOWN
            # Four hours: probe after probe, each when it is due.
            intervals = []
            while clock.now < T0 + 4 * 3600:
                intervals.append(destination.next_probe - clock.now)
                clock.now = destination.next_probe
                await forwarder.drain(until_empty=False)
            assert intervals[:6] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
            assert set(intervals[6:]) == {30.0}
            back = clock.now + 7.0  # the destination returns between two probes
            outage.up = True
            clock.now = destination.next_probe
            assert clock.now - back <= 30.0  # within one probe interval
            await forwarder.drain()
            assert (destination.state, destination.reason) == (State.UP, "")
            assert (await relay.app[STORE].stats(clock.now)).dead_letters == {}
    for user in range(20):
        mine = [n for u, n in delivered(fake) if u == f"u{user}"]
        assert mine == [user, 20 + user, 40 + user]


async def test_a_wrong_token_pauses_keeps_every_message_and_a_reload_resumes(
    tmp_path: Path,
) -> None:
    clock = Clock(T0)
    fake = FakeInfinario(token="RIGHT")  # the legacy API: each command refused alike
    async with running_fake(fake) as (_, api):
        settings = config_dict(
            tmp_path / "q.db",
            api.url,
            destination={"project_token": "WRONG", "credentials_probe": "1m"},
            sessions={"enabled": False},
        )
        async with running_relay(parse_config(yaml.safe_dump(settings)), clock=clock) as relay:
            forwarder = relay.app[FORWARDER]
            destination = forwarder.state.destination
            for n in range(4):
                batch = [track(n * 10 + u, f"u{n}-{u}") for u in range(10)]
                assert (await post(relay.url, "/v1/batch", {"batch": batch}))[0] == 200
            await forwarder.drain(until_empty=False)
            assert (destination.state, destination.reason) == (State.PAUSED, "configuration")
            assert "not this project's token" in destination.last_error
            # The probe a minute later finds the same: still paused, nothing dead-lettered.
            clock.now += 60
            await forwarder.drain(until_empty=False)
            assert destination.state is State.PAUSED
            stats = await relay.app[STORE].stats(clock.now)
            assert (stats.pending, stats.dead_letters, stats.in_backoff) == (40, {}, 0)
            # The operator fixes the token and reloads (SIGHUP): forwarding resumes at once.
            settings["destination"]["project_token"] = "RIGHT"
            forwarder.reload(parse_config(yaml.safe_dump(settings)))
            await forwarder.drain()
            assert (destination.state, destination.reason) == (State.UP, "")
    assert sorted(n for _, n in delivered(fake)) == list(range(40))


async def test_max_age_still_dead_letters_during_an_outage(tmp_path: Path) -> None:
    clock = Clock(T0)
    outage = Outage(503)
    async with running_fake(outage.fake) as (_, api):
        config = make_config(tmp_path / "q.db", api.url, destination={"max_age": "1h"})
        async with running_relay(config, clock=clock) as relay:
            assert (await post(relay.url, "/v1/batch", {"batch": [track(n) for n in range(3)]}))[
                0
            ] == 200
            forwarder, store = relay.app[FORWARDER], relay.app[STORE]
            destination = forwarder.state.destination
            await forwarder.drain(until_empty=False)
            while store.pending_count and clock.now < T0 + 2 * 3600:  # up to two hours
                clock.now = destination.next_probe
                await forwarder.drain(until_empty=False)
            assert T0 + 3600 < clock.now <= T0 + 3600 + 30  # at the first probe past an hour
            stats = await store.stats(clock.now)
            assert (stats.pending, stats.dead_letters) == (0, {"expired": 3})


async def test_one_batch_that_fails_on_its_own_does_not_hold_the_relay(tmp_path: Path) -> None:
    """A user whose messages make the destination answer 503 every time, sent first, alone in
    flight: it looks like an outage, but the next probe is other users', it works, and that
    user's messages then back off as theirs (in the queue, charged)."""
    clock = Clock(T0)
    fake = FakeInfinario()

    def poisoned(commands: list[dict[str, Any]]) -> Reply:
        ids = {c["data"]["customer_ids"]["registered"] for c in commands}
        return Reply(status=503) if "poison" in ids else Reply()

    fake.responder = poisoned
    async with running_fake(fake) as (_, api):
        config = make_config(
            tmp_path / "q.db", api.url, destination={"concurrency": 1, "batch_size": 2}
        )
        async with running_relay(config, clock=clock) as relay:
            calls = [track(0, "poison"), track(1, "poison")] + [
                track(n, f"u{n}") for n in range(2, 8)
            ]
            assert (await post(relay.url, "/v1/batch", {"batch": calls}))[0] == 200
            forwarder, store = relay.app[FORWARDER], relay.app[STORE]
            destination = forwarder.state.destination
            for _ in range(10):  # bounded: each turn a probe or a batch when due
                await forwarder.drain(until_empty=False)
                if not (await store.due(clock.now, (), 10)):
                    break
                clock.now = max(clock.now + 0.5, destination.next_probe)
            assert destination.state is State.UP
            stats = await store.stats(clock.now)
            assert (stats.pending, stats.in_backoff) == (2, 2)
            assert [r.attempts for r in await store.due(clock.now + 3600, (), 10)] == [1, 1]
    assert sorted(n for _, n in delivered(fake)) == list(range(2, 8))


async def test_max_age_holds_for_calls_read_ahead_while_a_batch_was_in_flight(
    tmp_path: Path,
) -> None:
    """A user's calls read ahead wait for the batch in flight before them; when that batch
    takes past destination.max_age (the clock jumps while the destination holds it), they
    are dead-lettered as expired, as a fresh read would have them, not sent."""
    clock = Clock(T0)
    fake = FakeInfinario()
    fake.gate = asyncio.Event()
    async with running_fake(fake) as (_, api):
        config = make_config(
            tmp_path / "q.db",
            api.url,
            destination={"max_age": "1h", "batch_size": 2, "concurrency": 2, "linger": "0s"},
        )
        async with running_relay(config, clock=clock) as relay:
            # One read takes a1-a4; a1, a2 go, a3, a4 wait for them; b5, b6 go in the other lane.
            calls = [track(n, "a") for n in range(1, 5)] + [track(n, "b") for n in (5, 6)]
            assert (await post(relay.url, "/v1/batch", {"batch": calls}))[0] == 200
            await fake.wait_for(lambda f: f.held >= 2)
            clock.now = T0 + 2 * 3600
            fake.gate.set()
            forwarder, store = relay.app[FORWARDER], relay.app[STORE]
            await forwarder.drain(until_empty=False)
            stats = await store.stats(clock.now)
            assert (stats.pending, stats.dead_letters) == (0, {"expired": 2})
    assert sorted(delivered(fake)) == [("a", 1), ("a", 2), ("b", 5), ("b", 6)]
