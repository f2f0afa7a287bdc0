"""`segment-relay import`: Segment archive files through the queue to the fake API, for good
once (docs/operations.md, "Importing archives")."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from segment_relay.testing import FakeInfinario
from support import (
    AUTH,
    post,
    postgres_database,
    relay_command,
    run_cli,
    running_fake,
    start_daemon,
    write_config,
)

pytestmark = pytest.mark.acceptance
T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
V2 = {"api": "exponea", "api_key": "KEY"}  # commands carry their messageId as command_id


def at(minutes: float) -> str:
    return (T0 + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


def write_archive(path: Path, lines: list[Any], *, gzipped: bool = True) -> Path:
    data = b"".join(
        (line if isinstance(line, bytes) else orjson.dumps(line)) + b"\n" for line in lines
    )
    path.write_bytes(gzip.compress(data) if gzipped else data)
    return path


def tracks(count: int, prefix: str, users: int) -> list[dict[str, Any]]:
    """`count` track calls of `users` users, a second apart, messageIds <prefix><n>."""
    return [
        {"type": "track", "userId": f"u{n % users}", "event": "Old", "messageId": f"{prefix}{n}",
         "timestamp": at(n / 60)}
        for n in range(count)
    ]  # fmt: skip


def config_for(tmp_path: Path, api_url: str, **sections: Any) -> Path:
    return write_config(
        tmp_path / "relay.yaml",
        tmp_path / "q.db",
        api_url,
        destination={**V2, **sections.pop("destination", {})},
        **sections,
    )


EVERY_TYPE = [
    {"type": "identify", "userId": "ann", "traits": {"plan": "pro"}, "messageId": "i1",
     "timestamp": at(0), "receivedAt": at(0.1), "sentAt": at(5)},
    {"type": "track", "userId": "ann", "event": "Bought", "properties": {"n": 1},
     "messageId": "t1", "timestamp": at(1), "sentAt": at(30)},
    {"type": "group", "userId": "ann", "groupId": "g1", "traits": {"name": "Acme"},
     "messageId": "g1", "timestamp": at(2)},
    {"type": "alias", "userId": "ann", "previousId": "anon-1", "messageId": "a1",
     "timestamp": at(3)},
    {"batch": [
        {"type": "track", "userId": "bob", "event": "Viewed", "messageId": "b1",
         "timestamp": at(4)},
        {"type": "track", "userId": "bob", "messageId": "b-no-event", "timestamp": at(4)},
        {"type": "track", "userId": "bob", "event": "No id", "timestamp": at(4)},
    ], "context": {"library": {"name": "analytics-python", "version": "2"}}},
    b"{not json",
]  # fmt: skip


async def test_an_archive_of_every_call_type_is_delivered_once_with_its_own_times(
    tmp_path: Path,
) -> None:
    archive = write_archive(tmp_path / "archive.jsonl.gz", EVERY_TYPE)
    rejects = tmp_path / "rejects.jsonl"
    async with running_fake(FakeInfinario()) as (fake, api):
        config = config_for(tmp_path, api.url, sessions={"enabled": False})
        # The relay is not running: the import waits in the queue for the next serve.
        code, out, err = await run_cli(
            "import", "--config", str(config), str(archive), "--rejects", str(rejects)
        )
        assert code == 1, err  # not every line was taken
        assert f"{archive}:5 (batch[1]): event is required on track" in err
        assert f"{archive}:6: not JSON" in err
        assert "imported 6 (" in err
        code, out, _ = await run_cli("status", "--json", "--config", str(config))
        assert json.loads(out)["imports_waiting"] == 6
        daemon = await start_daemon(config)
        try:
            commands = await fake.wait_for_commands(6)
        finally:
            assert await daemon.stop() == 0
        # Again, a day later or now: nothing is queued twice.
        code, _, err = await run_cli("import", "--config", str(config), str(archive))
        assert "imported 0 (" in err
        code, out, _ = await run_cli("status", "--json", "--config", str(config))
        assert (json.loads(out)["imports_waiting"], json.loads(out)["pending"]) == (0, 0)
    by_id = {c["command_id"]: c["data"] for c in commands}
    assert len(by_id) == 6
    assert by_id["t1"]["event_type"] == "Bought"
    # Its own timestamp, not corrected by sentAt (Segment's times in an archive are right).
    assert by_id["t1"]["timestamp"] == (T0 + timedelta(minutes=1)).timestamp()
    assert by_id["i1"]["properties"] == {"plan": "pro"}
    assert by_id["g1"]["properties"] == {"group_id": "g1", "group_name": "Acme"}
    assert by_id["a1"]["customer_ids"] == {"registered": "ann", "cookie": "anon-1"}
    assert by_id["b1"]["properties"]["library_name"] == "analytics-python"
    [made_up] = [k for k in by_id if k.startswith("import-")]  # "No id": an id from its line
    assert by_id[made_up]["event_type"] == "No id"
    refused = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["line"], r["index"]) for r in refused] == [(5, 1), (6, None)]


async def test_historical_sessions_come_from_the_calls_own_times(tmp_path: Path) -> None:
    pages = [
        {"type": "page", "userId": "cid", "name": "Home", "messageId": "p1", "timestamp": at(0)},
        {"type": "page", "userId": "cid", "name": "Cart", "messageId": "p2", "timestamp": at(10)},
        # 40 minutes later: over the 30-minute idle timeout, a new session.
        {"type": "screen", "userId": "cid", "name": "Pay", "messageId": "p3", "timestamp": at(50)},
        {"type": "page", "userId": "dee", "name": "Home", "messageId": "p4", "timestamp": at(5)},
    ]
    archive = write_archive(tmp_path / "pages.ndjson", pages, gzipped=False)
    async with running_fake(FakeInfinario()) as (fake, api):
        config = config_for(tmp_path, api.url)
        code, _, err = await run_cli("import", "--config", str(config), str(archive))
        assert code == 0, err
        daemon = await start_daemon(config)
        try:
            commands = await fake.wait_for_commands(4 + 6)
        finally:
            assert await daemon.stop() == 0
    sessions = sorted(
        (c["data"]["customer_ids"]["registered"], c["data"]["event_type"],
         c["data"]["timestamp"] - T0.timestamp(), c["data"]["properties"].get("duration"))
        for c in commands
        if c["data"]["event_type"].startswith("session_")
    )  # fmt: skip
    assert sessions == [
        ("cid", "session_end", 600.0, 600.0),
        ("cid", "session_end", 3000.0, 0.0),
        ("cid", "session_start", 0.0, None),
        ("cid", "session_start", 3000.0, None),
        ("dee", "session_end", 300.0, 0.0),
        ("dee", "session_start", 300.0, None),
    ]


async def test_an_interrupted_import_run_again_delivers_each_message_once(
    tmp_path: Path,
) -> None:
    count = 20_000
    lines = tracks(count, "m", users=50)
    archive = write_archive(tmp_path / "big.json.gz", lines)
    async with running_fake(FakeInfinario()) as (fake, api):
        config = config_for(tmp_path, api.url, destination={"max_requests_per_second": 10_000})
        # The first run reads standard input, which this test feeds: it is killed half-way,
        # with part of its input taken and the rest never sent.
        process = await asyncio.create_subprocess_exec(
            *relay_command(), "import", "--config", str(config), "-",
            stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # its own process group: its workers can be found
        )  # fmt: skip
        assert process.stdin is not None
        # 9 runs of lines: more than Parsers keeps in flight, so some are written.
        taken = lines[: 9 * 2000]
        process.stdin.write(b"".join(orjson.dumps(line) + b"\n" for line in taken))
        await process.stdin.drain()
        waiting = 0
        for _ in range(600):  # bounded: until part of it is in, then SIGKILL
            code, out, _ = await run_cli("status", "--json", "--config", str(config))
            if code == 0 and (waiting := json.loads(out)["imports_waiting"]) > 0:
                break
            await asyncio.sleep(0.05)
        process.kill()
        await process.wait()
        assert 0 < waiting < count, "the import was not caught half-way"
        # Its worker processes follow it rather than wait for work for ever.
        async with asyncio.timeout(30):
            while True:
                try:
                    os.killpg(process.pid, 0)
                except ProcessLookupError:
                    break
                await asyncio.sleep(0.1)
        code, _, err = await run_cli("import", "--config", str(config), str(archive))
        assert code == 0, err
        daemon = await start_daemon(config)
        try:
            await fake.wait_for(lambda f: len(f.accepted) >= count, timeout_s=120)
        finally:
            assert await daemon.stop() == 0
    delivered = [c["command_id"] for c in fake.accepted]
    assert sorted(delivered) == sorted(f"m{n}" for n in range(count))


async def test_live_calls_go_before_the_rest_of_an_import(tmp_path: Path) -> None:
    count = 6000
    archive = write_archive(tmp_path / "old.json.gz", tracks(count, "old", users=20))
    async with running_fake(FakeInfinario()) as (fake, api):
        # 20 requests/s of 50 commands: 1,000 a second, so the import takes 6 s to send.
        config = config_for(tmp_path, api.url, destination={"max_requests_per_second": 20})
        code, _, err = await run_cli("import", "--config", str(config), str(archive))
        assert code == 0, err
        daemon = await start_daemon(config)
        try:
            for n in range(20):
                body = {"userId": f"live{n}", "event": "Now", "messageId": f"live{n}"}
                assert (await post(daemon.url, "/v1/track", body, AUTH))[0] == 200
            await fake.wait_for(lambda f: len(f.accepted) >= count + 20, timeout_s=120)
        finally:
            assert await daemon.stop() == 0
    order = [c["command_id"] for c in fake.accepted]
    last_live = max(i for i, cid in enumerate(order) if cid.startswith("live"))
    imported_after = sum(1 for cid in order[last_live:] if cid.startswith("old"))
    assert imported_after >= count // 2, (last_live, imported_after)


async def test_an_import_into_the_postgresql_queue_is_delivered_once(tmp_path: Path) -> None:
    lines = [
        {"type": "track", "userId": "pg", "event": "E", "messageId": f"pg{n}", "timestamp": at(n)}
        for n in range(3)
    ]
    archive = write_archive(tmp_path / "pg.json.gz", lines)
    async with postgres_database() as database, running_fake(FakeInfinario()) as (fake, api):
        config = config_for(tmp_path, api.url, queue={"url": database})
        for expected in ("imported 3 (", "imported 0 ("):
            code, _, err = await run_cli("import", "--config", str(config), str(archive))
            assert (code, expected in err) == (0, True), err
        daemon = await start_daemon(config)
        try:
            commands = await fake.wait_for_commands(3)
        finally:
            assert await daemon.stop() == 0
    assert sorted(c["command_id"] for c in commands) == ["pg0", "pg1", "pg2"]
