"""The destination's state (destination.py): outages, pauses and refusals alike, times passed in."""

from __future__ import annotations

from segment_relay.destination import Destination, State, Verdict

WALL = 1_700_000_000.0


def test_an_outage_probes_at_a_doubling_interval_and_ends_at_the_first_answer() -> None:
    d = Destination(probe_initial_s=1.0, probe_max_s=30.0)
    assert d.gate(0.0) is None
    assert not d.starting()  # up: not a probe
    assert d.failed(sent_at=0.0, error="connection refused", tick=5.0, wall=WALL)
    assert (d.state, d.last_error, d.since) == (State.DOWN, "connection refused", WALL)
    assert d.gate(5.5) == 0.5
    probes = []
    tick = 6.0
    for _ in range(8):
        assert d.gate(tick) is None
        assert d.starting()  # the probe
        assert d.gate(tick) is not None  # one at a time
        assert d.failed(sent_at=tick, error="connection refused", tick=tick, wall=WALL)
        d.ended(probe=True)
        probes.append(d.next_probe - tick)
        tick = d.next_probe
    assert probes == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert d.starting()
    assert d.answered(tick + 0.2, WALL + 200) == tick + 0.2 - 5.0  # how long it was down
    d.ended(probe=True)
    assert (d.state, d.gate(tick)) == (State.UP, None)


def test_a_failure_after_another_batch_was_answered_is_about_that_batch() -> None:
    d = Destination()
    d.answered(10.0, WALL)
    assert not d.failed(sent_at=9.0, error="HTTP 500", tick=12.0, wall=WALL)
    assert d.state is State.UP
    assert d.failed(sent_at=11.0, error="HTTP 500", tick=13.0, wall=WALL)


def test_a_pause_waits_for_its_time_and_a_reload_ends_it_at_once() -> None:
    d = Destination()
    d.pause("credentials", "401 Unauthorized", until=40.0, tick=10.0, wall=WALL)
    assert (d.state, d.reason, d.gate(10.0)) == (State.PAUSED, "credentials", 30.0)
    assert d.gate(40.0) is None
    d.resume(tick=20.0, wall=WALL)
    assert (d.state, d.gate(20.0)) == (State.UP, None)


def test_refused_alike_by_two_batches_of_different_users_is_the_configuration() -> None:
    d = Destination()
    error = "project not found"
    assert d.refused_alike(error, frozenset({"a"}), 2, tick=0.0, hold_s=30.0) is Verdict.HOLD
    assert d.held_users(1.0) == {"a"}
    assert d.refused_alike(error, frozenset({"b"}), 2, tick=1.0, hold_s=30.0) is Verdict.PAUSE
    d.pause("configuration", error, until=31.0, tick=1.0, wall=WALL)
    d.answered(31.5, WALL)  # the probe is answered, refused alike again: still paused
    assert d.state is State.PAUSED
    assert d.refused_alike(error, frozenset({"a"}), 2, tick=31.5, hold_s=30.0) is Verdict.PAUSE
    # Fixed (SIGHUP): up at once; a batch with a command taken keeps it up.
    d.resume(tick=40.0, wall=WALL)
    assert (d.state, d.taken(41.0, WALL)) == (State.UP, None)


def test_refused_alike_then_a_batch_taken_is_about_the_messages() -> None:
    d = Destination()
    error = "event type is invalid"
    assert d.refused_alike(error, frozenset({"a"}), 2, tick=0.0, hold_s=30.0) is Verdict.HOLD
    d.taken(1.0, WALL)  # another user's batch went through
    assert d.held_users(1.0) == frozenset()
    assert d.refused_alike(error, frozenset({"a"}), 2, tick=2.0, hold_s=30.0) is Verdict.DEAD_LETTER


def test_one_users_batch_refused_alike_twice_with_nothing_between_is_dead_lettered() -> None:
    d = Destination()
    assert d.refused_alike("bad", frozenset({"a"}), 2, tick=0.0, hold_s=30.0) is Verdict.HOLD
    assert d.held_users(29.0) == {"a"}
    assert d.held_users(30.0) == frozenset()  # its hold ran out: sent again
    assert (
        d.refused_alike("bad", frozenset({"a"}), 2, tick=31.0, hold_s=30.0) is Verdict.DEAD_LETTER
    )


def test_one_command_refused_is_dead_lettered_but_counts_towards_a_pause() -> None:
    d = Destination()
    error = "no such project"
    assert d.refused_alike(error, frozenset({"a"}), 1, tick=0.0, hold_s=30.0) is Verdict.DEAD_LETTER
    assert d.held_users(0.0) == frozenset()
    assert d.refused_alike(error, frozenset({"b"}), 1, tick=1.0, hold_s=30.0) is Verdict.PAUSE
