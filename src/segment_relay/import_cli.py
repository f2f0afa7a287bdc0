"""`segment-relay import`: Segment archive files into the queue (docs/operations.md,
"Importing archives"). backfill.py reads the lines and makes the sessions; the queue keeps the
messages apart until the relay feeds them in."""

from __future__ import annotations

import argparse
import asyncio
import gzip
import io
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from . import jsontext
from .backfill import LineError, Sessions, imported, messages_of
from .config import Config, load_config
from .errors import ConfigError
from .queue import Queue, open_queue
from .records import NewMessage
from .segment import InvalidMessageError
from .sessions import SessionRules

EXIT_REFUSED = 1
CHUNK = 2000  # messages a transaction


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
        asyncio.run(_import(config, source, args.files, report))
    took = time.monotonic() - started
    print(
        f"imported {report.staged} messages from {len(args.files)} file(s) in {took:.1f}s "
        f"({report.read / max(took, 1e-9):,.0f} messages/s); {report.read - report.staged} "
        f"already imported or sent; {report.refused} refused",
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
    sessions = (
        Sessions(SessionRules.of(s.idle_timeout_s, s.event_types), time.time())
        if s.enabled
        else None
    )
    try:
        for file in files:
            await _import_file(store, config, source, file, sessions, report)
        if sessions is not None:
            report.staged += await store.stage_imports(sessions.ending())
    finally:
        await store.close()


async def _import_file(
    store: Queue,
    config: Config,
    source: str,
    file: str,
    sessions: Sessions | None,
    report: Report,
) -> None:
    now, started = time.time(), time.monotonic()
    limit = config.server.max_message_bytes
    chunk: list[NewMessage] = []
    with ArchiveFile(file) as (lines, size, position), _progress(file, size) as bar:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                for index, raw, envelope in messages_of(line):
                    report.read += 1
                    try:
                        message = imported(raw, envelope, source, now, limit)
                    except InvalidMessageError as exc:
                        report.refuse(file, number, str(exc), index)
                        continue
                    if sessions is not None:
                        chunk.extend(sessions.before(message))
                    chunk.append(message)
            except LineError as exc:
                report.refuse(file, number, str(exc))
            if len(chunk) >= CHUNK:
                report.staged += await store.stage_imports(chunk)
                chunk = []
                rate = report.read / max(time.monotonic() - started, 1e-9)
                bar.set_postfix_str(f"{report.read:,} messages, {rate:,.0f}/s", refresh=False)
                bar.update(position() - bar.n)
        report.staged += await store.stage_imports(chunk)
        bar.update(position() - bar.n)


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
