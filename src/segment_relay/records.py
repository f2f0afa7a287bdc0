"""The rows the queue stores and hands out, immutable (no SQL here).

The two made once per message on the hot paths are NamedTuples: built by tuple.__new__,
several times cheaper than a frozen dataclass's __init__; the rest are frozen dataclasses.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Self

from . import jsontext
from .segment import user_key
from .sessions import Activity, SessionEvent


class NewMessage(NamedTuple):
    """An accepted message on its way into the queue."""

    source: str
    message_id: str
    user_key: str
    type: str
    # The message as JSON. A str: the bytes orjson makes take 4 KiB however short they are,
    # and a message waits for its commit (6,400 in flight for 64 clients' 100-message batches).
    body: str
    received_at: float
    # The message itself, for the live debugger (not stored apart from `body`).
    message: dict[str, Any] | None = None
    # The relay made its messageId (the client sent none): it cannot repeat an accepted one.
    fresh_id: bool = False
    # What the session rules need of the call, when it drives sessions.
    activity: Activity | None = None

    def row(self, dedup_window_s: float) -> list[Any]:
        """The message as an element of the `insert_messages` JSON array."""
        return [
            self.source,
            self.message_id,
            self.user_key,
            self.type,
            self.body,
            self.received_at,
            self.received_at - dedup_window_s,
        ]

    @classmethod
    def session_event(cls, event: SessionEvent, received_at: float) -> NewMessage:
        message_id = event.message_id
        session = event.session
        return cls(
            session.source,
            message_id,
            session.user_key,
            event.kind,
            event.body(message_id),
            received_at,
        )

    @staticmethod
    def without_repeats(rows: list[NewMessage]) -> list[NewMessage]:
        """`rows` with repeats of a (source, messageId) left out (the store's insert statements
        do not see the dedup rows that their own trigger writes)."""
        seen: set[tuple[str, str]] = set()
        unique = []
        for m in rows:
            key = (m.source, m.message_id)
            if key not in seen:
                seen.add(key)
                unique.append(m)
        return unique


class QueuedMessage(NamedTuple):
    """A message row in the queue."""

    seq: int
    source: str
    message_id: str
    user_key: str
    type: str
    # The stored message as JSON text. It is parsed only when used (`message`): a read-ahead
    # reads rows that a batch may not take.
    body: str
    received_at: float
    attempts: int
    next_attempt_at: float
    first_attempt_at: float | None
    last_error: str | None
    # The epoch of the lease under which it was claimed (docs/queue.md, "Several relays"):
    # its outcome is written only while that lease is still this process's. 0 for SQLite,
    # where one process owns the whole queue.
    lease: int = 0

    @classmethod
    def claimed(cls, row: Sequence[Any], lease: int) -> QueuedMessage:
        """A row of the due query (the fields above, in order, but `lease`), claimed under
        `lease`."""
        return cls._make((*row, lease))

    @property
    def message(self) -> dict[str, Any]:
        """The stored message, parsed (again at each use)."""
        parsed: dict[str, Any] = jsontext.loads_stored(self.body)
        return parsed


# Why a message was refused at ingest (segment.InvalidMessageError.reason): a dead letter for
# one is replayed only once fixed (docs/api.md, "Refused messages").
REFUSED_REASONS = ("invalid", "too_large")
# Every reason a message is dead-lettered for (docs/metrics.md): those the destination or the
# forwarder gave, then those refused at ingest.
DEAD_LETTER_REASONS = (
    "rejected",
    "refused",
    "expired",
    "mapping_error",
    "project_limit",
    *REFUSED_REASONS,
)


class Refusal(NamedTuple):
    """A message refused inside a request, kept as a dead letter with the reason."""

    source: str
    message_id: str  # the message's own (empty when it has none)
    user_key: str
    type: str
    # The message as received, as JSON (its first server.max_message_bytes when larger).
    body: str
    received_at: float
    reason: str
    detail: str

    @classmethod
    def of(
        cls,
        raw: Any,
        call_type: str | None,
        source: str,
        received_at: float,
        *,
        reason: str,
        detail: str,
        max_bytes: int,
    ) -> Refusal:
        fields = raw if isinstance(raw, dict) else {}
        message_id, kind = (fields.get(k) for k in ("messageId", "type"))
        try:
            body = jsontext.dumps(raw)
        except jsontext.InvalidJSONError as exc:  # nested too deeply to be written
            body = jsontext.dumps({"unwritable": str(exc)})
        if len(body) > max_bytes:
            body = body[:max_bytes]
        return cls(
            source,
            message_id if isinstance(message_id, str) else "",
            user_key(fields),
            call_type or (kind if isinstance(kind, str) else ""),
            body.decode("utf-8", "ignore"),
            received_at,
            reason,
            detail,
        )


class DueRead(NamedTuple):
    """One read of the due messages (Store.read_due)."""

    rows: list[QueuedMessage]
    # The highest seq the read looked at: a message up to it that is not in `rows` was not due.
    looked: int
    # How many dead letters have been replayed into the queue, ever: replays go back under
    # their old seqs, below what earlier reads looked at.
    replayed: int


@dataclass(frozen=True)
class DeadLetter:
    """A message that left the queue without being delivered, and why."""

    id: int
    seq: int
    source: str
    message_id: str
    user_key: str
    type: str
    body: str  # the message as JSON text
    received_at: float
    reason: str
    detail: str
    response_status: int | None
    response_body: str | None
    attempts: int
    first_attempt_at: float | None
    last_attempt_at: float

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Self:
        return cls(*row)

    @property
    def refused(self) -> bool:
        """Refused at ingest and not fixed since: not replayable as it is."""
        return self.reason in REFUSED_REASONS


@dataclass(frozen=True)
class Failure:
    """Why a message is dead-lettered."""

    reason: str
    detail: str = ""
    response_status: int | None = None
    response_body: str | None = None


@dataclass(frozen=True)
class Instance:
    """A relay process sharing a PostgreSQL queue (`segment-relay status`)."""

    id: str
    host: str
    pid: int
    started_at: float
    seen_at: float
    # The buckets of users whose messages it forwards (docs/queue.md, "Several relays").
    buckets: list[int]
    # False: a receive-only relay (queue.forward: false), which holds no buckets.
    forwards: bool = True


@dataclass(frozen=True)
class QueueStats:
    """What `segment-relay status` shows."""

    pending: int
    in_backoff: int
    oldest_received_at: float | None
    dead_letters: dict[str, int]
    counters: dict[str, int]

    @classmethod
    def of(
        cls,
        pending: int,
        in_backoff: int,
        oldest: float | None,
        dead: Iterable[Sequence[Any]],
        counters: Iterable[Sequence[Any]],
    ) -> QueueStats:
        """From the queue's rows: (reason, count) of the dead letters, (name, value) counters."""
        return cls(
            int(pending),
            int(in_backoff),
            oldest,
            {str(r[0]): int(r[1]) for r in dead},
            {str(r[0]): int(r[1]) for r in counters},
        )
