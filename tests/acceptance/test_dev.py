"""`segment-relay dev`: one command, a relay that shows what it would send or what it sent."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest
from segment.analytics import Client

from support import relay_command

pytestmark = pytest.mark.acceptance


async def run_dev(*flags: str) -> tuple[list[str], int]:
    process = await asyncio.create_subprocess_exec(
        *relay_command(),
        "dev",
        "--port",
        "0",
        *flags,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not any(line.startswith("segment-relay dev: Segment API at") for line in lines):
                lines.append((await process.stdout.readline()).decode().rstrip())
            url = (
                next(line for line in lines if line.startswith("segment-relay dev:"))
                .split()[5]
                .rstrip(",")
            )
            client = Client("dev-write-key", host=url, sync_mode=True, max_retries=0)
            await asyncio.to_thread(
                client.track, user_id="u1", event="Dev test call", properties={"plan": "pro"}
            )
            while not any('"Dev test call"' in line for line in lines):
                lines.append((await process.stdout.readline()).decode().rstrip())
    finally:
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            await process.wait()
    assert process.returncode is not None
    return lines, process.returncode


async def test_dev_with_the_fake_api_shows_what_it_received() -> None:
    lines, code = await run_dev("--fake-infinario")
    assert code == 0
    received = [line for line in lines if line.startswith("fake Infinario received: ")]
    command = json.loads(received[0].removeprefix("fake Infinario received: "))
    assert command["name"] == "crm/events"
    assert command["data"]["type"] == "Dev test call"
    assert any('Client("dev-write-key"' in line for line in lines)


async def test_dev_dry_run_prints_each_command() -> None:
    lines, code = await run_dev()
    assert code == 0
    printed = [json.loads(line) for line in lines if line.startswith('{"name"')]
    assert printed[0]["data"]["properties"]["plan"] == "pro"
