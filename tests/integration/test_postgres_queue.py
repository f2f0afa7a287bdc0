"""The PostgreSQL queue with several relays on one real database, in one process: shared
dedup, one session per user, buckets shared and taken over, writes fenced by the lease."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import asyncpg
import pytest

from segment_relay.config import QueueConfig
from segment_relay.errors import StoreError
from segment_relay.queue import inspect_queue, open_queue
from segment_relay.queue.postgres import PostgresQueue
from segment_relay.queue.postgres.database import MIGRATIONS as PG_MIGRATIONS
from segment_relay.queue.postgres.database import Q, message_rows
from segment_relay.queue.postgres.leases import BUCKETS
from segment_relay.records import NewMessage
from segment_relay.sessions import SessionRules
from support import database_url, msg, page

OpenRelay = Callable[..., Awaitable[PostgresQueue]]


class Clock:
    """A monotonic clock the test moves (the leases' local side)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def relays(postgres_url: str) -> AsyncIterator[OpenRelay]:
    """Opens relays (PostgresQueue) on one database; closes them after the test."""
    async with AsyncExitStack() as stack:

        async def open_relay(**kwargs: Any) -> PostgresQueue:
            queue = await PostgresQueue.open(QueueConfig(url=postgres_url), **kwargs)
            stack.push_async_callback(queue.close)
            return queue

        yield open_relay


async def sql(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def test_a_message_id_sent_to_two_relays_at_once_is_stored_once(
    relays: OpenRelay, postgres_url: str
) -> None:
    a, b = await relays(), await relays()
    counts = await asyncio.gather(
        *(q.enqueue([msg(i, user=f"u{i % 7}")]) for i in range(200) for q in (a, b))
    )
    assert sum(counts) == 200
    assert [r[0] for r in await sql(postgres_url, "SELECT COUNT(*) FROM messages")] == [200]


async def test_a_users_calls_acked_one_after_another_by_two_relays_leave_in_order(
    relays: OpenRelay,
) -> None:
    a, b = await relays(), await relays()
    for i in range(20):
        await (a if i % 2 else b).enqueue([msg(i, user="u")])
    owner = a if (await a.due(2000.0, (), 100)) else b
    assert [r.message_id for r in await owner.due(2000.0, (), 100)] == [f"m{i}" for i in range(20)]


async def test_a_message_id_the_relay_made_gets_no_dedup_row(
    relays: OpenRelay, postgres_url: str
) -> None:
    """A call that came without a messageId cannot repeat an accepted one: it is stored, in
    order with the others of its commit, without a dedup row; sent ids are still deduped."""
    rules = SessionRules.of(60, ["page"])
    a = await relays(sessions=rules)
    made = [msg(n, user="u")._replace(fresh_id=True) for n in (1, 3)]
    assert await a.enqueue([msg(0, user="u"), made[0], msg(2, user="u"), made[1]]) == 4
    assert await a.enqueue([msg(0, user="u"), msg(2, user="u")]) == 0  # repeats
    opened = page(0, "v", "2024-01-01T00:00:00Z", 1000.0)
    assert await a.enqueue([opened._replace(fresh_id=True)]) == 1  # with a session
    ids = [r.message_id for r in await a.due(2000.0, (), 100)]
    assert ids[:4] == ["m0", "m1", "m2", "m3"]
    assert "p0" in ids
    dedup = await sql(postgres_url, "SELECT message_id FROM dedup ORDER BY 1")
    assert [r[0] for r in dedup] == ["m0", "m2"]


async def call_in_progress(conn: asyncpg.Connection, *, fresh: bool) -> tuple[Any, int]:
    """A commit in progress on `conn` (user "slow", messageId "late"), as the relay's group
    commit makes it (`fresh`: with a messageId the relay made, so no dedup row). Returns the
    open transaction and the seq."""
    transaction = conn.transaction()
    await transaction.start()
    late = NewMessage("s", "late", "slow", "track", "{}", 1000.0, fresh_id=fresh)
    await conn.execute(Q["insert_calls"], *message_rows([late]), 60.0)
    seq = await conn.fetchval("SELECT seq FROM messages WHERE message_id = 'late'")
    return transaction, int(seq)


@pytest.mark.parametrize("fresh", [False, True], ids=["sent id", "id the relay made"])
async def test_a_read_never_skips_a_seq_whose_transaction_commits_after_it(
    relays: OpenRelay, postgres_url: str, fresh: bool
) -> None:
    """The forwarder starts a read after what earlier reads saw (horizon.py); a call whose
    seq was taken before others' but committed after them is still found."""
    clock = Clock()
    a = await relays(clock=clock)
    late = await asyncpg.connect(postgres_url)
    try:
        transaction, late_seq = await call_in_progress(late, fresh=fresh)
        looked = 0
        for n in range(5):  # commits and reads go on around it
            clock.now += 1  # each read takes a transaction id of its own (horizon.py)
            await a.enqueue([msg(n, user=f"u{n}")])
            read = await a.read_due(2000.0, {f"u{i}" for i in range(5)}, 100, looked)
            assert read.rows == []
            looked = max(looked, read.looked)
        assert looked < late_seq
        await transaction.commit()
        found = (await a.read_due(2000.0, set(), 100, looked)).rows
        assert found[0].message_id == "late"
    finally:
        await late.close()
    # With nothing in progress, reads come to trust everything they saw, up to the newest.
    for _ in range(3):
        clock.now += 1
        read = await a.read_due(2000.0, {"slow", *(f"u{i}" for i in range(5))}, 100, 0)
    newest = (await sql(postgres_url, "SELECT MAX(seq) FROM messages"))[0][0]
    assert read.looked == newest


async def test_a_read_never_trusts_the_seq_of_the_newest_transaction_still_running(
    relays: OpenRelay, postgres_url: str
) -> None:
    """The transaction that took the seq is the newest with an id, and nothing commits
    after it: a snapshot's xmax is then its own id, and its xmin leaves it out."""
    clock = Clock()
    a = await relays(clock=clock)
    await a.enqueue([msg(0, user="u0")])
    late = await asyncpg.connect(postgres_url)
    try:
        transaction, late_seq = await call_in_progress(late, fresh=False)
        for _ in range(4):
            clock.now += 1
            read = await a.read_due(2000.0, {"u0"}, 100, 0)
            assert read.rows == []
            assert read.looked < late_seq
        await transaction.commit()
    finally:
        await late.close()


async def test_one_session_per_user_across_relays(relays: OpenRelay, postgres_url: str) -> None:
    rules = SessionRules.of(60, ["page"])
    a, b = await relays(sessions=rules), await relays(sessions=rules)
    # The same user's first pages reach both relays at once, many times over.
    for n in range(20):
        user = f"user{n}"
        await asyncio.gather(
            a.enqueue([page(2 * n, user, "2024-03-01T12:00:00Z", 1000.0)]),
            b.enqueue([page(2 * n + 1, user, "2024-03-01T12:00:01Z", 1000.5)]),
        )
    starts = await sql(
        postgres_url,
        "SELECT user_key, COUNT(*) FROM messages WHERE type = 'session_start' GROUP BY 1",
    )
    assert sorted((r[0], r[1]) for r in starts) == sorted((f"user{n}", 1) for n in range(20))
    assert [r[0] for r in await sql(postgres_url, "SELECT COUNT(*) FROM sessions")] == [20]


async def test_buckets_are_shared_between_live_relays_and_given_up_in_order(
    relays: OpenRelay,
) -> None:
    clock_a, clock_b = Clock(), Clock()
    a = await relays(clock=clock_a)
    b = await relays(clock=clock_b)
    [alone] = [i for i in await a.instances() if i.id == a.instance_id]
    assert len(alone.buckets) == BUCKETS  # the first relay took them all
    await a.renew()  # a sees b: it stops reading half of its buckets...
    assert len(a._leases.usable(clock_a())) == BUCKETS // 2  # noqa: SLF001
    clock_a.now += 5.0  # ...and gives them up once batches claimed before had time to end
    await a.renew()
    await b.renew()
    held = {i.id: set(i.buckets) for i in await a.instances()}
    assert len(held[a.instance_id]) == len(held[b.instance_id]) == BUCKETS // 2
    assert held[a.instance_id].isdisjoint(held[b.instance_id])


async def test_a_relay_that_lost_its_buckets_cannot_ack_retry_or_end_sessions(
    relays: OpenRelay, postgres_url: str
) -> None:
    rules = SessionRules.of(60, ["page"])
    a = await relays(sessions=rules)
    await a.enqueue(
        [msg(1, user="x"), msg(2, user="y"), page(3, "z", "2024-03-01T12:00:00Z", 1000.0)]
    )
    claimed = await a.due(2000.0, (), 10)
    assert len(claimed) == 4  # two calls, z's session_start and page
    # a is paused past its lease: its membership and leases run out, and b takes over.
    await sql(
        postgres_url,
        "UPDATE instances SET expires_at = now() - interval '1 s' WHERE id = $1",
        a.instance_id,
    )
    await sql(
        postgres_url,
        "UPDATE leases SET expires_at = now() - interval '1 s' WHERE owner = $1",
        a.instance_id,
    )
    b = await relays(sessions=rules)
    [b_state] = [i for i in await b.instances() if i.id == b.instance_id]
    assert len(b_state.buckets) == BUCKETS
    # a resumes, its leases still good by its own clock: every owner-only write is fenced.
    await a.settle(acked=claimed[:1], retry=[(claimed[1], 3000.0, "later", True)], now=2000.0)
    assert a.fenced == 2
    assert await a.due(2000.0, (), 10) == []
    assert await a.expire_sessions(5000.0) == 0
    rows = await b.due(2000.0, (), 10)
    assert [(r.message_id, r.attempts, r.next_attempt_at) for r in rows] == [
        (r.message_id, 0, 0.0) for r in claimed
    ]
    assert await b.expire_sessions(5000.0) == 1
    # b's own outcomes are written.
    await b.settle(acked=rows, now=2000.0)
    assert await b.due(6000.0, (), 10) != []  # z's session_end
    assert b.fenced == 0


async def test_a_stopping_relay_hands_its_buckets_over_at_once(
    relays: OpenRelay,
) -> None:
    a = await relays()
    b = await relays()
    await a.close()
    await b.renew()
    [b_state] = await b.instances()
    assert (b_state.id, len(b_state.buckets)) == (b.instance_id, BUCKETS)


async def test_connection_problems_name_queue_url_but_never_the_password(
    postgres_url: str,
) -> None:
    refused = "postgresql://postgres:s3cret@127.0.0.1:1/x"
    with pytest.raises(StoreError, match=r"queue\.url: cannot connect") as caught:
        await open_queue(QueueConfig(url=refused))
    assert "s3cret" not in str(caught.value)
    assert "postgres:***@127.0.0.1:1" in str(caught.value)
    missing = database_url("segment_relay_no_such_database")
    with pytest.raises(StoreError, match=r"queue\.url: the database refused .*does not exist"):
        await open_queue(QueueConfig(url=missing))
    nobody = postgres_url.replace("postgres@", "nobody_here@")
    with pytest.raises(StoreError, match=r"queue\.url: the database refused .*nobody_here"):
        await open_queue(QueueConfig(url=nobody))


async def test_a_command_on_a_database_without_a_queue_refuses_and_creates_nothing(
    postgres_url: str,
) -> None:
    with pytest.raises(StoreError, match=r"queue\.url: the database .* holds no segment-relay"):
        await open_queue(QueueConfig(url=postgres_url), daemon=False)
    conn = await asyncpg.connect(postgres_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('segment_relay_schema')") is None
    finally:
        await conn.close()
    # check-config's look creates nothing either.
    config = QueueConfig(url=postgres_url)
    assert (await inspect_queue(config)).endswith("(the schema is created at start)")
    relay = await open_queue(config)
    await relay.close()
    command = await open_queue(config, daemon=False)
    await command.close()
    latest = PG_MIGRATIONS[-1].version
    assert (await inspect_queue(config)).endswith(f"(schema version {latest}, 0 messages queued)")
