"""JSON read as Segment reads it (docs/api.md, "JSON"), with the official clients: a lone
surrogate does not cost a batch, and integers of any size keep their digits to the
destination, in both API styles."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from segment.analytics import Client

from segment_relay.service import STORE
from segment_relay.testing import FakeInfinario
from support import (
    AUTH,
    WRITE_KEY,
    Backend,
    install_node_client,
    make_config,
    post,
    requires,
    running_fake,
    running_relay,
    send_with_node_client,
)

pytestmark = pytest.mark.acceptance
BROKEN = "broken \ud83d emoji"  # a truncated emoji: a high surrogate without its pair
MENDED = "broken \ufffd emoji"
ORDER_ID = 12345678901234567890123
BALANCE = -1234567890123456789012345


def send_one_batch(url: str, calls: list[dict[str, Any]]) -> None:
    """The calls as one batch of segment-analytics-python (it sends when it holds them all)."""
    errors: list[str] = []
    client = Client(
        WRITE_KEY,
        host=url,
        max_retries=0,
        upload_size=len(calls),
        upload_interval=30,
        on_error=lambda exc, _items: errors.append(str(exc)),
    )
    for call in calls:
        client.track(**call)
    client.flush()  # waits until the batch was answered
    for consumer in client.consumers or []:
        consumer.pause()  # its thread (a daemon) ends at its next look at the queue
    assert errors == []


def properties(command: dict[str, Any]) -> dict[str, Any]:
    return dict(command["data"]["properties"])


@pytest.mark.parametrize("api", ["infinario", "exponea"])
async def test_a_lone_surrogate_and_huge_integers_reach_the_destination(
    tmp_path: Path, api: str, backend: Backend
) -> None:
    """Through either queue: SQLite's and PostgreSQL's keep the stored text as it is."""
    fake = FakeInfinario(api_key="KEY")
    calls = [{"user_id": f"u{n}", "event": "Viewed", "properties": {"n": n}} for n in range(6)] + [
        {
            "user_id": "u6",
            "event": "Order Completed",
            "properties": {"note": BROKEN, BROKEN: "key", "order_id": ORDER_ID, "balance": BALANCE},
        }
    ]
    async with running_fake(fake) as (_, api_server):
        config = make_config(
            tmp_path / "q.db",
            api_server.url,
            destination={"api": api, "api_key": "KEY"},
            sessions={"enabled": False},
            queue={"url": backend.url} if backend.kind == "postgres" else {},
        )
        async with running_relay(config) as relay:
            await asyncio.to_thread(send_one_batch, relay.url, calls)
            commands = await fake.wait_for_commands(7)
    events = {properties(c).get("n", "order"): properties(c) for c in commands}
    assert sorted(events, key=str) == [0, 1, 2, 3, 4, 5, "order"]
    order = events["order"]
    assert order["note"] == MENDED
    assert order[MENDED] == "key"
    assert type(order["order_id"]) is int
    assert order["order_id"] == ORDER_ID
    assert order["balance"] == BALANCE


@requires("node", "npm")
async def test_the_node_client_batch_with_a_lone_surrogate_is_delivered_whole(
    tmp_path: Path,
) -> None:
    """analytics-node sends JSON.stringify's text: a lone surrogate as `\\ud83d`. (A
    JavaScript number cannot hold a 23-digit integer; JSON.rawJSON can, where the runtime
    has it: Node 20 behind a flag.)"""
    node = await asyncio.to_thread(install_node_client)
    fake = FakeInfinario()
    calls = [
        ["track", {"userId": f"u{n}", "event": "Viewed", "properties": {"n": n}}] for n in range(4)
    ]
    calls.append(
        [
            "track",
            {
                "userId": "u4",
                "event": "Order Completed",
                "properties": {"note": BROKEN, "order_id": {"$rawJSON": str(ORDER_ID)}},
            },
        ]
    )
    async with running_fake(fake) as (_, api_server):
        config = make_config(tmp_path / "q.db", api_server.url, sessions={"enabled": False})
        async with running_relay(config) as relay:
            await send_with_node_client(node, relay.url, calls, "--harmony-json-parse-with-source")
            commands = await fake.wait_for_commands(5)
    events = {properties(c).get("n", "order"): properties(c) for c in commands}
    assert sorted(events, key=str) == [0, 1, 2, 3, "order"]
    assert events["order"]["note"] == MENDED
    assert events["order"]["order_id"] == ORDER_ID


async def test_what_postgresql_cannot_store_or_orjson_cannot_write_never_fails_a_request(
    tmp_path: Path, backend: Backend
) -> None:
    """A NUL in an id or event name, a huge integer id on a session call, a message nested
    too deeply: each is read as Segment would or refused alone, never a 5xx for the batch."""
    fake = FakeInfinario()
    deep: Any = "leaf"
    for _ in range(300):
        deep = [deep]
    nul = {"userId": "nul\u0000user", "event": "bad\u0000event", "messageId": "nul\u0000id"}
    batch = [
        {"type": "track", **nul, "properties": {"k\u0000": 1}},
        {"type": "page", "userId": ORDER_ID, "name": "Home"},
        {"type": "track", "userId": "deep", "event": "Deep", "properties": {"x": deep}},
        {"type": "track", "userId": "ok", "event": "Fine"},
    ]
    async with running_fake(fake) as (_, api_server):
        config = make_config(
            tmp_path / "q.db",
            api_server.url,
            sessions={"enabled": True},
            queue={"url": backend.url} if backend.kind == "postgres" else {},
        )
        async with running_relay(config) as relay:
            status, body = await post(relay.url, "/v1/batch", {"batch": batch})
            assert (status, body) == (200, {"success": True})
            # Deeper than any JSON reader here takes: refused whole, as JSON.
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    relay.url + "/v1/track", data=b"[" * 2000 + b"]" * 2000, headers=AUTH
                ) as response,
            ):
                assert response.status == 400
                assert (await response.json())["code"] == "invalid_json"
            commands = await fake.wait_for_commands(4)  # track, page, its session_start, track
            [deep_letter] = await relay.app[STORE].dead_letters(reason="invalid")
    assert "nested" in deep_letter.detail
    events = {c["data"]["type"]: c["data"] for c in commands}
    assert events["bad\ufffdevent"]["customer_ids"]["registered"] == "nul\ufffduser"
    assert events["bad\ufffdevent"]["properties"]["k\ufffd"] == 1
    assert events["page_visit"]["customer_ids"]["registered"] == str(ORDER_ID)
    assert events["session_start"]["customer_ids"]["registered"] == str(ORDER_ID)
    assert "Fine" in events
