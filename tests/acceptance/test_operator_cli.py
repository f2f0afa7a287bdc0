"""The operator's commands as a new user meets them: they never mislead (docs/operations.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import post, run_cli, start_daemon, write_config

pytestmark = pytest.mark.acceptance
T0 = "2024-03-01T12:00:00Z"


async def queue_two_calls(config: Path) -> None:
    """Two calls accepted by a daemon on `config` whose destination is down, then stopped."""
    daemon = await start_daemon(config)
    try:
        for n in range(2):
            body = {"userId": "u", "event": "e", "messageId": f"m{n}", "timestamp": T0}
            assert (await post(daemon.url, "/v1/track", body))[0] == 200
    finally:
        assert await daemon.stop() == 0


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
    config = write_config(
        tmp_path / "etc" / "relay.yaml",
        Path("data/q.db"),
        "http://127.0.0.1:9",
        destination={"retry": {"backoff_initial": "1h", "backoff_max": "1h"}},
    )
    await queue_two_calls(config)
    assert (tmp_path / "etc" / "data" / "q.db").is_file()
    code, out, err = await run_cli(
        "status", "--json", "--config", "../etc/relay.yaml", cwd=tmp_path / "elsewhere"
    )
    assert code == 0, err
    report = json.loads(out)
    assert (report["queue"], report["pending"]) == (str(tmp_path / "etc" / "data" / "q.db"), 2)
    assert not (tmp_path / "elsewhere" / "data").exists()
