"""Recovery from a destination outage (issue 19), clock-driven:

  .venv/bin/python bench/outage.py [--messages 10000] [--users 1000] [--outages 60,3600]

For each outage length: the relay (in this process, on a SQLite queue, the shipped
destination defaults: batches of 50, 80 requests/s, 4 in flight) takes a backlog of N
messages of U users while the fake API answers 503. The outage is driven by the relay's
injected clock: each probe goes when its time comes, as many as the outage takes. Then the
destination returns, at a moment between two probes, and the clock runs in real time again.
Reported: the time from the return to the last message delivered (the wait for the next
probe, on the relay's clock, plus the delivery, measured), against the time the rate limit
alone requires for the backlog (N / 50 per request / 80 requests per second).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import yaml
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import AUTH, WRITE_KEY
from segment_relay.appkeys import FORWARDER, STORE
from segment_relay.config import parse_config
from segment_relay.destination import State
from segment_relay.service import create_app
from segment_relay.testing import FakeInfinario, Reply

T0 = 1_800_000_000.0


class Clock:
    """Real time from T0, plus the jumps the outage makes."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.jumped = 0.0

    def __call__(self) -> float:
        return T0 + self.jumped + (time.monotonic() - self.start)

    def jump_to(self, when: float) -> None:
        self.jumped += max(0.0, when - self())


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def one_outage(outage_s: float, messages: int, users: int, tmp: Path) -> dict[str, float]:
    up = False
    fake = FakeInfinario(record=False)
    fake.responder = lambda commands: Reply() if up else Reply(status=503)
    fake_runner, api = await serve(fake.app())
    clock = Clock()
    settings = {
        "server": {"host": "127.0.0.1", "port": 0},
        "sources": [{"name": "bench", "write_key": WRITE_KEY}],
        "queue": {"path": str(tmp / "queue.db")},
        "destination": {"base_url": api, "project_token": "TOKEN"},
        "sessions": {"enabled": False},
    }
    app = create_app(parse_config(yaml.safe_dump(settings)), clock=clock)
    relay_runner, relay = await serve(app)
    try:
        forwarder, store = app[FORWARDER], app[STORE]
        destination = forwarder.state.destination
        async with aiohttp.ClientSession(headers={"Authorization": AUTH}) as session:
            for start in range(0, messages, 100):
                batch = [
                    {"type": "track", "userId": f"u{n % users}", "event": "e", "messageId": f"m{n}"}
                    for n in range(start, min(start + 100, messages))
                ]
                async with session.post(
                    relay + "/v1/batch", data=orjson.dumps({"batch": batch})
                ) as r:
                    assert r.status == 200, await r.text()
        async with asyncio.timeout(60):
            while destination.state is State.UP:
                await forwarder.drain(until_empty=False)
        went_down = destination.since
        probes = 0
        while destination.next_probe < went_down + outage_s:
            clock.jump_to(destination.next_probe)
            await forwarder.drain(until_empty=False, timeout_s=60)
            probes += 1
        returned = went_down + outage_s
        clock.jump_to(returned)
        up = True
        wait_s = destination.next_probe - clock()  # on the relay's clock, to the next probe
        clock.jump_to(destination.next_probe)
        started = time.perf_counter()
        await forwarder.drain(timeout_s=300)
        delivered_s = time.perf_counter() - started
        assert store.pending_count == 0
        assert fake.accepted_count >= messages
        stats = await store.stats(clock())
        assert stats.dead_letters == {}, stats.dead_letters
    finally:
        await relay_runner.cleanup()
        await fake_runner.cleanup()
    return {"probes": probes, "wait_s": wait_s, "delivered_s": delivered_s}


async def main(args: argparse.Namespace) -> None:
    floor = args.messages / 50 / 80.0
    print(
        f"{args.messages:,} messages of {args.users:,} users; the rate limit alone needs "
        f"{floor:.2f}s (50 a request, 80 requests/s)"
    )
    print(
        f"{'outage':>8} {'probes':>7} {'to probe':>9} {'delivery':>9} {'total':>8} {'/ floor':>8}"
    )
    for outage in args.outages:
        with tempfile.TemporaryDirectory() as d:
            r = await one_outage(outage, args.messages, args.users, Path(d))
        total = r["wait_s"] + r["delivered_s"]
        print(
            f"{outage:>7.0f}s {r['probes']:>7.0f} {r['wait_s']:>8.1f}s {r['delivered_s']:>8.2f}s "
            f"{r['delivered_s'] / floor:>7.2f}x {total:>7.1f}s {total / floor:>7.1f}x"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument(
        "--outages", type=lambda s: [float(x) for x in s.split(",")], default=[60.0, 3600.0]
    )
    asyncio.run(main(parser.parse_args()))
