"""The pure session rules, with time passed in."""

from __future__ import annotations

import gc
from typing import Any

import orjson

from segment_relay.queue.session_rows import SessionCache
from segment_relay.sessions import Activity, SessionEvent, SessionRules, SessionState

RULES = SessionRules.of(1800, ["page", "screen", "Video Played"])
CONTEXT = orjson.dumps({"ip": "1.2.3.4"}).decode()


def act(t: float, wall: float | None = None, **ids: Any) -> Activity:
    return Activity(
        "a1", "web", t, t if wall is None else wall, ids or {"anonymousId": "a1"}, CONTEXT
    )


def kinds(events: list[SessionEvent]) -> list[str]:
    return [e.kind for e in events]


def test_which_calls_are_session_activity() -> None:
    page = {"type": "page", "timestamp": "2024-03-01T12:00:00Z", "anonymousId": "a1"}
    assert RULES.activity(page, "web", "a1", 0.0) is not None
    assert (
        RULES.activity({**page, "type": "track", "event": "Video Played"}, "web", "a1", 0.0)
        is not None
    )
    assert RULES.activity({**page, "type": "track", "event": "Clicked"}, "web", "a1", 0.0) is None
    assert RULES.activity({**page, "type": "identify"}, "web", "a1", 0.0) is None


def test_open_extend_and_close_on_a_gap() -> None:
    events, state = RULES.on_activity(None, act(1000.0))
    assert kinds(events) == ["session_start"]
    assert state is not None
    assert (state.started_at, state.last_activity, state.expires_at) == (1000.0, 1000.0, 2800.0)
    events, state = RULES.on_activity(state, act(2000.0))
    assert events == []
    assert state is not None
    assert (state.started_at, state.last_activity, state.expires_at) == (1000.0, 2000.0, 3800.0)
    # More than the timeout after the last activity: the old session ends, a new one starts.
    events, new = RULES.on_activity(state, act(3801.0))
    assert kinds(events) == ["session_end", "session_start"]
    assert events[0].session == state
    assert orjson.loads(events[0].body())["properties"] == {"duration": 1000.0}
    assert new is not None
    assert new.started_at == 3801.0


def test_a_late_event_within_the_session_extends_it_backwards() -> None:
    _, state = RULES.on_activity(None, act(5000.0))
    events, state = RULES.on_activity(state, act(4000.0, wall=5001.0))
    assert events == []
    assert state is not None
    assert (state.started_at, state.last_activity) == (4000.0, 5000.0)


def test_an_event_far_older_than_the_session_leaves_it_alone() -> None:
    _, state = RULES.on_activity(None, act(10_000.0))
    events, after = RULES.on_activity(state, act(1000.0, wall=10_001.0))
    assert events == []
    assert after == state


def test_session_end_carries_the_ids_known_at_the_end_and_the_start_context() -> None:
    _, state = RULES.on_activity(None, act(1000.0))
    _, state = RULES.on_activity(state, act(1060.0, userId="u5", anonymousId="a1"))
    assert state is not None
    end = orjson.loads(SessionEvent("session_end", state).body())
    assert end["userId"] == "u5"
    assert end["anonymousId"] == "a1"
    assert end["timestamp"] == "1970-01-01T00:17:40.000Z"
    assert end["context"] == {"ip": "1.2.3.4"}
    assert end["properties"] == {"duration": 60.0}


def state(user: str, t: float) -> SessionState:
    return SessionState(user, "web", t, t, t + 1800, {"anonymousId": user}, None)


def test_the_session_cache_keeps_the_most_recently_written_up_to_its_capacity() -> None:
    cache = SessionCache(2)
    cache.written([state("a", 1.0), state("b", 2.0)])
    cache.written([state("a", 3.0)])  # a is now the most recent
    cache.written([state("c", 4.0)])
    assert len(cache) == 2
    assert cache.assumed(["a", "b", "c"]) == {"a": state("a", 3.0), "c": state("c", 4.0)}
    cache.forget(["a", "x"])
    assert cache.assumed(["a", "c"]) == {"c": state("c", 4.0)}


def test_the_rules_may_change_what_the_cache_assumed_without_changing_the_cache() -> None:
    cache = SessionCache(10)
    cache.written([state("a", 1.0)])
    assumed = cache.assumed(["a"])
    assumed["a"] = state("a", 2.0)
    assumed["b"] = state("b", 2.0)
    assert cache.assumed(["a", "b"]) == {"a": state("a", 1.0)}


def test_held_sessions_are_left_out_of_the_garbage_collectors_work() -> None:
    cache = SessionCache(10_000)
    gc.collect()
    before = len(gc.get_objects())
    cache.written([state(f"u{n}", float(n)) for n in range(1000)])
    gc.collect()
    assert len(gc.get_objects()) - before < 100
    assert cache.assumed(["u7"]) == {"u7": state("u7", 7.0)}
