"""The queue contract: what every backend does, run against SQLite and PostgreSQL alike.

Each test gets `backend`, which opens the queue under test (a SQLite file on tmp_path, or a
new PostgreSQL database), as often as the test asks (a reopen is a restart).
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from segment_relay.errors import StoreFullError
from segment_relay.records import Failure, NewMessage, Refusal
from segment_relay.sessions import SessionRules
from support import Backend, msg, page


async def test_enqueue_is_durable_across_reopen(backend: Backend) -> None:
    store = await backend.open()
    assert await store.enqueue([msg(1), msg(2)]) == 2
    await store.close()
    store = await backend.open()
    try:
        rows = await store.due(2000.0, (), 10)
        assert [r.message_id for r in rows] == ["m1", "m2"]
        assert store.pending_count == 2
    finally:
        await store.close()


async def test_concurrent_enqueues_share_commits_and_each_gets_its_own_count(
    backend: Backend,
) -> None:
    store = await backend.open()
    try:
        counts = await asyncio.gather(*(store.enqueue([msg(i), msg(i + 1000)]) for i in range(200)))
        assert counts == [2] * 200
        assert (await store.stats(0.0)).pending == 400
    finally:
        await store.close()


async def test_duplicates_within_the_window_are_not_stored_again(backend: Backend) -> None:
    store = await backend.open(dedup_window_s=100.0)
    try:
        assert await store.enqueue([msg(1, at=1000.0), msg(1, at=1000.0)]) == 1
        assert await store.enqueue([msg(1, at=1050.0)]) == 0
        # Another source may reuse the id; the same source may after the window.
        assert await store.enqueue([msg(1, at=1050.0, source="other")]) == 1
        assert await store.enqueue([msg(1, at=1200.0)]) == 1
    finally:
        await store.close()


async def test_dedup_survives_the_delivery_of_the_message(backend: Backend) -> None:
    store = await backend.open()
    try:
        await store.enqueue([msg(1)])
        [row] = await store.due(2000.0, (), 10)
        await store.settle(acked=[row], now=2000.0)
        assert await store.enqueue([msg(1, at=1001.0)]) == 0
    finally:
        await store.close()


async def test_a_user_waiting_for_a_retry_holds_back_only_that_user(backend: Backend) -> None:
    store = await backend.open()
    try:
        await store.enqueue([msg(1, "a"), msg(2, "b"), msg(3, "a"), msg(4, "b")])
        rows = await store.due(2000.0, (), 10)
        await store.settle(retry=[(rows[0], 2100.0, "later", True)], now=2000.0)
        assert [r.message_id for r in await store.due(2000.0, (), 10)] == ["m2", "m4"]
        # Busy users (a batch in flight) are left out too.
        assert [r.message_id for r in await store.due(2000.0, ("b",), 10)] == []
        # Once the retry is due, a's messages come back in their order.
        assert [r.message_id for r in await store.due(2100.0, (), 10)] == ["m1", "m2", "m3", "m4"]
        assert await store.next_retry_at() == 2100.0
    finally:
        await store.close()


async def test_dead_letters_keep_the_message_and_the_reason(backend: Backend) -> None:
    store = await backend.open()
    try:
        await store.enqueue([msg(1), msg(2)])
        rows = await store.due(2000.0, (), 10)
        await store.settle(
            acked=[rows[1]],
            dead=[(rows[0], Failure("rejected", "bad type", 200, "{}"))],
            now=2000.0,
            counters={"acked": 1},
        )
        [dead] = await store.dead_letters()
        assert (
            dead.message_id,
            dead.reason,
            dead.detail,
            orjson.loads(dead.body),
            dead.attempts,
        ) == (
            "m1",
            "rejected",
            "bad type",
            {"n": 1},
            1,
        )
        stats = await store.stats(2000.0)
        assert (stats.pending, stats.dead_letters, stats.counters) == (
            0,
            {"rejected": 1},
            {"acked": 1},
        )
    finally:
        await store.close()


async def test_one_outcome_writes_retries_dead_letters_names_and_counters_together(
    backend: Backend,
) -> None:
    store = await backend.open()
    try:
        await store.enqueue([msg(1, "a"), msg(2, "b"), msg(3, "c")])
        a, b, c = await store.due(2000.0, (), 10)
        # a: retried once (an attempt) then refused; b: held without an attempt; c: delivered.
        await store.settle(retry=[(a, 2100.0, "500", True)], now=2000.0)
        [a] = await store.due(2100.0, ("b", "c"), 10)
        await store.settle(
            acked=[c],
            retry=[(b, 2500.0, "held", False)],
            dead=[(a, Failure("refused", "bad", 400, '{"error": "bad"}'))],
            names=[("event_type", "e")],
            counters={"delivered": 1, "dead_lettered": 1},
            now=2100.0,
        )
        [dead] = await store.dead_letters()
        assert (dead.seq, dead.message_id, dead.user_key, dead.type, orjson.loads(dead.body)) == (
            a.seq, "m1", "a", "track", {"n": 1}
        )  # fmt: skip
        assert (dead.received_at, dead.reason, dead.detail) == (1000.0, "refused", "bad")
        assert (dead.response_status, dead.response_body) == (400, '{"error": "bad"}')
        assert (dead.attempts, dead.first_attempt_at, dead.last_attempt_at) == (2, 2000.0, 2100.0)
        [held] = await store.due(2500.0, (), 10)
        assert (held.seq, held.attempts, held.next_attempt_at, held.last_error) == (
            b.seq, 0, 2500.0, "held"
        )  # fmt: skip
        assert await store.due(2499.0, (), 10) == []
        assert await store.project_names() == [("event_type", "e")]
        stats = await store.stats(2500.0)
        assert (stats.pending, stats.dead_letters, stats.counters) == (
            1,
            {"refused": 1},
            {"delivered": 1, "dead_lettered": 1},
        )
        assert store.pending_count == 1
    finally:
        await store.close()


async def test_over_max_pending_the_store_refuses_and_keeps_what_it_has(backend: Backend) -> None:
    store = await backend.open(max_pending=3)
    try:
        await store.enqueue([msg(1), msg(2)])
        with pytest.raises(StoreFullError):
            await store.enqueue([msg(3), msg(4)])
        assert await store.enqueue([msg(3)]) == 1
        assert (await store.stats(0.0)).pending == 3
    finally:
        await store.close()


async def test_sessions_are_written_with_the_calls_and_survive_a_restart(backend: Backend) -> None:
    rules = SessionRules.of(60, ["page"])
    store = await backend.open(sessions=rules)
    try:
        assert await store.enqueue([page(1, "a", "2024-03-01T12:00:00Z", 1000.0)]) == 1
        # The same page again (a client retry) is a duplicate: no second session_start.
        assert await store.enqueue([page(1, "a", "2024-03-01T12:00:00Z", 1001.0)]) == 0
        rows = await store.due(2000.0, (), 10)
        assert [r.type for r in rows] == ["session_start", "page"]
        assert await store.session_stats() == (1, 1060.0)
    finally:
        await store.close()
    store = await backend.open(sessions=rules)
    try:
        assert await store.next_session_expiry() == 1060.0
        assert await store.expire_sessions(1059.0) == 0
        assert await store.expire_sessions(1060.0) == 1
        assert await store.session_stats() == (0, None)
        rows = await store.due(2000.0, (), 10)
        assert [r.type for r in rows] == ["session_start", "page", "session_end"]
        assert rows[2].message["properties"] == {"duration": 0.0}
    finally:
        await store.close()


async def test_a_session_the_timer_closes_meanwhile_is_not_written_back(backend: Backend) -> None:
    # A commit extending a's session and the timer closing it run at once. SQLite: the
    # commit's rules run on the event loop while the expiry is already queued for the SQLite
    # thread, on the session the cache still holds. PostgreSQL: on two connections, ordered
    # by the session row's lock. Either comes first, but never both: a closed session is not
    # extended (and so reopened) by the commit, which then opens a new one.
    store = await backend.open(sessions=SessionRules.of(60, ["page"]))
    try:
        await store.enqueue([page(1, "a", "2024-03-01T12:00:00Z", 1000.0)])
        later = asyncio.create_task(store.enqueue([page(2, "a", "2024-03-01T12:00:30Z", 1070.0)]))
        closed = asyncio.create_task(store.expire_sessions(1060.0))
        assert await asyncio.wait_for(later, 10) == 1
        rows = await store.due(2000.0, (), 10)
        if await asyncio.wait_for(closed, 10) == 1:
            # The timer first: the page opens a new session.
            kinds = ["session_start", "page", "session_end", "session_start", "page"]
            assert [r.type for r in rows] == kinds
            assert rows[3].message["timestamp"] == "2024-03-01T12:00:30.000Z"
        else:
            # The commit first: it extended the session, which the timer then left open.
            assert backend.kind == "postgres"  # SQLite's thread runs the expiry first
            assert [r.type for r in rows] == ["session_start", "page", "page"]
        assert await store.session_stats() == (1, 1130.0)
    finally:
        await store.close()


async def test_message_ids_past_the_window_are_forgotten(backend: Backend) -> None:
    store = await backend.open(dedup_window_s=100.0)
    try:
        await store.enqueue([msg(1, at=1000.0), msg(2, at=1090.0)])
        assert await store.prune_dedup(now=1150.0) == 1
        # m1 is forgotten (accepted again), m2 is still remembered.
        assert await store.enqueue([msg(1, at=1150.0), msg(2, at=1150.0)]) == 1
    finally:
        await store.close()


async def test_only_a_session_expiring_before_the_timers_deadline_wakes_it(
    backend: Backend,
) -> None:
    store = await backend.open(sessions=SessionRules.of(60, ["page"]))
    try:
        store.expiry.watch(1065.0)
        await store.enqueue([page(1, "a", "2024-03-01T12:00:00Z", 1000.0)])  # expires 1060
        assert store.expiry.changed.is_set()
        assert store.expiry.take_opened() == 1060.0
        store.expiry.changed.clear()
        await store.enqueue([page(2, "b", "2024-03-01T12:00:00Z", 1010.0)])  # expires 1070
        assert not store.expiry.changed.is_set()
        assert store.expiry.take_opened() is None
        store.expiry.watch(None)  # the timer has no deadline: every session opened wakes it
        await store.enqueue([page(3, "c", "2024-03-01T12:00:00Z", 1020.0)])
        assert store.expiry.changed.is_set()
        assert store.expiry.take_opened() == 1080.0
    finally:
        await store.close()


async def test_a_replayed_dead_letter_goes_back_to_its_place_in_its_users_order(
    backend: Backend,
) -> None:
    store = await backend.open()
    try:
        await store.enqueue([msg(1), msg(2)])
        first, second = await store.due(2000.0, (), 10)
        await store.settle(dead=[(first, Failure("rejected", "bad"))], now=2000.0)
        [dead] = await store.dead_letters()
        assert await store.replay([dead.id, dead.id + 1000], 2100.0) == 1
        rows = await store.due(2100.0, (), 10)
        assert [(r.seq, r.message_id, r.attempts) for r in rows] == [
            (first.seq, "m1", 0),
            (second.seq, "m2", 0),
        ]
        assert rows[0].received_at == 2100.0  # its max_age clock starts again
        assert await store.dead_letters() == []
    finally:
        await store.close()


async def test_dead_letters_are_listed_by_reason_and_purged_by_age(backend: Backend) -> None:
    store = await backend.open()
    try:
        await store.enqueue([msg(1), msg(2), msg(3)])
        a, b, c = await store.due(2000.0, (), 10)
        await store.settle(dead=[(a, Failure("rejected")), (b, Failure("expired"))], now=2000.0)
        await store.settle(dead=[(c, Failure("rejected"))], now=3000.0)
        assert [d.message_id for d in await store.dead_letters(reason="rejected")] == ["m1", "m3"]
        [first, *_] = await store.dead_letters()
        assert [d.message_id for d in await store.dead_letters(after=first.id)] == ["m2", "m3"]
        shown = await store.dead_letter(first.id)
        assert shown is not None
        assert shown.message_id == "m1"
        assert await store.dead_letter(first.id + 1000) is None
        assert await store.purge_dead_letters(older_than=2500.0) == 2
        assert [d.message_id for d in await store.dead_letters()] == ["m3"]
    finally:
        await store.close()


async def test_a_refused_message_is_kept_and_replays_only_once_fixed(backend: Backend) -> None:
    store = await backend.open()
    try:
        await store.enqueue([msg(1, user="u")])
        refused = Refusal(
            "s", "m2", "u", "track", '{"type":"track"}', 1500.0, "invalid", "no event"
        )
        await store.keep_refused([refused])
        [dead] = await store.dead_letters(reason="invalid")
        assert (dead.seq, dead.message_id, dead.body, dead.attempts) == (0, "m2", refused.body, 0)
        assert (dead.received_at, dead.last_attempt_at, dead.refused) == (1500.0, 1500.0, True)
        assert await store.replay([dead.id], 2000.0) == 0  # not as it is
        assert await store.dead_letter(dead.id) == dead
        fixed = NewMessage("s", "m2", "u", "track", '{"type":"track","event":"e"}', 1500.0)
        assert await store.fix_dead_letter(dead.id, fixed, "fixed; was invalid: no event")
        assert not await store.fix_dead_letter(dead.id + 1000, fixed, "")
        mended = await store.dead_letter(dead.id)
        assert mended is not None
        assert (mended.reason, mended.body, mended.refused) == ("fixed", fixed.body, False)
        assert await store.replay([dead.id], 2000.0) == 1
        # It had no place in the queue: it takes one after everything queued.
        rows = await store.due(2000.0, (), 10)
        assert [r.message_id for r in rows] == ["m1", "m2"]
        assert rows[1].seq > rows[0].seq
        assert await store.dead_letters() == []
    finally:
        await store.close()


async def test_a_call_with_a_session_events_message_id_does_not_hide_the_event(
    backend: Backend,
) -> None:
    store = await backend.open(sessions=SessionRules.of(60, ["page"]))
    try:
        # A client's call that happens to carry the messageId of a's session_start.
        taken = NewMessage("s", "session_start:a:1709294400.000", "a", "track", "{}", 999.0)
        assert await store.enqueue([taken]) == 1
        assert await store.enqueue([page(1, "a", "2024-03-01T12:00:00Z", 1000.0)]) == 1
        assert await store.expire_sessions(1060.0) == 1
        rows = await store.due(2000.0, (), 10)
        assert [r.type for r in rows] == ["track", "session_start", "page", "session_end"]
    finally:
        await store.close()


async def test_retry_now_makes_what_waits_due_and_the_state_is_recorded(backend: Backend) -> None:
    store = await backend.open()
    try:
        await store.enqueue([msg(1, user="a"), msg(2, user="b")])
        first, _ = await store.due(2000.0, (), 10)
        await store.settle(retry=[(first, 9000.0, "asked to retry", False)], now=2000.0)
        assert [r.message_id for r in await store.due(2000.0, (), 10)] == ["m2"]
        assert await store.retry_now(2000.0) == 1
        assert [r.message_id for r in await store.due(2000.0, (), 10)] == ["m1", "m2"]
        await store.note_destination('{"state": "down"}')
        assert [text for _, text in await store.destinations()] == ['{"state": "down"}']
    finally:
        await store.close()


async def test_imports_wait_apart_once_for_good_and_are_fed_in_order(backend: Backend) -> None:
    now = time.time()
    store = await backend.open()
    try:
        assert await store.enqueue([msg(1, at=now)]) == 1  # accepted live just now
        # m1 was accepted live; m2 comes twice: three are kept apart, in their order.
        rows = [msg(n, f"u{n % 2}", at=now) for n in (1, 2, 3, 2, 4)]
        assert await store.stage_imports(rows) == 3
        assert (await store.imports_waiting(), store.pending_count) == (3, 1)
        assert await store.stage_imports([msg(n, at=now) for n in (2, 3, 5)]) == 1
        # A live call repeating an imported one is not stored again (the dedup window).
        assert await store.enqueue([msg(5, at=now)]) == 0
        assert await store.feed_imports(2) == 2
        assert (await store.imports_waiting(), store.pending_count) == (2, 3)
        due = await store.due(now + 1, (), 10)
        assert [r.message_id for r in due] == ["m1", "m2", "m3"]
        assert await store.feed_imports(10) == 2
        assert await store.feed_imports(10) == 0
        assert store.pending_count == 5
    finally:
        await store.close()
    # For good: after a restart, and after delivery, an imported messageId stays known.
    store = await backend.open()
    try:
        delivered = await store.due(now + 1, (), 10)
        await store.settle(acked=delivered, now=now + 1)
        assert await store.stage_imports([msg(n, at=now + 2) for n in (2, 4, 6)]) == 1
    finally:
        await store.close()
