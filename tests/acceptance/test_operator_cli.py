"""The operator's commands as a new user meets them: they never mislead (docs/operations.md)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from support import (
    T0,
    post,
    queue_two_calls,
    run_cli,
    start_daemon,
    waiting_config,
    write_config,
)

pytestmark = pytest.mark.acceptance


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["status", "--json"],
        ["dead-letters", "list"],
        ["dead-letters", "purge", "--yes"],
        ["retry-now"],
    ],
)
async def test_a_command_on_a_missing_queue_names_it_and_creates_nothing(
    tmp_path: Path, command: list[str]
) -> None:
    queue = tmp_path / "nowhere" / "q.db"
    config = write_config(tmp_path / "relay.yaml", queue, "http://127.0.0.1:9")
    code, out, err = await run_cli(*command, "--config", str(config))
    assert code == 3, (out, err)
    assert f"no queue at {queue}" in err
    assert not (tmp_path / "nowhere").exists()


async def test_a_relative_queue_path_is_the_config_files_wherever_a_command_runs(
    tmp_path: Path,
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "elsewhere").mkdir()
    config = waiting_config(tmp_path / "etc" / "relay.yaml", Path("data/q.db"))
    await queue_two_calls(config)
    assert (tmp_path / "etc" / "data" / "q.db").is_file()
    code, out, err = await run_cli(
        "status", "--json", "--config", "../etc/relay.yaml", cwd=tmp_path / "elsewhere"
    )
    assert code == 0, err
    report = json.loads(out)
    assert (report["queue"], report["pending"]) == (str(tmp_path / "etc" / "data" / "q.db"), 2)
    assert not (tmp_path / "elsewhere" / "data").exists()


EXAMPLE = Path(__file__).parents[2] / "config.example.yaml"


def example_on_port_0(tmp_path: Path) -> Path:
    """The example config, listening on any free port with its queue under `tmp_path`."""
    text = EXAMPLE.read_text().replace("port: 8088 ", "port: 0 ")
    text = text.replace("path: ./relay-data/queue.db", f"path: {tmp_path / 'data' / 'q.db'}")
    path = tmp_path / "example.yaml"
    path.write_text(text)
    return path


def refused_configs(tmp_path: Path) -> list[tuple[Path, int, str]]:
    """Configs `serve` refuses before it listens: (file, exit code, what the error names)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"destination": {"project_token": ""}}, 2, "destination.project_token: required"),
        (
            {"destination": {"api": "exponea", "api_key": ""}},
            2,
            "destination.api_key: required when destination.api is exponea",
        ),
        (
            {"sources": [{"name": "web", "write_key": "dev-write-key"}]},
            2,
            "sources[0].write_key: 'dev-write-key' is the development key",
        ),
        ({"queue": {"path": str(blocker / "q.db")}}, 3, str(blocker)),
        ({"queue": {"path": str(garbage)}}, 3, "is not a usable SQLite database"),
    ]
    return [
        (write_config(tmp_path / f"c{i}.yaml", tmp_path / "ok.db", "http://127.0.0.1:9", **s), c, n)
        for i, (s, c, n) in enumerate(cases)
    ]


async def test_check_config_refuses_what_serve_refuses_and_creates_nothing(
    tmp_path: Path,
) -> None:
    for config, code, named in refused_configs(tmp_path):
        checked = await run_cli("check-config", "--config", str(config))
        assert (checked[0], named in checked[2], checked[1]) == (code, True, ""), checked
        served = await run_cli("serve", "--config", str(config))
        assert (served[0], named in served[2]) == (code, True), served
    assert not (tmp_path / "ok.db").exists()


async def test_check_config_reads_the_units_environment_file_and_nothing_else(
    tmp_path: Path,
) -> None:
    config = example_on_port_0(tmp_path)
    env_file = tmp_path / "env"
    env_file.write_text(
        "# as in /etc/segment-relay/env\n\nSEGMENT_WRITE_KEY=a-key-of-our-own\n"
        "INFINARIO_PROJECT_TOKEN='the-token'\n"
    )
    code, out, err = await run_cli(
        "check-config", "--config", str(config), "--env-file", str(env_file)
    )
    assert code == 0, err
    assert out.startswith(
        f"config OK: 1 source(s), listening on 127.0.0.1:0, queue SQLite {tmp_path / 'data' / 'q.db'} (created at start)"
    )
    assert not (tmp_path / "data").exists()
    # The shell's variables are not what the service sees: only the file counts.
    env_file.write_text("SEGMENT_WRITE_KEY=a-key-of-our-own\n")
    code, out, err = await run_cli(
        "check-config",
        "--config",
        str(config),
        "--env-file",
        str(env_file),
        env={"INFINARIO_PROJECT_TOKEN": "from-the-shell"},
    )
    assert code == 2
    assert "destination.project_token: required" in err
    env_file.write_text("SEGMENT_WRITE_KEY\n")
    code, out, err = await run_cli(
        "check-config", "--config", str(config), "--env-file", str(env_file)
    )
    assert (code, err.strip()) == (
        2,
        f"segment-relay: config error: {env_file}:1: not a VAR=value line",
    )


