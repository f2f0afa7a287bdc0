"""Every sequence of the shared session vectors, through the relay with a driven clock."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from segment_relay.segment import parse_time
from segment_relay.service import FORWARDER, STORE
from segment_relay.session_timer import SessionTimer
from segment_relay.testing import FakeInfinario
from support import CONFORMANCE, make_config, post, postgres_database, running_fake, running_relay

SEQUENCES: list[dict[str, Any]] = json.loads((CONFORMANCE / "sessions.json").read_text())[
    "sequences"
]


class Clock:
    """A wall clock the test sets."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def set(self, iso: str) -> None:
        at = parse_time(iso)
        assert at is not None
        self.now = at


def event_view(command: dict[str, Any], api: str) -> dict[str, Any]:
    """What the vectors speak of, read from a command in either API style."""
    data = command["data"]
    if api == "infinario":
        return {
            "type": data.get("type"),
            "timestamp": data.get("timestamp"),
            "customer_ids": data.get("customer_ids") or data.get("ids"),
            "properties": data["properties"],
        }
    return {
        "type": data.get("event_type"),
        "messageId": command["command_id"],
        "timestamp": data.get("timestamp"),
        "customer_ids": data["customer_ids"],
        "properties": data["properties"],
    }


def check(received: list[dict[str, Any]], expected: list[dict[str, Any]], api: str) -> None:
    assert [r["type"] for r in received] == [e["type"] for e in expected]
    for got, want in zip(received, expected, strict=True):
        if "messageId" in want and api == "exponea":
            assert got["messageId"] == want["messageId"]
        if "timestamp" in want:
            assert got["timestamp"] == pytest.approx(want["timestamp"], abs=1e-6)
        if "customer_ids" in want:
            assert got["customer_ids"] == want["customer_ids"]
        for key, value in want.get("properties_include", {}).items():
            assert got["properties"][key] == pytest.approx(value, abs=1e-6), key


# SQLite: with the session cache each commit's rules run on the event loop; without it, on
# the sessions read in the commit's transaction. PostgreSQL: on the sessions the commit locks.
@pytest.mark.parametrize("queue", ["sqlite-cache", "sqlite-no-cache", "postgres"])
@pytest.mark.parametrize("api", ["infinario", "exponea"])
@pytest.mark.parametrize("sequence", SEQUENCES, ids=[s["name"] for s in SEQUENCES])
async def test_sequence(sequence: dict[str, Any], api: str, queue: str, tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        queue_config: dict[str, Any] = {"path": str(tmp_path / "q.db")}
        if queue == "postgres":
            queue_config = {"url": await stack.enter_async_context(postgres_database())}
        await run_sequence(sequence, api, queue_config, 0 if queue == "sqlite-no-cache" else 10_000)


async def run_sequence(
    sequence: dict[str, Any], api: str, queue_config: dict[str, Any], cache_size: int
) -> None:
    clock = Clock()
    timeout = sequence["idle_timeout_s"]
    config_extra = {
        "sessions": {"enabled": True, "idle_timeout": timeout, "cache_size": cache_size},
        "destination": {"api": api, "api_key": "KEY"},
        "queue": queue_config,
    }
    async with running_fake(FakeInfinario(api_key="KEY")) as (fake, api_server):
        config = make_config(Path(), api_server.url, **config_extra)
        async with running_relay(config, clock=clock, session_timer=False) as relay:
            timer = SessionTimer(relay.app[STORE], clock)
            for step in sequence["steps"]:
                if "receive" in step:
                    clock.set(step["at"])
                    message = step["receive"]
                    status, body = await post(relay.url, f"/v1/{message['type']}", message)
                    assert status == 200, body
                else:
                    clock.set(step["clock"])
                    await timer.tick()
                await relay.app[FORWARDER].drain()
            assert relay.app[STORE].pending_count == 0
    events = [event_view(c, api) for c in fake.accepted]
    if "expected" in sequence:
        check(events, sequence["expected"], api)
    else:
        for user, expected in sequence["expected_per_user"].items():
            check([e for e in events if e["customer_ids"].get("cookie") == user], expected, api)
        assert len(events) == sum(len(x) for x in sequence["expected_per_user"].values())
