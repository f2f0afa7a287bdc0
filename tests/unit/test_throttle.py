"""Log lines a client could repeat at will, once per interval per kind (throttle.py)."""

from __future__ import annotations

from segment_relay.throttle import Throttle


def test_one_line_per_interval_per_kind_with_the_count_held_back() -> None:
    now = [100.0]
    throttle = Throttle(10.0, clock=lambda: now[0])
    assert throttle.let_through("invalid_json") == 0
    assert throttle.let_through("invalid_json") is None
    assert throttle.let_through("invalid_write_key") == 0  # another kind is not held
    now[0] = 109.9
    assert throttle.let_through("invalid_json") is None
    now[0] = 110.0
    assert throttle.let_through("invalid_json") == 2
    assert throttle.let_through("invalid_json") is None
