"""Schema versions: a queue made by an older release is upgraded in place; a relay older than
the database refuses it."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import asyncpg
import orjson
import pytest

from segment_relay.config import QueueConfig
from segment_relay.errors import StoreError
from segment_relay.queue import open_queue
from segment_relay.queue.postgres.database import MIGRATIONS as PG_MIGRATIONS
from segment_relay.queue.sqlite import SqliteQueue
from segment_relay.queue.sqlite.database import MIGRATIONS as SQLITE_MIGRATIONS
from segment_relay.records import NewMessage
from segment_relay.sessions import SessionRules

# Migration 1 is, by rule, the schema of the releases before schema versions, unchanged
# (migrations are never edited once released): a file made with it is such a release's queue.
BEFORE_VERSIONS = SQLITE_MIGRATIONS[0].sql


def page(user: str, at: float) -> NewMessage:
    message = {"type": "page", "messageId": "p1", "anonymousId": user,
               "timestamp": "2024-03-01T12:00:00Z"}  # fmt: skip
    activity = SessionRules.of(60, ["page"]).activity(message, "s", user, at)
    return NewMessage(
        "s", "p1", user, "page", orjson.dumps(message).decode(), at, activity=activity
    )


def old_queue(path: Path) -> None:
    """A queue as the releases before schema versions left it: a call waiting, a dead letter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.executescript(BEFORE_VERSIONS)
        db.execute(
            "INSERT INTO messages (source, message_id, user_key, type, body, received_at) "
            "VALUES ('s', 'old-1', 'u0', 'track', '{\"event\": \"Old\"}', 1000.0)"
        )
        db.execute(
            "INSERT INTO dead_letters (seq, source, message_id, user_key, type, body, "
            "received_at, reason, attempts, last_attempt_at) "
            "VALUES (7, 's', 'old-2', 'u0', 'track', '{}', 900.0, 'rejected', 1, 950.0)"
        )


def trigger_sql(path: Path, name: str) -> str:
    with sqlite3.connect(path) as db:
        [(sql,)] = db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?", (name,)
        ).fetchall()
    return str(sql)


async def test_a_queue_made_before_schema_versions_is_upgraded_in_place(
    queue_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old_queue(queue_path)
    assert "session_start" not in trigger_sql(queue_path, "session_commit")
    with caplog.at_level(logging.INFO, logger="segment_relay.queue.sqlite.database"):
        store = await SqliteQueue.open(queue_path, sessions=SessionRules.of(60, ["page"]))
    # Each step is logged, as the upgrade instructions (docs/operations.md) say.
    upgraded = [r.getMessage() for r in caplog.records if "schema upgraded" in r.getMessage()]
    assert upgraded == [
        f"queue schema upgraded to version {m.version} ({m.name})" for m in SQLITE_MIGRATIONS
    ]
    try:
        # Its rows are kept...
        [row] = await store.due(2000.0, (), 10)
        assert (row.message_id, row.body) == ("old-1", '{"event": "Old"}')
        [dead] = await store.dead_letters()
        assert dead.message_id == "old-2"
        # ...and the changed trigger reached it (CREATE TRIGGER IF NOT EXISTS would have kept
        # the old one): a call that took a session event's messageId no longer hides it.
        assert "session_start" in trigger_sql(queue_path, "session_commit")
        taken = NewMessage("s", "session_start:u1:1709294400.000", "u1", "track", "{}", 999.0)
        assert await store.enqueue([taken]) == 1
        assert await store.enqueue([page("u1", 1000.0)]) == 1
        kinds = [r.type for r in await store.due(2000.0, (), 10) if r.user_key == "u1"]
        assert kinds == ["track", "session_start", "page"]
    finally:
        await store.close()
    with sqlite3.connect(queue_path) as db:
        [(version,)] = db.execute("PRAGMA user_version").fetchall()
    assert version == SQLITE_MIGRATIONS[-1].version


async def test_a_relay_older_than_the_sqlite_queue_refuses_it(queue_path: Path) -> None:
    await (await SqliteQueue.open(queue_path)).close()
    newer = SQLITE_MIGRATIONS[-1].version + 1
    with sqlite3.connect(queue_path) as db:
        db.execute(f"PRAGMA user_version = {newer}")
    with pytest.raises(StoreError, match=f"schema version {newer}, newer than this relay"):
        await SqliteQueue.open(queue_path)
    # Refused, not changed: the newer relay still finds its version.
    with sqlite3.connect(queue_path) as db:
        assert db.execute("PRAGMA user_version").fetchall() == [(newer,)]


async def test_the_postgres_schema_is_versioned_and_a_newer_one_refused(postgres_url: str) -> None:
    config = QueueConfig(url=postgres_url)
    await (await open_queue(config)).close()
    # Opened again (as every start and every command does), nothing is applied twice.
    await (await open_queue(config)).close()
    await (await open_queue(config, daemon=False)).close()
    conn = await asyncpg.connect(postgres_url)
    try:
        versions = [r[0] for r in await conn.fetch("SELECT version FROM segment_relay_schema")]
        assert versions == [m.version for m in PG_MIGRATIONS]
        newer = PG_MIGRATIONS[-1].version + 1
        await conn.execute("INSERT INTO segment_relay_schema (version) VALUES ($1)", newer)
    finally:
        await conn.close()
    with pytest.raises(StoreError, match=f"schema version {newer}, newer than this relay"):
        await open_queue(config)
