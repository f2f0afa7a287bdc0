"""Bare baselines for the ingest benchmark, on the same event loop as the relay.

python bench/baselines.py parse   --port N            parse the JSON, answer 200
python bench/baselines.py durable --port N --db PATH  parse, one row per message in one
                                                      SQLite transaction (WAL, FULL), answer
python bench/baselines.py pg --port N --url URL       parse; the messages of all requests
                                                      waiting are inserted by one INSERT ...
                                                      SELECT unnest(...) and committed as soon
                                                      as the previous commit is done (group
                                                      commit, synchronous_commit on); answer
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import sys
from pathlib import Path

import aiosqlite
import asyncpg
import orjson
import uvloop
from aiohttp import web

OK = orjson.dumps({"success": True})


class BarePostgres:
    """The bare PostgreSQL handler: group commit of the waiting requests' messages."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.pending: list[tuple[list[str], asyncio.Future[None]]] = []
        self.queued = asyncio.Event()
        self.task = asyncio.create_task(self.commit_loop())

    @classmethod
    async def start(cls, url: str) -> BarePostgres:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        await pool.execute(
            "CREATE TABLE IF NOT EXISTS events (id bigserial PRIMARY KEY, body text)"
        )
        return cls(pool)

    async def commit_loop(self) -> None:
        while True:
            await self.queued.wait()
            self.queued.clear()
            groups, self.pending = self.pending, []
            bodies = [b for items, _ in groups for b in items]
            await self.pool.execute("INSERT INTO events (body) SELECT unnest($1::text[])", bodies)
            for _, done in groups:
                done.set_result(None)

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        items = body["batch"] if "batch" in body else [body]  # noqa: SIM401 - as durable's
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append(([orjson.dumps(m).decode() for m in items], done))
        self.queued.set()
        await done
        return web.Response(body=OK, content_type="application/json")


async def main(args: argparse.Namespace) -> None:
    app = web.Application(client_max_size=1024**2)
    conn: aiosqlite.Connection | None = None
    if args.mode == "durable":
        conn = await aiosqlite.connect(args.db)
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=FULL")
        await conn.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, body BLOB)")
        await conn.commit()

    async def parse(request: web.Request) -> web.Response:
        orjson.loads(await request.read())
        return web.Response(body=OK, content_type="application/json")

    async def durable(request: web.Request) -> web.Response:
        assert conn is not None
        body = orjson.loads(await request.read())
        items = body["batch"] if "batch" in body else [body]  # noqa: SIM401 - the measured path, kept as it was
        await conn.executemany(
            "INSERT INTO events (body) VALUES (?)", [(orjson.dumps(m),) for m in items]
        )
        await conn.commit()
        return web.Response(body=OK, content_type="application/json")

    bare_pg = await BarePostgres.start(args.url) if args.mode == "pg" else None
    handler = bare_pg.handle if bare_pg is not None else parse if args.mode == "parse" else durable
    app.router.add_post("/v1/{kind}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    print(
        f"baseline listening on http://127.0.0.1:{runner.addresses[0][1]}",
        file=sys.stderr,
        flush=True,
    )
    try:
        await asyncio.Event().wait()
    finally:
        if conn is not None:
            await conn.close()
        if bare_pg is not None:
            await bare_pg.pool.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["parse", "durable", "pg"])
    parser.add_argument("--url", default="")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--db", type=Path, default=Path("baseline.db"))
    with contextlib.suppress(KeyboardInterrupt, sqlite3.Error):
        uvloop.run(main(parser.parse_args()))
