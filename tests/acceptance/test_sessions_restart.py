"""Sessions across SIGTERM and SIGKILL: each starts once and ends once, with its duration."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from segment.analytics import Client

from segment_relay.testing import FakeInfinario, Reply
from support import WRITE_KEY, running_fake, start_daemon, write_config

pytestmark = pytest.mark.acceptance
T = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


def pages(url: str, calls: list[tuple[str, datetime]]) -> None:
    client = Client(WRITE_KEY, host=url, sync_mode=True, max_retries=0)
    for user, when in calls:
        client.page(anonymous_id=user, name="/home", properties={"path": "/home"}, timestamp=when)


def session_events(fake: FakeInfinario) -> list[dict[str, Any]]:
    return [c["data"] for c in fake.accepted if c["data"]["type"].startswith("session_")]


async def test_sessions_survive_sigterm_and_sigkill(tmp_path: Path) -> None:
    down = True
    fake = FakeInfinario()
    # The API refuses everything until the last daemon runs, so nothing is acked (and so
    # nothing can be sent twice) across the kills.
    fake.responder = lambda commands: Reply(status=503) if down else Reply()
    async with running_fake(fake) as (_, api):
        config = write_config(
            tmp_path / "relay.yaml",
            tmp_path / "data" / "q.db",
            api.url,
            sessions={"enabled": True, "idle_timeout": "3s"},
        )
        daemon = await start_daemon(config)
        await asyncio.to_thread(pages, daemon.url, [("a", T), ("b", T)])
        assert await daemon.stop(signal.SIGTERM) == 0

        daemon = await start_daemon(config)
        # One second later in event time: a's session continues.
        await asyncio.to_thread(pages, daemon.url, [("a", T + timedelta(seconds=1))])
        assert await daemon.stop(signal.SIGKILL) == -signal.SIGKILL

        down = False
        daemon = await start_daemon(config)
        try:
            await fake.wait_for(
                lambda f: sum(e["type"] == "session_end" for e in session_events(f)) >= 2,
                timeout_s=60,
            )
            await fake.wait_for_commands(7, timeout_s=30)
        finally:
            assert await daemon.stop() == 0
    events = session_events(fake)
    assert Counter((e["type"], e["customer_ids"]["cookie"]) for e in events) == {
        ("session_start", "a"): 1,
        ("session_end", "a"): 1,
        ("session_start", "b"): 1,
        ("session_end", "b"): 1,
    }
    durations = {
        e["customer_ids"]["cookie"]: e["properties"]["duration"]
        for e in events
        if e["type"] == "session_end"
    }
    # Event times are skew-corrected with the client's sentAt, so each call's time moves by its
    # own send latency (milliseconds here).
    assert durations == {"a": pytest.approx(1.0, abs=0.25), "b": 0.0}
    assert (
        sorted(c["data"]["type"] for c in fake.accepted)
        == ["page_visit"] * 3 + ["session_end"] * 2 + ["session_start"] * 2
    )
