"""The SQLite queue's file: opening it, its schema and its errors (docs/queue.md, "Schema
versions"). The queue itself is store.py."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from pathlib import Path

import aiosqlite

from ...errors import StoreError
from .. import migrations
from ..queries import load_queries

log = logging.getLogger(__name__)
Q = load_queries(__package__)
MIGRATIONS = migrations.load(__package__)


def is_full(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "full" in str(exc).lower()


async def connect(
    db_path: Path, synchronous: str, max_size: int
) -> tuple[aiosqlite.Connection, int]:
    """Open the database, apply the schema, count the queue; StoreError if it is unusable."""
    try:
        # Autocommit: a single statement commits itself; transactions of several statements
        # say BEGIN IMMEDIATE ... COMMIT (Store._write).
        conn = await aiosqlite.connect(db_path, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the queue {db_path}: {exc}") from exc
    try:
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        await conn.execute("PRAGMA busy_timeout=5000")
        if max_size:
            [(page_size,)] = await conn.execute_fetchall("PRAGMA page_size")
            await conn.execute(f"PRAGMA max_page_count={max(1, max_size // int(page_size))}")
        await conn._execute(_migrate, conn._conn, str(db_path))  # type: ignore[no-untyped-call]  # noqa: SLF001
        [(pending,)] = await conn.execute_fetchall(Q["count_messages"])
    except StoreError:
        await conn.close()
        raise
    except sqlite3.DatabaseError as exc:
        await conn.close()
        if "readonly" in str(exc) or "read-only" in str(exc):
            raise StoreError(
                f"cannot write to the queue {db_path}: it is read-only ({exc}); "
                "make the file and its directory writable by the relay's user"
            ) from exc
        raise StoreError(
            f"the queue {db_path} is not a usable SQLite database ({exc}); "
            "move it aside to start with an empty queue, or restore it from a backup"
        ) from exc
    return conn, int(pending)


def _statements(script: str) -> list[str]:
    """The statements of a migration script, whole (a trigger's body included)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in current.splitlines()
    ):
        raise RuntimeError(f"an incomplete statement ends a migration: {current[:80]!r}")
    return statements


def _migrate(raw: sqlite3.Connection, where: str) -> None:
    """Bring the schema up to date (see queue/migrations.py), on the SQLite thread.

    BEGIN IMMEDIATE is the lock: a second process waits (busy_timeout) and then finds the
    version already recorded. The version is SQLite's user_version, written in the same
    transaction. A file made before versions existed reads 0: migration 1 creates only what
    is missing (IF NOT EXISTS), so such a file keeps its rows and goes on from there.
    """
    applied: list[migrations.Migration] = []
    raw.execute("BEGIN IMMEDIATE")
    try:
        [(version,)] = raw.execute("PRAGMA user_version").fetchall()
        for migration in migrations.pending(MIGRATIONS, int(version), where):
            for statement in _statements(migration.sql):
                raw.execute(statement)
            raw.execute(f"PRAGMA user_version = {migration.version}")
            applied.append(migration)
        raw.execute("COMMIT")
    except BaseException:
        if raw.in_transaction:
            raw.execute("ROLLBACK")
        raise
    for migration in applied:
        log.info(
            "queue schema upgraded to version %d (%s)",
            migration.version,
            migration.name,
            extra={"action": "schema_upgraded"},
        )


def inspect(db_path: Path) -> str:
    """What `check-config` says of the queue at `db_path`, found usable by the relay without
    creating or changing anything; StoreError naming what `serve` would refuse."""
    if not db_path.exists():
        ancestor = db_path.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise StoreError(
                f"cannot create the queue {db_path}: {ancestor} is not a directory this user "
                "can write"
            )
        return f"SQLite {db_path} (created at start)"
    if not db_path.is_file():
        raise StoreError(f"the queue {db_path} is not a file")
    if not os.access(db_path, os.R_OK | os.W_OK) or not os.access(db_path.parent, os.W_OK):
        raise StoreError(
            f"cannot write to the queue {db_path}: make the file and its directory writable "
            "by the relay's user"
        )
    try:
        with contextlib.closing(sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)) as db:
            [(version,)] = db.execute("PRAGMA user_version").fetchall()
            migrations.pending(MIGRATIONS, int(version), str(db_path))
            pending = db.execute(Q["count_messages"]).fetchone()[0] if version else 0
    except sqlite3.DatabaseError as exc:
        raise StoreError(
            f"the queue {db_path} is not a usable SQLite database ({exc}); move it aside to "
            "start with an empty queue, or restore it from a backup"
        ) from exc
    return f"SQLite {db_path} (schema version {version}, {pending} messages queued)"


def backup(db_path: Path, dest: Path) -> int:
    """Copy the live queue at `db_path` to `dest` with SQLite's online backup API, as one
    consistent snapshot: the relay keeps taking calls meanwhile (a reader does not hold up
    WAL writers). Written beside `dest` and renamed into place once checked, so `dest` is
    whole or absent. Returns the messages queued in the copy."""
    if not db_path.is_file():
        raise StoreError(f"no queue at {db_path}")
    if dest.resolve() == db_path.resolve():
        raise StoreError(f"{dest} is the queue itself: back it up to another file")
    partial = dest.with_name(f".{dest.name}.partial")
    try:
        # Readable by its owner only, as the queue is: it holds the users' calls.
        os.close(os.open(partial, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600))
        with (
            contextlib.closing(sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)) as src,
            contextlib.closing(sqlite3.connect(partial)) as copy,
        ):
            src.execute("PRAGMA busy_timeout=5000")
            src.backup(copy)
            [(check,)] = copy.execute("PRAGMA quick_check").fetchall()
            if check != "ok":
                raise StoreError(f"the copy of {db_path} failed its check: {check}")
            [(pending,)] = copy.execute(Q["count_messages"]).fetchall()
        partial.replace(dest)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot back up {db_path} to {dest}: {exc}") from exc
    except OSError as exc:
        raise StoreError(f"cannot write {dest}: {exc.strerror}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return int(pending)
