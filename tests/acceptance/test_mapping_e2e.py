"""Every call type, sent with segment-analytics-python through the daemon, in both API styles."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from segment.analytics import Client
from segment.analytics.version import VERSION

from segment_relay.testing import FakeInfinario
from support import WRITE_KEY, running_fake, start_daemon, write_config

pytestmark = pytest.mark.acceptance
WHEN = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
LIBRARY = {"library_name": "analytics-python", "library_version": VERSION}


def send_every_call_type(url: str) -> None:
    client = Client(WRITE_KEY, host=url, sync_mode=True, max_retries=0)
    client.identify(
        user_id="u1",
        anonymous_id="a1",
        traits={"plan": "pro", "address": {"city": "Oslo"}},
        timestamp=WHEN,
    )
    client.track(
        user_id="u1",
        anonymous_id="a1",
        event="Order Completed",
        properties={"revenue": 5},
        timestamp=WHEN,
    )
    client.page(
        user_id="u1",
        anonymous_id="a1",
        category="Shop",
        name="Cart",
        properties={"path": "/cart"},
        timestamp=WHEN,
    )
    client.screen(
        user_id="u1", anonymous_id="a1", name="Home", properties={"tab": "feed"}, timestamp=WHEN
    )
    client.group(
        user_id="u1", anonymous_id="a1", group_id="g1", traits={"name": "Acme"}, timestamp=WHEN
    )
    client.alias(previous_id="a1", user_id="u1", timestamp=WHEN)


def expected_legacy() -> list[dict[str, Any]]:
    both = {"registered": "u1", "cookie": "a1"}

    def event(kind: str, props: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": "crm/events",
            "data": {
                "customer_ids": both,
                "project_id": "TOKEN",
                "type": kind,
                "properties": {**props, **LIBRARY},
            },
        }

    def customer(ids: dict[str, str], props: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": "crm/customers",
            "data": {"ids": ids, "project_id": "TOKEN", "properties": props},
        }

    return [
        customer(both, {"plan": "pro", "address_city": "Oslo"}),
        event("Order Completed", {"revenue": 5}),
        event("page_visit", {"path": "/cart", "page_name": "Cart", "page_category": "Shop"}),
        event("screen_visit", {"tab": "feed", "screen_name": "Home"}),
        customer(both, {"group_id": "g1", "group_name": "Acme"}),
        customer(both, {}),
    ]


def expected_v2() -> list[dict[str, Any]]:
    both = {"registered": "u1", "cookie": "a1"}

    def event(kind: str, props: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": "customers/events",
            "data": {"customer_ids": both, "event_type": kind, "properties": {**props, **LIBRARY}},
        }

    def customer(props: dict[str, Any]) -> dict[str, Any]:
        return {"name": "customers", "data": {"customer_ids": both, "properties": props}}

    return [
        customer({"plan": "pro", "address_city": "Oslo"}),
        event("Order Completed", {"revenue": 5}),
        event("page_visit", {"path": "/cart", "page_name": "Cart", "page_category": "Shop"}),
        event("screen_visit", {"tab": "feed", "screen_name": "Home"}),
        customer({"group_id": "g1", "group_name": "Acme"}),
        customer({}),
    ]


def split_times(command: dict[str, Any]) -> tuple[dict[str, Any], list[float]]:
    """The command without its time fields and command_id, and the times it carried."""
    data = dict(command["data"])
    times = [data.pop(k) for k in ("timestamp", "update_timestamp") if k in data]
    rest = {k: v for k, v in command.items() if k not in ("data", "command_id")}
    return {**rest, "data": data}, times


@pytest.mark.parametrize("api", ["infinario", "exponea"])
async def test_every_call_type_arrives_as_the_expected_commands(tmp_path: Path, api: str) -> None:
    fake = FakeInfinario(api_key="KEY")
    async with running_fake(fake) as (_, server):
        config = write_config(
            tmp_path / "relay.yaml",
            tmp_path / "q.db",
            server.url,
            destination={"api": api, "api_key": "KEY"},
            sessions={"enabled": False},
        )
        daemon = await start_daemon(config)
        try:
            await asyncio.to_thread(send_every_call_type, daemon.url)
            commands = await fake.wait_for_commands(6)
        finally:
            assert await daemon.stop() == 0
    assert all(r.reply_status == 200 for r in fake.requests)
    expected = expected_legacy() if api == "infinario" else expected_v2()
    stripped = [split_times(c) for c in commands]
    # Order is kept per user key (anonymousId, else userId): the first five calls carry
    # anonymousId a1 and arrive in order; the client's alias has only userId u1, so it is
    # another user's call and may arrive before or after them.
    alias = expected[5]
    in_order = [c for c, _ in stripped if c != alias]
    assert in_order == expected[:5]
    assert [c for c, _ in stripped].count(alias) == 1
    # Each time is the call's timestamp, skew-corrected (client and relay share a clock here).
    # Legacy customer updates carry no time; every other command carries exactly one.
    for command, times in stripped:
        if command["name"] == "crm/customers":
            assert times == []
        else:
            assert times == [pytest.approx(WHEN.timestamp(), abs=5.0)]
    if api == "exponea":
        ids = [c["command_id"] for c in commands]
        assert len(set(ids)) == 6
        assert all(isinstance(i, str) and i for i in ids)
