"""Forwarding benchmark (issue 5), against the fake API on 127.0.0.1, in one run:

  .venv/bin/python bench/forward.py [--messages 200000] [--e2e-events 100000]

(1) A queue pre-filled with N messages (through the store) drained by the real daemon, against
    a bare loop (bench/bare_forward.py) draining a copy of the same queue: events/s and ratio.
(2) End to end: E events sent in 100-message batches as fast as the daemon accepts them, and
    the time until the last is delivered: events/s, peak queue depth, peak resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from common import AUTH, python_bin, relay, relay_config
from ingest import TRACK

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from segment_relay.queue.sqlite import SqliteQueue
from segment_relay.records import NewMessage
from segment_relay.testing import FakeInfinario

# Forwarding speed is what this measures: the destination's rate limit (80 requests/s by
# default, Bloomreach's documented limit) is lifted so that the relay itself is the limit.
UNTHROTTLED = 10_000


async def prefill(path: Path, count: int) -> None:
    store = await SqliteQueue.open(path)
    now = time.time()
    for start in range(0, count, 1000):
        batch = []
        for n in range(start, min(start + 1000, count)):
            message = {**TRACK, "type": "track", "userId": f"user-{n % 1000}", "messageId": f"m{n}"}
            batch.append(
                NewMessage(
                    "bench",
                    f"m{n}",
                    f"user-{n % 1000}",
                    "track",
                    orjson.dumps(message).decode(),
                    now,
                )
            )
        await store.enqueue(batch)
    await store.close()


async def start_fake(fake: FakeInfinario) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def until_accepted(fake: FakeInfinario, count: int, timeout_s: float) -> None:
    await fake.wait_for(lambda f: f.accepted_count >= count, timeout_s)


async def drain_with_daemon(tmp: Path, db: Path, count: int) -> tuple[float, float]:
    fake = FakeInfinario(record=False)
    runner, url = await start_fake(fake)
    try:
        config = relay_config(tmp, url, rate=UNTHROTTLED, queue={"path": str(db)})
        started = time.perf_counter()
        with relay(config) as daemon:
            await until_accepted(fake, count, 900)
            took = time.perf_counter() - started
            _, peak = daemon.rss_mb()
    finally:
        await runner.cleanup()
    return count / took, peak


async def drain_bare(db: Path | str, count: int) -> float:
    """The bare loop draining the queue `db` (a SQLite file or a PostgreSQL URL): events/s."""
    fake = FakeInfinario(record=False)
    runner, url = await start_fake(fake)
    try:
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            python_bin(), "bench/bare_forward.py", str(db), url
        )
        async with asyncio.timeout(900):
            await process.wait()
        took = time.perf_counter() - started
        assert fake.accepted_count >= count, fake.accepted_count
    finally:
        await runner.cleanup()
    return count / took


async def end_to_end(tmp: Path, events: int) -> None:
    fake = FakeInfinario(record=False)
    runner, url = await start_fake(fake)
    # 1,000 users, as in the pre-filled queue (one user's calls go out one batch at a time).
    bodies = [
        orjson.dumps(
            {
                "batch": [
                    {"type": "track", **TRACK, "userId": f"user-{(b * 100 + i) % 1000}"}
                    for i in range(100)
                ]
            }
        )
        for b in range(10)
    ]
    try:
        config = relay_config(tmp, url, rate=UNTHROTTLED)
        with relay(config) as daemon:
            depth = PeakDepth(Path(str(tmp / "queue.db")))
            started = time.perf_counter()
            async with aiohttp.ClientSession() as session:
                batches = asyncio.Queue[int]()
                for n in range(events // 100):
                    batches.put_nowait(n)

                async def sender() -> None:
                    while not batches.empty():
                        n = batches.get_nowait()
                        body = bodies[n % len(bodies)]
                        async with session.post(
                            daemon.url + "/v1/batch", data=body, headers={"Authorization": AUTH}
                        ) as r:
                            assert r.status == 200, await r.text()
                        depth.sample()

                await asyncio.gather(*(sender() for _ in range(16)))
            accepted = time.perf_counter() - started
            while fake.accepted_count < events:
                depth.sample()
                await until_accepted(fake, min(events, fake.accepted_count + 5000), 900)
            took = time.perf_counter() - started
            _, peak = daemon.rss_mb()
        print(
            f"end to end: {events:,} events accepted in {accepted:.1f}s, all delivered in {took:.1f}s: "
            f"{events / took:,.0f} events/s end to end; peak queue depth {depth.peak:,}; daemon peak RSS {peak:.0f} MiB"
        )
    finally:
        await runner.cleanup()


class PeakDepth:
    """Samples the queue depth with a read-only connection (at most every 0.2 s)."""

    def __init__(self, db: Path) -> None:
        self.db, self.peak, self._last = db, 0, 0.0

    def sample(self) -> None:
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as conn:
            (depth,) = conn.execute("SELECT COUNT(*) FROM messages").fetchone()
        self.peak = max(self.peak, int(depth))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--e2e-events", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        source = tmp / "prefilled.db"
        await prefill(source, args.messages)
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{source}{suffix}").exists():
                shutil.copy(f"{source}{suffix}", f"{tmp / 'bare.db'}{suffix}")
                shutil.copy(f"{source}{suffix}", f"{tmp / 'relay.db'}{suffix}")
        bare = await drain_bare(tmp / "bare.db", args.messages)
        ours, peak = await drain_with_daemon(tmp, tmp / "relay.db", args.messages)
        print(
            f"pre-filled queue of {args.messages:,}: bare loop {bare:,.0f} events/s, relay {ours:,.0f} events/s "
            f"= {ours / bare:.2f}x (daemon peak RSS {peak:.0f} MiB)"
        )
        await end_to_end(tmp, args.e2e_events)


if __name__ == "__main__":
    asyncio.run(main())
