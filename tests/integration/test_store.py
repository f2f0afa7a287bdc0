"""The SQLite queue on a real file: durable enqueue, dedup, due order, outcomes."""

from __future__ import annotations

from pathlib import Path

import pytest

from segment_relay.errors import StoreError
from segment_relay.queue.sqlite import SqliteQueue
from segment_relay.sessions import SessionRules
from support import page


async def test_a_second_daemon_on_the_same_queue_is_refused(queue_path: Path) -> None:
    store = await SqliteQueue.open(queue_path)
    try:
        with pytest.raises(StoreError, match="in use by another segment-relay process"):
            await SqliteQueue.open(queue_path)
    finally:
        await store.close()


async def test_a_file_that_is_not_a_database_is_refused_clearly(queue_path: Path) -> None:
    queue_path.parent.mkdir(parents=True)
    queue_path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        await SqliteQueue.open(queue_path)
    assert queue_path.read_bytes().startswith(b"this is not sqlite")


async def test_a_user_whose_session_left_the_cache_is_read_from_the_database(
    queue_path: Path,
) -> None:
    store = await SqliteQueue.open(
        queue_path, sessions=SessionRules.of(60, ["page"]), session_cache=1
    )
    try:
        await store.enqueue([page(1, "a", "2024-03-01T12:00:00Z", 1000.0)])
        await store.enqueue([page(2, "b", "2024-03-01T12:00:00Z", 1001.0)])  # a leaves the cache
        assert (store.session_commits, store.session_commits_read) == (2, 0)
        await store.enqueue([page(3, "a", "2024-03-01T12:00:10Z", 1010.0)])
        assert (store.session_commits, store.session_commits_read) == (3, 1)
        rows = await store.due(2000.0, (), 10)
        assert [(r.type, r.user_key) for r in rows] == [
            ("session_start", "a"),
            ("page", "a"),
            ("session_start", "b"),
            ("page", "b"),
            ("page", "a"),
        ]
        assert await store.expire_sessions(1070.0) == 2
        ends = {
            r.user_key: r.message for r in await store.due(2000.0, (), 10) if r.seq > rows[-1].seq
        }
        assert ends["a"]["properties"] == {"duration": 10.0}
    finally:
        await store.close()
