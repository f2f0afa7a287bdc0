"""Pure Segment message rules: validation, enrichment and clock-skew correction.

No I/O here: the receiver hands in parsed JSON and the server clock, and gets back either an
enriched message ready to store or the reason it is refused.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from . import jsontext
from .edge import fills_ip

CALL_TYPES = ("identify", "track", "page", "screen", "group", "alias")
# Path segment -> message type, long and browser short forms.
PATH_TYPES = {
    "identify": "identify",
    "track": "track",
    "page": "page",
    "screen": "screen",
    "group": "group",
    "alias": "alias",
    "i": "identify",
    "t": "track",
    "p": "page",
    "s": "screen",
    "g": "group",
    "a": "alias",
}
_OBJECT_FIELDS = ("traits", "properties", "context", "integrations")
_STRING_FIELDS = ("name", "category", "messageId")
MAX_ID_CHARS = 1024
MAX_EVENT_CHARS = 1024
MIN_TIME_S = 0.0
MAX_TIME_S = 4_102_444_800.0  # 2100-01-01


class InvalidMessageError(ValueError):
    """A message the receiver refuses, with a reason a client developer can act on."""

    reason = "invalid"


class MessageTooLargeError(InvalidMessageError):
    """A message over server.max_message_bytes."""

    reason = "too_large"


def parse_time(value: Any) -> float | None:
    """An ISO 8601 time as Unix seconds, or None when it is not a valid time string."""
    if not isinstance(value, str) or not value or len(value) > 64:
        return None
    return _parse_iso(value)


@functools.lru_cache(maxsize=4096)
def _parse_iso(value: str) -> float | None:
    # Cached: a message's times are read more than once (checked, then corrected), and
    # calls sent together share them (an archive's messages: 28.4 -> 25.9 us each to check
    # and enrich, the mean of three runs each).
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return moment.timestamp()
    except (OverflowError, OSError):
        return None


def format_time(seconds: float) -> str:
    """Unix seconds as ISO 8601 UTC with milliseconds, as Segment writes it."""
    # As datetime does it: round to microseconds, then cut to milliseconds.
    whole = math.floor(seconds)
    micros = round((seconds - whole) * 1_000_000)
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    return _format_millisecond(whole, micros // 1000)


@functools.lru_cache(maxsize=4096)
def _format_millisecond(whole: int, millis: int) -> str:
    # Calls arriving together share their millisecond, or at least their second: cached, a
    # time costs a dict lookup (a receivedAt and a timestamp are formatted per message).
    return f"{_format_second(whole)}.{millis:03d}Z"


@functools.lru_cache(maxsize=1024)
def _format_second(whole: int) -> str:
    return datetime.fromtimestamp(whole, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


_ids = random.Random()
_UUID7_VERSION_VARIANT = (0x7 << 76) | (0b10 << 62)
_MS_MASK = (1 << 48) - 1


def new_message_id(received_at: float) -> str:
    """A time-ordered (version 7, RFC 9562) UUID for a message received without one.

    The first 48 bits are `received_at` in milliseconds, so ids generated together sit together
    in the dedup index: a commit dirties a few of its pages instead of one page per message
    (random version 4 ids made the SQLite thread write ~6x the data to the WAL; 100-message
    batches, receiver only: 240 -> 355 requests/s). The other 74 bits are random, from a
    seeded-at-start PRNG: ids only need to be unique, and os.urandom's system call per id was
    7% of the receiver's time under load.
    """
    ms = int(received_at * 1000) & _MS_MASK
    rand = _ids.getrandbits(74)
    bits = (ms << 80) | ((rand >> 62) << 64) | (rand & ((1 << 62) - 1)) | _UUID7_VERSION_VARIANT
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, str):
        return len(value.strip()) > 0 and len(value) <= MAX_ID_CHARS
    return isinstance(value, int | float)


def validate(message: Any, call_type: str | None) -> dict[str, Any]:
    """Check one message; return it with its `type` set, or raise InvalidMessageError.

    `call_type` is the type given by the path (single calls); batch items carry their own.
    """
    if not isinstance(message, dict):
        raise InvalidMessageError(f"a message must be a JSON object, got {type(message).__name__}")
    kind = call_type or message.get("type")
    if kind not in CALL_TYPES:
        raise InvalidMessageError(f"type must be one of {', '.join(CALL_TYPES)}, got {kind!r}")
    _check_field_types(message)
    _check_ids(message)
    _check_type_fields(message, kind)
    checked: dict[str, Any] = message if message.get("type") == kind else {**message, "type": kind}
    return checked


def _check_field_types(message: dict[str, Any]) -> None:
    for name in _OBJECT_FIELDS:
        if message.get(name) is not None and not isinstance(message[name], dict):
            raise InvalidMessageError(f"{name} must be an object")
    for name in _STRING_FIELDS:
        if message.get(name) is not None and not isinstance(message[name], str):
            raise InvalidMessageError(f"{name} must be a string")
    for name in ("timestamp", "sentAt", "originalTimestamp"):
        if message.get(name) is not None and parse_time(message[name]) is None:
            raise InvalidMessageError(f"{name} must be an ISO 8601 time, got {message[name]!r}")


def _check_ids(message: dict[str, Any]) -> None:
    if not _valid_id(message.get("userId")) and not _valid_id(message.get("anonymousId")):
        raise InvalidMessageError(
            "userId or anonymousId is required (a non-empty string or number)"
        )
    for name in ("userId", "anonymousId"):
        if message.get(name) is not None and not _valid_id(message[name]):
            raise InvalidMessageError(f"{name} must be a non-empty string or a number")


def _check_type_fields(message: dict[str, Any], kind: str) -> None:
    if kind == "track":
        event = message.get("event")
        if not isinstance(event, str) or not event.strip():
            raise InvalidMessageError("event is required on track and must be a non-empty string")
        if len(event) > MAX_EVENT_CHARS:
            raise InvalidMessageError(f"event must be at most {MAX_EVENT_CHARS} characters")
    elif kind == "alias":
        if not _valid_id(message.get("userId")) or not _valid_id(message.get("previousId")):
            raise InvalidMessageError("alias requires userId and previousId")
    elif kind == "group" and not _valid_id(message.get("groupId")):
        raise InvalidMessageError("groupId is required on group")


@dataclass(frozen=True)
class BatchEnvelope:
    """What a batch request says about all of its messages."""

    sent_at: float | None = None
    context: dict[str, Any] | None = None
    integrations: dict[str, Any] | None = None
    # The client's address, for the calls that get it as context.ip (edge.fills_ip).
    client_ip: str | None = None


def corrected_timestamp(
    message: dict[str, Any], received_at: float, batch_sent_at: float | None
) -> float:
    """The event time with the client's clock skew removed (docs/api.md).

    `receivedAt - (sentAt - timestamp)` when the client said when it sent the call, else the
    client's own timestamp, else the time the relay received it.
    """
    client_time = parse_time(message.get("timestamp"))
    sent_at = parse_time(message.get("sentAt"))
    if sent_at is None:
        sent_at = batch_sent_at
    if client_time is None:
        return received_at
    if sent_at is None:
        return client_time
    return received_at - (sent_at - client_time)


def enrich(message: dict[str, Any], received_at: float, envelope: BatchEnvelope) -> dict[str, Any]:
    """A validated message as stored: messageId, receivedAt, corrected timestamp, merged context.

    The client's own timestamp is kept as `originalTimestamp`; the write key is never stored.
    """
    out = dict(message)
    out.pop("writeKey", None)
    if not out.get("messageId"):
        out["messageId"] = new_message_id(received_at)
    if envelope.context:
        out["context"] = {**envelope.context, **(out.get("context") or {})}
    if envelope.client_ip is not None and fills_ip(out.get("context")):
        out["context"] = {**out["context"], "ip": envelope.client_ip}
    if envelope.integrations:
        out["integrations"] = {**envelope.integrations, **(out.get("integrations") or {})}
    if "timestamp" in out and "originalTimestamp" not in out:
        out["originalTimestamp"] = out["timestamp"]
    corrected = corrected_timestamp(message, received_at, envelope.sent_at)
    if not MIN_TIME_S <= corrected <= MAX_TIME_S:
        raise InvalidMessageError(
            "timestamp, corrected by sentAt, falls outside the years 1970-2100"
        )
    out["timestamp"] = format_time(corrected)
    out["receivedAt"] = format_time(received_at)
    return out


def prepare(
    raw: Any, call_type: str | None, received_at: float, envelope: BatchEnvelope, max_bytes: int
) -> tuple[dict[str, Any], bytes]:
    """A call as the queue stores it: validated, enriched, and as JSON of at most `max_bytes`;
    InvalidMessageError (or MessageTooLargeError) otherwise."""
    enriched = enrich(validate(raw, call_type), received_at, envelope)
    try:
        encoded = jsontext.dumps(enriched)
    except jsontext.InvalidJSONError as exc:
        raise InvalidMessageError(str(exc)) from exc
    if len(encoded) > max_bytes:
        raise MessageTooLargeError(
            f"the message is {len(encoded)} bytes; at most {max_bytes} are accepted"
        )
    return enriched, encoded


def user_key(message: dict[str, Any]) -> str:
    """The key that orders a user's messages and drives sessions: anonymousId, else userId."""
    for name in ("anonymousId", "userId"):
        value = message.get(name)
        if _valid_id(value):
            return str(value)
    return ""
