"""Helpers shared by the tests: configs, a relay on loopback, the CLI in a subprocess."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import yaml
from aiohttp import web

from segment_relay.config import Config, QueueConfig, parse_config
from segment_relay.queue import Queue, open_queue
from segment_relay.records import NewMessage
from segment_relay.service import create_app
from segment_relay.sessions import SessionRules
from segment_relay.testing import FakeInfinario

TESTS = Path(__file__).parent
CONFORMANCE = TESTS / "conformance"
NODE_DIR = TESTS / "node"
WRITE_KEY = "test-write-key"
T0 = "2024-03-01T12:00:00Z"
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
    merged = deep_merge(base, sections)
    if "url" in merged["queue"]:  # the PostgreSQL queue instead
        del merged["queue"]["path"]
    return merged


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


async def start_server(
    app: web.Application, port: int = 0, ssl_context: ssl.SSLContext | None = None
) -> Server:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context)
    await site.start()
    bound = int(runner.addresses[0][1])
    scheme = "https" if ssl_context is not None else "http"
    return Server(f"{scheme}://127.0.0.1:{bound}", bound, app, runner)


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

    async def wait_stderr(self, text: str, timeout_s: float = 20.0, count: int = 1) -> None:
        """Wait (bounded) until the daemon logged `count` lines containing `text`."""
        async with asyncio.timeout(timeout_s), self.output_changed:
            await self.output_changed.wait_for(
                lambda: sum(text in line for line in self.stderr_lines) >= count
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
        if found is not None and not found.done() and "listening on http" in text:
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


async def run_cli(
    *args: str,
    timeout_s: float = 60.0,
    cwd: Path | None = None,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    """Run the CLI to completion, from `cwd`, with `stdin` on a pipe and `env` added to the
    environment; return (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        *relay_command(),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    async with asyncio.timeout(timeout_s):
        out, err = await process.communicate(stdin)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def post(
    url: str, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + path, data=json.dumps(body), headers=headers if headers is not None else AUTH
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


async def send_with_node_client(
    node: Path, url: str, calls: list[Any], *node_options: str, timeout_s: float = 60.0
) -> None:
    """Send `calls` ([method, params] each) with @segment/analytics-node (tests/node/send.mjs)
    to the relay at `url`; fail with its stderr if a call reported an error."""
    process = await asyncio.create_subprocess_exec(
        str(node),
        *node_options,
        str(NODE_DIR / "send.mjs"),
        url,
        json.dumps(calls),
        WRITE_KEY,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout_s):
        _, err = await process.communicate()
    assert process.returncode == 0, err.decode()


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


# --- queue rows -------------------------------------------------------------------------------


def msg(
    n: int, user: str = "u", kind: str = "track", at: float = 1000.0, source: str = "s"
) -> NewMessage:
    """A call (messageId m<n>) as the receiver hands it to the queue."""
    return NewMessage(source, f"m{n}", user, kind, f'{{"n": {n}}}', at)


def page(n: int, user: str, event_time: str, at: float) -> NewMessage:
    """A page call (messageId p<n>) that drives sessions of a 60 s idle timeout."""
    message = {"type": "page", "messageId": f"p{n}", "anonymousId": user, "timestamp": event_time}
    activity = SessionRules.of(60, ["page"]).activity(message, "s", user, at)
    return NewMessage(
        "s", f"p{n}", user, "page", orjson.dumps(message).decode(), at, activity=activity
    )


# --- PostgreSQL ---------------------------------------------------------------------------------

# The server the PostgreSQL tests make their databases on (trust auth on 127.0.0.1).
POSTGRES_ADMIN_URL = os.environ.get(
    "SEGMENT_RELAY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# Set by .ci/run: a PostgreSQL test that cannot reach the server fails instead of skipping.
POSTGRES_REQUIRED = os.environ.get("SEGMENT_RELAY_REQUIRE_POSTGRES") == "1"
HOW_TO_ENABLE_POSTGRES = (
    "PostgreSQL is not reachable at "
    + POSTGRES_ADMIN_URL.split("@")[-1]
    + " (start it, e.g. `pg_ctlcluster --skip-systemctl-redirect 15 main start`, or point "
    "SEGMENT_RELAY_TEST_POSTGRES at a server where the user may create databases)"
)


def database_url(name: str) -> str:
    """The URL of database `name` on the test server."""
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


@contextlib.asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A new, empty database on the test server (dropped on exit); yields its URL.

    Skips, saying how to enable them, where the server cannot be reached, unless .ci/run made
    the PostgreSQL tests mandatory (SEGMENT_RELAY_REQUIRE_POSTGRES=1).
    """
    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        if POSTGRES_REQUIRED:
            raise AssertionError(f"{HOW_TO_ENABLE_POSTGRES}: {exc}") from exc
        pytest.skip(HOW_TO_ENABLE_POSTGRES)
    name = f"segment_relay_test_{os.getpid()}_{next(_DATABASES)}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield database_url(name)
    finally:
        # A new connection: a test may have restarted the server meanwhile.
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=30)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


_DATABASES = itertools.count()


@dataclass
class Backend:
    """Opens the queue under test (a contract test's `backend`): `kind` is "sqlite" (a file
    at `path`) or "postgres" (the database at `url`). What it opened is closed after the test."""

    kind: str
    path: Path | None = None
    url: str = ""
    opened: list[Queue] = field(default_factory=list)

    async def open(
        self,
        *,
        dedup_window_s: float = 86400.0,
        max_pending: int = 10_000_000,
        sessions: SessionRules | None = None,
        lease_s: float = 15.0,
    ) -> Queue:
        config = QueueConfig(
            path=str(self.path),
            url=self.url,
            dedup_window_s=dedup_window_s,
            max_pending=max_pending,
            lease_s=lease_s,
        )
        queue = await open_queue(config, sessions=sessions)
        self.opened.append(queue)
        return queue

    async def close_all(self) -> None:
        for queue in self.opened:
            with contextlib.suppress(Exception):
                await queue.close()


async def queue_two_calls(config: Path) -> None:
    """Two calls of one user accepted by a daemon on `config`, then stopped; with the
    destination down (127.0.0.1:9) and an hour's backoff they stay queued."""
    daemon = await start_daemon(config)
    try:
        for n in range(2):
            body = {"userId": "u", "event": "e", "messageId": f"m{n}", "timestamp": T0}
            assert (await post(daemon.url, "/v1/track", body))[0] == 200
    finally:
        assert await daemon.stop() == 0


def waiting_config(path: Path, queue_path: Path) -> Path:
    """A config whose destination is down, so that what the relay accepts stays queued."""
    return write_config(
        path,
        queue_path,
        "http://127.0.0.1:9",
        destination={"retry": {"backoff_initial": "1h", "backoff_max": "1h"}},
    )


# --- proxies and load balancers in front of relays (the documented configurations) -------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fenced_block(doc: Path, after: str) -> str:
    """The first fenced block of `doc` after the text `after`."""
    found = re.search(re.escape(after) + r".*?\n```\n(.*?)```", doc.read_text(), re.DOTALL)
    assert found, f"no configuration after {after!r} in {doc.name}"
    return found.group(1)


def nginx_command(tmp_path: Path, server: str) -> list[str]:
    """nginx in the foreground with `server` (a server block and its upstreams) as its site."""
    (tmp_path / "nginx.conf").write_text(
        f"daemon off;\npid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'};\n"
        f"events {{}}\nhttp {{\n    access_log off;\n    client_body_temp_path {tmp_path};\n"
        f"    proxy_temp_path {tmp_path};\n{server}}}\n"
    )
    return ["nginx", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)]


def haproxy_command(tmp_path: Path, config: str) -> list[str]:
    """HAProxy in the foreground with `config` (frontends and backends)."""
    (tmp_path / "haproxy.cfg").write_text(
        "global\n    maxconn 256\ndefaults\n    timeout connect 2s\n    timeout client 30s\n"
        f"    timeout server 30s\n\n{config}"
    )
    return ["haproxy", "-f", str(tmp_path / "haproxy.cfg"), "-db"]


@contextlib.asynccontextmanager
async def listening(command: list[str], port: int) -> AsyncIterator[None]:
    """`command` running until exit, once it takes connections on `port` (bounded wait)."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(20):
            while True:
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
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
