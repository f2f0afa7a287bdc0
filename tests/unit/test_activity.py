"""The forwarder's log summary: one line an interval, only when something happened."""

from __future__ import annotations

from collections import Counter

from segment_relay.activity import Activity


def test_a_summary_once_an_interval_has_passed_with_what_it_saw() -> None:
    now = [100.0]
    activity = Activity(60, clock=lambda: now[0])
    assert activity.due() is None
    activity.add(delivered=50, retried=0, dead_lettered=Counter())
    now[0] = 130.0
    activity.add(delivered=49, retried=1, dead_lettered=Counter({"rejected": 1}))
    assert activity.due() is None  # 30 s: not yet
    now[0] = 160.0
    summary = activity.due()
    assert summary is not None
    assert str(summary) == (
        "forwarded in the last 60s: 99 delivered, 1 to retry, 1 dead-lettered (rejected: 1)"
    )
    assert summary.fields() == {
        "interval_s": 60.0,
        "delivered": 99,
        "retried": 1,
        "dead_lettered": {"rejected": 1},
    }
    # The next interval starts empty, and an interval with nothing in it says nothing.
    now[0] = 230.0
    assert activity.due() is None
    activity.add(delivered=0, retried=0, dead_lettered=Counter())
    now[0] = 300.0
    assert activity.flush() is None


def test_the_last_summary_at_the_stop_covers_the_interval_so_far() -> None:
    now = [0.0]
    activity = Activity(60, clock=lambda: now[0])
    activity.add(delivered=3, retried=0, dead_lettered=Counter({"expired": 2, "rejected": 1}))
    now[0] = 12.5
    summary = activity.flush()
    assert summary is not None
    assert str(summary).endswith(
        "3 delivered, 0 to retry, 3 dead-lettered (expired: 2, rejected: 1)"
    )
    assert summary.seconds == 12.5
