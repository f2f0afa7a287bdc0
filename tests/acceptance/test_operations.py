"""Running it in production: sd_notify, the watchdog, the unit file, metrics, logs, stopping."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from segment_relay import ops
from segment_relay.service import FORWARDER
from segment_relay.testing import FakeInfinario, Reply
from support import (
    AUTH,
    WRITE_KEY,
    make_config,
    post,
    queue_pending,
    relay_command,
    requires,
    run_cli,
    running_fake,
    running_relay,
    start_daemon,
    write_config,
)

pytestmark = pytest.mark.acceptance
ROOT = Path(__file__).parents[2]
T0 = "2024-03-01T12:00:00Z"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    yield sock
    sock.close()


async def next_datagram(sock: socket.socket, timeout_s: float) -> str:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        return (await loop.sock_recv(sock, 4096)).decode()


async def test_ready_watchdog_and_stopping_in_that_order(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    async with running_fake() as (_, api):
        config = write_config(tmp_path / "relay.yaml", tmp_path / "q.db", api.url)
        env = {"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "400000"}
        os.environ.update(env)
        try:
            daemon = await start_daemon(config)
        finally:
            for key in env:
                os.environ.pop(key)
        messages = [await next_datagram(notify_socket, 30)]
        while sum("WATCHDOG=1" in m for m in messages) < 3:
            messages.append(await next_datagram(notify_socket, 30))
        assert await daemon.stop() == 0
        while "STOPPING=1" not in messages[-1]:
            messages.append(await next_datagram(notify_socket, 30))
    assert messages[0].startswith("READY=1\nSTATUS=0 messages queued")
    assert all(m.startswith("WATCHDOG=1\nSTATUS=") for m in messages[1:-1])
    assert messages[-1].startswith("STOPPING=1")


async def test_a_wedged_forwarder_stops_the_watchdog_pings(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    environ = {"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "300000"}
    async with running_fake() as (_, api):
        config = make_config(tmp_path / "q.db", api.url)
        async with running_relay(config, environ=environ) as relay:
            # The pinger serve() starts once the relay is ready.
            stop = asyncio.Event()
            pinger = asyncio.create_task(ops.watchdog(relay.app, stop))
            assert "WATCHDOG=1" in await next_datagram(notify_socket, 10)
            forwarder = relay.app[FORWARDER]
            # Wedge the forwarder's loop where it claims work (as a hung queue read would).
            async with forwarder._dispatching:  # noqa: SLF001 - the wedge under test
                # Pings stop: within a bounded wait, a gap longer than the interval appears.
                async with asyncio.timeout(20):
                    while True:
                        try:
                            await next_datagram(notify_socket, 1.0)
                        except TimeoutError:
                            break
            # Unwedged, the pings come back.
            assert "WATCHDOG=1" in await next_datagram(notify_socket, 10)
            stop.set()
            await pinger


@requires("systemd-analyze")
def test_the_unit_file_verifies() -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze
    unit = (ROOT / "systemd" / "segment-relay.service").read_text()
    # Verified against the binary where this checkout installed it.
    here = unit.replace("/opt/segment-relay/venv/bin/segment-relay", relay_command()[0])
    path = ROOT / "build" / "segment-relay.service"
    path.parent.mkdir(exist_ok=True)
    path.write_text(here)
    result = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    for key in (
        "Type=notify",
        "WatchdogSec=",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "StateDirectory=segment-relay",
        "NoNewPrivileges=yes",
    ):
        assert key in unit


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_what_was_sent_retried_and_dead_lettered(tmp_path: Path) -> None:
    fake = FakeInfinario()
    fake.script.extend([Reply(status=500), Reply(commands=["ok", "retry", "error"])])
    async with running_fake(fake) as (_, api):
        config = make_config(
            tmp_path / "q.db", api.url, destination={"retry": {"command_retry": "10ms"}}
        )
        async with running_relay(config) as relay:
            batch = [
                {"type": "track", "userId": f"u{i}", "event": "e", "timestamp": T0}
                for i in range(3)
            ]
            batch.append({"type": "track", "event": "no ids"})
            assert (await post(relay.url, "/v1/batch", {"batch": batch}))[0] == 200
            await relay.app[FORWARDER].drain()
            async with (
                aiohttp.ClientSession() as session,
                session.get(relay.url + "/metrics") as response,
            ):
                assert response.status == 200
                text = await response.text()
    got = samples(text)
    assert got[("segment_relay_messages_received_total", (("endpoint", "batch"),))] == 4
    assert got[("segment_relay_messages_stored_total", ())] == 3
    assert got[("segment_relay_messages_rejected_total", (("reason", "invalid"),))] == 1
    # 3 commands refused with a 500 (a quick retry follows), then 3 sent, then the retried one.
    assert got[("segment_relay_commands_sent_total", ())] == 3 + 3 + 1
    assert got[("segment_relay_commands_acked_total", ())] == 2
    assert got[("segment_relay_commands_retried_total", (("reason", "command_retry"),))] == 1
    assert got[("segment_relay_commands_dead_lettered_total", (("reason", "rejected"),))] == 1
    assert got[("segment_relay_queue_depth", ())] == 0
    assert got[("segment_relay_dead_letters", (("reason", "rejected"),))] == 1
    assert got[("segment_relay_dead_letters", (("reason", "expired"),))] == 0
    assert got[("segment_relay_destination_paused", (("reason", "credentials"),))] == 0
    assert got[("segment_relay_session_commits", ())] == 0  # no page or screen calls
    assert got[("segment_relay_session_commits_read", ())] == 0
    assert got[("segment_relay_requests_total", (("endpoint", "batch"), ("status", "200")))] == 1
    assert WRITE_KEY not in text
    assert "TOKEN" not in text


async def test_metrics_show_why_forwarding_is_paused(tmp_path: Path) -> None:
    fake = FakeInfinario()
    fake.script.append(Reply(status=401))
    async with (
        running_fake(fake) as (_, api),
        running_relay(make_config(tmp_path / "q.db", api.url)) as relay,
    ):
        body = {"userId": "u", "event": "e", "timestamp": T0}
        assert (await post(relay.url, "/v1/track", body))[0] == 200
        await relay.app[FORWARDER].drain(until_empty=False)
        async with (
            aiohttp.ClientSession() as session,
            session.get(relay.url + "/metrics") as response,
        ):
            got = samples(await response.text())
    assert got[("segment_relay_destination_paused", (("reason", "credentials"),))] == 1
    assert got[("segment_relay_destination_paused", (("reason", "configuration"),))] == 0
    assert got[("segment_relay_destination_state", (("state", "paused"),))] == 1
    assert got[("segment_relay_queue_depth", ())] == 1


async def test_admin_endpoints_on_their_own_port(tmp_path: Path) -> None:
    async with running_fake() as (_, api):
        config = write_config(
            tmp_path / "relay.yaml", tmp_path / "q.db", api.url, server={"admin_port": 0}
        )
        daemon = await start_daemon(config)
        try:
            await daemon.wait_stderr("admin on")
            admin = next(
                line.rsplit(" ", 1)[-1] for line in daemon.stderr_lines if "admin on" in line
            )
            async with aiohttp.ClientSession() as session:
                async with session.get(admin + "/ready") as response:
                    ready = await response.json()
                    assert (response.status, ready["ready"]) == (200, True)
                    assert ready["destination"]["state"] == "up"
                async with session.get(admin + "/metrics") as response:
                    assert response.status == 200
                async with session.get(daemon.url + "/metrics") as response:
                    assert response.status == 404
                    assert (await response.json())["code"] == "not_found"
                async with session.post(admin + "/ready") as response:
                    assert (response.status, response.headers["Allow"]) == (405, "GET, HEAD")
                    assert (await response.json())["code"] == "method_not_allowed"
        finally:
            assert await daemon.stop() == 0


async def test_json_logs_carry_the_action_and_never_a_secret(tmp_path: Path) -> None:
    async with running_fake(FakeInfinario(token="s3cret-token")) as (fake, api):
        config = write_config(
            tmp_path / "relay.yaml",
            tmp_path / "q.db",
            api.url,
            destination={"project_token": "s3cret-token"},
        )
        process = await asyncio.create_subprocess_exec(
            *relay_command(),
            "--log-format",
            "json",
            "serve",
            "--config",
            str(config),
            stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
        )
        assert process.stderr is not None
        lines: list[str] = []
        async with asyncio.timeout(30):
            while not any("listening on" in line for line in lines):
                lines.append((await process.stderr.readline()).decode())
        url = json.loads(lines[-1])["url"]
        assert (
            await post(
                url,
                "/v1/batch",
                {"batch": [{"type": "track", "userId": "u", "event": "e"}, {"type": "track"}]},
            )
        )[0] == 200
        await fake.wait_for_commands(1)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            _, rest = await process.communicate()
    assert process.returncode == 0
    output = "".join(lines) + rest.decode()
    records = [json.loads(line) for line in output.splitlines()]  # every line
    actions = {r.get("action") for r in records}
    assert {"listening", "store_open", "messages_rejected", "forwarded", "stopped"} <= actions
    [summary] = [r for r in records if r.get("action") == "forwarded"]
    assert (summary["delivered"], summary["retried"], summary["dead_lettered"]) == (1, 0, {})
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert "s3cret-token" not in output
    assert WRITE_KEY not in output


async def test_logs_tell_dead_letters_at_warning_and_batches_in_a_summary(
    tmp_path: Path,
) -> None:
    fake = FakeInfinario()
    fake.script.append(Reply(commands=["ok", "error"]))
    async with running_fake(fake) as (_, api):
        config = write_config(tmp_path / "relay.yaml", tmp_path / "q.db", api.url)
        daemon = await start_daemon(config, "--log-level", "debug")
        try:
            batch = [
                {"type": "track", "userId": user, "event": "e", "timestamp": T0}
                for user in ("a", "b")
            ]
            assert (await post(daemon.url, "/v1/batch", {"batch": batch}))[0] == 200
            await daemon.wait_stderr("dead-lettered (rejected)")
        finally:
            assert await daemon.stop() == 0
    lines = daemon.stderr_lines
    [dead] = [line for line in lines if "dead-lettered (rejected)" in line]
    assert " WARNING segment_relay.outcomes: 1 messages dead-lettered (rejected)" in dead
    assert "scripted error" in dead
    # Each batch at DEBUG; at INFO, one summary an interval (and at the stop).
    assert any(" DEBUG segment_relay.outcomes: batch sent: 1 acked" in line for line in lines)
    [summary] = [line for line in lines if "forwarded in the last" in line]
    assert " INFO " in summary
    assert summary.endswith("1 delivered, 0 to retry, 1 dead-lettered (rejected: 1)")
    # --log-level debug is the relay's own: not aiosqlite's statements.
    assert not [line for line in lines if " aiosqlite" in line]


async def test_a_port_in_use_is_named_and_with_json_logs_every_line_is_json(
    tmp_path: Path,
) -> None:
    async with running_fake() as (_, api):
        config = write_config(tmp_path / "relay.yaml", tmp_path / "q.db", api.url)
        first = await start_daemon(config)
        try:
            taken = write_config(
                tmp_path / "again.yaml",
                tmp_path / "other.db",
                api.url,
                server={"port": int(first.url.rsplit(":", 1)[1])},
            )
            code, out, err = await run_cli("--log-format", "json", "serve", "--config", str(taken))
            assert out == ""
        finally:
            assert await first.stop() == 0
    records = [json.loads(line) for line in err.splitlines()]
    assert code == 4
    assert records[-1]["level"] == "error"
    assert "cannot listen on http://127.0.0.1:" in records[-1]["message"]
    assert "server.port" in records[-1]["message"]


async def test_sighup_reloads_the_write_keys(tmp_path: Path) -> None:
    async with running_fake() as (_, api):
        config = write_config(tmp_path / "relay.yaml", tmp_path / "q.db", api.url)
        daemon = await start_daemon(config)
        try:
            new_key = {"Authorization": "Basic " + base64.b64encode(b"rotated-key:").decode()}
            assert (await post(daemon.url, "/v1/track", {"userId": "u", "event": "e"}, new_key))[
                0
            ] == 401
            write_config(
                tmp_path / "relay.yaml",
                tmp_path / "q.db",
                api.url,
                sources=[{"name": "test", "write_key": "rotated-key"}],
            )
            daemon.process.send_signal(signal.SIGHUP)
            await daemon.wait_stderr("reloaded: sources")
            assert (await post(daemon.url, "/v1/track", {"userId": "u", "event": "e"}, new_key))[
                0
            ] == 200
            assert (await post(daemon.url, "/v1/track", {"userId": "u", "event": "e"}, AUTH))[
                0
            ] == 401
        finally:
            assert await daemon.stop() == 0


async def test_sighup_keeps_what_needs_a_restart_and_a_file_changed_back_warns_no_more(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "relay.yaml", tmp_path / "q.db", "http://127.0.0.1:9")
    daemon = await start_daemon(config)
    try:
        write_config(tmp_path / "relay.yaml", tmp_path / "elsewhere.db", "http://127.0.0.1:9")
        daemon.process.send_signal(signal.SIGHUP)
        await daemon.wait_stderr("reloaded:")
        write_config(tmp_path / "relay.yaml", tmp_path / "q.db", "http://127.0.0.1:9")
        daemon.process.send_signal(signal.SIGHUP)  # back to what runs: nothing to restart for
        await daemon.wait_stderr("reloaded:", count=2)
        assert (await post(daemon.url, "/v1/track", {"userId": "u", "event": "e"}))[0] == 200
    finally:
        assert await daemon.stop() == 0
    warned = [line for line in daemon.stderr_lines if "need a restart" in line]
    assert len(warned) == 1, daemon.stderr_lines
    assert "reload: queue changed" in warned[0]
    assert not (tmp_path / "elsewhere.db").exists()


async def test_sigterm_with_a_backlog_drains_in_flight_and_loses_nothing(tmp_path: Path) -> None:
    fake = FakeInfinario()
    slow = True
    fake.responder = lambda commands: Reply(delay_s=0.3) if slow else Reply()
    async with running_fake(fake) as (_, api):
        config = write_config(
            tmp_path / "relay.yaml",
            tmp_path / "q.db",
            api.url,
            destination={"concurrency": 2, "max_requests_per_second": 1000},
            shutdown={"grace": "10s"},
        )
        daemon = await start_daemon(config)
        sent = [
            {
                "type": "track",
                "userId": f"u{i % 50}",
                "event": "e",
                "messageId": f"m{i}",
                "timestamp": T0,
                "properties": {"n": i},
            }
            for i in range(5000)
        ]
        for start in range(0, 5000, 500):
            assert (await post(daemon.url, "/v1/batch", {"batch": sent[start : start + 500]}))[
                0
            ] == 200
        await fake.wait_for(lambda f: len(f.accepted) >= 100)
        # Hold the batches in flight at the API while we look at /ready during the drain.
        fake.gate = asyncio.Event()
        await fake.wait_for(lambda f: f.held >= 1)
        started = asyncio.get_running_loop().time()
        daemon.process.send_signal(signal.SIGTERM)
        ready: list[tuple[int, Any]] = []
        async with aiohttp.ClientSession() as session, asyncio.timeout(10):
            while not ready:
                async with session.get(daemon.url + "/ready") as response:
                    if response.status == 503:
                        ready.append((response.status, await response.json()))
        fake.gate.set()
        # No second signal: that would mean "stop now" (batches in flight stay queued).
        code = await daemon.stop(sig=None)
        took = asyncio.get_running_loop().time() - started
        assert code == 0
        assert took < 10 + 5  # the grace period, and a margin for start-up of teardown
        assert ready
        assert ready[0][1]["reasons"] == ["shutting down"]
        delivered_before = len(fake.accepted)
        assert delivered_before < 5000
        slow = False
        daemon = await start_daemon(config)
        try:
            await fake.wait_for_commands(5000, timeout_s=120)
        finally:
            assert await daemon.stop() == 0
    numbers = [c["data"]["properties"]["n"] for c in fake.accepted]
    assert sorted(numbers) == list(range(5000)), "lost or duplicated"


async def test_a_second_signal_stops_at_once_and_keeps_the_batches_in_flight(
    tmp_path: Path,
) -> None:
    fake = FakeInfinario()
    async with running_fake(fake) as (_, api):
        config = write_config(
            tmp_path / "relay.yaml", tmp_path / "q.db", api.url, shutdown={"grace": "60s"}
        )
        daemon = await start_daemon(config)
        fake.gate = asyncio.Event()  # the API holds the first batch
        sent = [
            {
                "type": "track",
                "userId": "u",
                "event": "e",
                "messageId": f"m{i}",
                "timestamp": T0,
                "properties": {"n": i},
            }
            for i in range(10)
        ]
        assert (await post(daemon.url, "/v1/batch", {"batch": sent}))[0] == 200
        await fake.wait_for(lambda f: f.held >= 1)
        started = asyncio.get_running_loop().time()
        daemon.process.send_signal(signal.SIGTERM)
        await daemon.wait_stderr("stopping")
        # Without a second signal the relay would wait up to the 60 s grace for the API.
        assert await daemon.stop(signal.SIGTERM) == 0
        assert asyncio.get_running_loop().time() - started < 30
        assert any("second signal" in line for line in daemon.stderr_lines)
        fake.gate.set()
        # The store was closed cleanly and the batch is still queued: it goes out after a restart.
        assert await queue_pending(config) == 10
        daemon = await start_daemon(config)
        try:
            await fake.wait_for(lambda f: len(f.accepted) >= 10)
        finally:
            assert await daemon.stop() == 0
    assert sorted({c["data"]["properties"]["n"] for c in fake.accepted}) == list(range(10))
