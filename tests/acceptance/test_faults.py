"""Storage faults and bad input: clear errors, and nothing accepted is lost."""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import signal
import sqlite3
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import (
    AUTH,
    queue_pending,
    queue_two_calls,
    relay_command,
    start_daemon,
    waiting_config,
    write_config,
)

pytestmark = pytest.mark.acceptance


async def queue_with_two_calls(tmp_path: Path) -> Path:
    """A config whose queue holds two accepted calls (the daemon stopped, nothing sent)."""
    config = waiting_config(tmp_path / "relay.yaml", tmp_path / "data" / "q.db")
    await queue_two_calls(config)
    return config


async def serve_exits(config: Path, *prefix: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *prefix,
        *relay_command(),
        "serve",
        "--config",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_a_corrupted_queue_is_refused_with_the_recovery_and_left_alone(
    tmp_path: Path,
) -> None:
    config = await queue_with_two_calls(tmp_path)
    db = tmp_path / "data" / "q.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = db.read_bytes()
    db.write_bytes(data[:100] + b"\xff" * 200 + data[300:])
    before = db.read_bytes()
    code, err = await serve_exits(config)
    assert code == 3
    assert "not a usable SQLite database" in err
    assert "move it aside" in err
    assert db.read_bytes() == before


async def test_a_truncated_queue_is_refused(tmp_path: Path) -> None:
    config = await queue_with_two_calls(tmp_path)
    db = tmp_path / "data" / "q.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.write_bytes(db.read_bytes()[:1500])
    code, err = await serve_exits(config)
    assert code == 3
    assert "queue error" in err


async def test_a_second_daemon_on_the_same_queue_refuses_clearly(tmp_path: Path) -> None:
    config = await queue_with_two_calls(tmp_path)
    daemon = await start_daemon(config)
    try:
        code, err = await serve_exits(config)
        assert code == 3
        assert "in use by another segment-relay process" in err
    finally:
        assert await daemon.stop() == 0
    assert await queue_pending(config) == 2


@pytest.mark.skipif(
    shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to drop root's override"
)
async def test_a_read_only_queue_is_refused_and_kept(tmp_path: Path) -> None:
    # Permissions bind root only without CAP_DAC_OVERRIDE: the daemon runs without it (and
    # stays uid 0, so it reaches the venv and the files wherever the repository is cloned,
    # a directory only root can enter included), as a service user without write access.
    config = await queue_with_two_calls(tmp_path)
    data = tmp_path / "data"
    for path in data.iterdir():
        path.chmod(0o444)
    data.chmod(0o555)
    try:
        code, err = await serve_exits(
            config, "setpriv", "--bounding-set=-dac_override,-dac_read_search"
        )
    finally:
        data.chmod(0o755)
    assert code == 3, err
    assert "read-only" in err, err
    assert await queue_pending(config) == 2


async def test_a_missing_directory_is_created(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "relay.yaml", tmp_path / "a" / "b" / "q.db", "http://127.0.0.1:9"
    )
    daemon = await start_daemon(config)
    assert await daemon.stop() == 0
    assert (tmp_path / "a" / "b" / "q.db").exists()


# --- bad input ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=40,
)
messages = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["track", "identify", "page", "screen", "group", "alias", "bogus"])
        | json_values,
        "userId": st.text(max_size=20) | st.integers() | json_values,
        "anonymousId": st.text(max_size=20) | json_values,
        "event": st.text(max_size=30) | json_values,
        "previousId": st.text(max_size=10) | json_values,
        "groupId": st.text(max_size=10) | json_values,
        "timestamp": st.sampled_from(
            ["2024-03-01T12:00:00Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "nope", ""]
        )
        | json_values,
        "sentAt": st.sampled_from(["2024-03-01T12:00:10Z", "garbage"]) | json_values,
        "properties": json_values,
        "traits": json_values,
        "context": json_values,
        "name": json_values,
        "messageId": st.text(max_size=40) | json_values,
    },
)


