"""The bare forwarding loop the forward benchmark compares against (issue 5).

  python bench/bare_forward.py QUEUE_DB|POSTGRESQL_URL API_URL

Reads the queue's rows 50 at a time in order, decodes them, posts a minimal command per
message with aiohttp, deletes the rows; prints the number of messages forwarded. The queue is
a SQLite file, or a PostgreSQL queue (bench/pg.py).
"""

from __future__ import annotations

import sqlite3
import sys

import aiohttp
import asyncpg
import orjson
import uvloop


def command(body: str | bytes) -> dict[str, object]:
    message = orjson.loads(body)
    return {
        "name": "crm/events",
        "data": {
            "customer_ids": {
                "registered": str(message.get("userId") or message.get("anonymousId"))
            },
            "project_id": "TOKEN",
            "type": message.get("event", "x"),
            "properties": {},
            "timestamp": 0.0,
        },
    }


async def main_pg(db: str, url: str) -> None:
    conn = await asyncpg.connect(db)
    sent = 0
    async with aiohttp.ClientSession() as session:
        while rows := await conn.fetch("SELECT seq, body FROM messages ORDER BY seq LIMIT 50"):
            commands = [command(body) for _, body in rows]
            async with session.post(
                url + "/bulk", data=orjson.dumps({"commands": commands})
            ) as response:
                await response.read()
            await conn.execute(
                "DELETE FROM messages WHERE seq = ANY($1::bigint[])", [r[0] for r in rows]
            )
            sent += len(rows)
    await conn.close()
    print(sent)


async def main(db: str, url: str) -> None:
    if db.startswith("postgresql://"):
        await main_pg(db, url)
        return
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    sent = 0
    async with aiohttp.ClientSession() as session:
        while rows := conn.execute(
            "SELECT seq, body FROM messages ORDER BY seq LIMIT 50"
        ).fetchall():
            commands = []
            for _, body in rows:
                message = orjson.loads(body)
                commands.append(
                    {
                        "name": "crm/events",
                        "data": {
                            "customer_ids": {
                                "registered": str(
                                    message.get("userId") or message.get("anonymousId")
                                )
                            },
                            "project_id": "TOKEN",
                            "type": message.get("event", "x"),
                            "properties": {},
                            "timestamp": 0.0,
                        },
                    }
                )
            async with session.post(
                url + "/bulk", data=orjson.dumps({"commands": commands})
            ) as response:
                await response.read()
            conn.execute("BEGIN")
            conn.executemany("DELETE FROM messages WHERE seq = ?", [(seq,) for seq, _ in rows])
            conn.execute("COMMIT")
            sent += len(rows)
    print(sent)


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2]))
