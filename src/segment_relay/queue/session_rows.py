"""Pure: the rows one commit stores once the session rules have seen its messages.

The store reads the inputs (which messages were accepted before, the users' sessions) and
writes the outcome in the same transaction; what happens in between is here, without I/O.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any, NamedTuple

from ..records import NewMessage
from ..sessions import Activity, SessionRules, SessionState


class Expansion(NamedTuple):
    """Each group's rows with the session events they cause (rows, how many are events), the
    sessions to save (every active user's, in their new state) and how many sessions start."""

    groups: list[tuple[list[NewMessage], int]]
    changed: list[SessionState]
    started: int

    def saved(self) -> list[list[Any]]:
        """The sessions to save as the rows of the store's session statements."""
        return [
            [
                s.user_key,
                s.source,
                s.started_at,
                s.last_activity,
                s.expires_at,
                s.ids,
                s.json_context(),
            ]
            for s in self.changed
        ]


def session_activities(messages: Sequence[NewMessage]) -> dict[int, Activity]:
    """id(message) -> its session activity, for the messages that have one."""
    return {id(m): m.activity for m in messages if m.activity is not None}


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
    return Expansion(expanded, list(changed.values()), started)


class SessionCache:
    """The sessions of the users most recently seen, as last written, held on the event loop.

    With it a commit applies the rules before its hop to the SQLite thread, so that thread
    runs one statement and no Python. It is only a guess: the statement checks each user's
    row against the state assumed here (or its absence, for a user not here) and refuses the
    whole commit if one differs, and the commit is then applied by reading the sessions in its
    transaction. A user not here is assumed to have no session: new users are the common miss.
    At most `capacity` sessions are held, so memory does not grow with the open sessions;
    the least recently written go first. They are held as flat tuples of strings and numbers,
    which Python's garbage collector stops tracking (a NamedTuple, or a tuple holding a dict,
    it tracks for good), so they add nothing to its collections.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._states: OrderedDict[str, tuple[Any, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def assumed(self, user_keys: Iterable[str]) -> dict[str, SessionState]:
        """The held sessions of `user_keys` (a new dict: the caller may change it)."""
        states = self._states
        assumed = {}
        for key in user_keys:
            if held := states.get(key):
                user_key, source, started_at, last_activity, expires_at, context = held[:6]
                ids = dict(zip(held[6::2], held[7::2], strict=True))
                assumed[key] = SessionState(
                    user_key, source, started_at, last_activity, expires_at, ids, context
                )
        return assumed

    def written(self, sessions: Iterable[SessionState]) -> None:
        """Hold `sessions` as just written, dropping the least recently written over capacity."""
        states = self._states
        for session in sessions:
            # Flat, ids last as key, value, ...: a tuple holding a tuple is untracked only
            # by a later collection than the one that untracks the inner tuple.
            states[session.user_key] = (*session[:5], session.context, *chain(*session.ids.items()))
            states.move_to_end(session.user_key)
        while len(states) > self.capacity:
            states.popitem(last=False)

    def forget(self, user_keys: Iterable[str]) -> None:
        """Drop the sessions of `user_keys` (closed, or no longer known)."""
        for key in user_keys:
            self._states.pop(key, None)

    def clear(self) -> None:
        self._states.clear()


class ExpiryWatch:
    """Wakes the session timer when a session opens that expires before the timer's deadline.

    `changed` is set, and the earliest such expiry kept for `take_opened`, only for a session
    that expires before the deadline given to `watch` (None: for every session opened). A new
    session expires a whole timeout from now: after that deadline if another one is open.
    """

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self._opened: float | None = None
        self._watched: float | None = None

    def watch(self, deadline: float | None) -> None:
        self._watched = deadline

    def opened(self, expires_at: float) -> None:
        """Sessions were opened; `expires_at` is the earliest of their expiries."""
        watched = self._watched
        if watched is None or expires_at < watched:
            if self._opened is None or expires_at < self._opened:
                self._opened = expires_at
            self.changed.set()

    def take_opened(self) -> float | None:
        """The earliest expiry among sessions opened since the last call (None: none opened)."""
        earliest, self._opened = self._opened, None
        return earliest
