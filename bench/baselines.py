"""Bare baselines for the ingest benchmark, on the same event loop as the relay.

python bench/baselines.py parse   --port N            parse the JSON, answer 200
python bench/baselines.py durable --port N --db PATH  parse, one row per message in one
                                                      SQLite transaction (WAL, FULL), answer
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import sys
from pathlib import Path

import aiosqlite
import orjson
import uvloop
from aiohttp import web

OK = orjson.dumps({"success": True})


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

    handler = parse if args.mode == "parse" else durable
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["parse", "durable"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--db", type=Path, default=Path("baseline.db"))
    with contextlib.suppress(KeyboardInterrupt, sqlite3.Error):
        uvloop.run(main(parser.parse_args()))
