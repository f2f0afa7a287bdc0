"""The relay in-process on 127.0.0.1: receive, store, forward to the fake API."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import orjson

from segment_relay.service import FORWARDER, METRICS, STORE
from segment_relay.testing import FakeInfinario, Reply
from support import AUTH, WRITE_KEY, Server, make_config, post, running_relay

T0 = "2024-03-01T12:00:00.000Z"


def track(n: int, user: str = "u1", **extra: Any) -> dict[str, Any]:
    return {"userId": user, "event": f"e{n}", "messageId": f"m{n}", "timestamp": T0, **extra}


async def test_a_track_call_arrives_mapped(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    fake, api = fake_api
    async with running_relay(make_config(queue_path, api.url)) as relay:
        status, body = await post(relay.url, "/v1/track", track(1, properties={"plan": "pro"}))
        assert (status, body) == (200, {"success": True})
        [command] = await fake.wait_for_commands(1)
    assert command == {
        "name": "crm/events",
        "data": {
            "customer_ids": {"registered": "u1"},
            "project_id": "TOKEN",
            "type": "e1",
            "properties": {"plan": "pro"},
            "timestamp": 1709294400.0,
        },
    }


async def test_write_key_by_basic_auth_with_or_without_colon_or_in_the_body(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    fake, api = fake_api
    no_colon = {"Authorization": "Basic " + base64.b64encode(WRITE_KEY.encode()).decode()}
    async with running_relay(make_config(queue_path, api.url)) as relay:
        assert (await post(relay.url, "/v1/track", track(1), AUTH))[0] == 200
        assert (await post(relay.url, "/v1/t", track(2), no_colon))[0] == 200
        assert (await post(relay.url, "/v1/track", track(3, writeKey=WRITE_KEY), {}))[0] == 200
        status, _ = await post(
            relay.url,
            "/v1/batch",
            {"batch": [{**track(4), "type": "track", "writeKey": WRITE_KEY}]},
            {},
        )
        assert status == 200
        await fake.wait_for_commands(4)


async def test_unknown_and_missing_write_keys_get_401_json(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    _, api = fake_api
    bad = {"Authorization": "Basic " + base64.b64encode(b"nope:").decode()}
    async with running_relay(make_config(queue_path, api.url), forward=False) as relay:
        status, body = await post(relay.url, "/v1/track", track(1), bad)
        assert status == 401
        assert body == {
            "success": False,
            "code": "invalid_write_key",
            "message": "the write key is not known to this relay",
            "error": "the write key is not known to this relay",
        }
        status, body = await post(relay.url, "/v1/track", track(1), {})
        assert (status, body["code"]) == (401, "missing_write_key")
        assert relay.app[STORE].pending_count == 0


async def test_a_batch_stores_its_valid_messages_and_refuses_none_of_them_silently(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    fake, api = fake_api
    batch = [
        {**track(1), "type": "track"},
        {"type": "track", "userId": "u1"},
        {"type": "identify", "userId": "u1", "traits": {"a": 1}},
    ]
    async with running_relay(make_config(queue_path, api.url)) as relay:
        assert await post(relay.url, "/v1/batch", {"batch": batch}) == (200, {"success": True})
        commands = await fake.wait_for_commands(2)
        registry = relay.app[METRICS].registry
        assert (
            registry.get_sample_value(
                "segment_relay_messages_rejected_total", {"reason": "invalid"}
            )
            == 1
        )
        assert registry.get_sample_value("segment_relay_messages_stored_total") == 2
    assert [c["name"] for c in commands] == ["crm/events", "crm/customers"]


async def test_per_command_retry_and_error(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    fake, api = fake_api
    fake.script.append(Reply(commands=["ok", "retry", "error"]))
    async with running_relay(make_config(queue_path, api.url)) as relay:
        batch = [
            {**track(1, "a"), "type": "track"},
            {**track(2, "b"), "type": "track"},
            {**track(3, "c"), "type": "track"},
        ]
        assert (await post(relay.url, "/v1/batch", {"batch": batch}))[0] == 200
        await fake.wait_for(lambda f: len(f.accepted) >= 2)
        await relay.app[FORWARDER].drain()
        store = relay.app[STORE]
        [dead] = await store.dead_letters()
        assert (dead.message_id, dead.reason, dead.detail) == ("m3", "rejected", "scripted error")
        assert store.pending_count == 0
    assert [c["data"]["type"] for c in fake.accepted] == ["e1", "e2"]


async def test_server_errors_are_retried_until_delivered(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    fake, api = fake_api
    fake.script.extend([Reply(status=500), Reply(status=503), Reply(status=502)])
    async with running_relay(make_config(queue_path, api.url)) as relay:
        assert (await post(relay.url, "/v1/track", track(1)))[0] == 200
        [command] = await fake.wait_for_commands(1)
        assert command["data"]["type"] == "e1"
    assert [r.reply_status for r in fake.requests] == [500, 503, 502, 200]


async def test_dry_run_prints_each_command_as_a_json_line(queue_path: Path) -> None:
    out = io.StringIO()
    config = make_config(queue_path, "http://127.0.0.1:9")
    async with running_relay(config, dry_run=True, dry_run_out=out) as relay:
        assert (await post(relay.url, "/v1/identify", {"userId": "u1", "traits": {"plan": "pro"}}))[
            0
        ] == 200
        assert (await post(relay.url, "/v1/track", track(2)))[0] == 200
        await relay.app[FORWARDER].drain()
        assert relay.app[STORE].pending_count == 0
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0] == {
        "name": "crm/customers",
        "data": {"ids": {"registered": "u1"}, "project_id": "TOKEN", "properties": {"plan": "pro"}},
    }
    assert lines[1]["data"]["type"] == "e2"