async def test_the_example_config_forwards_only_with_a_write_key_of_its_own(
    tmp_path: Path,
) -> None:
    config = example_on_port_0(tmp_path)
    token = {"INFINARIO_PROJECT_TOKEN": "the-token"}
    code, _, err = await run_cli("serve", "--config", str(config), env=token)
    assert code == 2
    assert "sources[0].write_key: 'dev-write-key' is the development key" in err
    assert not (tmp_path / "data").exists()
    # A dry run takes it, and says so.
    daemon = await start_daemon(config, "--dry-run")
    assert await daemon.stop() == 0
    assert any(
        "WARNING" in line and "sources[0].write_key is the well-known development key" in line
        for line in daemon.stderr_lines
    ), daemon.stderr_lines


async def test_a_dry_run_keeps_its_state_apart_from_the_real_queue(tmp_path: Path) -> None:
    config = waiting_config(tmp_path / "relay.yaml", tmp_path / "data" / "q.db")
    await queue_two_calls(config)
    code, out, err = await run_cli("status", "--json", "--config", str(config))
    assert code == 0, err
    before = json.loads(out)
    daemon = await start_daemon(config, "--dry-run")
    try:
        page = {"userId": "dry", "name": "Home", "messageId": "p1", "timestamp": T0}
        assert (await post(daemon.url, "/v1/page", page))[0] == 200
        await daemon.wait_stdout(2)  # session_start and the page
    finally:
        assert await daemon.stop() == 0
    printed = [json.loads(line) for line in daemon.stdout_lines]
    assert {c["data"]["customer_ids"]["registered"] for c in printed} == {"dry"}
    code, out, err = await run_cli("status", "--json", "--config", str(config))
    assert code == 0, err
    after = json.loads(out)
    assert (after["pending"], after["open_sessions"], after["counters"]) == (
        2,
        0,
        before["counters"],
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the commands as root, as operators do")
async def test_commands_run_as_root_leave_the_queue_to_the_services_user(tmp_path: Path) -> None:
    # SQLite gives the -wal and -shm files it makes as root the database file's owner: an
    # operator's `status` or `backup` with sudo never locks the service out of its queue.
    config = waiting_config(tmp_path / "relay.yaml", tmp_path / "data" / "q.db")
    await queue_two_calls(config)
    data = tmp_path / "data"
    # The last connection to close takes the -wal and -shm files with it, as when the
    # service stopped and nothing had the queue open since.
    sqlite3.connect(data / "q.db").close()
    assert sorted(p.name for p in data.iterdir()) == ["q.db", "q.db.lock"]
    service_user = 65534  # as systemd's DynamicUser owns /var/lib/segment-relay
    for path in [data, *data.iterdir()]:
        os.chown(path, service_user, service_user)
    for command in (
        ["status"],
        ["dead-letters", "list"],
        ["backup", str(tmp_path / "copy.db")],
    ):
        code, _, err = await run_cli(*command, "--config", str(config))
        assert code == 0, err
        owners = {path.name: (path.stat().st_uid, path.stat().st_gid) for path in data.iterdir()}
        assert set(owners.values()) == {(service_user, service_user)}, (command, owners)


async def test_serve_under_systemd_warns_of_a_queue_outside_its_state_directory(
    tmp_path: Path,
) -> None:
    # The queue is not a database, so serve stops after its checks: what it said is all.
    garbage = tmp_path / "q.db"
    garbage.write_bytes(b"not a database" * 100)
    config = write_config(tmp_path / "relay.yaml", garbage, "http://127.0.0.1:9")
    state = "/var/lib/segment-relay"
    warning = (
        f"queue.path {garbage} is outside the unit's StateDirectory ({state}): the service can "
        f"write only there; set queue.path: {state}/queue.db"
    )
    code, _, err = await run_cli("serve", "--config", str(config), env={"STATE_DIRECTORY": state})
    assert (code, warning in err) == (3, True), err
    code, _, err = await run_cli(
        "serve", "--config", str(config), env={"STATE_DIRECTORY": str(tmp_path)}
    )
    assert (code, "StateDirectory" in err) == (3, False), err


async def test_every_command_takes_the_units_environment_file(tmp_path: Path) -> None:
    config = waiting_config(tmp_path / "relay.yaml", tmp_path / "data" / "q.db")
    await queue_two_calls(config)
    # The token only in the root-only env file, as operations.md sets it up.
    config.write_text(
        config.read_text().replace("project_token: TOKEN", "project_token: ${TOKEN_ONLY_IN_FILE}")
    )
    env_file = tmp_path / "env"
    env_file.write_text("TOKEN_ONLY_IN_FILE=TOKEN\n")
    code, _, err = await run_cli("status", "--config", str(config))
    assert code == 2
    assert "TOKEN_ONLY_IN_FILE is not set" in err
    for command in (["status", "--json"], ["dead-letters", "list"], ["retry-now"]):
        code, _, err = await run_cli(*command, "--config", str(config), "--env-file", str(env_file))
        assert code == 0, (command, err)


async def test_check_config_under_the_units_state_directory_warns_of_a_queue_outside_it(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "relay.yaml", tmp_path / "q.db", "http://127.0.0.1:9")
    state = {"STATE_DIRECTORY": "/var/lib/segment-relay"}
    code, out, err = await run_cli("check-config", "--config", str(config), env=state)
    assert (code, out.startswith("config OK")) == (0, True), err
    assert "is outside the unit's StateDirectory (/var/lib/segment-relay)" in err
