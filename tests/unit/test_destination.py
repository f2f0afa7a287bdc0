"""The destination's state (destination.py): outages, pauses and refusals alike, times passed in."""

from __future__ import annotations

from segment_relay.destination import Destination, State, Verdict

A, B, C = frozenset({"a"}), frozenset({"b"}), frozenset({"c"})


def test_an_outage_probes_at_a_doubling_interval_and_ends_at_the_first_answer() -> None:
    d = Destination(probe_initial_s=1.0, probe_max_s=30.0)
    assert d.gate(0.0) is None
    assert d.starting() == 0  # up: not a probe
    assert d.failed(sent_at=0.0, error="connection refused", users=A, probe=0, now=5.0)
    assert (d.state, d.last_error, d.since) == (State.DOWN, "connection refused", 5.0)
    assert d.gate(5.5) == 0.5
    # Batches in flight when it went down fail too: they change nothing.
    assert d.failed(sent_at=0.5, error="timeout", users=B, probe=0, now=5.2)
    assert d.next_probe == 6.0
    intervals = []
    now = 6.0
    for n in range(8):
        assert d.gate(now) is None
        probe = d.starting()
        assert probe
        assert d.gate(now) is not None  # one at a time
        assert d.failed(
            sent_at=now, error="refused", users=frozenset({f"u{n}"}), probe=probe, now=now
        )
        d.ended(probe)
        intervals.append(d.next_probe - now)
        now = d.next_probe
    assert intervals == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    probe = d.starting()
    assert d.answered(sent_at=now, users=C, now=now + 0.2) == now + 0.2 - 5.0  # down that long
    d.ended(probe)
    assert (d.state, d.gate(now)) == (State.UP, None)


def test_the_next_probe_goes_to_other_users_and_a_failure_of_theirs_is_then_theirs() -> None:
    d = Destination()
    d.failed(sent_at=0.0, error="500", users=A, probe=0, now=1.0)
    probe = d.starting()
    d.failed(sent_at=2.0, error="500", users=A, probe=probe, now=2.0)
    d.ended(probe)
    assert d.probed_users() == A  # the next probe is someone else's
    probe = d.starting()
    d.answered(sent_at=4.0, users=B, now=4.1)
    d.ended(probe)
    assert (d.state, d.probed_users()) == (State.UP, frozenset())
    # a's batch fails again, with nothing answered since: it is about a's messages.
    assert not d.failed(sent_at=5.0, error="500", users=A, probe=0, now=6.0)
    assert d.state is State.UP
    # Down again, a's probe fails: when nothing but a's messages is due, a may be the probe.
    d.failed(sent_at=7.0, error="500", users=B, probe=0, now=8.0)
    probe = d.starting()
    d.failed(sent_at=9.0, error="500", users=A, probe=probe, now=9.0)
    d.ended(probe)
    assert d.probed_users() == A
    d.probe_anyone()
    assert d.probed_users() == frozenset()


def test_a_failure_after_another_batch_was_answered_is_about_that_batch() -> None:
    d = Destination()
    d.answered(sent_at=10.0, users=B, now=10.5)
    assert not d.failed(sent_at=9.0, error="HTTP 500", users=A, probe=0, now=12.0)
    assert d.state is State.UP
    assert d.failed(sent_at=11.0, error="HTTP 500", users=A, probe=0, now=13.0)


def test_a_pause_holds_against_answers_sent_before_it_and_a_reload_ends_it() -> None:
    d = Destination()
    d.pause("retry_after", "429", until=40.0, now=10.0)
    assert (d.state, d.reason, d.gate(10.0)) == (State.PAUSED, "retry_after", 30.0)
    # A batch already in flight is answered, another fails: the pause stands.
    assert d.answered(sent_at=9.0, users=A, now=11.0) is None
    assert d.failed(sent_at=9.5, error="timeout", users=B, probe=0, now=12.0)
    d.pause("retry_after", "429", until=20.0, now=12.0)  # a shorter wait does not shorten it
    assert (d.state, d.next_probe) == (State.PAUSED, 40.0)
    assert d.gate(40.0) is None
    d.resume(now=20.0)
    assert (d.state, d.gate(20.0)) == (State.UP, None)


def test_refused_alike_by_two_batches_of_different_users_is_the_configuration() -> None:
    d = Destination()
    error = "project not found"
    assert d.refused_alike(error, A, 2, now=0.0, hold_s=30.0) is Verdict.HOLD
    assert d.held_users(1.0) == A
    assert d.refused_alike(error, B, 2, now=1.0, hold_s=30.0) is Verdict.PAUSE
    d.pause("configuration", error, until=31.0, now=1.0)
    d.answered(sent_at=31.5, users=A, now=31.5)  # the probe, refused alike again: still paused
    assert d.state is State.PAUSED
    assert d.refused_alike(error, A, 2, now=31.5, hold_s=30.0) is Verdict.PAUSE
    d.resume(now=40.0)  # fixed (SIGHUP): up at once
    assert (d.state, d.taken(41.0)) == (State.UP, None)


def test_refused_alike_then_a_batch_taken_is_about_the_messages() -> None:
    d = Destination()
    error = "event type is invalid"
    assert d.refused_alike(error, A, 2, now=0.0, hold_s=30.0) is Verdict.HOLD
    d.taken(1.0)  # another user's batch went through
    assert d.held_users(1.0) == frozenset()
    assert d.refused_alike(error, A, 2, now=2.0, hold_s=30.0) is Verdict.DEAD_LETTER


def test_one_users_batch_refused_alike_again_after_its_hold_goes_and_judges_nothing_else() -> None:
    d = Destination()
    assert d.refused_alike("bad", A, 2, now=0.0, hold_s=30.0) is Verdict.HOLD
    assert d.held_users(29.0) == A
    assert d.held_users(30.0) == frozenset()  # its hold ran out: sent again
    assert d.refused_alike("bad", A, 2, now=31.0, hold_s=30.0) is Verdict.DEAD_LETTER
    # The next batch refused so is judged afresh, not dead-lettered at once.
    assert d.refused_alike("bad", B, 2, now=32.0, hold_s=30.0) is Verdict.HOLD


def test_one_command_refused_is_dead_lettered_but_counts_towards_a_pause() -> None:
    d = Destination()
    error = "no such project"
    assert d.refused_alike(error, A, 1, now=0.0, hold_s=30.0) is Verdict.DEAD_LETTER
    assert d.held_users(0.0) == frozenset()
    assert d.refused_alike(error, B, 1, now=1.0, hold_s=30.0) is Verdict.PAUSE


def test_an_old_probe_ending_late_does_not_end_the_new_one() -> None:
    d = Destination()
    d.failed(sent_at=0.0, error="x", users=A, probe=0, now=1.0)
    old = d.starting()
    d.answered(sent_at=2.0, users=B, now=2.0)  # up again while it is in flight
    d.failed(sent_at=3.0, error="x", users=B, probe=0, now=3.0)  # down again
    assert d.probing  # the old one is still out: one probe at a time
    d.ended(old)
    new = d.starting()
    d.ended(old)  # a stray end of the old one
    assert (d.probing, new != old) == (True, True)
