"""How far a PostgreSQL read saw everything (queue/postgres/horizon.py), snapshots passed in."""

from __future__ import annotations

from segment_relay.queue.postgres.horizon import Horizon


def test_nothing_is_trusted_before_a_later_read_saw_the_takers_end() -> None:
    horizon = Horizon()
    # Read 1 (its own transaction 60): the sequence is at 100.
    assert horizon.read(xmin=50, xid=60, allocated=100) == 0
    # Read 2 (transaction 70): seqs up to 100 were taken by transactions below 70, and one
    # of those (65) still runs.
    assert horizon.read(xmin=65, xid=70, allocated=180) == 0
    # Read 3: every transaction below 70 has ended (the oldest running is 71).
    assert horizon.read(xmin=71, xid=75, allocated=200) == 100
    # Read 4: transaction 74 still runs, below read 3's 75: 180 stays untrusted.
    assert horizon.read(xmin=74, xid=80, allocated=210) == 100
    # Read 5: past both: up to 200 (read 3's sequence value, taken before read 4's id).
    assert horizon.read(xmin=90, xid=90, allocated=220) == 200


def test_the_reads_own_transaction_must_have_ended_too() -> None:
    horizon = Horizon()
    horizon.read(xmin=10, xid=10, allocated=5)
    # Read 2 took transaction 11; nothing else runs: xmin 11 is not past it.
    assert horizon.read(xmin=11, xid=11, allocated=5) == 0
    assert horizon.read(xmin=12, xid=12, allocated=5) == 5


def test_trust_never_goes_back_and_a_long_transaction_holds_it() -> None:
    horizon = Horizon()
    horizon.read(xmin=1, xid=2, allocated=10)
    horizon.read(xmin=2, xid=3, allocated=20)
    assert horizon.read(xmin=5, xid=6, allocated=25) == 10
    # Transaction 5 (a writer) began before read 3 and runs on: nothing more is trusted,
    # however many reads pass (only the newest few are remembered; each covers the older).
    for n in range(20):
        assert horizon.read(xmin=5, xid=10 + n, allocated=30 + n) == 10
    # All ended: up to what the read before this one saw (49 needs a read past its xid).
    assert horizon.read(xmin=100, xid=100, allocated=60) == 48


def test_looked_stops_at_the_last_row_of_a_full_read() -> None:
    horizon = Horizon()
    horizon.read(xmin=1, xid=1, allocated=500)
    horizon.read(xmin=2, xid=2, allocated=500)
    assert horizon.looked(xmin=3, xid=3, allocated=500, last_seq=120) == 120
    assert horizon.looked(xmin=4, xid=4, allocated=500, last_seq=None) == 500


def test_reads_without_an_id_of_their_own_pair_nothing_but_still_judge() -> None:
    horizon = Horizon()
    assert horizon.wants_xid(0.0)
    assert not horizon.wants_xid(0.05)  # at most every XID_EVERY_S
    assert horizon.wants_xid(0.1)
    horizon.read(xmin=1, xid=None, allocated=10)
    horizon.read(xmin=2, xid=5, allocated=20)  # pairs 10 with 5
    assert horizon.read(xmin=5, xid=None, allocated=30) == 0  # 5 may still run
    assert horizon.read(xmin=6, xid=None, allocated=40) == 10
