"""Pure lease bookkeeping of the PostgreSQL queue (queue/postgres/leases.py), times passed in."""

from __future__ import annotations

from segment_relay.queue.postgres.leases import BUCKETS, Leases, bucket_of, share


def test_a_user_always_falls_in_the_same_bucket_and_buckets_spread() -> None:
    assert bucket_of("user-1") == bucket_of("user-1")
    assert len({bucket_of(f"user-{n}") for n in range(1000)}) == BUCKETS


def test_each_relay_aims_at_its_share() -> None:
    assert [share(64, n) for n in (0, 1, 2, 3, 64, 100)] == [64, 64, 32, 22, 1, 1]


def test_leases_are_used_only_until_a_renewal_is_due_to_have_run_out() -> None:
    leases = Leases(lease_s=15.0)
    assert leases.renewed([(0, 1), (1, 1)], sent_at=100.0) == []
    assert leases.usable(100.0 + 13.4) == [0, 1]
    assert leases.usable(100.0 + 13.5) == []  # 0.9 of the lease, on the clock of the sending
    changes = leases.changes
    assert leases.renewed([(1, 1)], sent_at=120.0) == [0]  # lost to another relay
    assert leases.changes == changes + 1
    assert leases.usable(121.0) == [1]


def test_a_retaken_bucket_under_a_new_epoch_counts_as_lost_once() -> None:
    leases = Leases(lease_s=15.0)
    leases.renewed([(5, 3)], sent_at=0.0)
    assert leases.renewed([(5, 4)], sent_at=5.0) == [5]
    assert leases.held == {5: 4}


def test_a_drained_bucket_is_released_once_its_batches_ended_or_a_lease_passed() -> None:
    leases = Leases(lease_s=15.0)
    leases.renewed([(b, 1) for b in range(4)], sent_at=0.0)
    leases.drain(target=2, now=1.0)
    assert leases.usable(1.0) == [0, 1]  # the highest two are no longer read from
    leases.sending.update([3])
    assert leases.to_release(now=3.0, after_s=5.0) == []  # not drained long enough
    assert leases.to_release(now=7.0, after_s=5.0) == [2]  # 3 has a batch in flight
    leases.sending.subtract([3])
    assert leases.to_release(now=8.0, after_s=5.0) == [3]
    assert sorted(leases.held) == [0, 1]
    leases.drain(target=1, now=10.0)
    leases.sending.update([1])
    assert leases.to_release(now=24.0, after_s=5.0) == []
    assert leases.to_release(now=25.0, after_s=5.0) == [1]  # a whole lease: released anyway


def test_taking_a_bucket_changes_the_claims() -> None:
    leases = Leases(lease_s=15.0)
    changes = leases.changes
    assert leases.gained([(7, 1)]) == [7]
    assert leases.changes == changes + 1
    leases.gained([])
    assert leases.changes == changes + 1
