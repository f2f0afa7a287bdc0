"""The README's HAProxy and nginx configurations, as printed there, in front of two relays on
one PostgreSQL database: calls keep being accepted, and every accepted one delivered, when
one relay dies."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from segment_relay.testing import FakeInfinario
from support import (
    AUTH,
    postgres_database,
    requires,
    running_fake,
    start_daemon,
    write_config,
)

pytestmark = pytest.mark.acceptance
README = Path(__file__).parents[2] / "README.md"


def readme_block(after: str) -> str:
    """The first fenced block of the README after the line `after`."""
    text = README.read_text()
    found = re.search(re.escape(after) + r"\n\n```\n(.*?)```", text, re.DOTALL)
    assert found, f"no configuration after {after!r} in README.md"
    return found.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def adapt(config: str, front: int, relays: list[int]) -> str:
    """The README's addresses (10.0.0.11:8088, ...; listening on 8088) made local."""
    for n, port in enumerate(relays):
        config = config.replace(f"10.0.0.1{n + 1}:8088", f"127.0.0.1:{port}")
    return config.replace("bind :8088", f"bind 127.0.0.1:{front}").replace(
        "listen 8088;", f"listen 127.0.0.1:{front};"
    )


@contextlib.asynccontextmanager
async def balancer(kind: str, tmp_path: Path, front: int, relays: list[int]) -> AsyncIterator[None]:
    if kind == "haproxy":
        config = "global\n    maxconn 256\ndefaults\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\n"
        config += adapt(
            readme_block(
                "refuses (a relay answers 503 while it stops or cannot reach the database). HAProxy:"
            ),
            front,
            relays,
        )
        path = tmp_path / "haproxy.cfg"
        path.write_text(config)
        command = ["haproxy", "-f", str(path), "-db"]
    else:
        server = adapt(readme_block("or nginx:"), front, relays)
        config = (
            f"daemon off;\npid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'};\n"
            f"events {{}}\nhttp {{\n    access_log off;\n    client_body_temp_path {tmp_path};\n"
            f"    proxy_temp_path {tmp_path};\n{server}}}\n"
        )
        path = tmp_path / "nginx.conf"
        path.write_text(config)
        command = ["nginx", "-c", str(path), "-p", str(tmp_path)]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        # Bounded: until the front port accepts connections.
        async with asyncio.timeout(20):
            while True:
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", front)
                    writer.close()
                    break
                if process.returncode is not None:
                    assert process.stderr is not None
                    raise AssertionError((await process.stderr.read()).decode())
                await asyncio.sleep(0.05)
        yield
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 20)


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
