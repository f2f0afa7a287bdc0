"""`segment-relay dead-letters`: list, show, fix, replay and purge dead letters (docs/api.md,
"Refused messages"). The queue does the work; this module says what happened."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from . import jsontext
from .config import Config, load_config, parse_duration
from .queue import Queue, open_queue
from .records import DeadLetter, NewMessage
from .segment import CALL_TYPES, BatchEnvelope, InvalidMessageError, prepare, user_key

EXIT_FAILED = 1
EXIT_USAGE = 64


def add_parser(commands: Any) -> None:
    """The `dead-letters` command and its actions, under the CLI's `commands`."""
    dead = commands.add_parser("dead-letters", help="list, show, fix, replay or purge dead letters")
    actions = dead.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="one line per dead letter, oldest first")
    listing.add_argument("--reason", help="only those dead-lettered for this reason")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true", help="one JSON object a line, for scripts")
    show = actions.add_parser("show", help="one dead letter in full, as JSON")
    show.add_argument("id", type=int)
    fix = actions.add_parser(
        "fix", help="replace a dead letter's message (checked as the API checks it); then replay"
    )
    fix.add_argument("id", type=int)
    fix.add_argument("file", help="the message as JSON (- for standard input)")
    replay = actions.add_parser("replay", help="move dead letters back to the queue")
    replay.add_argument("ids", type=int, nargs="*", help="the dead letters to replay")
    replay.add_argument("--reason", help="replay every dead letter with this reason")
    purge = actions.add_parser("purge", help="delete dead letters")
    purge.add_argument("--older-than", help="only those last tried before this long ago (e.g. 7d)")
    purge.add_argument(
        "--yes", action="store_true", help="purge every dead letter without asking (scripts)"
    )
    for sub in (listing, show, fix, replay, purge):
        sub.add_argument("-c", "--config", required=True)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.action == "replay" and not args.ids and not args.reason:
        print("segment-relay: dead-letters replay needs IDs or --reason", file=sys.stderr)
        return EXIT_USAGE
    if args.action == "purge" and args.older_than is None and not args.yes:
        if not sys.stdin.isatty():
            print(
                "segment-relay: dead-letters purge without --older-than deletes every dead "
                "letter: add --yes to do that",
                file=sys.stderr,
            )
            return EXIT_USAGE
        answer = input("Delete every dead letter, for good? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing purged")
            return EXIT_FAILED
    if args.action == "fix":
        try:
            args.text = (
                sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
            )
        except OSError as exc:
            print(f"segment-relay: cannot read {args.file}: {exc}", file=sys.stderr)
            return EXIT_USAGE

    async def act() -> int:
        store = await open_queue(config.queue, daemon=False)
        try:
            return await _act(store, config, args)
        finally:
            await store.close()

    return asyncio.run(act())


async def _act(store: Queue, config: Config, args: argparse.Namespace) -> int:
    now = time.time()
    if args.action == "list":
        return await _list(store, args.limit, args.reason, as_json=args.json)
    if args.action == "show":
        dead = await store.dead_letter(args.id)
        if dead is None:
            print(f"segment-relay: no dead letter {args.id}", file=sys.stderr)
            return EXIT_FAILED
        print(jsontext.dumps_indented({**dead.__dict__, "body": _body(dead)}))
        return 0
    if args.action == "fix":
        return await _fix(store, config, args.id, args.file, args.text)
    if args.action == "replay":
        return await _replay(store, args, now)
    older = parse_duration(args.older_than or 0, "--older-than")
    print(f"purged {await store.purge_dead_letters(now - older)} dead letters")
    return 0


LIST_COLUMNS = ("ID", "LAST TRIED (UTC)", "REASON", "TYPE", "MESSAGE ID", "DETAIL")
DETAIL_WIDTH = 80


async def _list(store: Queue, limit: int, reason: str | None, *, as_json: bool) -> int:
    found = await store.dead_letters(limit=limit, reason=reason)
    if as_json:
        for d in found:
            print(jsontext.dumps({k: v for k, v in d.__dict__.items() if k != "body"}).decode())
        return 0
    if not found:
        counts = (await store.stats(time.time())).dead_letters
        held = ", ".join(f"{n} {why}" for why, n in sorted(counts.items()))
        if reason is None:
            print("no dead letters")
        else:
            print(f"no dead letters with reason {reason!r} (there are: {held or 'none'})")
        return 0
    rows = [LIST_COLUMNS] + [
        (
            str(d.id),
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.last_attempt_at)),
            d.reason,
            d.type,
            d.message_id,
            d.detail if len(d.detail) <= DETAIL_WIDTH else d.detail[: DETAIL_WIDTH - 3] + "...",
        )
        for d in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(LIST_COLUMNS) - 1)]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]))
    if len(found) == limit:
        print(f"(the first {limit}; --limit N shows more)")
    return 0


def _body(dead: DeadLetter) -> Any:
    """The message as JSON, or the text as kept (a refused message cut at the size limit)."""
    try:
        return jsontext.loads_stored(dead.body)
    except ValueError:
        return dead.body


async def _fix(store: Queue, config: Config, dead_id: int, file: str, text: bytes) -> int:
    dead = await store.dead_letter(dead_id)
    if dead is None:
        print(f"segment-relay: no dead letter {dead_id}", file=sys.stderr)
        return EXIT_FAILED
    try:
        raw = jsontext.loads(text)
        # A message refused on /v1/<type> may carry no type of its own: the path gave it.
        path_type = dead.type if dead.type in CALL_TYPES else None
        own_type = isinstance(raw, dict) and raw.get("type")
        limit = config.server.max_message_bytes
        message, encoded = prepare(
            raw, None if own_type else path_type, dead.received_at, BatchEnvelope(), limit
        )
    except (jsontext.InvalidJSONError, InvalidMessageError) as exc:
        print(f"segment-relay: {file}: the message is still refused: {exc}", file=sys.stderr)
        return EXIT_FAILED
    fixed = NewMessage(
        dead.source,
        str(message["messageId"]),
        user_key(message),
        str(message["type"]),
        encoded.decode(),
        dead.received_at,
    )
    was = f"fixed; was {dead.reason}: {dead.detail}"
    if not await store.fix_dead_letter(dead_id, fixed, was):
        print(f"segment-relay: no dead letter {dead_id}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"fixed dead letter {dead_id}; replay it with: segment-relay dead-letters replay {dead_id}"
    )
    return 0


async def _replay(store: Queue, args: argparse.Namespace, now: float) -> int:
    ids = list(args.ids)
    if args.reason:
        after = 0
        while batch := await store.dead_letters(limit=1000, reason=args.reason, after=after):
            ids.extend(d.id for d in batch)
            after = batch[-1].id
    found = {i: await store.dead_letter(i) for i in dict.fromkeys(ids)}
    missing = [i for i, d in found.items() if d is None]
    refused = [d for d in found.values() if d is not None and d.refused]
    replayable = [i for i, d in found.items() if d is not None and not d.refused]
    moved = await store.replay(replayable, now) if replayable else 0
    print(f"replayed {moved} dead letters")
    for d in refused:
        print(
            f"segment-relay: dead letter {d.id} was refused at ingest ({d.reason}: "
            f"{d.detail}); fix it first: segment-relay dead-letters fix {d.id} FILE",
            file=sys.stderr,
        )
    if missing:
        print(f"segment-relay: no dead letter {', '.join(map(str, missing))}", file=sys.stderr)
    return EXIT_FAILED if refused or missing else 0
