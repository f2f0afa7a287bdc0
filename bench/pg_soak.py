"""PostgreSQL queue soak (issue 17): does a queue that deletes what it delivers stay small?

  .venv/bin/python bench/pg_soak.py [--messages 1000000] [--rate 4000] [--users 10000]
                                    [--no-sessions]

The daemon on `queue.url` (a new database, dropped after) forwards, unthrottled, to the fake
API in this process, while 100-call batches with unique messageIds (one call in ten a page,
which drives sessions of 30 s) are posted at `--rate` calls/s until `--messages` are
accepted. Every 10% of the way, and once all are delivered, it prints the size of each table
with its indexes and TOAST, the dead rows, the vacuums (the relay's, and autovacuum's) and
the queue's depth.
`dedup` is expected to grow: it keeps every messageId for `queue.dedup_window` (24 h).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg
import orjson

from common import AUTH, relay
from forward import UNTHROTTLED, start_fake
from ingest import TRACK
from pg import database, pg_config
from segment_relay.testing import FakeInfinario

TABLES = ("messages", "sessions", "dead_letters", "leases", "counters", "dedup")
SIZES = """
SELECT c.relname, pg_relation_size(c.oid), pg_indexes_size(c.oid),
       COALESCE(pg_total_relation_size(c.reltoastrelid), 0), s.n_live_tup, s.n_dead_tup,
       s.autovacuum_count, s.vacuum_count
FROM pg_class AS c JOIN pg_stat_user_tables AS s ON s.relid = c.oid
WHERE c.relname = ANY($1::text[])
"""


def mib(n: int) -> str:
    return f"{n / 1024 / 1024:7.1f}"


async def sizes(conn: asyncpg.Connection, label: str, accepted: int, delivered: int) -> None:
    rows = {r[0]: r for r in await conn.fetch(SIZES, list(TABLES))}
    depth = await conn.fetchval("SELECT COUNT(*) FROM messages")
    print(f"-- {label}: {accepted:,} accepted, {delivered:,} delivered, {depth:,} queued")
    for table in TABLES:
        _, heap, index, toast, live, dead, autovacuums, vacuums = rows[table]
        print(
            f"   {table:<13} heap {mib(heap)} MiB  indexes {mib(index)} MiB  toast {mib(toast)} MiB"
            f"  live {live:>9,}  dead {dead:>8,}  vacuums {vacuums} (auto {autovacuums})"
        )


async def soak(url: str, tmp: Path, args: argparse.Namespace) -> None:
    fake = FakeInfinario(record=False)
    runner, api_url = await start_fake(fake)
    config = pg_config(
        tmp,
        api_url,
        url,
        rate=UNTHROTTLED,
        sessions={"enabled": not args.no_sessions, "idle_timeout": "30s"},
    )
    accepted = 0
    started = time.monotonic()
    with relay(config) as daemon:
        conn = await asyncpg.connect(url)
        await sizes(conn, "start", 0, 0)
        marks = [args.messages * k // 10 for k in range(1, 11)]
        async with aiohttp.ClientSession() as session:

            async def post(batch_no: int) -> None:
                nonlocal accepted
                calls = []
                for i in range(100):
                    n = batch_no * 100 + i
                    user = f"user-{n * 7919 % args.users}"
                    kind = "page" if n % 10 == 0 else "track"
                    calls.append({**TRACK, "type": kind, "userId": user, "messageId": f"soak-{n}"})
                body = orjson.dumps({"batch": calls})
                for _ in range(100):  # bounded: retried while the relay says 503
                    async with session.post(
                        daemon.url + "/v1/batch", data=body, headers={"Authorization": AUTH}
                    ) as response:
                        if response.status == 200:
                            accepted += 100
                            return
                    await asyncio.sleep(0.5)
                raise SystemExit("the relay kept refusing a batch")

            batches = args.messages // 100
            in_flight: set[asyncio.Task[None]] = set()
            for b in range(batches):
                # Paced: batch b leaves at start + b * 100 / rate.
                await asyncio.sleep(max(0.0, started + b * 100 / args.rate - time.monotonic()))
                task = asyncio.create_task(post(b))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                while marks and accepted >= marks[0]:
                    mark = marks.pop(0)
                    await sizes(
                        conn, f"{mark * 100 // args.messages}%", accepted, fake.accepted_count
                    )
            await asyncio.gather(*in_flight)
        await fake.wait_for(lambda f: f.accepted_count >= args.messages, timeout_s=1800)
        for _ in range(3600):  # and the session ends, due 30 s after each user's last page
            if await conn.fetchval("SELECT COUNT(*) FROM messages") == 0:
                break
            await asyncio.sleep(0.5)
        took = time.monotonic() - started
        await sizes(conn, "all delivered", accepted, fake.accepted_count)
        print(
            f"{args.messages:,} calls in {took:.0f}s ({args.messages / took:,.0f}/s in and out); "
            f"daemon RSS {daemon.rss_mb()[0]:.0f} MiB (peak {daemon.rss_mb()[1]:.0f})"
        )
        await conn.close()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=4000.0)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--no-sessions", action="store_true", help="sessions off")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d, database() as url:
        asyncio.run(soak(url, Path(d), args))


if __name__ == "__main__":
    main()
