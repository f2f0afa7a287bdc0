"""The real CLI in a subprocess, driven by the official segment-analytics-python client."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from segment.analytics import Client
from segment.analytics.version import VERSION

from segment_relay.testing import FakeInfinario
from support import WRITE_KEY, Server, run_cli, running_fake, start_daemon, write_config

pytestmark = pytest.mark.acceptance
WHEN = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


def send_with_python_client(
    url: str, calls: list[tuple[str, dict[str, Any]]], **options: Any
) -> None:
    """Send calls with the official client in sync mode: each call is one POST /v1/batch."""
    client = Client(WRITE_KEY, host=url, sync_mode=True, max_retries=0, **options)
    for method, kwargs in calls:
        getattr(client, method)(**kwargs)


def without_timestamp(command: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    data = dict(command["data"])
    return {**command, "data": data}, data.pop("timestamp", None)


async def test_track_and_identify_from_the_python_client_arrive_as_exact_commands(
    fake_api: tuple[FakeInfinario, Server], tmp_path: Path
) -> None:
    fake, api = fake_api
    config = write_config(tmp_path / "relay.yaml", tmp_path / "data" / "queue.db", api.url)
    daemon = await start_daemon(config)
    try:
        await asyncio.to_thread(
            send_with_python_client,
            daemon.url,
            [
                (
                    "track",
                    {
                        "user_id": "u1",
                        "event": "Order Completed",
                        "properties": {"revenue": 9.5, "item": {"sku": "S1"}},
                        "timestamp": WHEN,
                    },
                ),
                (
                    "identify",
                    {"user_id": "u1", "traits": {"plan": "pro", "a.b": 1}, "timestamp": WHEN},
                ),
            ],
        )
        commands = await fake.wait_for_commands(2)
    finally:
        assert await daemon.stop() == 0
    event, timestamp = without_timestamp(commands[0])
    assert event == {
        "name": "crm/events",
        "data": {
            "customer_ids": {"registered": "u1"},
            "project_id": "TOKEN",
            "type": "Order Completed",
            "properties": {
                "revenue": 9.5,
                "item_sku": "S1",
                "library_name": "analytics-python",
                "library_version": VERSION,
            },
        },
    }
    # The relay removes the client's clock skew (receivedAt - (sentAt - timestamp)); with client
    # and relay on one machine the corrected time is the given one within the request's latency.
    assert timestamp == pytest.approx(WHEN.timestamp(), abs=5.0)
    assert commands[1] == {
        "name": "crm/customers",
        "data": {
            "ids": {"registered": "u1"},
            "project_id": "TOKEN",
            "properties": {"plan": "pro", "a_b": 1},
        },
    }
    assert len(fake.accepted) == 2


async def test_a_call_accepted_while_the_api_is_down_is_delivered_after_a_restart(
    tmp_path: Path,
) -> None:
    # Find a port for the API, then close it: the relay's first tries are refused connections.
    async with running_fake() as (_, probe):
        api_port = probe.port
    queue = tmp_path / "data" / "queue.db"
    config = write_config(tmp_path / "relay.yaml", queue, f"http://127.0.0.1:{api_port}")
    daemon = await start_daemon(config)
    try:
        await asyncio.to_thread(
            send_with_python_client,
            daemon.url,
            [("track", {"user_id": "u9", "event": "Kept", "timestamp": WHEN})],
        )
    finally:
        assert await daemon.stop() == 0
    code, out, err = await run_cli("status", "--config", str(config), "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["pending"] == 1
    assert status["dead_letters"] == {}

    async with running_fake(port=api_port) as (fake, _):
        daemon = await start_daemon(config)
        try:
            [command] = await fake.wait_for_commands(1)
        finally:
            assert await daemon.stop() == 0
    assert command["data"]["type"] == "Kept"
    assert command["data"]["customer_ids"] == {"registered": "u9"}
    code, out, _ = await run_cli("status", "--config", str(config), "--json")
    assert json.loads(out)["pending"] == 0


async def test_dry_run_prints_the_commands_on_stdout(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "relay.yaml",
        tmp_path / "q.db",
        "http://127.0.0.1:9",
        destination={"project_token": ""},
    )
    daemon = await start_daemon(config, "--dry-run")
    try:
        await asyncio.to_thread(
            send_with_python_client,
            daemon.url,
            [("track", {"user_id": "u1", "event": "Dry", "timestamp": WHEN})],
        )
        await daemon.wait_stdout(1)
    finally:
        assert await daemon.stop(signal.SIGINT) == 0
    command = json.loads(daemon.stdout_lines[0])
    assert (command["name"], command["data"]["type"]) == ("crm/events", "Dry")


@pytest.mark.parametrize(
    ("yaml_text", "named"),
    [
        (
            "sources: [{name: web, write_key: k}]\nserver: {port: eighty}\n",
            "server.port: must be an integer",
        ),
        ("sources: [{name: web, write_key: k}]\nqueue: {paht: x.db}\n", "queue.paht: unknown key"),
        (
            "sources: [{name: web, write_key: '${RELAY_TEST_UNSET_VARIABLE}'}]\n",
            "sources[0].write_key: environment variable RELAY_TEST_UNSET_VARIABLE is not set",
        ),
    ],
)
async def test_check_config_names_the_bad_key(tmp_path: Path, yaml_text: str, named: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    code, out, err = await run_cli("check-config", "--config", str(path))
    assert code == 2
    assert named in err
    assert out == ""


async def test_check_config_accepts_the_example_for_a_dry_run(tmp_path: Path) -> None:
    example = Path(__file__).parents[2] / "config.example.yaml"
    code, out, _ = await run_cli("check-config", "--dry-run", "--config", str(example))
    assert code == 0
    assert out.startswith("config OK: 1 source(s)")


async def test_python_m_runs_the_cli_both_ways_and_global_options_go_anywhere(
    tmp_path: Path,
) -> None:
    for module in ("segment_relay", "segment_relay.cli"):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, "--version", stdout=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(30):
            printed, _ = await process.communicate()
        assert (process.returncode, printed.decode().split()[0]) == (0, "segment-relay")
    example = Path(__file__).parents[2] / "config.example.yaml"
    for args in (
        ["--log-level", "warning", "check-config", "--dry-run", "--config", str(example)],
        ["check-config", "--dry-run", "--config", str(example), "--log-level", "warning"],
        ["check-config", "--log-format=json", "--dry-run", "--config", str(example)],
    ):
        code, out, err = await run_cli(*args)
        assert (code, out.split(":")[0]) == (0, "config OK"), err
    code, _, err = await run_cli("check-config", "--config", str(example), "--log-level", "loud")
    assert code == 2
    assert "invalid choice: 'loud'" in err
