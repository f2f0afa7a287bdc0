"""The queue seam (docs/queue.md): `open_queue` picks the backend the config names.

`queue.path`: the SQLite queue (queue/sqlite), one relay process on one VM.
`queue.url`: the PostgreSQL queue (queue/postgres), shared by any number of relays.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ..config import QueueConfig
from ..errors import StoreError
from ..sessions import SessionRules
from .protocol import Queue
from .sqlite import SqliteQueue
from .sqlite.database import backup as backup_sqlite
from .sqlite.database import inspect as inspect_sqlite

__all__ = ["Queue", "backup_queue", "inspect_queue", "open_queue"]


async def open_queue(
    config: QueueConfig,
    *,
    sessions: SessionRules | None = None,
    session_cache: int = 10_000,
    daemon: bool = True,
    forwarding: bool = True,
    create: bool | None = None,
) -> Queue:
    """Open the queue `config` names.

    `daemon`: this process is the relay (SQLite: it takes the file's lock; PostgreSQL: it
    joins the relays sharing the database). A command that only reads or administers the
    queue (`status`, `dead-letters`) passes False. `forwarding`: it forwards (PostgreSQL: it
    takes a share of the users' buckets). `create`: make the queue when there is none (by
    default only a relay does; `import` does too). Raises StoreError when the queue cannot
    be used.
    """
    create = daemon if create is None else create
    if config.url:
        # Imported here: a relay on SQLite never loads asyncpg (69 ms of import at start-up).
        from .postgres import PostgresQueue  # noqa: PLC0415

        return await PostgresQueue.open(
            config,
            sessions=sessions,
            member=daemon,
            forwarding=daemon and forwarding,
            create=create,
        )
    return await SqliteQueue.open(
        config.path,
        synchronous=config.synchronous,
        dedup_window_s=config.dedup_window_s,
        max_pending=config.max_pending,
        max_size=config.max_size,
        exclusive=daemon,
        create=create,
        sessions=sessions,
        session_cache=session_cache,
    )


async def inspect_queue(config: QueueConfig) -> str:
    """Check that the relay can use the queue `config` names, creating and changing nothing,
    and describe it (`check-config`); StoreError naming what `serve` would refuse."""
    if config.url:
        from .postgres.database import inspect  # noqa: PLC0415 - see open_queue

        return await inspect(config)
    return await asyncio.to_thread(inspect_sqlite, Path(config.path))


async def backup_queue(config: QueueConfig, dest: Path) -> int:
    """Copy the live SQLite queue to `dest` (docs/operations.md, "Backing up"); return the
    messages queued in the copy. A PostgreSQL queue is backed up with its database."""
    if config.url:
        raise StoreError(
            "queue.url: a PostgreSQL queue is backed up with its database (pg_dump, or the "
            "database's own backups), not by this command"
        )
    return await asyncio.to_thread(backup_sqlite, Path(config.path), dest)
