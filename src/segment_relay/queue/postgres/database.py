"""The PostgreSQL queue's connections (docs/queue.md): two pools, the schema, the errors.

`Database.open` connects, upgrades the schema under an advisory lock and counts the queue.
`Database.connection()` hands out a connection and turns the errors that are the database's
state rather than the request's into StoreError, so that the relay answers 503 and tries
again instead of failing; it remembers the last such failure for /ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import asyncpg
import orjson

from ...config import QueueConfig, redact_url
from ...errors import StoreError
from ...records import NewMessage
from .. import migrations
from ..queries import load_queries
from .leases import bucket_of

log = logging.getLogger(__name__)
Q = load_queries(__package__)
MIGRATIONS = migrations.load(__package__)
# Any key will do, so long as every release takes the same one: the migration lock.
MIGRATION_LOCK = 0x5E6_4E1A
# What a lost or refused connection raises: the relay answers 503 and carries on.
UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.InterfaceError,
    # The driver's own view of a connection that broke under it (a protocol out of step).
    asyncpg.exceptions.InternalClientError,
)
# SQLSTATE classes of errors that are the database's state, not the request's: a lost
# connection (08), a rolled-back transaction (40, deadlock or serialization), no resources
# (53: too many connections, a full disk), an operator's intervention (57: shutdown, a
# cancelled or timed-out statement), a transaction the server ended (25: idle too long in a
# transaction, a read-only standby), a lock not available (55). Nothing was written: the
# relay answers 503 or tries again later.
_TRANSIENT_CLASSES = frozenset({"08", "25", "40", "53", "55", "57"})
_LOGIN = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What a connection returned to the pool needs reset: nothing. The backend leaves no
    session state (its advisory locks are the transaction's, it never LISTENs), and asyncpg's
    default reset is a round trip at every release (a pooled SELECT 1 took 0.38-0.52 ms with
    it, 0.20-0.28 ms without)."""


async def _connect(config: QueueConfig, *, durable: bool = True) -> asyncpg.Pool:
    """A pool of connections to the queue. `durable=False`: their commits return before the
    WAL is flushed (synchronous_commit off; see Database.outcomes).

    No statement may take longer than a lease, and a transaction left idle (its relay paused
    or gone) is ended by the server after a third of one, so that its locks (a user's
    session, a messageId, the leases a fence holds) cannot hold the other relays up.
    """
    where = redact_url(config.url)
    settings = {
        "application_name": "segment-relay",
        "synchronous_commit": "on" if durable else "off",
        "idle_in_transaction_session_timeout": str(int(config.lease_s * 1000 / 3)),
    }
    try:
        pool = await asyncpg.create_pool(
            config.url,
            min_size=1,
            max_size=config.pool_size,
            timeout=10,
            command_timeout=config.lease_s,
            server_settings=settings,
            reset=_keep_session,
        )
    except _LOGIN as exc:
        raise StoreError(f"queue.url: the database refused {where}: {exc}") from exc
    except (*UNREACHABLE, asyncpg.PostgresError) as exc:
        raise StoreError(f"queue.url: cannot connect to {where}: {exc}") from exc
    assert pool is not None
    return pool


def message_rows(rows: Sequence[NewMessage]) -> tuple[str, list[str]]:
    """`rows` as the two parameters of the statements that insert messages (insert_calls,
    insert_messages, stage_imports): their small fields as one JSON array, and their bodies.

    Not an array per field: asyncpg encodes an array element by element, with two abstract
    base class checks per text element. For commits of 2,500 calls the relay's CPU fell from
    5.3 to 2.6 us per call with this, and PostgreSQL's time stayed the same; bench/pg.py's
    100-call batches went 1.16x with it and the dedup rule (docs/queue.md)."""
    fields = [
        {
            "bucket": bucket_of(m.user_key),
            "source": m.source,
            "message_id": m.message_id,
            "user_key": m.user_key,
            "type": m.type,
            "received_at": m.received_at,
            "fresh": m.fresh_id,
        }
        for m in rows
    ]
    return orjson.dumps(fields).decode(), [m.body for m in rows]


