"""`segment-relay import`: Segment archive files into the queue (docs/operations.md,
"Importing archives"). backfill.py reads the lines and makes the sessions; the queue keeps the
messages apart until the relay feeds them in."""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import gzip
import io
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from . import jsontext
from .backfill import Parsed, Sessions, parse_lines
from .config import Config, load_config
from .errors import ConfigError
from .queue import Queue, open_queue
from .records import NewMessage
from .sessions import SessionRules

EXIT_REFUSED = 1
EXIT_INTERRUPTED = 130
CHUNK = 2000  # lines a worker parses at once, and so about the messages a transaction
MAX_WORKERS = 4  # so at most 8 runs of lines (16,000) are in flight
PARENT_CHECK_S = 1.0


def add_parser(commands: Any) -> None:
    """The `import` command, under the CLI's `commands`."""
    parser = commands.add_parser(
        "import", help="import Segment archive files (.json/.jsonl/.ndjson, optionally .gz)"
    )
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("files", nargs="+", help="archive files; - for standard input")
    parser.add_argument(
        "--source", help="the source (a name under `sources`) they belong to (default: the first)"
    )
    parser.add_argument("--rejects", help="write each refused line here, as a JSON line")


class Report:
    """What an import did, and where each refused line goes."""

    def __init__(self, rejects: IO[str] | None) -> None:
        self.read = self.staged = self.refused = 0
        self.rejects = rejects

    def refuse(self, file: str, line: int, reason: str, index: int | None = None) -> None:
        self.refused += 1
        where = f"{file}:{line}" + (f" (batch[{index}])" if index is not None else "")
        print(f"segment-relay: {where}: {reason}", file=sys.stderr)
        if self.rejects is not None:
            entry = {"file": file, "line": line, "index": index, "reason": reason}
            self.rejects.write(jsontext.dumps(entry).decode() + "\n")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    source = _source(config, args.source)
    with ExitStack() as stack:
        rejects = stack.enter_context(Path(args.rejects).open("w")) if args.rejects else None
        report = Report(rejects)
        started = time.monotonic()
        try:
            asyncio.run(_import(config, source, args.files, report))
        except KeyboardInterrupt:
            print(
                f"segment-relay: import interrupted after {report.staged} were queued; run it "
                "again to finish (nothing already in is queued twice)",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
    took = time.monotonic() - started
    print(
        f"imported {report.staged} (new messages and their session events) from "
        f"{report.read} messages read in {len(args.files)} file(s), in {took:.1f}s "
        f"({report.read / max(took, 1e-9):,.0f} messages/s); {report.refused} refused",
        file=sys.stderr,
    )
    return EXIT_REFUSED if report.refused else 0


def _source(config: Config, name: str | None) -> str:
    names = [s.name for s in config.sources]
    if name is None:
        return names[0]
    if name not in names:
        raise ConfigError(f"--source {name}: not a source in the config ({', '.join(names)})")
    return name


async def _import(config: Config, source: str, files: list[str], report: Report) -> None:
    store = await open_queue(config.queue, daemon=False, create=True)
    s = config.sessions
    rules = SessionRules.of(s.idle_timeout_s, s.event_types) if s.enabled else None
    sessions = Sessions(rules, time.time()) if rules is not None else None
    try:
        with Parsers() as parsers:
            for file in files:
                parse = functools.partial(
                    parse_lines,
                    source=source,
                    now=time.time(),
                    max_bytes=config.server.max_message_bytes,
                    rules=rules,
                )
                await _import_file(store, parsers, parse, file, sessions, report)
        if sessions is not None:
            report.staged += await store.stage_imports(sessions.ending())
    finally:
        await store.close()


async def _import_file(
    store: Queue,
    parsers: Parsers,
    parse: Callable[[list[bytes], int], Parsed],
    file: str,
    sessions: Sessions | None,
    report: Report,
) -> None:
    started = time.monotonic()
    writer = Writer(store, report)

    async def take(parsed: Parsed) -> None:
        report.read += parsed.read
        for number, index, reason in parsed.refused:
            report.refuse(file, number, reason, index)
        rows: list[NewMessage] = []
        for message, activity in parsed.messages:
            if sessions is not None:
                rows.extend(sessions.before(message, activity))
            rows.append(message)
        await writer.write(rows)

    with ArchiveFile(file) as (lines, size, position), _progress(file, size) as bar:
        for first, chunk in _chunks(lines):
            if (done := await parsers.submit(parse, chunk, first)) is not None:
                await take(done)
            rate = report.read / max(time.monotonic() - started, 1e-9)
            bar.set_postfix_str(f"{report.read:,} messages, {rate:,.0f}/s", refresh=False)
            bar.update(position() - bar.n)
        while (done := await parsers.next()) is not None:
            await take(done)
        await writer.flush()
        bar.update(position() - bar.n)


def _chunks(lines: Iterator[bytes]) -> Iterator[tuple[int, list[bytes]]]:
    """The lines in runs of CHUNK, each with the number of its first line."""
    first, chunk = 1, []
    for line in lines:
        chunk.append(line)
        if len(chunk) == CHUNK:
            yield first, chunk
            first, chunk = first + CHUNK, []
    if chunk:
        yield first, chunk


def _end_with(parent: int) -> None:
    """In a worker: exit once the import that started it is gone (killed, say), rather than
    wait for work for ever (its queue's pipes stay open in the other workers)."""

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the import's to handle

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_S)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class Parsers:
    """Archive lines checked and enriched in worker processes, one per core, while this one
    reads the file and the queue's thread writes: checking a message costs twice what storing
    it does (bench/import_rate.py: 0.33x the queue's own insert rate in one process). Results
    come back in order; at most two runs per worker are in flight."""

    def __init__(self) -> None:
        self.workers = min(os.cpu_count() or 1, MAX_WORKERS)
        self.in_flight: collections.deque[asyncio.Future[Parsed]] = collections.deque()

    def __enter__(self) -> Parsers:
        context = multiprocessing.get_context("forkserver")
        self.pool = ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=_end_with, initargs=(os.getpid(),)
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(cancel_futures=True)

    async def submit(
        self, parse: Callable[[list[bytes], int], Parsed], chunk: list[bytes], first: int
    ) -> Parsed | None:
        """Hand a run of lines to a worker; the oldest result once enough are in flight."""
        loop = asyncio.get_running_loop()
        self.in_flight.append(loop.run_in_executor(self.pool, parse, chunk, first))
        if len(self.in_flight) < 2 * self.workers:
            return None
        return await self.in_flight.popleft()

    async def next(self) -> Parsed | None:
        """The oldest result still in flight (None: none is)."""
        return await self.in_flight.popleft() if self.in_flight else None


