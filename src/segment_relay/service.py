"""The composition root: builds the aiohttp app from a Config and runs it.

The store, the HTTP client session and the forwarder each live in one `cleanup_ctx` generator,
so teardown runs in reverse order and only for what started (style.md 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TextIO

import aiohttp
from aiohttp import web

from .config import Config
from .forward import DryRunSender, Forwarder, HttpSender, Sender
from .infinario import api_style
from .limits import ProjectLimits
from .mapping import MappingSettings
from .metrics import Metrics
from .receive import Receiver
from .session_timer import SessionTimer
from .sessions import SessionRules
from .store import Store

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", Metrics)
FORWARDER = web.AppKey("forwarder", Forwarder)
SESSION_TIMER = web.AppKey("session_timer", SessionTimer)
STOPPING = web.AppKey("stopping", asyncio.Event)
# Set when a task the relay cannot run without (the forwarder) died: serve() exits non-zero.
FATAL = web.AppKey("fatal", asyncio.Event)


def mapping_settings(config: Config) -> MappingSettings:
    """The mapping's view of the config."""
    m = config.mapping
    return MappingSettings(m.registered_id, m.cookie_id, m.context_fields)


def create_app(
    config: Config,
    *,
    dry_run: bool = False,
    dry_run_out: TextIO | None = None,
    clock: Callable[[], float] = time.time,
    forward: bool = True,
    session_timer: bool = True,
) -> web.Application:
    """The relay as an aiohttp app: Segment API, health endpoints, store and forwarder.

    `forward=False` builds a receiver only (the forwarder is not started), for tests that
    inspect the queue; `session_timer=False` leaves idle sessions to `SessionTimer.tick()`
    called by a test that drives the clock.
    """
    if not dry_run and forward:
        config.check_destination()
    app = web.Application(client_max_size=config.server.max_request_bytes)
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[STOPPING] = asyncio.Event()
    app[FATAL] = asyncio.Event()
    receiver = Receiver(config, app[METRICS], clock)
    receiver.add_routes(app)
    app.cleanup_ctx.append(functools.partial(_store_ctx, receiver=receiver))
    if config.sessions.enabled and session_timer:
        app.cleanup_ctx.append(functools.partial(_session_timer_ctx, clock=clock))
    if forward:
        sender = functools.partial(_sender, dry_run=dry_run, dry_run_out=dry_run_out, clock=clock)
        app.cleanup_ctx.append(functools.partial(_forwarder_ctx, sender=sender, clock=clock))
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    return app


async def _store_ctx(app: web.Application, *, receiver: Receiver) -> AsyncIterator[None]:
    config = app[CONFIG]
    q, s = config.queue, config.sessions
    app[STORE] = await Store.open(
        q.path,
        synchronous=q.synchronous,
        dedup_window_s=q.dedup_window_s,
        max_pending=q.max_pending,
        max_size=q.max_size,
        sessions=SessionRules.of(s.idle_timeout_s, s.event_types) if s.enabled else None,
    )
    receiver.store = app[STORE]
    log.info(
        "queue open at %s with %d messages pending",
        q.path,
        app[STORE].pending_count,
        extra={"action": "store_open"},
    )
    yield
    await app[STORE].close()
    log.info("queue closed", extra={"action": "store_closed"})


@contextlib.asynccontextmanager
async def _sender(
    app: web.Application,
    *,
    dry_run: bool,
    dry_run_out: TextIO | None,
    clock: Callable[[], float],
) -> AsyncIterator[Sender]:
    config = app[CONFIG]
    style = api_style(config.destination)
    if dry_run:
        yield DryRunSender(style, dry_run_out)
        return
    async with aiohttp.ClientSession() as session:
        yield HttpSender(session, style, config.destination, app[METRICS], clock)


async def _forwarder_ctx(
    app: web.Application,
    *,
    sender: Callable[[web.Application], contextlib.AbstractAsyncContextManager[Sender]],
    clock: Callable[[], float],
) -> AsyncIterator[None]:
    config = app[CONFIG]
    async with sender(app) as send:
        limits = ProjectLimits.from_names(await app[STORE].project_names())
        forwarder = Forwarder(
            app[STORE],
            send,
            config.destination,
            mapping_settings(config),
            app[METRICS],
            clock,
            limits,
        )
        app[FORWARDER] = forwarder
        async with _background(app, "forwarder", forwarder.run):
            yield


async def _session_timer_ctx(
    app: web.Application, *, clock: Callable[[], float]
) -> AsyncIterator[None]:
    timer = SessionTimer(app[STORE], clock)
    app[SESSION_TIMER] = timer
    # Sessions that went idle while the relay was down are closed before it serves.
    await timer.tick()
    async with _background(app, "session-timer", timer.run):
        yield


@contextlib.asynccontextmanager
async def _background(
    app: web.Application, name: str, run: Callable[[asyncio.Event], Coroutine[Any, Any, None]]
) -> AsyncIterator[None]:
    """Run `run(stop)` as a supervised task; on exit set `stop` and wait for it to finish."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(stop), name=name)
    task.add_done_callback(lambda t: _supervise(t, app[FATAL]))
    try:
        yield
    finally:
        stop.set()
        # A task that died was logged by _supervise; the rest of teardown still runs.
        with contextlib.suppress(Exception):
            await task


def _supervise(task: asyncio.Task[None], fatal: asyncio.Event) -> None:
    """A forwarder that dies takes the process down, so systemd restarts it cleanly."""
    if task.cancelled() or task.exception() is None:
        return
    log.critical(
        "the %s task died",
        task.get_name(),
        exc_info=task.exception(),
        extra={"action": "task_died"},
    )
    fatal.set()


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def _ready(request: web.Request) -> web.Response:
    app = request.app
    reasons = []
    if app[STOPPING].is_set():
        reasons.append("shutting down")
    if FORWARDER in app and app[FORWARDER].state.credentials_error:
        reasons.append(f"destination credentials refused: {app[FORWARDER].state.credentials_error}")
    if reasons:
        return web.json_response({"ready": False, "reasons": reasons}, status=503)
    return web.json_response({"ready": True})


async def serve(config: Config, *, dry_run: bool = False) -> int:
    """Run the relay until SIGTERM or SIGINT, then stop cleanly; return the exit code."""
    app = create_app(config, dry_run=dry_run)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(
            f"segment-relay: cannot listen on {config.server.host}:{config.server.port}: "
            f"{exc.strerror}"
        ) from exc
    host, port = runner.addresses[0][:2]
    # Tests and people read this line to learn the port (server.port: 0 picks a free one).
    print(f"segment-relay listening on http://{host}:{port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    stopped = asyncio.ensure_future(stop.wait())
    fatal = asyncio.ensure_future(app[FATAL].wait())
    await asyncio.wait([stopped, fatal], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    fatal.cancel()
    app[STOPPING].set()
    log.info("stopping", extra={"action": "stopping"})
    await runner.cleanup()
    log.info("stopped", extra={"action": "stopped"})
    return 1 if app[FATAL].is_set() else 0
