"""Several relay processes on one real PostgreSQL database: a relay killed or paused at any
moment loses nothing, a user's calls leave in the order they were acked, sessions start and
end once, and `status` shows who holds what."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from segment_relay.config import DEV_WRITE_KEY
from segment_relay.testing import FakeInfinario, Reply
from support import (
    AUTH,
    Daemon,
    Server,
    deep_merge,
    postgres_database,
    run_cli,
    running_fake,
    start_daemon,
    write_config,
)

pytestmark = pytest.mark.acceptance
LEASE = "3s"


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with postgres_database() as url:
        yield url


def relay_config(tmp_path: Path, name: str, database: str, api: Server, **sections: Any) -> Path:
    """A relay of the group: the shared database, v2 API style (commands carry the
    messageId), a short lease, sessions of 2 s; `sections` add to these."""
    group = {
        "queue": {"url": database, "lease": LEASE},
        "destination": {
            "api": "exponea",
            "api_key": "KEY",
            "max_requests_per_second": 1000,
            "timeout": "2s",  # below the lease
        },
        "sessions": {"enabled": True, "idle_timeout": "2s"},
    }
    return write_config(
        tmp_path / f"{name}.yaml", tmp_path / "unused.db", api.url, **deep_merge(group, sections)
    )


@contextlib.asynccontextmanager
async def relays(*configs: Path) -> AsyncIterator[list[Daemon]]:
    started: list[Daemon] = []
    try:
        for config in configs:
            started.append(await start_daemon(config))
        yield started
    finally:
        for daemon in started:
            if daemon.process.returncode is None:
                await daemon.stop(signal.SIGKILL)


def call(user: str, n: int, kind: str) -> tuple[str, dict[str, Any]]:
    message: dict[str, Any] = {
        "userId": user,
        "messageId": f"{user}-{n}",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "properties": {"n": n},
    }
    if kind == "track":
        message["event"] = "Step"
    return f"/v1/{kind}", message


async def send_until_acked(
    session: aiohttp.ClientSession, targets: list[Daemon], path: str, message: dict[str, Any]
) -> None:
    """POST to the first relay that answers 200, as a load balancer with retries would."""
    for _ in range(200):
        for daemon in targets:
            if daemon.process.returncode is not None:
                continue
            with contextlib.suppress(aiohttp.ClientError):
                if await post(session, daemon, path, message) == 200:
                    return
        await asyncio.sleep(0.05)  # all refused or gone for now: a client's back-off
    raise AssertionError(f"no relay took {message['messageId']}")


async def post(
    session: aiohttp.ClientSession, daemon: Daemon, path: str, message: dict[str, Any]
) -> int:
    async with session.post(
        daemon.url + path, data=orjson.dumps(message), headers=AUTH
    ) as response:
        return response.status


def first_deliveries(fake: FakeInfinario) -> list[dict[str, Any]]:
    """The commands the fake took, each messageId once (delivery is at least once)."""
    seen: set[str] = set()
    first = []
    for command in fake.accepted:
        if command["command_id"] not in seen:
            seen.add(command["command_id"])
            first.append(command)
    return first


async def test_a_killed_relay_loses_nothing_and_order_and_sessions_hold(
    tmp_path: Path, database: str
) -> None:
    rng = random.Random(7)
    users = [f"user{i}" for i in range(16)]
    per_user = 24
    async with running_fake(FakeInfinario(api_key="KEY")) as (fake, api):
        a_config = relay_config(tmp_path, "a", database, api)
        b_config = relay_config(tmp_path, "b", database, api)
        async with relays(a_config, b_config) as (a, b), aiohttp.ClientSession() as session:
            acked: dict[str, list[str]] = {u: [] for u in users}
            killed = asyncio.Event()

            async def one_user(user: str) -> None:
                for n in range(per_user):
                    # Calls alternate between the relays (a round-robin balancer); a page now
                    # and then drives the user's session.
                    kind = "page" if n % 6 == 0 else "track"
                    path, message = call(user, n, kind)
                    order = [a, b] if (n + users.index(user)) % 2 else [b, a]
                    await send_until_acked(session, order, path, message)
                    acked[user].append(message["messageId"])
                    if sum(map(len, acked.values())) == len(users) * per_user // 3:
                        killed.set()

            async def kill_a() -> None:
                await killed.wait()
                await asyncio.sleep(rng.random() * 0.2)  # at some moment while calls flow
                a.process.kill()

            await asyncio.wait_for(
                asyncio.gather(kill_a(), *(one_user(u) for u in users)), timeout=120
            )
            assert await a.stop(None) == -signal.SIGKILL
            every_call = {m for ms in acked.values() for m in ms}
            await fake.wait_for(
                lambda f: every_call <= {c["command_id"] for c in f.accepted}, timeout_s=90
            )
            # Every started session ends (2 s idle), also those of a's users.
            await fake.wait_for(lambda f: sessions_closed(first_deliveries(f), users), timeout_s=90)
            code, out, err = await run_cli("status", "--json", "--config", str(b_config))
            assert code == 0, err
            status = orjson.loads(out)
    delivered = first_deliveries(fake)
    for user in users:
        calls = [c["command_id"] for c in delivered if c["command_id"] in set(acked[user])]
        assert calls == acked[user], f"{user}'s calls left out of order"
    assert status["pending"] == 0
    [survivor] = status["instances"]
    assert len(survivor["buckets"]) == 64


def sessions_closed(delivered: list[dict[str, Any]], users: list[str]) -> bool:
    """Each user's session events alternate start, end, ..., and the last one is an end."""
    for user in users:
        kinds = [
            c["data"]["event_type"]
            for c in delivered
            if c["data"].get("event_type", "").startswith("session_")
            and c["data"]["customer_ids"].get("registered") == user
        ]
        if not kinds or kinds != ["session_start", "session_end"] * (len(kinds) // 2):
            return False
    return True


async def test_a_paused_relay_that_resumes_past_its_lease_writes_nothing_for_lost_buckets(
    tmp_path: Path, database: str
) -> None:
    # a sends to its own fake API, which holds a's first request until the test lets it go.
    fake_a, fake_b = FakeInfinario(api_key="KEY"), FakeInfinario(api_key="KEY")
    fake_a.gate = asyncio.Event()
    async with (
        running_fake(fake_a) as (_, api_a),
        running_fake(fake_b) as (_, api_b),
        aiohttp.ClientSession() as session,
    ):
        a_config = relay_config(tmp_path, "a", database, api_a)
        b_config = relay_config(tmp_path, "b", database, api_b)
        async with relays(a_config) as [a]:
            ids = []
            for n in range(10):
                path, message = call("paused-user", n, "track")
                await send_until_acked(session, [a], path, message)
                ids.append(message["messageId"])
            await fake_a.wait_for(lambda f: f.held >= 1)
            a.process.send_signal(signal.SIGSTOP)  # a's batch is in flight
            async with relays(b_config):
                # b takes a's buckets once a's lease ran out, and sends what a had claimed.
                await fake_b.wait_for(
                    lambda f: set(ids) <= {c["command_id"] for c in f.accepted}, timeout_s=60
                )
                fake_a.gate.set()  # the destination answers a's old request...
                a.process.send_signal(signal.SIGCONT)  # ...and a wakes up to it
                await a.wait_stderr("their bucket's lease passed to another relay", 30)
                await a.wait_stderr("lost buckets", 30)
                code, out, err = await run_cli("status", "--json", "--config", str(b_config))
                assert code == 0, err
                status = orjson.loads(out)
                assert status["pending"] == 0
                held = {i["id"]: len(i["buckets"]) for i in status["instances"]}
                assert sum(held.values()) == 64
    # b delivered each message once; a's stale outcome changed nothing of b's.
    assert [c["command_id"] for c in fake_b.accepted] == ids


async def test_a_message_id_sent_to_both_relays_is_stored_and_delivered_once(
    tmp_path: Path, database: str
) -> None:
    fake = FakeInfinario(api_key="KEY")
    # Commands of one event type are refused: their calls are dead-lettered, for the CLI.
    fake.responder = lambda commands: Reply(
        commands=["error" if c["data"].get("event_type") == "Refused" else "ok" for c in commands]
    )
    async with running_fake(fake) as (_, api), aiohttp.ClientSession() as session:
        configs = [relay_config(tmp_path, name, database, api) for name in ("a", "b")]
        async with relays(*configs) as (a, b):
            ids = [f"twice-{n}" for n in range(40)]

            async def both(n: int) -> None:
                event = "Refused" if n < 3 else "Step"
                message = {"userId": f"u{n % 5}", "event": event, "messageId": ids[n]}
                await asyncio.gather(
                    send_until_acked(session, [a], "/v1/track", message),
                    send_until_acked(session, [b], "/v1/track", message),
                )

            await asyncio.gather(*(both(n) for n in range(40)))
            await fake.wait_for(
                lambda f: (
                    set(ids[3:]) <= {c["command_id"] for c in f.accepted}
                    and set(ids[:3]) <= refused(f)
                ),
                timeout_s=60,
            )
            for _ in range(40):  # bounded: until the outcomes of the last batches are written
                code, out, err = await run_cli("status", "--json", "--config", str(configs[0]))
                assert code == 0, err
                status = orjson.loads(out)
                if status["pending"] == 0:
                    break
            code, listed, err = await run_cli(
                "dead-letters",
                "list",
                "--json",
                "--reason",
                "rejected",
                "--config",
                str(configs[1]),
            )
            assert code == 0, err
            dead_ids = [orjson.loads(line)["id"] for line in listed.splitlines()]
            code, out, err = await run_cli(
                "dead-letters", "replay", *map(str, dead_ids), "--config", str(configs[1])
            )
            assert (code, out.strip()) == (0, "replayed 3 dead letters"), err
    delivered = [c["command_id"] for c in fake.accepted]
    assert sorted(delivered) == sorted(ids[3:])  # each once
    assert status["counters"]["delivered"] == 37
    assert status["dead_letters"] == {"rejected": 3}
    assert len(dead_ids) == 3


def refused(fake: FakeInfinario) -> set[str]:
    """The messageIds of commands the fake refused (per-command error)."""
    return {
        command["command_id"]
        for request in fake.requests
        for command, result in zip(request.commands, request.results, strict=False)
        if result.get("success") is False
    }


async def test_calls_to_a_receive_only_relay_wait_for_a_relay_that_forwards(
    tmp_path: Path, database: str
) -> None:
    users = [f"ro-user{i}" for i in range(6)]
    # One event time for every call: each user's pages fall in one session, whatever the pace.
    moment = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def timed(user: str, n: int, kind: str) -> tuple[str, dict[str, Any]]:
        path, message = call(user, n, kind)
        return path, {**message, "timestamp": moment}

    async with running_fake(FakeInfinario(api_key="KEY")) as (fake, api):
        # The receive-only relay needs no destination credentials. It takes 66 messages at
        # most: the 60 calls below and their users' session_starts.
        ro_queue = {"forward": False, "max_pending": 66}
        receiver = relay_config(tmp_path, "receiver", database, api, queue=ro_queue)
        forwarder = relay_config(tmp_path, "forwarder", database, api)
        code, out, err = await run_cli("check-config", "--config", str(receiver))
        assert code == 0, err
        assert "receive only (other relays forward)" in out
        acked: dict[str, list[str]] = {u: [] for u in users}
        async with relays(receiver) as [r], aiohttp.ClientSession() as session:
            for n in range(10):
                for user in users:
                    # A page now and then opens the user's session.
                    path, message = timed(user, n, "page" if n % 4 == 0 else "track")
                    await send_until_acked(session, [r], path, message)
                    acked[user].append(message["messageId"])
            code, out, err = await run_cli("status", "--config", str(receiver))
            assert code == 0, err
            # Alone, it forwards nothing: every call and each user's session_start wait.
            assert "pending messages:   66" in out
            assert "receive only" in out
            assert "no live relay forwards" in out
            # Full (queue.max_pending). Its count of the queue is read again every 5 s and
            # may be a call short when that read ran beside a commit: two more may be taken.
            for n in range(10, 13):
                path, extra = timed(users[0], n, "track")
                if await post(session, r, path, extra) == 503:
                    break
                acked[users[0]].append(extra["messageId"])
            else:
                raise AssertionError("queue.max_pending did not hold")
            # A reload is checked as a relay that takes calls: not with a well-known key.
            relay_config(
                tmp_path,
                "receiver",
                database,
                api,
                queue=ro_queue,
                sources=[{"name": "test", "write_key": DEV_WRITE_KEY}],
            )
            r.process.send_signal(signal.SIGHUP)
            await r.wait_stderr("reload refused")
            async with relays(forwarder):
                every_call = {m for ms in acked.values() for m in ms}
                await fake.wait_for(
                    lambda f: every_call <= {c["command_id"] for c in f.accepted}, timeout_s=60
                )
                # The receiver counts the queue again (every 5 s) and takes calls once more.
                path, late = timed(users[0], 20, "track")
                for _ in range(300):  # bounded: 60 s
                    if await post(session, r, path, late) == 200:
                        break
                    await asyncio.sleep(0.2)  # a client's back-off after a 503
                else:
                    raise AssertionError("the receive-only relay stayed full")
                acked[users[0]].append(late["messageId"])
                await fake.wait_for(
                    lambda f: late["messageId"] in {c["command_id"] for c in f.accepted},
                    timeout_s=60,
                )
                # The forwarding relay ends the sessions the receive-only one started.
                await fake.wait_for(
                    lambda f: sessions_closed(first_deliveries(f), users), timeout_s=60
                )
                code, out, err = await run_cli("status", "--json", "--config", str(receiver))
                assert code == 0, err
    status = orjson.loads(out)
    held = {i["forwards"]: len(i["buckets"]) for i in status["instances"]}
    assert held == {False: 0, True: 64}
    delivered = first_deliveries(fake)
    for user in users:
        calls = [c["command_id"] for c in delivered if c["command_id"] in set(acked[user])]
        assert calls == acked[user], f"{user}'s calls left out of order"
