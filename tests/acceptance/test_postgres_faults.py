"""The PostgreSQL queue's faults with the real server: a wrong URL at start, and the server
going away under load and coming back (stopped and started with pg_ctlcluster)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from segment_relay.testing import FakeInfinario
from support import (
    AUTH,
    POSTGRES_ADMIN_URL,
    postgres_database,
    relay_command,
    run_cli,
    running_fake,
    start_daemon,
    write_config,
)

pytestmark = pytest.mark.acceptance
CLUSTERS = Path("/etc/postgresql")


def cluster() -> list[str]:
    """pg_ctlcluster's version and name of the machine's cluster."""
    return [sorted(p.name for p in CLUSTERS.iterdir())[0], "main"]


def pg_ctl(action: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *cluster(), action, "-m", "fast"],
        check=True,
        capture_output=True,
        timeout=60,
    )


can_restart = pytest.mark.skipif(
    shutil.which("pg_ctlcluster") is None
    or not CLUSTERS.is_dir()
    or os.geteuid() != 0
    or "127.0.0.1" not in POSTGRES_ADMIN_URL,
    reason="needs the machine's own PostgreSQL cluster (pg_ctlcluster, as root) to restart it",
)


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with postgres_database() as url:
        yield url


async def test_a_wrong_queue_url_stops_the_start_naming_the_key_not_the_password(
    tmp_path: Path,
) -> None:
    config = write_config(
        tmp_path / "relay.yaml",
        tmp_path / "unused.db",
        "http://127.0.0.1:9",
        queue={"url": "postgresql://relay:s3cret@127.0.0.1:1/relay"},
    )
    process = await asyncio.create_subprocess_exec(
        *relay_command(), "serve", "--config", str(config), stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        _, err = await process.communicate()
    assert process.returncode == 3
    assert "queue.url: cannot connect to postgresql://relay:***@127.0.0.1:1/relay" in err.decode()
    assert "s3cret" not in err.decode()
    # check-config makes the same check, and says the same.
    code, out, err_text = await run_cli("check-config", "--config", str(config))
    assert (code, out) == (3, "")
    assert "queue.url: cannot connect to postgresql://relay:***@127.0.0.1:1/relay" in err_text
    assert "s3cret" not in err_text


@can_restart
async def test_the_relay_rides_out_the_database_going_away_under_load(
    tmp_path: Path, database: str
) -> None:
    async with running_fake(FakeInfinario()) as (fake, api):
        config = write_config(
            tmp_path / "relay.yaml", tmp_path / "unused.db", api.url, queue={"url": database}
        )
        daemon = await start_daemon(config)
        acked: list[int] = []
        refused: list[tuple[int, dict[str, object], str | None]] = []
        was_refused = asyncio.Event()
        try:
            async with aiohttp.ClientSession() as session:

                async def send(n: int) -> None:
                    message = {
                        "userId": f"u{n % 10}",
                        "event": "E",
                        "messageId": f"m{n}",
                        "properties": {"n": n},
                    }
                    for _ in range(600):  # bounded: a client that retries what was refused
                        with contextlib.suppress(aiohttp.ClientError):
                            async with session.post(
                                daemon.url + "/v1/track", data=orjson.dumps(message), headers=AUTH
                            ) as response:
                                if response.status == 200:
                                    acked.append(n)
                                    return
                                body = await response.json(content_type=None)
                                refused.append(
                                    (response.status, body, response.headers.get("Retry-After"))
                                )
                                was_refused.set()
                        await asyncio.sleep(0.05)
                    raise AssertionError(f"m{n} was never accepted")

                async def ready() -> tuple[int, dict[str, object]]:
                    async with session.get(daemon.url + "/ready") as response:
                        return response.status, await response.json()

                load = [asyncio.create_task(send(n)) for n in range(100)]
                await asyncio.wait(load, timeout=0.2)
                await asyncio.to_thread(pg_ctl, "stop")
                try:
                    more = [asyncio.create_task(send(n)) for n in range(100, 200)]
                    await asyncio.wait_for(was_refused.wait(), 30)
                    status, body = await ready()
                finally:
                    await asyncio.to_thread(pg_ctl, "start")
                async with asyncio.timeout(120):
                    await asyncio.gather(*load, *more)
                await fake.wait_for(
                    lambda f: set(acked) <= {c["data"]["properties"]["n"] for c in f.accepted},
                    timeout_s=60,
                )
                assert (await ready())[0] == 200
        finally:
            code = await daemon.stop()
            assert code == 0, "\n".join(daemon.stderr_lines[-30:])
    # While the database was away: 503 with Retry-After and a JSON reason; /ready said why.
    assert {(s, b["code"], r is not None) for s, b, r in refused} == {
        (503, "store_unavailable", True)
    }
    assert status == 503
    assert "cannot be reached" in " ".join(map(str, body["reasons"]))  # type: ignore[call-overload]
    assert sorted(acked) == list(range(200))
