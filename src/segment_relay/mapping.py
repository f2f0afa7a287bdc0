"""Pure mapping of stored Segment messages to API-neutral Infinario commands (design.md section 4).

One stored message becomes at most one command: a customer update (identify, alias, group) or
an event (track, page, screen and the relay's own session events). `infinario.py` renders a
command in the configured API style.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .config import DEFAULT_CONTEXT_FIELDS, Config
from .errors import MappingError
from .segment import parse_time

MAX_PROPERTIES = 255
SESSION_TYPES = ("session_start", "session_end")
EVENT_TYPES = {"page": "page_visit", "screen": "screen_visit"}
_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")


@dataclass(frozen=True)
class MappingSettings:
    """What the mapping needs from the config."""

    registered_id: str = "registered"
    cookie_id: str = "cookie"
    context_fields: tuple[str, ...] = DEFAULT_CONTEXT_FIELDS


def mapping_settings(config: Config) -> MappingSettings:
    """The mapping's view of the config."""
    m = config.mapping
    return MappingSettings(m.registered_id, m.cookie_id, m.context_fields)


@dataclass(frozen=True)
class Command:
    """One API-neutral command: a customer update (`event_type` None) or an event."""

    message_id: str
    ids: dict[str, str]
    properties: dict[str, Any]
    timestamp: float
    event_type: str | None = None
    # Keys beyond MAX_PROPERTIES that were left out, for the dropped-keys counter.
    dropped_keys: int = field(default=0, compare=False)


@functools.lru_cache(maxsize=256)
def snake(name: str) -> str:
    """`userAgent` -> `user_agent`; names already in snake case are unchanged."""
    return _CAMEL.sub(r"_\1", name).lower()


def unpack(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Pairs in document order with the first level of object values unpacked.

    `{"address": {"country": "UK"}}` -> `("address_country", "UK")`; deeper objects stay
    objects, and an empty object unpacks to nothing.
    """
    for key, value in values.items():
        if isinstance(value, dict):
            for inner, inner_value in value.items():
                yield f"{prefix}{key}_{inner}", inner_value
        else:
            yield f"{prefix}{key}", value


def build_properties(pairs: Iterable[tuple[str, Any]]) -> tuple[dict[str, Any], int]:
    """Apply the property pipeline to unpacked pairs; return the properties and keys dropped.

    `.` and `$` in keys become `_`; on a collision the earlier pair wins; at most
    MAX_PROPERTIES keys are kept, the first in document order.
    """
    out: dict[str, Any] = {}
    dropped = 0
    for raw_key, value in pairs:
        key = raw_key.replace(".", "_").replace("$", "_")
        if key in out:
            continue
        if len(out) >= MAX_PROPERTIES:
            dropped += 1
            continue
        out[key] = value
    return out, dropped


def context_pairs(context: Any, names: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """The configured context fields as event properties (`os.name` -> `os_name`)."""
    if not isinstance(context, dict):
        return
    for name in names:
        value = context.get(name)
        if value is None:
            continue
        if isinstance(value, dict):
            yield from unpack({snake(name): value})
        else:
            yield snake(name), value


def _id(value: Any) -> str | None:
    if value is None or isinstance(value, bool | dict | list):
        return None
    text = str(value)
    return text if text else None


def customer_ids(message: dict[str, Any], settings: MappingSettings) -> dict[str, str]:
    """`userId` -> registered, `anonymousId` -> cookie; empty ids are left out."""
    ids: dict[str, str] = {}
    if (registered := _id(message.get("userId"))) is not None:
        ids[settings.registered_id] = registered
    if (cookie := _id(message.get("anonymousId"))) is not None:
        ids[settings.cookie_id] = cookie
    return ids


def _object(message: dict[str, Any], name: str) -> dict[str, Any]:
    value = message.get(name)
    return value if isinstance(value, dict) else {}


def map_message(message: dict[str, Any], settings: MappingSettings) -> Command | None:
    """Map one enriched Segment message; None when it is skipped (an alias without userId).

    Raises MappingError when the message cannot become a valid command.
    """
    kind = message.get("type")
    message_id = str(message.get("messageId") or "")
    timestamp = parse_time(message.get("timestamp"))
    if timestamp is None:
        raise MappingError(
            f"timestamp is missing or not an ISO 8601 time: {message.get('timestamp')!r}"
        )
    ids = customer_ids(message, settings)
    if kind == "alias":
        registered = _id(message.get("userId"))
        previous = _id(message.get("previousId"))
        if registered is None or previous is None:
            return None
        alias_ids = {settings.registered_id: registered, settings.cookie_id: previous}
        return Command(message_id, alias_ids, {}, timestamp)
    if not ids:
        raise MappingError("the message has neither userId nor anonymousId")
    if kind == "identify":
        props, dropped = build_properties(unpack(_object(message, "traits")))
        return Command(message_id, ids, props, timestamp, dropped_keys=dropped)
    if kind == "group":
        group_id = _id(message.get("groupId"))
        if group_id is None:
            raise MappingError("groupId is missing")
        pairs = [("group_id", group_id), *unpack(_object(message, "traits"), "group_")]
        props, dropped = build_properties(pairs)
        return Command(message_id, ids, props, timestamp, dropped_keys=dropped)
    return _event(kind, message, message_id, ids, timestamp, settings)


def _event(
    kind: Any,
    message: dict[str, Any],
    message_id: str,
    ids: dict[str, str],
    timestamp: float,
    settings: MappingSettings,
) -> Command:
    pairs: list[tuple[str, Any]] = list(unpack(_object(message, "properties")))
    if kind == "track":
        event = message.get("event")
        if not isinstance(event, str) or not event.strip():
            raise MappingError("track has no event name")
        event_type = event
    elif kind in EVENT_TYPES:
        event_type = EVENT_TYPES[kind]
        for name in ("name", "category"):
            if message.get(name) is not None:
                pairs.append((f"{kind}_{name}", message[name]))
    elif kind in SESSION_TYPES:
        event_type = kind
    else:
        raise MappingError(f"unknown message type {kind!r}")
    pairs.extend(context_pairs(message.get("context"), settings.context_fields))
    props, dropped = build_properties(pairs)
    return Command(message_id, ids, props, timestamp, event_type, dropped)
