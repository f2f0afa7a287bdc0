"""Pure mapping of stored Segment messages to API-neutral Infinario commands (docs/mapping.md).

One stored message becomes at most one command: a customer update (identify, alias, group) or
an event (track, page, screen and the relay's own session events). `infinario.py` renders a
command in the configured API style.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
    # (field, property name) for each context field, computed once.
    context_names: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = tuple((name, snake(name)) for name in self.context_fields)
        object.__setattr__(self, "context_names", names)


def mapping_settings(config: Config) -> MappingSettings:
    """The mapping's view of the config."""
    m = config.mapping
    return MappingSettings(m.registered_id, m.cookie_id, m.context_fields)


class Command(NamedTuple):
    """One API-neutral command: a customer update (`event_type` None) or an event.

    A NamedTuple, as the records made per message on the event loop are (records.py).
    """

    message_id: str
    ids: dict[str, str]
    properties: dict[str, Any]
    timestamp: float
    event_type: str | None = None
    # Keys beyond MAX_PROPERTIES that were left out, for the dropped-keys counter.
    dropped_keys: int = 0


def snake(name: str) -> str:
    """`userAgent` -> `user_agent`; names already in snake case are unchanged."""
    return _CAMEL.sub(r"_\1", name).lower()


def add_property(out: dict[str, Any], key: str, value: Any) -> int:
    """Put one pair through the property pipeline into `out`; return how many keys it dropped.

    An object value is unpacked one level (`address: {country: UK}` -> `address_country`;
    deeper objects stay objects, an empty object adds nothing). No generators or pair lists:
    the forwarder maps every event on the event loop.
    """
    if not isinstance(value, dict):
        return _put(out, key, value)
    dropped = 0
    for inner, inner_value in value.items():
        dropped += _put(out, f"{key}_{inner}", inner_value)
    return dropped


def _put(out: dict[str, Any], key: str, value: Any) -> int:
    """`.` and `$` in the key become `_`; on a collision the earlier pair wins; at most
    MAX_PROPERTIES keys are kept, the first in document order. Returns the keys dropped."""
    if "." in key or "$" in key:
        key = key.replace(".", "_").replace("$", "_")
    if key in out:
        return 0
    if len(out) >= MAX_PROPERTIES:
        return 1
    out[key] = value
    return 0


def add_properties(out: dict[str, Any], values: Any, prefix: str = "") -> int:
    """`add_property` for each pair of an object (nothing when it is not one)."""
    dropped = 0
    if isinstance(values, dict):
        for key, value in values.items():
            dropped += add_property(out, prefix + key, value)
    return dropped


def add_context(out: dict[str, Any], context: Any, names: tuple[tuple[str, str], ...]) -> int:
    """The context fields `names` (field, property name) as event properties
    (`os.name` -> `os_name`)."""
    dropped = 0
    if isinstance(context, dict):
        for name, key in names:
            value = context.get(name)
            if value is not None:
                dropped += add_property(out, key, value)
    return dropped


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
    props: dict[str, Any] = {}
    if kind == "identify":
        dropped = add_properties(props, message.get("traits"))
        return Command(message_id, ids, props, timestamp, dropped_keys=dropped)
    if kind == "group":
        group_id = _id(message.get("groupId"))
        if group_id is None:
            raise MappingError("groupId is missing")
        dropped = add_property(props, "group_id", group_id)
        dropped += add_properties(props, message.get("traits"), "group_")
        return Command(message_id, ids, props, timestamp, dropped_keys=dropped)
    event_type = _event_type(kind, message)
    dropped = add_properties(props, message.get("properties"))
    if kind in EVENT_TYPES:
        for name in ("name", "category"):
            if message.get(name) is not None:
                dropped += add_property(props, f"{kind}_{name}", message[name])
    dropped += add_context(props, message.get("context"), settings.context_names)
    return Command(message_id, ids, props, timestamp, event_type, dropped)


def _event_type(kind: Any, message: dict[str, Any]) -> str:
    if kind == "track":
        event = message.get("event")
        if not isinstance(event, str) or not event.strip():
            raise MappingError("track has no event name")
        return event
    if kind in EVENT_TYPES:
        return EVENT_TYPES[kind]
    if kind in SESSION_TYPES:
        return str(kind)
    raise MappingError(f"unknown message type {kind!r}")
