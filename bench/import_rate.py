"""Import benchmark (issue 21): `segment-relay import` of a gzipped archive against the
queue's own insert rate for the same messages, in the same run:

  .venv/bin/python bench/import_rate.py [--messages 1000000] [--rounds 1]

The archive holds N of bench/ingest.py's typical track calls (a browser's context, 1,000
users), one a line, gzipped. (1) The real command imports it into a fresh SQLite queue
(reading, gunzip, JSON, the API's checks and enrichment, sessions on, the inserts). (2) The
same messages, already made, are inserted by the queue's own method (stage_imports, 2,000 a
transaction) into another fresh queue: what the queue alone can take. Reported: messages/s of
each and their ratio; with rounds, each round alternates the two and the median is given.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from common import BIN
from ingest import TRACK

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from segment_relay.queue.sqlite import SqliteQueue
from segment_relay.records import NewMessage
from segment_relay.segment import BatchEnvelope, prepare, user_key

CHUNK = 2000


def archive(path: Path, count: int) -> None:
    with gzip.open(path, "wb", compresslevel=6) as out:
        for n in range(count):
            message = {**TRACK, "type": "track", "userId": f"user-{n % 1000}",
                       "messageId": f"bench-{n}", "receivedAt": "2024-03-01T12:00:01.000Z"}  # fmt: skip
            out.write(orjson.dumps(message) + b"\n")


def config(tmp: Path) -> Path:
    path = tmp / "relay.yaml"
    path.write_text(
        "sources: [{name: bench, write_key: bench-write-key}]\n"
        f"queue: {{path: {tmp / 'queue.db'}}}\n"
        "destination: {project_token: TOKEN, base_url: 'http://127.0.0.1:9'}\n"
    )
    return path


def import_command(tmp: Path, file: Path, count: int) -> float:
    started = time.monotonic()
    subprocess.run(
        [str(BIN / "segment-relay"), "import", "--config", str(config(tmp)), str(file)],
        check=True,
        timeout=3600,
        stderr=subprocess.DEVNULL,
    )
    return count / (time.monotonic() - started)


async def queue_alone(tmp: Path, file: Path, count: int) -> float:
    rows = []
    now = time.time()
    with gzip.open(file, "rb") as lines:
        for line in lines:
            message, encoded = prepare(orjson.loads(line), None, now, BatchEnvelope(), 32768)
            rows.append(NewMessage("bench", message["messageId"], user_key(message),
                                   "track", encoded.decode(), now))  # fmt: skip
    store = await SqliteQueue.open(tmp / "alone.db", exclusive=False, create=True)
    try:
        started = time.monotonic()
        for start in range(0, len(rows), CHUNK):
            await store.stage_imports(rows[start : start + CHUNK])
        took = time.monotonic() - started
    finally:
        await store.close()
    assert len(rows) == count
    return count / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-import-") as workdir:
        tmp = Path(workdir)
        file = tmp / "archive.jsonl.gz"
        archive(file, args.messages)
        print(f"{args.messages:,} messages, {file.stat().st_size / 2**20:.1f} MiB gzipped")
        ratios = []
        for n in range(args.rounds):
            (tmp / f"cmd{n}").mkdir()
            (tmp / f"raw{n}").mkdir()
            command = import_command(tmp / f"cmd{n}", file, args.messages)
            alone = asyncio.run(queue_alone(tmp / f"raw{n}", file, args.messages))
            ratios.append(command / alone)
            print(
                f"round {n + 1}: import {command:,.0f} messages/s; queue alone {alone:,.0f} "
                f"messages/s; {ratios[-1]:.2f}x"
            )
        print(f"import / queue alone = {statistics.median(ratios):.2f}x (median of {args.rounds})")


if __name__ == "__main__":
    main()
