"""Disk per queued message (docs/operations.md, "Disk sizing"), measured through the daemon:

  .venv/bin/python bench/disk.py [--messages 200000]

The daemon's destination is down (127.0.0.1:9), so every call it accepts stays queued. It
takes N of bench/ingest.py's typical track calls (686 bytes of JSON each, with a browser's
context), sent in 100-message batches, each with its own messageId. It prints the queue's
size (the file and its WAL) per message, and the size with the WAL checkpointed after the
daemon stopped. The messageIds kept for deduplication (queue.dedup_window) are included.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from common import AUTH, relay, relay_config
from ingest import TRACK

BATCH = 100


def size(db: Path) -> int:
    return sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file())


async def send(url: str, count: int) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": AUTH}) as session:
        for start in range(0, count, BATCH):
            batch = [
                {**TRACK, "type": "track", "messageId": f"disk-{n}", "userId": f"user-{n % 1000}"}
                for n in range(start, min(start + BATCH, count))
            ]
            async with session.post(
                url + "/v1/batch",
                data=orjson.dumps({"batch": batch}),
                timeout=aiohttp.ClientTimeout(total=30),
            ) as response:
                assert response.status == 200, await response.text()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=200_000)
    args = parser.parse_args()
    body = len(orjson.dumps({**TRACK, "type": "track", "messageId": "disk-0"}))
    with tempfile.TemporaryDirectory(prefix="bench-disk-") as workdir:
        tmp = Path(workdir)
        db = tmp / "queue.db"
        config = relay_config(tmp, "http://127.0.0.1:9")
        started = time.monotonic()
        with relay(config) as daemon:
            asyncio.run(asyncio.wait_for(send(daemon.url, args.messages), 600))
            live = size(db)
        with sqlite3.connect(db) as conn:
            [(queued,)] = conn.execute("SELECT COUNT(*) FROM messages").fetchall()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        settled = size(db)
    print(
        f"{args.messages} calls of {body} bytes of JSON each, in {time.monotonic() - started:.0f}s"
    )
    print(f"queued: {queued}")
    print(
        f"while running (file + WAL): {live / 2**20:.1f} MiB, {live / queued:.0f} bytes a message"
    )
    print(
        f"checkpointed:               {settled / 2**20:.1f} MiB, {settled / queued:.0f} bytes a message"
    )


if __name__ == "__main__":
    main()
