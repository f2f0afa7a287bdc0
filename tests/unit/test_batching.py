"""Which due messages make a batch, and durable backoff."""

from __future__ import annotations

import random

from segment_relay.batching import Coverage, durable_delay, select_batch
from segment_relay.config import RetryConfig
from segment_relay.records import DueRead, QueuedMessage


def row(
    seq: int, user: str, kind: str = "track", received_at: float = 0.0, attempts: int = 0
) -> QueuedMessage:
    return QueuedMessage(
        seq, "s", f"m{seq}", user, kind, "{}", received_at, attempts, 0.0, None, None
    )


def seqs(rows: list[QueuedMessage]) -> list[int]:
    return [r.seq for r in rows]


def test_a_full_batch_goes_at_once_in_order() -> None:
    rows = [row(i, f"u{i % 3}") for i in range(10)]
    assert seqs(select_batch(rows, 4, 10.0, 0.0).batch) == [0, 1, 2, 3]


def test_a_customer_update_is_not_batched_with_the_same_users_commands() -> None:
    rows = [
        row(1, "a"),
        row(2, "a", "identify"),
        row(3, "b"),
        row(4, "a"),
        row(5, "b", "identify"),
        row(6, "c"),
    ]
    # a's identify waits for the next batch (a already has a command here), and holds back a's
    # later track; b's identify comes after b's track... and is held back likewise.
    assert seqs(select_batch(rows, 50, 0.0, 0.0).batch) == [1, 3, 6]
    rows = [row(2, "a", "identify"), row(4, "a"), row(6, "c")]
    assert seqs(select_batch(rows, 50, 0.0, 0.0).batch) == [2, 6]


def test_a_batch_that_is_not_full_lingers_from_its_oldest_message() -> None:
    rows = [row(1, "a", received_at=100.0), row(2, "b", received_at=100.1)]
    waiting = select_batch(rows, 50, 0.2, 100.1)
    assert waiting.batch == []
    assert waiting.wait_until == 100.2
    assert seqs(select_batch(rows, 50, 0.2, 100.2).batch) == [1, 2]


def test_durable_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    retry = RetryConfig(backoff_initial_s=5.0, backoff_max_s=60.0)
    rand = random.Random(1)
    for attempts, full in [(1, 5.0), (2, 10.0), (3, 20.0), (4, 40.0), (5, 60.0), (50, 60.0)]:
        delay = durable_delay(attempts, retry, rand)
        assert full / 2 <= delay <= full


def test_coverage_one_users_backlog_in_flight() -> None:
    # One user, 1,000 queued (seqs 1..1000), 8 rows per read (limit).
    coverage = Coverage()
    first = DueRead([row(i, "u") for i in range(1, 9)], looked=8, replayed=0)
    assert coverage.after(set()) == 0
    coverage.update(first, 0, set(), 8)
    assert (coverage.seq, coverage.users) == (8, {"u"})
    # u's batch is in flight: the next read may start after 8 and finds nothing up to 1000.
    assert coverage.after({"u"}) == 8
    coverage.update(DueRead([], looked=1000, replayed=0), 8, {"u"}, 8)
    assert (coverage.seq, coverage.users) == (1000, {"u"})
    # u is idle again: a read starts over and takes u's next rows; what was known about
    # u's backlog still holds once u is busy again.
    assert coverage.after(set()) == 0
    coverage.update(DueRead([row(i, "u") for i in range(9, 17)], 16, 0), 0, set(), 8)
    assert coverage.after({"u"}) == 1000
    # Another user's row seen makes every read start over until that user is busy too.
    coverage.update(DueRead([row(1001, "v")], 1001, 0), 1000, {"u"}, 8)
    assert coverage.after({"u"}) == 0
    assert coverage.after({"u", "v"}) == 1001


def test_coverage_a_read_of_the_whole_queue_replaces_what_was_known() -> None:
    coverage = Coverage(seq=500, users={"a", "b", "c"})
    coverage.update(DueRead([row(600, "d")], looked=700, replayed=0), 0, {"a"}, 8)
    assert (coverage.seq, coverage.users) == (700, {"a", "d"})


def test_coverage_a_replay_or_a_retry_coming_due_starts_over() -> None:
    coverage = Coverage(seq=500, users={"a"}, replayed=3)
    assert not coverage.note_replays(DueRead([], 900, replayed=3), 500)
    # Dead letters went back under old seqs: a read that skipped up to 500 may have missed
    # them, one that started at 0 did not.
    assert coverage.note_replays(DueRead([], 900, replayed=4), 500)
    assert (coverage.seq, coverage.users, coverage.after({"a"})) == (0, set(), 0)
    coverage.update(DueRead([], 900, replayed=4), 0, {"a"}, 8)
    assert coverage.after({"a"}) == 900
    # A read from the start is whole, but what was known before it no longer holds: a
    # replayed message may lie beyond the rows it returned.
    full = DueRead([row(i, "b") for i in range(1, 9)], looked=8, replayed=5)
    assert not coverage.note_replays(full, 0)
    coverage.update(full, 0, {"a"}, 8)
    assert (coverage.seq, coverage.users) == (8, {"a", "b"})
    coverage.forget()
    assert coverage.after({"a"}) == 0
