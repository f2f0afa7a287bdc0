"""The forwarder against the scripted fake API: every outcome row of docs/api.md."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from segment_relay.config import Config
from segment_relay.forward import IDLE_POLL_S
from segment_relay.queue.sqlite import SqliteQueue
from segment_relay.service import FORWARDER, METRICS, STORE
from segment_relay.testing import FakeInfinario, Reply, random_faults
from support import Server, make_config, post, running_fake, running_relay

T0 = "2024-03-01T12:00:00.000Z"


def track(user: str, n: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": user,
        "event": "e",
        "messageId": f"{user}-{n}",
        "timestamp": T0,
        "properties": {"n": n},
        **extra,
    }


def identify(user: str, n: int) -> dict[str, Any]:
    return {
        "type": "identify",
        "userId": user,
        "messageId": f"{user}-{n}",
        "timestamp": T0,
        "traits": {"n": n},
    }


def key(command: dict[str, Any]) -> tuple[str, int]:
    data = command["data"]
    ids = data.get("customer_ids") or data.get("ids")
    return ids["registered"], int(data["properties"]["n"])


# One user's backlog, posted as one batch, and its calls as delivered in order.
BIG = [track("big", n) for n in range(1, 21)]
BIG_KEYS = [("big", n) for n in range(1, 21)]


def backlog_config(queue_path: Path, api: Server, **destination: Any) -> Config:
    """Two commands a request, sent at once: BIG makes ten requests, one in flight at a time."""
    return make_config(
        queue_path, api.url, destination={"batch_size": 2, "linger": "0s", **destination}
    )


async def hold_backlog(relay: Server, fake: FakeInfinario) -> None:
    """Close the fake's gate and post BIG; return once a request waits at the gate."""
    fake.gate = asyncio.Event()
    assert (await post(relay.url, "/v1/batch", {"batch": BIG}))[0] == 200
    await fake.wait_for(lambda f: f.held >= 1)


async def release(fake: FakeInfinario, count: int) -> list[tuple[str, int]]:
    """Open the fake's gate; once `count` commands are in, what was delivered (BIG in order)."""
    assert fake.gate is not None
    fake.gate.set()
    delivered = [key(c) for c in await fake.wait_for_commands(count)]
    assert [k for k in delivered if k[0] == "big"] == BIG_KEYS
    return delivered


