"""`segment-relay backup`: a consistent copy of the live queue while the daemon takes calls,
and that copy restored (docs/operations.md, "Backing up")."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from segment_relay.service import FORWARDER
from segment_relay.testing import FakeInfinario
from support import (
    T0,
    make_config,
    post,
    queue_pending,
    queue_two_calls,
    run_cli,
    running_fake,
    running_relay,
    start_daemon,
    waiting_config,
)

pytestmark = pytest.mark.acceptance
CALLS = 600


async def test_a_backup_taken_under_load_holds_every_call_acknowledged_before_it(
    tmp_path: Path,
) -> None:
    config = waiting_config(tmp_path / "relay.yaml", tmp_path / "data" / "q.db")
    copy = tmp_path / "backups" / "queue-copy.db"
    copy.parent.mkdir()
    acked: list[str] = []
    many_acked = asyncio.Event()
    daemon = await start_daemon(config)
    try:

        async def send() -> None:
            for n in range(CALLS):  # bounded in count; each post is bounded in time
                body = {"userId": f"u{n % 7}", "event": "e", "messageId": f"m{n}", "timestamp": T0}
                assert (await post(daemon.url, "/v1/track", body))[0] == 200
                acked.append(f"m{n}")
                if len(acked) == CALLS // 4:
                    many_acked.set()

        sender = asyncio.create_task(send())
        async with asyncio.timeout(60):
            await many_acked.wait()
        before = list(acked)
        code, out, err = await run_cli("backup", "--config", str(config), str(copy))
        during = len(acked) - len(before)
        await sender
        # Without --force an existing copy is kept.
        again = await run_cli("backup", "--config", str(config), str(copy))
    finally:
        assert await daemon.stop() == 0
    assert code == 0, err
    assert out.startswith(f"backed up {tmp_path / 'data' / 'q.db'} to {copy}: ")
    assert (again[0], "add --force" in again[2]) == (64, True)
    assert copy.stat().st_mode & 0o777 == 0o600
    assert not list(copy.parent.glob(".*partial"))
    assert during > 0, "the daemon took no calls while the backup ran: not a test under load"

    # Restored (the copy put where a queue lives), it delivers every call acked before it
    # (the v2 API style, whose commands carry their messageId as command_id).
    restored = tmp_path / "restored" / "q.db"
    restored.parent.mkdir()
    shutil.copyfile(copy, restored)
    async with running_fake(FakeInfinario()) as (fake, api):
        async with running_relay(
            make_config(restored, api.url, destination={"api": "exponea", "api_key": "KEY"})
        ) as relay:
            await relay.app[FORWARDER].drain()
        delivered = [c["command_id"] for c in fake.accepted]
    assert set(before) <= set(delivered)
    assert len(delivered) == len(set(delivered))
    assert set(delivered) <= {f"m{n}" for n in range(CALLS)}


async def test_a_backup_never_replaces_the_queue_itself(tmp_path: Path) -> None:
    config = waiting_config(tmp_path / "relay.yaml", tmp_path / "q.db")
    await queue_two_calls(config)
    code, out, err = await run_cli(
        "backup", "--force", "--config", str(config), str(tmp_path / "." / "q.db")
    )
    assert (code, out) == (3, "")
    assert "is the queue itself" in err
    assert await queue_pending(config) == 2


async def test_backup_of_a_postgresql_queue_says_how_instead(tmp_path: Path) -> None:
    config = waiting_config(tmp_path / "relay.yaml", tmp_path / "q.db")
    config.write_text(
        config.read_text().replace(
            f"path: {tmp_path / 'q.db'}", "url: postgresql://relay@127.0.0.1:1/relay"
        )
    )
    code, out, err = await run_cli("backup", "--config", str(config), str(tmp_path / "copy.db"))
    assert (code, out) == (3, "")
    assert "a PostgreSQL queue is backed up with its database (pg_dump" in err
