"""The README's HAProxy and nginx configurations, as printed there, in front of two relays on
one PostgreSQL database: calls keep being accepted, and every accepted one delivered, when
one relay dies."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import orjson
import pytest

from segment_relay.testing import FakeInfinario
from support import (
    AUTH,
    fenced_block,
    free_port,
    haproxy_command,
    listening,
    nginx_command,
    postgres_database,
    requires,
    running_fake,
    start_daemon,
    write_config,
)

pytestmark = pytest.mark.acceptance
README = Path(__file__).parents[2] / "README.md"


def readme_block(after: str) -> str:
    return fenced_block(README, after)


def adapt(config: str, front: int, relays: list[int]) -> str:
    """The README's addresses (10.0.0.11:8088, ...; listening on 8088) made local."""
    for n, port in enumerate(relays):
        config = config.replace(f"10.0.0.1{n + 1}:8088", f"127.0.0.1:{port}")
    return config.replace("bind :8088", f"bind 127.0.0.1:{front}").replace(
        "listen 8088;", f"listen 127.0.0.1:{front};"
    )


def balancer(
    kind: str, tmp_path: Path, front: int, relays: list[int]
) -> contextlib.AbstractAsyncContextManager[None]:
    """The README's HAProxy or nginx configuration, made local, running in front of `relays`."""
    if kind == "haproxy":
        config = readme_block(
            "refuses (a relay answers 503 while it stops or cannot reach the database). HAProxy:"
        )
        command = haproxy_command(tmp_path, adapt(config, front, relays))
    else:
        command = nginx_command(tmp_path, adapt(readme_block("or nginx:"), front, relays))
    return listening(command, front)


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("haproxy", marks=requires("haproxy")),
        pytest.param("nginx", marks=requires("nginx")),
    ],
)
async def test_the_readme_configs_keep_taking_calls_when_a_relay_dies(
    kind: str, tmp_path: Path
) -> None:
    ports = [free_port(), free_port()]
    front = free_port()
    async with (
        postgres_database() as database,
        running_fake(FakeInfinario()) as (fake, api),
        # The client connects from 127.0.0.2; the load balancer runs on 127.0.0.1.
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        ) as session,
    ):
        daemons = []
        for n, port in enumerate(ports):
            config = write_config(
                tmp_path / f"relay{n}.yaml",
                tmp_path / "unused.db",
                api.url,
                server={"host": "127.0.0.1", "port": port, "trusted_proxies": ["127.0.0.1/32"]},
                queue={"url": database, "lease": "3s"},
                destination={"timeout": "2s"},
            )
            daemons.append(await start_daemon(config))
        try:
            async with balancer(kind, tmp_path, front, ports):
                acked: list[int] = []

                async def send(n: int) -> None:
                    body = orjson.dumps(
                        {"userId": f"u{n % 7}", "event": "E", "messageId": f"lb-{n}",
                         "properties": {"n": n}, "context": {"direct": True}}
                    )  # fmt: skip
                    for _ in range(100):  # bounded: a client retries what was refused
                        with contextlib.suppress(aiohttp.ClientError):
                            async with session.post(
                                f"http://127.0.0.1:{front}/v1/track", data=body, headers=AUTH
                            ) as response:
                                if response.status == 200:
                                    acked.append(n)
                                    return
                        await asyncio.sleep(0.1)
                    raise AssertionError(f"call {n} was never accepted through {kind}")

                await asyncio.gather(*(send(n) for n in range(100)))
                daemons[0].process.kill()  # one relay dies
                await daemons[0].stop(None)
                await asyncio.gather(*(send(n) for n in range(100, 200)))
                await fake.wait_for(
                    lambda f: set(acked) <= {c["data"]["properties"]["n"] for c in f.accepted},
                    timeout_s=60,
                )
        finally:
            for daemon in daemons:
                if daemon.process.returncode is None:
                    await daemon.stop()
    assert sorted(acked) == list(range(200))
    # The relays saw the client's address through the balancer's X-Forwarded-For.
    assert {c["data"]["properties"]["ip"] for c in fake.accepted} == {"127.0.0.2"}