async def inspect(config: QueueConfig) -> str:
    """What `check-config` says of the database at `queue.url`, found usable by the relay
    without changing anything; StoreError naming what `serve` would refuse."""
    where = redact_url(config.url)
    pool = await _connect(config)
    try:
        async with pool.acquire() as conn:
            if not await conn.fetchval(Q["schema_exists"]):
                return f"PostgreSQL {where} (the schema is created at start)"
            version = int(await conn.fetchval(Q["schema_version"]))
            migrations.pending(MIGRATIONS, version, where)
            pending = int(await conn.fetchval(Q["count_messages"])) if version else 0
    except UNREACHABLE as exc:
        raise StoreError(f"queue.url: cannot reach {where}: {exc}") from exc
    finally:
        await pool.close()
    return f"PostgreSQL {where} (schema version {version}, {pending} messages queued)"


async def _migrate(conn: asyncpg.Connection, where: str, *, create: bool) -> None:
    """Bring the schema up to date (queue/migrations.py) in one transaction, under an
    advisory lock, so that relays starting together apply each migration once.

    Without `create` (a command that only reads or administers the queue) a database that
    holds no queue yet is refused, and left as it is."""
    if not create and not await conn.fetchval(Q["schema_exists"]):
        raise StoreError(
            f"queue.url: the database {where} holds no segment-relay queue (a relay creates "
            "it when it starts); is this the database the relays use?"
        )
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS segment_relay_schema ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        version = await conn.fetchval(Q["schema_version"])
        for migration in migrations.pending(MIGRATIONS, int(version), where):
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO segment_relay_schema (version) VALUES ($1)", migration.version
            )
            log.info(
                "queue schema upgraded to version %d (%s)",
                migration.version,
                migration.name,
                extra={"action": "schema_upgraded"},
            )


class Database:
    """The queue's two pools: `pool` commits with the WAL flush (calls, leases, the CLI);
    `outcomes` without it (reads, outcomes of sends, session ends): one of those lost in a
    crash of the database is only undone (the messages are sent again, the sessions closed
    again), never lost, and a settlement no longer waits for an fsync of its own (bench/pg.py
    forwarding: 4.7k -> 5.8k events/s)."""

    def __init__(self, pool: asyncpg.Pool, outcomes: asyncpg.Pool, where: str) -> None:
        self.pool = pool
        self.outcomes = outcomes
        # queue.url without its password.
        self.where = where
        # Why the database could not be used, from the latest operation that failed (None
        # once one succeeds): /ready.
        self.down: str | None = None

    @classmethod
    async def open(
        cls, config: QueueConfig, *, outcomes: bool, analyze: bool, create: bool = True
    ) -> tuple[Database, int]:
        """Connect and upgrade the schema; return the database and the messages queued.

        `outcomes`: open the second pool (a relay that forwards). `analyze`: a queue that
        holds a backlog is analyzed at once (otherwise autovacuum's next round, up to a minute
        later, and until then a plan may sort the whole queue). `create`: make the schema in a
        database that has none (else StoreError). Raises StoreError naming
        queue.url (never its password), or when a newer relay upgraded the schema.
        """
        pool = await _connect(config)
        where = redact_url(config.url)
        try:
            async with pool.acquire() as conn:
                await _migrate(conn, where, create=create)
                pending = int(await conn.fetchval(Q["count_messages"]))
                if pending and analyze:
                    await conn.execute(Q["analyze"])
            second = await _connect(config, durable=False) if outcomes else pool
        except BaseException:
            await pool.close()
            raise
        return cls(pool, second, where), pending

    @contextlib.asynccontextmanager
    async def connection(self, *, outcome: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A connection (`outcome`: of the pool for outcomes); a lost or refused one raises
        StoreError and is remembered in `down` until one works again."""
        pool = self.outcomes if outcome else self.pool
        try:
            async with pool.acquire(timeout=10) as conn:
                yield conn
        except UNREACHABLE as exc:
            self.down = f"the queue database {self.where} cannot be reached: {exc}"
            raise StoreError(self.down) from exc
        except asyncpg.PostgresError as exc:
            if str(exc.sqlstate or "")[:2] not in _TRANSIENT_CLASSES:
                raise
            raise StoreError(f"the queue database {self.where} refused: {exc}") from exc
        self.down = None

    async def close(self, timeout_s: float) -> None:
        """Close both pools; a pool that will not close in `timeout_s` is terminated."""
        for pool in {self.outcomes, self.pool}:
            try:
                await asyncio.wait_for(pool.close(), timeout_s)
            except Exception as exc:  # noqa: BLE001 - nothing is lost: every write is done
                log.warning("closing the queue's connections: %s", exc)
                pool.terminate()
