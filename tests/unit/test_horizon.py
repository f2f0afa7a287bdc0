"""How far a PostgreSQL read saw everything (queue/postgres/horizon.py), snapshots passed in."""

from __future__ import annotations

from segment_relay.queue.postgres.horizon import Horizon


def test_nothing_is_trusted_before_a_later_read_saw_the_takers_end() -> None:
    horizon = Horizon()
    # Read 1: the sequence is at 100; transactions from 50 on may still be running.
    assert horizon.read(xmin=50, xmax=60, allocated=100) == 0
    # Read 2: seqs up to 100 were taken by transactions below 70; one below 70 still runs.
    assert horizon.read(xmin=65, xmax=70, allocated=180) == 0
    # Read 3: every transaction below 70 has ended, so seqs up to 100 are all visible.
    assert horizon.read(xmin=70, xmax=75, allocated=200) == 100
    # Read 4: read 3's xmax (75) is not reached yet; 180 stays untrusted.
    assert horizon.read(xmin=74, xmax=80, allocated=210) == 100
    # Read 5: past both: up to 200 (read 3's sequence value, taken before read 4's xmax).
    assert horizon.read(xmin=90, xmax=90, allocated=220) == 210


def test_an_idle_database_trusts_what_the_previous_read_allocated() -> None:
    horizon = Horizon()
    assert horizon.read(xmin=10, xmax=10, allocated=5) == 0
    assert horizon.read(xmin=10, xmax=10, allocated=5) == 5


def test_trust_never_goes_back_and_a_long_transaction_holds_it() -> None:
    horizon = Horizon()
    horizon.read(xmin=1, xmax=2, allocated=10)
    assert horizon.read(xmin=3, xmax=3, allocated=20) == 10
    # Transaction 3 began after read 2 and runs on: nothing more is trusted, however many
    # reads pass (only the newest few are remembered; each covers the older ones).
    for n in range(20):
        assert horizon.read(xmin=3, xmax=10 + n, allocated=30 + n) == 10
    assert horizon.read(xmin=100, xmax=100, allocated=60) == 49


def test_looked_stops_at_the_last_row_of_a_full_read() -> None:
    horizon = Horizon()
    horizon.read(xmin=1, xmax=1, allocated=500)
    assert horizon.looked(xmin=1, xmax=1, allocated=500, last_seq=120) == 120
    assert horizon.looked(xmin=1, xmax=1, allocated=500, last_seq=None) == 500