async def test_retry_after_pauses_every_lane(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    fake, api = fake_api
    fake.script.append(Reply(status=429, headers={"Retry-After": "1"}))
    async with running_relay(
        make_config(queue_path, api.url, destination={"concurrency": 4})
    ) as relay:
        assert (await post(relay.url, "/v1/batch", {"batch": [track("a", 1)]}))[0] == 200
        await fake.wait_for(lambda f: len(f.requests) >= 1)
        refused_at = fake.requests[0].at
        # Another user's call, in another lane, after the 429: it waits for Retry-After too.
        assert (await post(relay.url, "/v1/batch", {"batch": [track("b", 1)]}))[0] == 200
        await fake.wait_for_commands(2)
        await relay.app[FORWARDER].drain()
    assert [r.reply_status for r in fake.requests[:1]] == [429]
    assert all(r.at - refused_at >= 1.0 for r in fake.requests[1:])
    assert sorted(key(c) for c in fake.accepted) == [("a", 1), ("b", 1)]


async def test_timeouts_and_resets_are_retried(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    fake, api = fake_api
    fake.script.extend([Reply(drop=True, delay_s=1.0), Reply(drop=True)])
    config = make_config(queue_path, api.url, destination={"timeout": "300ms"})
    async with running_relay(config) as relay:
        assert (await post(relay.url, "/v1/batch", {"batch": [track("a", 1)]}))[0] == 200
        await fake.wait_for_commands(1)
        await fake.wait_for(lambda f: len(f.requests) >= 3)  # the stalled one ends last
        retried = relay.app[METRICS].registry.get_sample_value("segment_relay_commands_sent_total")
    assert retried == 3
    assert sorted(r.reply_status for r in fake.requests) == [0, 0, 200]
    assert [key(c) for c in fake.accepted] == [("a", 1)]


async def test_refused_credentials_pause_forwarding_until_they_work(queue_path: Path) -> None:
    fake = FakeInfinario(api_key="RIGHT")
    async with running_fake(fake) as (_, api):
        config = make_config(
            queue_path,
            api.url,
            destination={"api": "exponea", "api_key": "WRONG", "credentials_probe": "100ms"},
        )
        async with running_relay(config) as relay:
            assert (await post(relay.url, "/v1/batch", {"batch": [track("a", 1), track("b", 1)]}))[
                0
            ] == 200
            await fake.wait_for(lambda f: len(f.requests) >= 2)
            async with (
                aiohttp.ClientSession() as session,
                session.get(relay.url + "/ready") as response,
            ):
                ready = await response.json()
            assert response.status == 503
            assert "credentials refused" in ready["reasons"][0]
            store = relay.app[STORE]
            assert await store.dead_letters() == []
            assert store.pending_count == 2
            fake.api_key = "WRONG"  # the operator fixes the key on the destination's side
            await fake.wait_for_commands(2)
            async with (
                aiohttp.ClientSession() as session,
                session.get(relay.url + "/ready") as response,
            ):
                assert response.status == 200
    assert all(r.reply_status == 401 for r in fake.requests[:2])


async def test_a_whole_request_4xx_is_split_to_dead_letter_only_the_bad_command(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    fake, api = fake_api

    def refuse_bad(commands: list[Any]) -> Reply:
        bad = any(c["data"]["properties"].get("bad") for c in commands)
        return (
            Reply(status=400, body={"success": False, "message": "invalid property"})
            if bad
            else Reply()
        )

    fake.responder = refuse_bad
    batch = [
        track("a", 1),
        track("b", 1, properties={"n": 1, "bad": True}),
        track("c", 1),
        track("d", 1),
        track("b", 2),
    ]
    async with running_relay(make_config(queue_path, api.url)) as relay:
        assert (await post(relay.url, "/v1/batch", {"batch": batch}))[0] == 200
        await fake.wait_for_commands(4)
        await relay.app[FORWARDER].drain()
        [dead] = await relay.app[STORE].dead_letters()
    assert (dead.message_id, dead.reason, dead.response_status) == ("b-1", "refused", 400)
    assert "invalid property" in (dead.response_body or "")
    assert sorted(key(c) for c in fake.accepted) == [("a", 1), ("b", 2), ("c", 1), ("d", 1)]


async def test_one_user_stuck_in_retries_holds_back_no_one_else(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    fake, api = fake_api

    def stuck(commands: list[Any]) -> Reply:
        return Reply(commands=["retry" if key(c)[0] == "stuck" else "ok" for c in commands])

    fake.responder = stuck
    config = make_config(queue_path, api.url, destination={"retry": {"command_retry": "20ms"}})
    async with running_relay(config) as relay:
        assert (
            await post(relay.url, "/v1/batch", {"batch": [track("stuck", 1), track("stuck", 2)]})
        )[0] == 200
        await fake.wait_for(
            lambda f: sum(key(c) == ("stuck", 1) for r in f.requests for c in r.commands) >= 3
        )
        assert (
            await post(relay.url, "/v1/batch", {"batch": [track(f"u{i}", 1) for i in range(5)]})
        )[0] == 200
        delivered = await fake.wait_for_commands(5)
        await relay.app[FORWARDER].drain(until_empty=False)
        assert relay.app[STORE].pending_count == 2
    # Each other user's call went out in the first request after it arrived: never held back.
    sent = [key(c) for r in fake.requests for c in r.commands if key(c)[0] != "stuck"]
    assert sorted(sent) == sorted(key(c) for c in delivered) == [(f"u{i}", 1) for i in range(5)]
    # The stuck user's later call never went out without the first ahead of it.
    for request in fake.requests:
        keys = [key(c) for c in request.commands]
        if ("stuck", 2) in keys:
            assert keys.index(("stuck", 1)) < keys.index(("stuck", 2))


async def test_a_command_retry_goes_out_when_due_without_other_traffic(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    # The forwarder remembers the earliest retry time between wake-ups; the one it writes must
    # make it look again, or the retry waits for the idle poll (forward.IDLE_POLL_S, 5 s).
    fake, api = fake_api
    fake.script.append(Reply(commands=["retry"]))
    config = make_config(
        queue_path, api.url, destination={"retry": {"command_retry": "100ms"}, "linger": "0s"}
    )
    async with running_relay(config) as relay:
        assert (await post(relay.url, "/v1/batch", {"batch": [track("a", 1)]}))[0] == 200
        await fake.wait_for_commands(1, timeout_s=IDLE_POLL_S - 1)
    first, second = fake.requests
    assert [r.results[0]["status"] for r in (first, second)] == ["retry", "ok"]
    assert second.at - first.at >= 0.1


@pytest.mark.parametrize("linger", ["0s", "300ms"])
async def test_a_user_with_a_backlog_in_flight_hides_no_one_who_comes_later(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path, linger: str
) -> None:
    # While "big" has a batch in flight, reads start after what earlier reads covered (all of
    # big's backlog): a call of another user that arrives later must still be found. With a
    # linger, the reads that found only big's rows wait no longer than that call's linger
    # (it goes while big's batch is still held).
    fake, api = fake_api
    async with running_relay(backlog_config(queue_path, api, linger=linger)) as relay:
        await hold_backlog(relay, fake)
        assert (await post(relay.url, "/v1/track", track("late", 1)))[0] == 200
        # One batch per user is in flight: the second held request is late's.
        await fake.wait_for(lambda f: f.held >= 2, timeout_s=IDLE_POLL_S - 1)
        assert ("late", 1) in await release(fake, 21)


async def test_calls_of_a_user_with_a_batch_in_flight_are_not_read_for_until_it_ends(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    # A read while "big" has a batch in flight finds nothing of big's to send. Until that batch
    # ends, more of big's calls cannot go, and calls of others only after their linger or as a
    # full batch: a commit is no reason to read again (each read is a query, and one user's
    # steady stream made one per commit).
    fake, api = fake_api
    config = make_config(queue_path, api.url, destination={"batch_size": 50, "linger": "3s"})
    async with running_relay(config) as relay:
        metrics = relay.app[METRICS].registry
        fake.gate = asyncio.Event()
        backlog = [track("big", n) for n in range(1, 61)]
        assert (await post(relay.url, "/v1/batch", {"batch": backlog}))[0] == 200
        await fake.wait_for(lambda f: f.held >= 1)
        reads = metrics.get_sample_value("segment_relay_queue_reads_total")
        assert reads is not None
        started = time.monotonic()
        for n in range(61, 81):  # 20 commits, fewer calls than a batch
            assert (await post(relay.url, "/v1/track", track("big", n)))[0] == 200
        # One read may still come (the one after the rate limit's 12.5 ms, which finds big
        # busy, if the gate held big's batch first), and one more each linger a slow machine
        # took over the posts.
        allowed = reads + 1 + (time.monotonic() - started) // 3
        assert (metrics.get_sample_value("segment_relay_queue_reads_total") or 0) <= allowed
        fake.gate.set()
        delivered = [key(c) for c in await fake.wait_for_commands(80)]
        assert delivered == [("big", n) for n in range(1, 81)]


async def test_a_retry_coming_due_is_sent_while_a_user_with_a_backlog_is_in_flight(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    # "r" waits for a retry when big's backlog arrives behind it; the reads that find only
    # big's rows cover r's too. When r's retry time comes, a read must look at r again at once,
    # not at the next idle poll (forward.IDLE_POLL_S) or when big's batch ends.
    fake, api = fake_api
    fake.script.append(Reply(commands=["retry"]))
    config = backlog_config(queue_path, api, retry={"command_retry": "300ms"})
    async with running_relay(config) as relay:
        assert (await post(relay.url, "/v1/track", track("r", 1)))[0] == 200
        await fake.wait_for(lambda f: len(f.requests) >= 1)
        await hold_backlog(relay, fake)
        await fake.wait_for(lambda f: f.held >= 2, timeout_s=IDLE_POLL_S - 1)
        assert ("r", 1) in await release(fake, 21)


async def test_a_dead_letter_replayed_meanwhile_is_found_while_a_backlog_is_in_flight(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    # The CLI (another process) replays a dead letter under its old seq, below what the
    # forwarder's reads have covered while big's batch is in flight: the next read must find
    # it, not the next idle poll.
    fake, api = fake_api
    fake.script.append(Reply(commands=["error"]))
    # Unthrottled, so that a read follows at once when big's batch starts.
    config = backlog_config(queue_path, api, max_requests_per_second=10_000)
    async with running_relay(config) as relay:
        assert (await post(relay.url, "/v1/track", track("x", 1)))[0] == 200
        await relay.app[FORWARDER].drain(until_empty=False)
        await hold_backlog(relay, fake)
        cli = await SqliteQueue.open(queue_path, exclusive=False)
        try:
            [dead] = await cli.dead_letters()
            assert await cli.replay([dead.id], time.time()) == 1
        finally:
            await cli.close()
        # A call of another user wakes the forwarder (the CLI's commit does not).
        assert (await post(relay.url, "/v1/track", track("y", 1)))[0] == 200
        await fake.wait_for(
            lambda f: ("y", 1) in [key(c) for c in f.held_commands], timeout_s=IDLE_POLL_S - 1
        )
        assert ("x", 1) in [key(c) for c in fake.held_commands]
        await release(fake, 22)


async def test_batches_read_ahead_and_held_by_the_rate_limit_keep_each_users_order(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    # One read fills every free lane (batch_size x concurrency rows); the rate limit then holds
    # the second batch back. Whatever was read ahead must still go out in the user's order.
    fake, api = fake_api
    calls = [track("c", 1), track("c", 2), *(track("a", n) for n in range(1, 7))]
    config = make_config(
        queue_path,
        api.url,
        destination={"batch_size": 2, "concurrency": 4, "max_requests_per_second": 20},
    )
    async with running_relay(config) as relay:
        assert (await post(relay.url, "/v1/batch", {"batch": calls}))[0] == 200
        await fake.wait_for_commands(len(calls))
    assert [key(c) for r in fake.requests for c in r.commands] == [
        ("c", 1), ("c", 2), *(("a", n) for n in range(1, 7))
    ]  # fmt: skip
    assert [len(r.commands) for r in fake.requests] == [2, 2, 2, 2]


def reorders_the_fake_asked_for(
    fake: FakeInfinario,
) -> set[tuple[tuple[str, int], tuple[str, int]]]:
    """(earlier, later) pairs where the fake answered retry to earlier and ok to a later
    command of the same user in the same request: those may arrive out of order."""
    allowed: set[tuple[tuple[str, int], tuple[str, int]]] = set()
    for request in fake.requests:
        for p, result in enumerate(request.results):
            if result.get("status") != "retry":
                continue
            earlier = key(request.commands[p])
            for later, outcome in zip(
                request.commands[p + 1 :], request.results[p + 1 :], strict=True
            ):
                if outcome.get("status") == "ok" and key(later)[0] == earlier[0]:
                    allowed.add((earlier, key(later)))
    return allowed


def delivered_per_user(delivered: list[tuple[str, int]]) -> dict[str, list[int]]:
    by_user: dict[str, list[int]] = defaultdict(list)
    for user, n in delivered:
        by_user[user].append(n)
    return by_user


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_faults_lose_nothing_and_keep_each_users_order(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path, seed: int
) -> None:
    fake, api = fake_api
    rng = random.Random(seed)

    # A stalled request outlasts the relay's timeout and is then dropped. The timeout is far
    # above what an answered request takes even on a loaded machine: a reply that arrives after
    # the relay gave up is a legitimate duplicate (at-least-once), and this test counts them.
    # (At 150 ms, one in a few full-suite runs on 2 busy cores had one.)
    fake.responder = random_faults(rng, drop_delay_s=1.2)
    users = [f"user{u}" for u in range(20)]
    sent: list[dict[str, Any]] = []
    for n in range(50):
        for user in users:
            sent.append(identify(user, n) if n % 10 == 0 else track(user, n))
    config = make_config(
        queue_path,
        api.url,
        destination={
            "batch_size": 20,
            "concurrency": 4,
            "timeout": "1s",
            "max_requests_per_second": 1000,
            "retry": {"command_retry": "10ms", "backoff_initial": "10ms", "backoff_max": "50ms"},
        },
    )
    async with running_relay(config) as relay:
        for start in range(0, len(sent), 250):
            assert (await post(relay.url, "/v1/batch", {"batch": sent[start : start + 250]}))[
                0
            ] == 200
        await relay.app[FORWARDER].drain(timeout_s=120)
        store = relay.app[STORE]
        assert store.pending_count == 0
        dead = {
            (d.user_key, int(d.message_id.rsplit("-", 1)[1]))
            for d in await store.dead_letters(limit=10_000)
        }
    delivered = [key(c) for c in fake.accepted]
    everything = {(m["userId"], int(m["messageId"].rsplit("-", 1)[1])) for m in sent}
    assert len(delivered) == len(set(delivered)), "a message was delivered twice"
    assert set(delivered) | dead == everything
    assert not set(delivered) & dead
    allowed = reorders_the_fake_asked_for(fake)
    for user, ns in delivered_per_user(delivered).items():
        for i, a in enumerate(ns):
            for b in ns[i + 1 :]:
                if b < a:  # b was accepted first but delivered after a
                    assert ((user, b), (user, a)) in allowed, (user, b, a)
    customer_updates = {(u, n) for u in users for n in range(0, 50, 10)}
    assert not any(a in customer_updates or b in customer_updates for a, b in allowed)
    assert delivered  # something was delivered
