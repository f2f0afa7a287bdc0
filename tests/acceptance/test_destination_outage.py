"""A real outage of the destination (the fake API stopped, then started on the same port)
under the CLI daemon, with the official Python client; and `retry-now` against a running
daemon (docs/architecture.md, "Outages")."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from segment.analytics import Client

from segment_relay.testing import FakeInfinario, Reply
from support import WRITE_KEY, run_cli, running_fake, start_daemon, start_server, write_config

pytestmark = pytest.mark.acceptance


def send(url: str, calls: list[tuple[str, int]]) -> None:
    client = Client(WRITE_KEY, host=url, sync_mode=True, max_retries=0)
    for user, n in calls:
        client.track(user_id=user, event="Step", properties={"n": n}, message_id=f"{user}-{n}")


def steps(fake: FakeInfinario) -> list[tuple[str, int]]:
    return [
        (c["data"]["customer_ids"]["registered"], c["data"]["properties"]["n"])
        for c in fake.accepted
    ]


async def status(config: Path) -> dict[str, Any]:
    code, out, err = await run_cli("status", "--json", "--config", str(config))
    assert code == 0, err
    report: dict[str, Any] = json.loads(out)
    return report


async def test_a_real_outage_charges_nothing_and_ends_at_the_first_probe_that_works(
    tmp_path: Path,
) -> None:
    fake = FakeInfinario()
    calls = [(f"u{u}", n) for n in range(5) for u in range(4)]
    async with running_fake(fake) as (_, api):
        config = write_config(
            tmp_path / "relay.yaml",
            tmp_path / "q.db",
            api.url,
            destination={"timeout": "2s", "probe_initial": "500ms", "probe_max": "2s"},
            sessions={"enabled": False},
        )
        daemon = await start_daemon(config)
        try:
            await asyncio.to_thread(send, daemon.url, calls[:4])
            await fake.wait_for_commands(4)
            await api.runner.cleanup()  # the destination goes away: connections refused
            await asyncio.to_thread(send, daemon.url, calls[4:])
            await daemon.wait_stderr("the destination is down")
            down = await status(config)
            [seen] = down["destination"]
            assert (seen["state"], down["pending"], down["in_backoff"]) == ("down", 16, 0)
            assert seen["next_probe_in_s"] <= 2.0
            async with (
                aiohttp.ClientSession() as session,
                session.get(daemon.url + "/metrics") as response,
            ):
                metrics = await response.text()
            assert 'segment_relay_destination_state{state="down"} 1.0' in metrics
            assert 'segment_relay_destination_state{state="up"} 0.0' in metrics
            # It comes back on the same port: the next probe finds it, every lane resumes.
            back = await start_server(fake.app(), api.port)
            try:
                await fake.wait_for_commands(20, timeout_s=30)
                await daemon.wait_stderr("the destination is back after")
            finally:
                await back.runner.cleanup()
            after = await status(config)
            assert (after["pending"], after["dead_letters"]) == (0, {})
            assert after["destination"][0]["state"] == "up"
        finally:
            assert await daemon.stop() == 0
    for user in range(4):
        assert [n for u, n in steps(fake) if u == f"u{user}"] == list(range(5))
    # One line when it went down and one when it came back, not one per failed batch.
    assert sum("the destination is down" in line for line in daemon.stderr_lines) == 1


async def test_retry_now_sends_what_waits_for_a_retry_at_once(tmp_path: Path) -> None:
    fake = FakeInfinario()
    fake.script.append(Reply(commands=["retry"]))  # the first command: "retry later"
    async with running_fake(fake) as (_, api):
        config = write_config(
            tmp_path / "relay.yaml",
            tmp_path / "q.db",
            api.url,
            destination={"retry": {"command_retry": "1h"}},
            sessions={"enabled": False},
        )
        daemon = await start_daemon(config)
        try:
            await asyncio.to_thread(send, daemon.url, [("u1", 1)])
            await fake.wait_for(lambda f: len(f.requests) >= 1)
            for _ in range(100):  # bounded: until its retry is written
                if (await status(config))["in_backoff"] == 1:
                    break
            else:
                pytest.fail("the retry was never written")
            code, out, err = await run_cli("retry-now", "--config", str(config))
            assert (code, out.split(" ", 1)[0]) == (0, "1"), err
            await fake.wait_for_commands(1, timeout_s=20)  # not in an hour
        finally:
            assert await daemon.stop() == 0
    assert steps(fake) == [("u1", 1)]
