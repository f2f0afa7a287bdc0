"""PostgreSQL queue benchmark (issue 17), each figure against a baseline in the same run:

  .venv/bin/python bench/pg.py [--seconds 10] [--rounds 1] [--messages 100000] [--only PART]
                               [--message-ids] [--receive-only]

Needs wrk and the PostgreSQL server of SEGMENT_RELAY_TEST_POSTGRES (default: postgres on
127.0.0.1:5432, trust auth); every part makes and drops its own database.

(1) ingest: the relay on `queue.url` against a bare handler (aiohttp + asyncpg: parse, one
    INSERT ... SELECT unnest(...) per group of concurrent requests, commit, 200), single calls
    and 100-call batches, 64 connections; each relay run between two baseline runs. The calls
    carry no messageId (the relay makes one, and records none for dedup) unless --message-ids
    gives each call one of its own, as the Segment libraries do.
(2) forward: a queue prefilled with N messages drained by the daemon against a bare loop
    (read 50 in order, map, POST, delete) on the same database; each round runs both, and
    the median of the rounds' ratios is the figure (this host's bare loop varies by a fifth).
(3) two relays on one database against one: single calls, 64 connections in all.
(4) failover: SIGKILL one of two relays, then the time until the first delivery of a call
    acked after the kill for a user of the killed relay's buckets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import yaml

from common import AUTH, WrkResult, fake_api, process, python_bin, relay, relay_config, wrk
from forward import UNTHROTTLED, drain_bare, start_fake, until_accepted
from ingest import BATCH, SINGLE, TRACK, row

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from segment_relay.config import QueueConfig
from segment_relay.queue.postgres import PostgresQueue
from segment_relay.queue.postgres.leases import bucket_of
from segment_relay.records import NewMessage
from segment_relay.testing import FakeInfinario

ADMIN = os.environ.get(
    "SEGMENT_RELAY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@contextlib.contextmanager
def database() -> Iterator[str]:
    """A new database on the server (dropped after)."""
    name = f"segment_relay_bench_{uuid.uuid4().hex[:8]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(ADMIN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    try:
        yield ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def pg_config(tmp: Path, api_url: str, url: str, *, forward: bool = True, **kwargs: object) -> Path:
    """The benchmark's relay config (common.relay_config) on the PostgreSQL queue at `url`;
    `forward=False` makes it a receive-only relay (queue.forward), in a directory of its own."""
    if not forward:
        tmp = tmp / "receive-only"
        tmp.mkdir(exist_ok=True)
    config = relay_config(tmp, api_url, **kwargs)  # type: ignore[arg-type]
    data = yaml.safe_load(config.read_text())
    # Instead of relay_config's SQLite path and synchronous:
    data["queue"] = {"url": url, "forward": forward}
    config.write_text(yaml.safe_dump(data))
    return config


# The calls with a messageId each, as the Segment libraries send them (bench/ids.lua makes
# every MESSAGE_ID a new id).
SINGLE_IDS = orjson.dumps({**TRACK, "messageId": "MESSAGE_ID"})
BATCH_IDS = orjson.dumps(
    {
        "batch": [{"type": "track", **TRACK, "messageId": "MESSAGE_ID"}] * 100,
        "sentAt": "2024-03-01T12:00:01.000Z",
    }
)


def baseline(url: str, body: bytes, path: str, seconds: int, script: str) -> WrkResult:
    with process(python_bin(), "bench/baselines.py", "pg", "--url", url) as server:
        return wrk(server.url + path, body, seconds=seconds, script=script)


def ingest(args: argparse.Namespace) -> None:
    print("(1) ingest, 64 connections; relay on queue.url vs the bare PostgreSQL handler")
    if args.message_ids:
        print("    every call with a messageId of its own (the relay records each for dedup)")
    else:
        print("    calls without messageIds (the relay makes them; no dedup rows)")
    if args.receive_only:
        print("    the relay measured is receive-only; a second relay forwards what it stores")
    print(f"{'':<34} {'acked ev/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>7} {'steal':>7}")
    script = "ids.lua" if args.message_ids else "post.lua"
    single, batch = (SINGLE_IDS, BATCH_IDS) if args.message_ids else (SINGLE, BATCH)
    for name, body, path, events in [
        ("single calls", single, "/v1/track", 1),
        ("100-call batches", batch, "/v1/batch", 100),
    ]:
        ratios = []
        with tempfile.TemporaryDirectory() as d:
            with database() as url:
                before = baseline(url, body, path, args.seconds, script)
            print(row(f"{name}: bare", before, events))
            for n in range(args.rounds):
                tmp = Path(d) / f"r{n}"
                tmp.mkdir()
                with database() as url, fake_api() as api:
                    config = pg_config(tmp, api.url, url)
                    with contextlib.ExitStack() as relays:
                        if args.receive_only:
                            # A relay that forwards what the measured one stores, on the other
                            # core; no calls are sent to it.
                            relays.enter_context(relay(config))
                            config = pg_config(tmp, api.url, url, forward=False)
                        daemon = relays.enter_context(relay(config))
                        ours = wrk(daemon.url + path, body, seconds=args.seconds, script=script)
                with database() as url:
                    after = baseline(url, body, path, args.seconds, script)
                ratios.append(
                    ours.ok_per_s(events) / ((before.ok_per_s(events) + after.ok_per_s(events)) / 2)
                )
                print(row(f"{name}: relay", ours, events) + f"   {ratios[-1]:.2f}x")
                print(row(f"{name}: bare", after, events))
                before = after
        print(f"{name}: relay / bare = {statistics.median(ratios):.2f}x (median of {ratios})")


async def prefill(url: str, count: int, users: int = 1000) -> None:
    queue = await PostgresQueue.open(QueueConfig(url=url), member=False, create=True)
    now = time.time()
    try:
        for start in range(0, count, 1000):
            batch = []
            for n in range(start, min(start + 1000, count)):
                user = f"user-{n % users}"
                message = {**TRACK, "type": "track", "userId": user, "messageId": f"m{n}"}
                batch.append(
                    NewMessage("bench", f"m{n}", user, "track", orjson.dumps(message).decode(), now)
                )
            await queue.enqueue(batch)
    finally:
        await queue.close()


async def drain_with(url: str, count: int, tmp: Path) -> float:
    fake = FakeInfinario(record=False)
    runner, api_url = await start_fake(fake)
    try:
        config = pg_config(tmp, api_url, url, rate=UNTHROTTLED)
        started = time.perf_counter()
        with relay(config):
            await until_accepted(fake, count, 900)
            return time.perf_counter() - started
    finally:
        await runner.cleanup()


def forward(args: argparse.Namespace) -> None:
    n = args.messages
    print(f"(2) forward {n:,} prefilled messages (1,000 users), unthrottled")
    ratios = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.rounds):
            with database() as url:
                asyncio.run(prefill(url, n))
                bare = n / asyncio.run(drain_bare(url, n))
            with database() as url:
                asyncio.run(prefill(url, n))
                ours = asyncio.run(drain_with(url, n, Path(d)))
            ratios.append(bare / ours)
            print(f"  bare loop: {n / bare:>10,.0f} ev/s ({bare:.1f}s)")
            print(f"  relay:     {n / ours:>10,.0f} ev/s ({ours:.1f}s; includes start-up)")
            print(f"  relay / bare = {ratios[-1]:.2f}x")
    print(f"forward: relay / bare = {statistics.median(ratios):.2f}x (median of {ratios})")


def two_relays(args: argparse.Namespace) -> None:
    print("(3) single calls: two relays on one database (32 connections each) vs one (64)")
    with tempfile.TemporaryDirectory() as d, database() as url, fake_api() as api:
        configs = []
        for name in ("a", "b"):
            (Path(d) / name).mkdir()
            configs.append(pg_config(Path(d) / name, api.url, url))
        with relay(configs[0]) as a, relay(configs[1]) as b:
            one = wrk(a.url + "/v1/track", SINGLE, seconds=args.seconds)
            with ThreadPoolExecutor(2) as pool:
                both = list(
                    pool.map(
                        lambda daemon: wrk(
                            daemon.url + "/v1/track", SINGLE, connections=32, seconds=args.seconds
                        ),
                        (a, b),
                    )
                )
    total = sum(r.ok_per_s(1) for r in both)
    print(f"  one relay:  {one.ok_per_s(1):>10,.0f} calls/s (p99 {one.p99_ms:.1f} ms)")
    print(
        f"  two relays: {total:>10,.0f} calls/s ({' + '.join(f'{r.ok_per_s(1):,.0f}' for r in both)})"
    )
    print(
        f"  two / one = {total / one.ok_per_s(1):.2f}x (both share this machine's 2 cores with PostgreSQL)"
    )


async def failover_once(url: str, tmp: Path) -> float:
    fake = FakeInfinario()
    runner, api_url = await start_fake(fake)
    procs: list[asyncio.subprocess.Process] = []
    try:
        urls = []
        for name in ("a", "b"):
            (tmp / name).mkdir(exist_ok=True)
            config = pg_config(tmp / name, api_url, url, rate=UNTHROTTLED)
            proc = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "segment-relay"),
                "--log-level",
                "warning",
                "serve",
                "--config",
                str(config),
                stderr=asyncio.subprocess.PIPE,
            )
            procs.append(proc)
            assert proc.stderr is not None
            line = (await proc.stderr.readline()).decode()
            urls.append(line.split("listening on ")[1].split()[0])
        # Wait until the two share the buckets: b holds some.
        conn = await asyncpg.connect(url)
        try:
            for _ in range(600):
                held = await conn.fetch(
                    "SELECT owner, COUNT(*) FROM leases WHERE owner IS NOT NULL GROUP BY 1"
                )
                if len(held) == 2:
                    break
                await asyncio.sleep(0.1)
            a_owner = await conn.fetchval("SELECT id FROM instances WHERE pid = $1", procs[0].pid)
            a_buckets = {
                r[0]
                for r in await conn.fetch("SELECT bucket FROM leases WHERE owner = $1", a_owner)
            }
        finally:
            await conn.close()
        user = next(f"user-{i}" for i in range(10_000) if bucket_of(f"user-{i}") in a_buckets)
        procs[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await procs[0].wait()
        async with aiohttp.ClientSession() as session:
            message = {**TRACK, "userId": user, "messageId": "after-the-kill"}
            async with session.post(
                urls[1] + "/v1/track", data=orjson.dumps(message), headers={"Authorization": AUTH}
            ) as response:
                assert response.status == 200
        await fake.wait_for(
            lambda f: any(c["data"]["customer_ids"].get("registered") == user for c in f.accepted),
            120,
        )
        return fake.requests[-1].at - killed
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 60)
        await runner.cleanup()


def failover(args: argparse.Namespace) -> None:
    print(
        "(4) failover: SIGKILL of one of two relays (queue.lease 15s) to the first delivery "
        "of a call acked after it, for a user of the killed relay"
    )
    times = []
    for n in range(args.rounds):
        with tempfile.TemporaryDirectory() as d, database() as url:
            times.append(asyncio.run(failover_once(url, Path(d))))
        print(f"  round {n + 1}: {times[-1]:.1f}s")
    print(
        f"  failover: {statistics.median(times):.1f}s (median); the lease is 15s, renewed every 5s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--only", choices=["ingest", "forward", "two", "failover"])
    parser.add_argument(
        "--receive-only",
        action="store_true",
        help="ingest: measure a receive-only relay (queue.forward: false) while a second "
        "relay on the same database forwards",
    )
    parser.add_argument(
        "--message-ids",
        action="store_true",
        help="ingest: every call with a messageId of its own (as the Segment libraries send)",
    )
    args = parser.parse_args()
    parts = {"ingest": ingest, "forward": forward, "two": two_relays, "failover": failover}
    for name, part in parts.items():
        if args.only in (None, name):
            part(args)


if __name__ == "__main__":
    main()
