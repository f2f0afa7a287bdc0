"""What the mapping cannot send is never silently lost: it is dead-lettered with a reason."""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from segment_relay.records import NewMessage
from segment_relay.service import FORWARDER, METRICS, STORE
from segment_relay.testing import FakeInfinario
from support import Server, make_config, post, running_relay

T0 = "2024-03-01T12:00:00.000Z"


async def test_a_message_the_mapping_refuses_is_dead_lettered(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    fake, api = fake_api
    async with running_relay(make_config(queue_path, api.url)) as relay:
        store = relay.app[STORE]
        # A row as an older relay could have stored it: no timestamp to send.
        body = orjson.dumps(
            {"type": "track", "userId": "u1", "event": "x", "messageId": "old-1"}
        ).decode()
        await store.enqueue([NewMessage("test", "old-1", "u1", "track", body, time.time())])
        assert (
            await post(relay.url, "/v1/track", {"userId": "u2", "event": "fine", "timestamp": T0})
        )[0] == 200
        await fake.wait_for_commands(1)
        await relay.app[FORWARDER].drain()
        [dead] = await store.dead_letters()
        assert (dead.message_id, dead.reason) == ("old-1", "mapping_error")
        assert "timestamp" in dead.detail
        assert (
            relay.app[METRICS].registry.get_sample_value(
                "segment_relay_commands_dead_lettered_total", {"reason": "mapping_error"}
            )
            == 1
        )


async def test_the_256th_event_type_is_dead_lettered_naming_the_limit(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    fake, api = fake_api
    batch = [
        {"type": "track", "userId": f"u{i}", "event": f"type-{i:03d}", "timestamp": T0}
        for i in range(257)
    ]
    async with running_relay(make_config(queue_path, api.url)) as relay:
        assert (await post(relay.url, "/v1/batch", {"batch": batch}))[0] == 200
        await fake.wait_for_commands(255)
        await relay.app[FORWARDER].drain()
        dead = await relay.app[STORE].dead_letters()
        assert {d.reason for d in dead} == {"project_limit"}
        assert len(dead) == 2
        assert "255 event types" in dead[0].detail
    assert len({c["data"]["type"] for c in fake.accepted}) == 255


async def test_property_keys_over_255_are_dropped_and_counted(
    fake_api: tuple[FakeInfinario, Server], queue_path: Path
) -> None:
    fake, api = fake_api
    props = {f"p{i:03d}": i for i in range(300)}
    async with running_relay(make_config(queue_path, api.url)) as relay:
        assert (
            await post(
                relay.url,
                "/v1/track",
                {"userId": "u1", "event": "wide", "properties": props, "timestamp": T0},
            )
        )[0] == 200
        [command] = await fake.wait_for_commands(1)
        assert (
            relay.app[METRICS].registry.get_sample_value(
                "segment_relay_dropped_property_keys_total", {"event_type": "wide"}
            )
            == 45
        )
    assert list(command["data"]["properties"]) == [f"p{i:03d}" for i in range(255)]
