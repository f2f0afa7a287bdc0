"""Pure: the rows one commit stores once the session rules have seen its messages.

The store reads the inputs (which messages were accepted before, the users' sessions) and
writes the outcome in the same transaction; what happens in between is here, without I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .records import NewMessage
from .sessions import Activity, SessionRules, SessionState


class Expansion(NamedTuple):
    """Each group's rows with the session events they cause (rows, how many are events), the
    session rows to save and how many sessions start."""

    groups: list[tuple[list[NewMessage], int]]
    saved: list[list[Any]]
    started: int


def session_activities(
    rules: SessionRules | None, messages: Sequence[NewMessage]
) -> dict[int, Activity]:
    """id(message) -> its session activity, for the messages that have one."""
    if rules is None:
        return {}
    return {
        id(m): a
        for m in messages
        if m.message is not None
        and (a := rules.activity(m.message, m.source, m.user_key, m.received_at)) is not None
    }


def expand(
    rules: SessionRules,
    groups: Sequence[list[NewMessage]],
    activities: dict[int, Activity],
    seen: set[tuple[str, str]],
    states: dict[str, SessionState],
) -> Expansion:
    """Each group's rows with the session events they cause, in order, given which messages
    were accepted before (`seen`, a repeat opens nothing) and the users' sessions (`states`).
    `seen` and `states` are updated as the messages are taken."""
    changed: dict[str, SessionState] = {}
    expanded: list[tuple[list[NewMessage], int]] = []
    started = 0
    for messages in groups:
        rows: list[NewMessage] = []
        for message in messages:
            activity = activities.get(id(message))
            key = (message.source, message.message_id)
            if activity is not None and key not in seen:
                seen.add(key)
                events, state = rules.on_activity(states.get(activity.user_key), activity)
                if state is not None:
                    states[activity.user_key] = changed[activity.user_key] = state
                for event in events:  # most calls extend a session: none
                    rows.append(NewMessage.session_event(event, message.received_at))
                    started += event.kind == "session_start"
            rows.append(message)
        expanded.append((rows, len(rows) - len(messages)))
    saved = [
        [s.user_key, s.source, s.started_at, s.last_activity, s.expires_at, s.ids, s.context]
        for s in changed.values()
    ]
    return Expansion(expanded, saved, started)
