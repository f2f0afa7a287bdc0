"""Helpers shared by the tests: configs, a relay on loopback, the CLI in a subprocess."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from segment_relay.config import Config, parse_config
from segment_relay.service import create_app
from segment_relay.testing import FakeInfinario

TESTS = Path(__file__).parent
CONFORMANCE = TESTS / "conformance"
NODE_DIR = TESTS / "node"
WRITE_KEY = "test-write-key"
# One-line summaries that tests want printed at the end of the run (conftest prints them).
SUMMARIES: list[str] = []
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def config_dict(queue_path: Path, base_url: str, **sections: Any) -> dict[str, Any]:
    """A test config: port 0, the queue in `queue_path`, no linger, quick retries."""
    base: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "sources": [{"name": "test", "write_key": WRITE_KEY}],
        "queue": {"path": str(queue_path)},
        "destination": {
            "base_url": base_url,
            "project_token": "TOKEN",
            "linger": 0,
            "timeout": "5s",
            "retry": {
                "quick_attempts": 2,
                "quick_initial": 0,
                "quick_max": 0,
                "backoff_initial": "50ms",
                "backoff_max": "200ms",
            },
        },
    }
    return deep_merge(base, sections)


def make_config(queue_path: Path, base_url: str, **sections: Any) -> Config:
    return parse_config(yaml.safe_dump(config_dict(queue_path, base_url, **sections)))


def write_config(path: Path, queue_path: Path, base_url: str, **sections: Any) -> Path:
    path.write_text(yaml.safe_dump(config_dict(queue_path, base_url, **sections)))
    return path


@dataclass
class Server:
    """An aiohttp app running on 127.0.0.1."""

    url: str
    port: int
    app: web.Application
    runner: web.AppRunner


async def start_server(app: web.Application, port: int = 0) -> Server:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = int(runner.addresses[0][1])
    return Server(f"http://127.0.0.1:{bound}", bound, app, runner)


@contextlib.asynccontextmanager
async def running_relay(config: Config, **kwargs: Any) -> AsyncIterator[Server]:
    """The relay app from `create_app` on a loopback port, stopped on exit."""
    server = await start_server(create_app(config, **kwargs))
    try:
        yield server
    finally:
        await server.runner.cleanup()


@contextlib.asynccontextmanager
async def running_fake(
    fake: FakeInfinario | None = None, port: int = 0
) -> AsyncIterator[tuple[FakeInfinario, Server]]:
    fake = fake or FakeInfinario()
    server = await start_server(fake.app(), port)
    try:
        yield fake, server
    finally:
        await server.runner.cleanup()


def relay_command() -> list[str]:
    """The installed `segment-relay` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "segment-relay"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "segment_relay.cli"]


@dataclass
class Daemon:
    """`segment-relay serve` running in a subprocess."""

    process: asyncio.subprocess.Process
    url: str = ""
    stderr_lines: list[str] = field(default_factory=list)
    stdout_lines: list[str] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    output_changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def wait_stderr(self, text: str, timeout_s: float = 20.0) -> None:
        """Wait (bounded) until the daemon logged a line containing `text`."""
        async with asyncio.timeout(timeout_s), self.output_changed:
            await self.output_changed.wait_for(
                lambda: any(text in line for line in self.stderr_lines)
            )

    async def wait_stdout(self, count: int, timeout_s: float = 20.0) -> list[str]:
        """Wait (bounded) until the daemon printed at least `count` lines on stdout."""
        async with asyncio.timeout(timeout_s), self.output_changed:
            await self.output_changed.wait_for(lambda: len(self.stdout_lines) >= count)
        return list(self.stdout_lines)

    async def stop(self, sig: int | None = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """Send `sig` (None: none, the daemon is already stopping) and wait for the exit."""
        if self.process.returncode is None and sig is not None:
            self.process.send_signal(sig)
        async with asyncio.timeout(timeout_s):
            code = await self.process.wait()
            await asyncio.gather(*self.readers)
        return code


async def _pump(
    stream: asyncio.StreamReader,
    into: list[str],
    found: asyncio.Future[str] | None,
    changed: asyncio.Condition | None = None,
) -> None:
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip("\n")
        into.append(text)
        if changed is not None:
            async with changed:
                changed.notify_all()
        if found is not None and not found.done() and "listening on http://" in text:
            found.set_result(text.rsplit(" ", 1)[-1])


async def start_daemon(config_path: Path, *extra: str, timeout_s: float = 30.0) -> Daemon:
    """Start the CLI daemon and wait (bounded) until it says where it listens."""
    process = await asyncio.create_subprocess_exec(
        *relay_command(),
        "serve",
        "--config",
        str(config_path),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    assert process.stderr is not None
    daemon = Daemon(process)
    found: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    daemon.readers = [
        asyncio.create_task(
            _pump(process.stderr, daemon.stderr_lines, found, daemon.output_changed)
        ),
        asyncio.create_task(
            _pump(process.stdout, daemon.stdout_lines, None, daemon.output_changed)
        ),
    ]
    exited: asyncio.Future[int] = asyncio.ensure_future(process.wait())
    try:
        async with asyncio.timeout(timeout_s):
            waiters: list[asyncio.Future[Any]] = [found, exited]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
    if not found.done():
        await daemon.stop(signal.SIGKILL)
        raise AssertionError("the daemon did not start:\n" + "\n".join(daemon.stderr_lines))
    daemon.url = found.result()
    return daemon


async def run_cli(*args: str, timeout_s: float = 60.0) -> tuple[int, str, str]:
    """Run the CLI to completion; return (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        *relay_command(), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout_s):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def post(
    url: str, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + path, data=orjson.dumps(body), headers=headers if headers is not None else AUTH
        ) as response,
    ):
        return response.status, await response.json(content_type=None)


def install_node_client() -> Path:
    """npm ci from the committed lock file (once per checkout)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node, "node is needed for the Node client tests"
    assert npm, "npm is needed for the Node client tests"
    if not (NODE_DIR / "node_modules" / "@segment" / "analytics-node").is_dir():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return Path(node)


def requires(*tools: str) -> pytest.MarkDecorator:
    """Skip, saying why, where a system tool the test drives is missing. .ci/run installs
    them all (Debian packages), so in CI these tests always run."""
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(
        bool(missing), reason=f"needs {', '.join(missing)} (apt-get install; .ci/run does)"
    )


async def queue_pending(config: Path) -> int:
    """Messages in the queue of `config`, as `segment-relay status --json` reports them."""
    code, out, err = await run_cli("status", "--json", "--config", str(config))
    assert code == 0, err
    return int(orjson.loads(out)["pending"])