class Writer:
    """Chunks into the queue while the next is read: the queue's thread writes one chunk as
    the event loop parses the next (bench/import_rate.py: 0.35x the queue's own insert rate
    one after the other). At most one chunk is in flight, and order is kept."""

    def __init__(self, store: Queue, report: Report) -> None:
        self.store, self.report = store, report
        self.pending: asyncio.Future[int] | None = None

    async def write(self, chunk: list[NewMessage]) -> None:
        await self.flush()
        self.pending = asyncio.ensure_future(self.store.stage_imports(chunk))
        await asyncio.sleep(0)  # hand the chunk to the queue's thread before parsing on

    async def flush(self) -> None:
        if self.pending is not None:
            self.report.staged += await self.pending
            self.pending = None


class ArchiveFile:
    """An archive opened for reading: its lines (gzip or not, whatever its name; - for
    standard input), its size in bytes (None: unknown), and how far it has been read (of the
    file as stored, so a gzip file's progress is in its own bytes)."""

    def __init__(self, file: str) -> None:
        self.file = file

    def __enter__(self) -> tuple[Iterator[bytes], int | None, Callable[[], int]]:
        if self.file == "-":
            self.raw: IO[bytes] = sys.stdin.buffer
            size = None
        else:
            self.raw = Path(self.file).open("rb")
            size = Path(self.file).stat().st_size
        start = self.raw.peek(2)[:2] if isinstance(self.raw, io.BufferedReader) else b""
        gzipped = start == b"\x1f\x8b"
        stream: Iterable[bytes] = gzip.GzipFile(fileobj=self.raw) if gzipped else self.raw
        return iter(stream), size, self.raw.tell if size is not None else (lambda: 0)

    def __exit__(self, *exc: object) -> None:
        if self.raw is not sys.stdin.buffer:
            self.raw.close()


def _progress(file: str, size: int | None) -> tqdm[Any]:
    """A bar of the bytes read on a terminal; nothing shown otherwise."""
    return tqdm(
        total=size,
        desc=Path(file).name,
        unit="B",
        unit_scale=True,
        disable=not sys.stderr.isatty(),
        file=sys.stderr,
    )