def raw_body(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:  # noqa: PLR0911 - one return per kind
    kind = draw(
        st.sampled_from(["bytes", "message", "batch", "deep", "gzip-garbage", "utf8", "long"])
    )
    path = draw(st.sampled_from(["/v1/track", "/v1/batch", "/v1/p", "/v1/import/", "/v1/a"]))
    if kind == "bytes":
        return path, draw(st.binary(max_size=300)), {}
    if kind == "message":
        return path, json.dumps(draw(messages), allow_nan=True).encode(), {}
    if kind == "batch":
        batch = draw(st.lists(messages, max_size=10))
        return (
            path,
            json.dumps({"batch": batch, "sentAt": draw(json_values)}, allow_nan=True).encode(),
            {},
        )
    if kind == "deep":
        depth = draw(st.integers(1, 3000))
        return (
            path,
            b'{"userId": "u", "event": "e", "properties": ' + b"[" * depth + b"]" * depth + b"}",
            {},
        )
    if kind == "gzip-garbage":
        return path, b"\x1f\x8b\x08" + draw(st.binary(max_size=200)), {"Content-Encoding": "gzip"}
    if kind == "utf8":
        return path, b'{"userId": "\xff\xfe", "event": "\xc3\x28"}', {}
    return (
        path,
        gzip.compress(
            json.dumps({"userId": "u", "event": "x" * draw(st.integers(0, 100_000))}).encode()
        ),
        {"Content-Encoding": "gzip"},
    )


@st.composite
def requests_(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    return raw_body(draw)


def send(url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    headers = {**AUTH, **headers}
    request = urllib.request.Request(url + path, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_random_input_never_gets_a_500_and_never_stores_what_cannot_be_sent(tmp_path: Path) -> None:
    # The bundled fake API (a process of its own) takes what the relay forwards.
    fake = subprocess.Popen(
        [*relay_command(), "fake-infinario", "--port", "0", "--token", "TOKEN", "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert fake.stderr is not None
    banner = fake.stderr.readline().decode()
    assert "listening on " in banner, banner
    api = banner.split("listening on ")[1].split(" ")[0]
    config = write_config(tmp_path / "relay.yaml", tmp_path / "q.db", api)
    process = subprocess.Popen(
        [*relay_command(), "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    drain: threading.Thread | None = None
    try:
        url = ""
        while "listening on" not in (line := process.stderr.readline().decode()):
            assert line, "the daemon did not start"
        url = line.rsplit(" ", 1)[-1].strip()
        # Keep reading its log, or the daemon blocks on a full pipe (one line per batch).
        drain = threading.Thread(target=process.stderr.read, daemon=True)
        drain.start()
        statuses: list[int] = []

        @settings(
            max_examples=300,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(requests_())
        def one(request: tuple[str, bytes, dict[str, str]]) -> None:
            status, body = send(url, *request)
            statuses.append(status)
            assert status in (200, 400, 401, 413), (status, body)
            assert (
                set(body) == {"success"}
                if status == 200
                else {"success", "code", "message", "error"}
            )

        one()
        assert process.poll() is None, "the daemon died"
        assert (
            send(url, "/v1/track", json.dumps({"userId": "u", "event": "still here"}).encode(), {})[
                0
            ]
            == 200
        )
        assert 200 in statuses
        assert 400 in statuses
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        if drain is not None:
            drain.join(timeout=10)
        process.stderr.close()
        fake.send_signal(signal.SIGINT)
        fake.wait(timeout=30)
        fake.stderr.close()
        assert process.returncode == 0
    code, out, _ = subprocess_cli(
        "dead-letters", "list", "--json", "--reason", "mapping_error", "--config", str(config)
    )
    assert code == 0
    assert out == "", f"stored messages the mapping refused:\n{out}"


def subprocess_cli(*args: str) -> tuple[int, str, str]:
    result = subprocess.run(
        [*relay_command(), *args], capture_output=True, text=True, timeout=60, check=False
    )
    return result.returncode, result.stdout, result.stderr
