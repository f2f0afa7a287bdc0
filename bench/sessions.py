"""Sessions benchmark (issue 6), in one run:

  .venv/bin/python bench/sessions.py [--sessions 1000000] [--seconds 10] [--rounds 3]
                                     [--together 3] [--rate N]

(1) Opens N sessions through the store (page calls of N users, 1,000 per commit), and prints
    the resident memory of this process before and after, the database size, and the time to
    expire them all through the session timer.
(2) Page-call ingest of the real daemon with sessions off and on, alternating for --rounds
    pairs (wrk, 64 connections, five page calls per user, so one call in five opens a
    session), and the ratio of the means, with each pair's own ratio. The daemon runs
    as shipped, forwarding at the destination's default rate limit; `--rate N` lifts it.
(3) The same two daemons at once, for --together rounds: each with its own wrk (32
    connections) and fake API, sharing the host's two cores. Whatever else the host runs
    then slows both alike, so the ratio of their rates is free of the drift between runs
    that spreads (2). It is the relative CPU cost of sessions under equal load, not the
    ingest ratio itself: it hides costs that are waits rather than CPU (the code of
    session 5 read 0.85x here against 0.63-0.79x in (2)).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

from common import fake_api, relay, relay_config, wrk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from segment_relay.queue.sqlite import SqliteQueue
from segment_relay.records import NewMessage
from segment_relay.session_timer import SessionTimer
from segment_relay.sessions import SessionRules


def rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def db_size_mb(path: Path) -> float:
    return (
        sum(
            p.stat().st_size
            for p in path.parent.glob(path.name + "*")
            if not p.name.endswith(".lock")
        )
        / 2**20
    )


async def open_sessions(path: Path, count: int) -> None:
    rules = SessionRules.of(1800, ["page"])
    store = await SqliteQueue.open(path, sessions=rules)
    now = time.time()
    before = rss_mb()
    started = time.perf_counter()
    checkpoints = {count // 10, count // 2, count}
    for start in range(0, count, 1000):
        batch = []
        for n in range(start, min(start + 1000, count)):
            message = {
                "type": "page",
                "anonymousId": f"a{n}",
                "messageId": f"p{n}",
                "name": "Home",
                "timestamp": "2024-03-01T12:00:00.000Z",
                "context": {"userAgent": "bench"},
            }
            activity = rules.activity(message, "bench", f"a{n}", now)
            batch.append(
                NewMessage(
                    "bench",
                    f"p{n}",
                    f"a{n}",
                    "page",
                    orjson.dumps(message).decode(),
                    now,
                    activity=activity,
                )
            )
        await store.enqueue(batch)
        if start + 1000 in checkpoints:
            opened, _ = await store.session_stats()
            print(
                f"  {opened:>9,} open sessions: RSS {rss_mb():6.1f} MiB (started at {before:.1f}), "
                f"database {db_size_mb(path):7.1f} MiB, {time.perf_counter() - started:6.1f}s"
            )
    opened, _ = await store.session_stats()
    timer = SessionTimer(store, clock=lambda: now + 3600)
    started = time.perf_counter()
    closed = await timer.tick()
    took = time.perf_counter() - started
    left, _ = await store.session_stats()
    print(
        f"  expired {closed:,} of {opened:,} sessions in {took:.1f}s ({closed / took:,.0f}/s), {left} left; "
        f"RSS {rss_mb():.1f} MiB"
    )
    await store.close()


def ingest(tmp: Path, sessions: bool, seconds: int, rate: float | None) -> float:
    with (
        fake_api() as api,
        relay(relay_config(tmp, api.url, rate=rate, sessions={"enabled": sessions})) as daemon,
    ):
        result = wrk(daemon.url + "/v1/page", b"", seconds=seconds, script="pages.lua")
        rss, peak = daemon.rss_mb()
    print(
        f"  sessions {'on ' if sessions else 'off'}: {result.ok_per_s(1):8,.0f} page calls/s, p99 {result.p99_ms:.1f} ms, "
        f"non-2xx {result.non_2xx}, daemon RSS {rss:.0f} MiB (peak {peak:.0f})"
    )
    return result.ok_per_s(1)


def ingest_together(seconds: int, rate: float | None) -> float:
    with contextlib.ExitStack() as stack:
        daemons = {}
        for sessions in (False, True):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            api = stack.enter_context(fake_api())
            config = relay_config(tmp, api.url, rate=rate, sessions={"enabled": sessions})
            daemons[sessions] = stack.enter_context(relay(config))
        with ThreadPoolExecutor(2) as pool:
            runs = {
                sessions: pool.submit(
                    wrk,
                    d.url + "/v1/page",
                    b"",
                    connections=32,
                    seconds=seconds,
                    script="pages.lua",
                )
                for sessions, d in daemons.items()
            }
            off, on = (runs[s].result().ok_per_s(1) for s in (False, True))
    print(f"  at once: sessions off {off:8,.0f}, on {on:8,.0f} page calls/s: {on / off:.2f}x")
    return on / off


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument(
        "--rounds", type=int, default=3, help="off/on pairs of ingest runs (the host drifts)"
    )
    parser.add_argument("--together", type=int, default=3, help="rounds of both daemons at once")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="destination.max_requests_per_second (default: the relay's, 80)",
    )
    args = parser.parse_args()
    if args.sessions:
        with tempfile.TemporaryDirectory() as d:
            print(f"(1) {args.sessions:,} sessions through the store")
            asyncio.run(open_sessions(Path(d) / "sessions.db", args.sessions))
    if args.rounds:
        print(
            f"(2) page-call ingest, 64 connections, {args.seconds}s each, forwarding at {args.rate or 'the default'} requests/s"
        )
        offs: list[float] = []
        ons: list[float] = []
        for _ in range(args.rounds):
            for sessions, rates in ((False, offs), (True, ons)):
                with tempfile.TemporaryDirectory() as d:
                    rates.append(ingest(Path(d), sessions, args.seconds, args.rate))
        off, on = sum(offs) / len(offs), sum(ons) / len(ons)
        # Each round's own ratio shows how far this host drifted between runs.
        ratios = [b / a for a, b in zip(offs, ons, strict=True)]
        spread = ", ".join(f"{r:.2f}x" for r in ratios)
        print(
            f"  sessions on / off = {on / off:.2f}x (cost {100 * (1 - on / off):.0f}% of page-call ingest); "
            f"per round: {spread}; median round {statistics.median(ratios):.2f}x"
        )
    if args.together:
        print(f"(3) both daemons at once, 32 connections each, {args.seconds}s")
        together = [ingest_together(args.seconds, args.rate) for _ in range(args.together)]
        print(
            f"  sessions on / off at once: median {statistics.median(together):.2f}x "
            f"(cost {100 * (1 - statistics.median(together)):.0f}%)"
        )


if __name__ == "__main__":
    main()
