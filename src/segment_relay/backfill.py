"""Backfill (docs/operations.md, "Importing archives"): Segment's archive lines as messages,
historical sessions from their own times, and the relay's feeder that lets imported
messages into the queue only while live calls are not waiting.

The reading and the sessions are pure; `feed` is the daemon's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import jsontext
from .queue.protocol import Queue
from .records import NewMessage
from .segment import BatchEnvelope, InvalidMessageError, parse_time, prepare, user_key
from .sessions import Activity, SessionEvent, SessionRules, SessionState

log = logging.getLogger(__name__)

# The feeder moves imported messages in chunks while fewer than FEED_BELOW wait in the queue:
# a live call waits behind at most one chunk's batches.
FEED_BELOW = 1000
FEED_CHUNK = 500
FEED_IDLE_S = 1.0


class LineError(ValueError):
    """A line of an archive that cannot be imported, and why."""


def messages_of(line: bytes) -> Iterator[tuple[int, Any, BatchEnvelope]]:
    """The messages of one archive line (a message, or `{"batch": [...]}` with its context),
    each with its index in the line. A message without a messageId gets one made from the
    line, so that importing the line again repeats it. LineError for a line that is neither.
    """
    try:
        value = jsontext.loads(line)
    except jsontext.InvalidJSONError as exc:
        raise LineError(f"not JSON: {exc}") from exc
    if isinstance(value, dict) and isinstance(value.get("batch"), list):
        context, integrations = value.get("context"), value.get("integrations")
        envelope = BatchEnvelope(
            context=context if isinstance(context, dict) else None,
            integrations=integrations if isinstance(integrations, dict) else None,
        )
        items: list[Any] = value["batch"]
    else:
        envelope, items = BatchEnvelope(), [value]
    digest = hashlib.sha256(line.strip()).hexdigest()[:32]  # the same with CRLF or none
    for index, item in enumerate(items):
        if isinstance(item, dict) and not item.get("messageId"):
            yield index, {**item, "messageId": f"import-{digest}-{index}"}, envelope
        else:
            yield index, item, envelope


def imported(
    raw: Any, envelope: BatchEnvelope, source: str, now: float, max_bytes: int
) -> NewMessage:
    """One archived message checked and enriched as the API does, keeping its own time: its
    `timestamp` as it is (no clock-skew correction by `sentAt`: the archive's times are
    Segment's), its `receivedAt` when it has one. Queued as of `now` (max_age counts from
    there). InvalidMessageError as the API's."""
    if not isinstance(raw, dict):
        raise InvalidMessageError(f"a message must be a JSON object, got {type(raw).__name__}")
    received_at = parse_time(raw.get("receivedAt")) or now
    own = {k: v for k, v in raw.items() if k != "sentAt"}
    message, encoded = prepare(own, None, received_at, envelope, max_bytes)
    return NewMessage(
        source, str(message["messageId"]), user_key(message), str(message["type"]),
        encoded.decode(), now, message,
    )  # fmt: skip


@dataclass
class Parsed:
    """What a run of archive lines holds: the messages, each with its session activity (None:
    none), in order; the lines or messages refused (line number, index in a batch line,
    reason); how many messages were read."""

    messages: list[tuple[NewMessage, Activity | None]] = field(default_factory=list)
    refused: list[tuple[int, int | None, str]] = field(default_factory=list)
    read: int = 0


def parse_lines(
    lines: list[bytes],
    first: int,
    source: str,
    now: float,
    max_bytes: int,
    rules: SessionRules | None,
) -> Parsed:
    """The messages of `lines` (numbered from `first`), as `imported` makes them. Pure, so
    that worker processes can run it (import_cli.Parsers)."""
    parsed = Parsed()
    for number, line in enumerate(lines, first):
        if not line.strip():
            continue
        try:
            for index, raw, envelope in messages_of(line):
                parsed.read += 1
                try:
                    message = imported(raw, envelope, source, now, max_bytes)
                except InvalidMessageError as exc:
                    parsed.refused.append((number, index, str(exc)))
                    continue
                assert message.message is not None
                activity = (
                    None
                    if rules is None
                    else rules.activity(message.message, source, message.user_key, 0.0)
                )
                # Without the parsed message: only what the queue stores crosses processes.
                parsed.messages.append((message._replace(message=None), activity))
        except LineError as exc:
            parsed.refused.append((number, None, str(exc)))
    return parsed


@dataclass
class Sessions:
    """Sessions of imported calls from their own times, apart from the live ones: a gap over
    the idle timeout starts a new session; every session still open ends with the import."""

    rules: SessionRules
    now: float
    open: dict[str, SessionState] = field(default_factory=dict)

    def before(self, message: NewMessage, activity: Activity | None) -> list[NewMessage]:
        """The session events to queue before `message`, whose session `activity` it is
        (none: it is not session activity)."""
        if activity is None:
            return []
        events, state = self.rules.on_activity(self.open.get(message.user_key), activity)
        if state is not None:
            self.open[message.user_key] = state
        return [self._row(event) for event in events]

    def ending(self) -> list[NewMessage]:
        """A session_end for every session the import opened (at its last call)."""
        ends = [self._row(SessionEvent("session_end", s)) for s in self.open.values()]
        self.open.clear()
        return ends

    def _row(self, event: SessionEvent) -> NewMessage:
        session = event.session
        return NewMessage(
            session.source, event.message_id, session.user_key, event.kind, event.body(),
            self.now,
        )  # fmt: skip


async def feed(store: Queue, stop: asyncio.Event) -> None:
    """The daemon's feeder: imported messages into the queue, a chunk at a time, while fewer
    than FEED_BELOW messages wait there; otherwise it looks again every FEED_IDLE_S."""
    while not stop.is_set():
        moved = 0
        if store.pending_count < FEED_BELOW:
            try:
                moved = await store.feed_imports(FEED_CHUNK)
            except Exception as exc:  # noqa: BLE001 - the relay goes on; the imports wait
                log.warning(
                    "cannot feed imported messages into the queue (they wait): %s",
                    exc,
                    extra={"action": "feed_failed"},
                )
        if moved:
            log.debug("fed %d imported messages into the queue", moved, extra={"action": "fed"})
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), FEED_IDLE_S)
