"""Pure idle-session rules (docs/sessions.md): no I/O, time passed in.

Page and screen calls (and any configured track events) drive a session per user key
(`anonymousId`, else `userId`). Event time decides whether a call continues a session; the wall
clock decides when an idle session is closed by the timer. The store applies these rules inside
the transaction that stores the calls, so a crash can neither lose nor repeat a session event.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from . import jsontext
from .segment import format_time, parse_time

_ID_FIELDS = ("userId", "anonymousId")


def _session_id(value: Any) -> Any:
    """An id as a session keeps it: an integer past 64 bits as its digits (orjson writes no
    such integer, and the mapping sends ids as text all the same)."""
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return str(value)
    return value


class SessionState(NamedTuple):
    """An open session: event times in Unix seconds, `expires_at` on the wall clock.

    This and Activity are NamedTuples: one is made per session call, and a frozen dataclass's
    __init__ costs several times more. A state holds no container that Python's garbage
    collector tracks (ids are strings and numbers, the context is JSON text), so the states
    the store caches are left out of its collections: with the context as a dict, 10,000
    cached sessions made full collections take 38 ms and cost 6 us per page call.
    """

    user_key: str
    source: str
    started_at: float
    last_activity: float
    expires_at: float
    # userId / anonymousId last seen in the session: a session_end carries the ids known at
    # its end (a login during the session adds the userId).
    ids: dict[str, Any]
    # The context of the call that opened the session, as JSON, copied onto both session
    # events (None: that call had none).
    context: str | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> SessionState:
        """A row of the sessions table (ids as JSON, or already parsed)."""
        ids = row[5]
        return cls(
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            ids if isinstance(ids, dict) else orjson.loads(ids),
            row[6] if row[6] is None or isinstance(row[6], str) else bytes(row[6]).decode(),
        )

    def json_context(self) -> orjson.Fragment | None:
        """The context, to be written into a JSON document as is."""
        return None if self.context is None else orjson.Fragment(self.context)


class SessionEvent(NamedTuple):
    """A session_start or session_end to enqueue, as a Segment-like message."""

    kind: str
    session: SessionState

    @property
    def timestamp(self) -> float:
        if self.kind == "session_start":
            return self.session.started_at
        return self.session.last_activity

    @property
    def message_id(self) -> str:
        session = self.session
        return f"{self.kind}:{session.user_key}:{session.started_at:.3f}"

    def body(self, message_id: str | None = None) -> str:
        """The message, as JSON, that the forwarder maps like any other event (`message_id`:
        this event's, when the caller has it)."""
        session = self.session
        message: dict[str, Any] = {
            "type": self.kind,
            "messageId": self.message_id if message_id is None else message_id,
            **session.ids,
            "timestamp": format_time(self.timestamp),
        }
        if session.context is not None:
            message["context"] = orjson.Fragment(session.context)
        if self.kind == "session_end":
            message["properties"] = {
                "duration": round(session.last_activity - session.started_at, 3)
            }
        return jsontext.stored(orjson.dumps(message))


class Activity(NamedTuple):
    """A call that opens or extends a session, as the rules see it. The receiver makes it as
    it accepts the call, so that the parsed call need not wait for the commit."""

    user_key: str
    source: str
    event_time: float
    wall_time: float
    ids: dict[str, Any]
    # The call's context as JSON (None: it has none), for a session it opens.
    context: str | None


@dataclass(frozen=True)
class SessionRules:
    """Which calls are session activity, and the idle timeout."""

    idle_timeout_s: float
    event_types: frozenset[str] = frozenset({"page", "screen"})

    @classmethod
    def of(cls, idle_timeout_s: float, event_types: Iterable[str]) -> SessionRules:
        return cls(idle_timeout_s, frozenset(event_types))

    def activity(
        self, message: dict[str, Any], source: str, user_key: str, wall_time: float
    ) -> Activity | None:
        """The message as session activity, or None when it does not touch sessions: it is
        not of a type, or a track call of an event name, in `event_types`."""
        kind = message.get("type")
        if kind not in self.event_types and (
            kind != "track" or message.get("event") not in self.event_types
        ):
            return None
        event_time = parse_time(message.get("timestamp"))
        if event_time is None or not user_key:
            return None
        ids = {}
        for name in _ID_FIELDS:  # a loop, not a comprehension: this runs for every page call
            value = message.get(name)
            if value is not None and value != "":
                ids[name] = _session_id(value)
        context = message.get("context")
        return Activity(
            user_key,
            source,
            event_time,
            wall_time,
            ids,
            # A str: the bytes orjson makes take 4 KiB however short they are.
            jsontext.dumps(context).decode() if isinstance(context, dict) and context else None,
        )

    def on_activity(
        self, session: SessionState | None, activity: Activity
    ) -> tuple[list[SessionEvent], SessionState | None]:
        """The session events a call causes (in enqueue order, before the call) and the new state.

        Opens a session when there is none; a call more than the timeout after the last
        activity (in event time) closes the old session first and opens a new one; a call far
        older than the session (historical data) leaves it alone.
        """
        timeout = self.idle_timeout_s
        _, _, event_time, wall_time, call_ids, _ = activity  # unpacked: once per session call
        expires_at = wall_time + timeout
        if session is None:
            opened = self._open(activity, expires_at)
            return [SessionEvent("session_start", opened)], opened
        user_key, source, started_at, last_activity, expiry, ids, context = session
        if event_time - last_activity > timeout:
            opened = self._open(activity, expires_at)
            return [
                SessionEvent("session_end", session),
                SessionEvent("session_start", opened),
            ], opened
        if event_time < started_at - timeout:
            return [], session
        if not call_ids.items() <= ids.items():  # ids are strings or numbers (validated)
            ids = {**ids, **call_ids}  # a login during the session adds the userId
        extended = SessionState(
            user_key,
            source,
            event_time if event_time < started_at else started_at,
            event_time if event_time > last_activity else last_activity,
            expires_at if expires_at > expiry else expiry,
            ids,
            context,
        )
        return [], extended

    @staticmethod
    def _open(activity: Activity, expires_at: float) -> SessionState:
        # Positional, and the call's own ids (no state changes a dict in place): once per
        # session, within the commit.
        event_time = activity.event_time
        return SessionState(
            activity.user_key,
            activity.source,
            event_time,
            event_time,
            expires_at,
            activity.ids,
            activity.context,
        )
