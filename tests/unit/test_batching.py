"""Which due messages make a batch, and durable backoff."""

from __future__ import annotations

import random

from segment_relay.batching import durable_delay, select_batch
from segment_relay.config import RetryConfig
from segment_relay.records import QueuedMessage


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
