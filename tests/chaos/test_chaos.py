"""Proof that nothing is lost: the real daemon, SIGKILLed at random, against a failing API.

Several clients send uniquely numbered events (single calls and batches, many users, page
calls that open sessions); a killer SIGKILLs and restarts the daemon at seeded moments; the
fake API fails at random (500, 429 with Retry-After, stalls, resets, per-command retry and
error). Then the API heals, the daemon drains, and conservation is checked.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from segment_relay.segment import format_time
from segment_relay.testing import FakeInfinario, Reply, random_faults
from support import AUTH, SUMMARIES, Daemon, run_cli, running_fake, start_daemon, write_config

pytestmark = pytest.mark.chaos
EVENTS = int(os.environ.get("CHAOS_EVENTS", "1500"))
# Event times 10 ms apart, so each session has its own start (a user calls every 0.4 s).
T0 = 1_709_294_400.0
KILLS = int(os.environ.get("CHAOS_KILLS", "3"))


@dataclass
class Run:
    daemon: Daemon
    acked: set[int] = field(default_factory=set)
    sent: dict[int, dict[str, Any]] = field(default_factory=dict)
    kills: int = 0
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def ack(self, numbers: list[int]) -> None:
        async with self.progress:
            self.acked.update(numbers)
            self.progress.notify_all()


def event(n: int, rng: random.Random) -> dict[str, Any]:
    user = f"user{n % 40}"
    base = {
        "messageId": f"chaos-{n}",
        "anonymousId": user,
        "timestamp": format_time(T0 + n * 0.01),
        "properties": {"n": n, "payload": "x" * (n % 50)},
    }
    if rng.random() < 0.2:
        return {**base, "type": "page", "name": f"/p{n}"}
    return {**base, "type": "track", "event": f"chaos {n % 7}"}


async def client(run: Run, numbers: list[int], rng: random.Random) -> None:
    """Send numbers in single calls and batches; retry what was not answered 200."""
    async with aiohttp.ClientSession() as session:
        i = 0
        while i < len(numbers):
            size = 1 if rng.random() < 0.5 else rng.randint(2, 40)
            chunk = numbers[i : i + size]
            payloads = [run.sent[n] for n in chunk]
            for _attempt in range(100):
                try:
                    if len(chunk) == 1:
                        message = payloads[0]
                        url, body = f"{run.daemon.url}/v1/{message['type']}", message
                    else:
                        url, body = f"{run.daemon.url}/v1/batch", {"batch": payloads}
                    async with session.post(
                        url, json=body, headers=AUTH, timeout=aiohttp.ClientTimeout(total=10)
                    ) as response:
                        if response.status == 200:
                            await run.ack(chunk)
                            break
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.05)  # a client's retry backoff, not a wait for a state
            i += size


async def killer(run: Run, config: Path, rng: random.Random, stop: asyncio.Event) -> None:
    while run.kills < KILLS and not stop.is_set():
        target = len(run.acked) + rng.randint(EVENTS // (KILLS * 3), EVENTS // KILLS)
        async with run.progress:
            await run.progress.wait_for(lambda t=target: len(run.acked) >= t or stop.is_set())  # type: ignore[misc]
        if stop.is_set():
            return
        assert await run.daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        run.kills += 1
        run.daemon = await start_daemon(config)


def faulty(rng: random.Random, healthy: list[bool]) -> Callable[[list[Any]], Reply]:
    failing = random_faults(rng, retry=7, error=3, drop_delay_s=0.2)
    return lambda commands: Reply() if healthy[0] else failing(commands)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_conservation_under_kills_and_faults(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    healthy = [False]
    fake = FakeInfinario()
    fake.responder = faulty(random.Random(seed + 1000), healthy)
    async with running_fake(fake) as (_, api):
        config = write_config(
            tmp_path / "relay.yaml",
            tmp_path / "q.db",
            api.url,
            destination={
                "timeout": "150ms",
                "concurrency": 4,
                "batch_size": 50,
                "max_requests_per_second": 1000,
                "retry": {
                    "command_retry": "20ms",
                    "backoff_initial": "20ms",
                    "backoff_max": "100ms",
                },
            },
            sessions={"enabled": True, "idle_timeout": "1s"},
        )
        run = Run(await start_daemon(config))
        run.sent = {n: event(n, rng) for n in range(EVENTS)}
        numbers = list(range(EVENTS))
        shares = [numbers[k::4] for k in range(4)]
        stop = asyncio.Event()
        async with asyncio.timeout(240 + EVENTS / 100):
            kill_task = asyncio.create_task(killer(run, config, random.Random(seed + 7), stop))
            await asyncio.gather(
                *(
                    client(run, share, random.Random(seed * 10 + k))
                    for k, share in enumerate(shares)
                )
            )
            async with run.progress:
                stop.set()
                run.progress.notify_all()
            await kill_task
            healthy[0] = True
            # Drain: the queue empties and every session ends (the 1 s idle timeout).
            await drained(config)
        assert await run.daemon.stop() == 0
        code, out, err = await run_cli(
            "dead-letters", "list", "--json", "--limit", "100000", "--config", str(config)
        )
        assert code == 0, err
    dead_ids = [json.loads(line)["message_id"] for line in out.splitlines()]
    dead = {int(i.removeprefix("chaos-")) for i in dead_ids if i.startswith("chaos-")}
    # A session_end the fake refused is dead-lettered: that session did end.
    ended = {
        (i.split(":")[1], round(float(i.split(":")[2]), 3))
        for i in dead_ids
        if i.startswith("session_end:")
    }
    check(run, fake, dead, ended, seed)


def numbers_of(fake: FakeInfinario) -> list[int]:
    return [
        int(c["data"]["properties"]["n"]) for c in fake.accepted if "n" in c["data"]["properties"]
    ]


async def drained(config: Path) -> None:
    """Until `status` shows an empty queue and no open session (bounded by the caller)."""
    while True:
        code, out, err = await run_cli("status", "--json", "--config", str(config))
        assert code == 0, err
        status = json.loads(out)
        if status["pending"] == 0 and status["open_sessions"] == 0:
            return
        await asyncio.sleep(0.2)  # polling another process's queue; bounded by asyncio.timeout


def sessions_closed(fake: FakeInfinario, dead_ends: set[tuple[str, float]]) -> bool:
    starts = {session_key(c) for c in fake.accepted if c["data"]["type"] == "session_start"}
    ends = {session_key(c) for c in fake.accepted if c["data"]["type"] == "session_end"}
    return bool(starts) and starts <= ends | dead_ends


def session_key(command: dict[str, Any]) -> tuple[str, float]:
    data = command["data"]
    start = data["timestamp"] - data["properties"].get("duration", 0)
    return data["customer_ids"]["cookie"], round(start, 3)


def check_order(run: Run, fake: FakeInfinario, delivered: list[int]) -> None:
    """Per-user order among first deliveries, but for what the fake itself reordered: a
    command it answered retry (or error, which a crash before the dead letter was written
    sends again) while it accepted a later one of the same user in the same request."""
    allowed = set()
    for request in fake.requests:
        numbers = [c["data"]["properties"].get("n") for c in request.commands]
        for p, result in enumerate(request.results):
            if result.get("status") in ("retry", "error") and numbers[p] is not None:
                for later, outcome in zip(numbers[p + 1 :], request.results[p + 1 :], strict=True):
                    if outcome.get("status") == "ok" and later is not None:
                        allowed.add((numbers[p], later))
    seen: set[int] = set()
    by_user: dict[str, list[int]] = defaultdict(list)
    for n in delivered:
        if n not in seen:
            seen.add(n)
            by_user[run.sent[n]["anonymousId"]].append(n)
    for ns in by_user.values():
        for i, a in enumerate(ns):
            for b in ns[i + 1 :]:
                assert b > a or (b, a) in allowed, f"order: {b} delivered after {a}"


def check(
    run: Run, fake: FakeInfinario, dead: set[int], dead_ends: set[tuple[str, float]], seed: int
) -> None:
    delivered = numbers_of(fake)
    counts = Counter(delivered)
    duplicates = sum(c - 1 for c in counts.values())
    # Conservation: everything acked is delivered or dead-lettered with a reason.
    missing = run.acked - set(counts) - dead
    assert not missing, f"acked but lost: {sorted(missing)[:20]}"
    # Nothing that was not sent appears, and payloads are intact.
    for command in fake.accepted:
        props = command["data"]["properties"]
        if "n" in props:
            n = int(props["n"])
            assert n in run.sent
            assert props["payload"] == run.sent[n]["properties"]["payload"]
    check_order(run, fake, delivered)
    # Sessions: every session that started also ended.
    assert sessions_closed(fake, dead_ends)
    # Each session's start and end arrive once, but for resends of batches in flight at a kill.
    session_events = Counter(
        (c["data"]["type"], session_key(c))
        for c in fake.accepted
        if c["data"]["type"].startswith("session_")
    )
    duplicates += sum(n - 1 for n in session_events.values())
    # Duplicates only from batches in flight at a kill: at most concurrency x batch size each.
    assert duplicates <= run.kills * 4 * 50
    summary = {
        "seed": seed,
        "sent": len(run.sent),
        "acked": len(run.acked),
        "delivered": len(set(counts)),
        "dead_lettered": len(dead),
        "duplicates": duplicates,
        "kills": run.kills,
    }
    SUMMARIES.append("chaos: " + json.dumps(summary))
