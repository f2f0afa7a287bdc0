"""The composition root: builds the aiohttp app from a Config and runs it.

The store, the session timer, the HTTP client session with the forwarder, and the watchdog
each live in one `cleanup_ctx` generator, so teardown runs in reverse order and only for what
started (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from aiohttp import web

from . import backfill, debugger, jsontext, ops, tls
from .appkeys import (
    CERTIFICATE,
    CONFIG,
    DEBUG_FEED,
    FATAL,
    FORWARDER,
    METRICS,
    NOTIFIER,
    RECEIVER,
    SESSION_TIMER,
    STOPPING,
    STORE,
)
from .config import DEV_WRITE_KEY, Config, build
from .debugger import DebugFeed
from .errors import ListenError, StoreError
from .forward import Forwarder
from .infinario import api_style
from .limits import ProjectLimits
from .mapping import mapping_settings
from .metrics import Metrics
from .notify import Notifier
from .queue import open_queue
from .receive import Receiver, add_fallback
from .senders import DryRunSender, HttpSender, Sender
from .session_timer import SessionTimer
from .sessions import SessionRules
from .testing import FakeInfinario
from .waiting import first_set

log = logging.getLogger(__name__)
# Where the relay listens: logged at every --log-level.
announced = logging.getLogger(f"{__name__}.listening")

MAINTENANCE_INTERVAL_S = 600.0
GC_YOUNG_THRESHOLD = 10_000

__all__ = ["FORWARDER", "METRICS", "SESSION_TIMER", "STORE", "create_app", "serve"]


def create_app(
    config: Config,
    *,
    dry_run: bool = False,
    dry_run_out: TextIO | None = None,
    clock: Callable[[], float] = time.time,
    forward: bool = True,
    session_timer: bool = True,
    environ: Mapping[str, str] | None = None,
) -> web.Application:
    """The relay as an aiohttp app: Segment API, operator endpoints, store and forwarder.

    `forward=False` builds a receiver only (the forwarder is not started): a receive-only
    relay (`queue.forward: false`), and tests that inspect the queue; `session_timer=False`
    leaves idle sessions to `SessionTimer.tick()` called by a test that drives the clock;
    `environ` is where systemd's NOTIFY_SOCKET and WATCHDOG_USEC are read (the process
    environment by default).
    """
    if not dry_run and forward:
        config.check_destination()
    app = web.Application(client_max_size=config.server.max_request_bytes)
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[STOPPING] = asyncio.Event()
    app[FATAL] = asyncio.Event()
    app[NOTIFIER] = Notifier(environ)
    app[RECEIVER] = Receiver(config, app[METRICS], clock, app[STOPPING])
    app[RECEIVER].add_routes(app)
    app.cleanup_ctx.append(functools.partial(_store_ctx, forwarding=forward))
    app.cleanup_ctx.append(functools.partial(_maintenance_ctx, clock=clock))
    if config.sessions.enabled and session_timer:
        app.cleanup_ctx.append(functools.partial(_session_timer_ctx, clock=clock))
    if forward:
        sender = functools.partial(_sender, dry_run=dry_run, dry_run_out=dry_run_out, clock=clock)
        app.cleanup_ctx.append(functools.partial(_forwarder_ctx, sender=sender, clock=clock))
    if config.server.admin_port is None:
        ops.add_routes(app, app)
    if config.debugger.enabled:
        app[DEBUG_FEED] = app[RECEIVER].feed = DebugFeed(config.debugger.history)
        debugger.add_routes(
            app, app[DEBUG_FEED], config.debugger.allow, app[STOPPING], app[RECEIVER].proxies
        )
    add_fallback(app)
    return app


async def _store_ctx(app: web.Application, *, forwarding: bool) -> AsyncIterator[None]:
    config = app[CONFIG]
    q, s = config.queue, config.sessions
    app[STORE] = await open_queue(
        q,
        sessions=SessionRules.of(s.idle_timeout_s, s.event_types) if s.enabled else None,
        session_cache=s.cache_size,
        forwarding=forwarding,
    )
    app[RECEIVER].store = app[STORE]
    log.info(
        "queue open at %s with %d messages pending",
        app[STORE].where,
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
        forwarder.grace_s = config.shutdown.grace_s
        forwarder.feed = app.get(DEBUG_FEED)
        watchdog_s = app[NOTIFIER].watchdog_s
        if watchdog_s is not None:
            forwarder.max_wait_s = watchdog_s / 4
        app[FORWARDER] = forwarder
        # Stopping begins with STOPPING: the forwarder stops claiming and drains first.
        async with (
            _background(app, "forwarder", forwarder.run, app[STOPPING]),
            _background(app, "imports", functools.partial(backfill.feed, app[STORE])),
        ):
            yield


async def _maintenance_ctx(
    app: web.Application, *, clock: Callable[[], float]
) -> AsyncIterator[None]:
    """Forget messageIds past the dedup window, at start and every 10 minutes."""

    async def prune(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                forgotten = await app[STORE].prune_dedup(clock())
            except StoreError as exc:
                log.warning("cannot prune message ids: %s", exc, extra={"action": "queue_down"})
                forgotten = 0
            if forgotten:
                log.info(
                    "forgot %d message ids past the dedup window",
                    forgotten,
                    extra={"action": "dedup_pruned"},
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), MAINTENANCE_INTERVAL_S)

    async with _background(app, "maintenance", prune):
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
    app: web.Application,
    name: str,
    run: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    stop: asyncio.Event | None = None,
) -> AsyncIterator[None]:
    """Run `run(stop)` as a supervised task; on exit set `stop` and wait for it to finish."""
    stop = stop or asyncio.Event()
    task = asyncio.create_task(run(stop), name=name)
    task.add_done_callback(functools.partial(_supervise, fatal=app[FATAL], stop=stop))
    try:
        yield
    finally:
        stop.set()
        # A task that died was logged by _supervise; the rest of teardown still runs.
        with contextlib.suppress(Exception):
            await task


def _supervise(task: asyncio.Task[None], *, fatal: asyncio.Event, stop: asyncio.Event) -> None:
    """A task that dies (or ends before it was told to) takes the process down, so systemd
    restarts it cleanly."""
    if task.cancelled() or (task.exception() is None and stop.is_set()):
        return
    log.critical(
        "the %s task died",
        task.get_name(),
        exc_info=task.exception(),
        extra={"action": "task_died"},
    )
    fatal.set()


async def serve(
    config: Config,
    *,
    dry_run: bool = False,
    reload_config: Callable[[], Config] | None = None,
    announce: Callable[[str], None] | None = None,
) -> int:
    """Run the relay until SIGTERM or SIGINT, then stop cleanly; return the exit code.

    Stopping: /ready and the Segment API answer 503 at once, the forwarder stops claiming and
    its batches in flight get `shutdown.grace` to finish, then open requests are answered and
    the listeners and the queue close. A second signal skips the grace period. SIGHUP
    applies what `reload_config` returns (the config file read again), when given.
    """
    certificate = tls.certificate(config.server)  # a bad pair stops here, before anything
    app = create_app(config, dry_run=dry_run, forward=config.queue.forward)
    if certificate is not None:
        app[CERTIFICATE] = certificate
    stop = _handle_signals(app, reload_config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    sites = [
        web.TCPSite(
            runner,
            config.server.host,
            config.server.port,
            ssl_context=certificate.context if certificate is not None else None,
        )
    ]
    admin: web.AppRunner | None = None
    if config.server.admin_port is not None:
        admin_app = web.Application()
        ops.add_routes(admin_app, app)
        add_fallback(admin_app)
        admin = web.AppRunner(admin_app, handle_signals=False, access_log=None)
        await admin.setup()
        sites.append(web.TCPSite(admin, config.server.admin_host, config.server.admin_port))
    try:
        for site in sites:
            await site.start()
    except OSError as exc:
        await _cleanup(runner, admin)
        raise ListenError(
            f"cannot listen on {site.name} (server.host, server.port or server.admin_port): "
            f"{exc.strerror}"
        ) from exc
    # What start-up made lives as long as the daemon: frozen, it is left out of the garbage
    # collector's full collections, which otherwise walk all of it (bench/sessions.py: 20-30
    # ms pauses, with sessions on every 2 s, doubled the p99). Almost everything a request
    # makes is freed by reference counting within a few thousand allocations, so the young
    # generation is collected after 10,000 (default 700: 500 collections, 0.2 s of an 8 s run).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    host, port = runner.addresses[0][:2]
    # Tests and people read this line to learn the port (server.port: 0 picks a free one); it
    # is logged whatever --log-level says (cli.logging_config).
    url = f"{'https' if certificate is not None else 'http'}://{host}:{port}"
    announced.info("segment-relay listening on %s", url, extra={"action": "listening", "url": url})
    if admin is not None:
        a_host, a_port = admin.addresses[0][:2]
        a_url = f"http://{a_host}:{a_port}"
        announced.info("segment-relay admin on %s", a_url, extra={"action": "admin", "url": a_url})
    if announce is not None:
        announce(url)
    app[NOTIFIER].ready(ops.status_line(app))
    pinging = asyncio.Event()
    watchdog = None
    if app[NOTIFIER].watchdog_s is not None:
        watchdog = asyncio.create_task(ops.watchdog(app, pinging), name="watchdog")
    await _until_stopped(app, stop)
    pinging.set()
    if watchdog is not None:
        await watchdog
    app[NOTIFIER].stopping(ops.status_line(app))
    await _cleanup(runner, admin)
    log.info("stopped", extra={"action": "stopped"})
    return 1 if app[FATAL].is_set() else 0


def _handle_signals(
    app: web.Application, reload_config: Callable[[], Config] | None
) -> asyncio.Event:
    """SIGTERM/SIGINT set the returned event (a signal only sets an event, docs/architecture.md);
    SIGHUP reloads. Installed before start-up, so no signal finds the default handler."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if reload_config is not None:
        loop.add_signal_handler(signal.SIGHUP, ops.reload, app, reload_config)
    return stop


async def _until_stopped(app: web.Application, stop: asyncio.Event) -> None:
    """Wait for SIGTERM/SIGINT (or a dead task), then drain the forwarder within the grace."""
    await first_set(stop, app[FATAL])
    log.info("stopping", extra={"action": "stopping"})
    app[STOPPING].set()
    forwarder = app.get(FORWARDER)
    if forwarder is not None:
        # A second signal: stop waiting for batches in flight (they stay queued).
        stop.clear()
        hurry = asyncio.ensure_future(stop.wait())
        drained = asyncio.ensure_future(forwarder.stopped())
        await asyncio.wait([hurry, drained], return_when=asyncio.FIRST_COMPLETED)
        if not drained.done():
            log.warning(
                "second signal: not waiting for batches in flight", extra={"action": "hurry"}
            )
            forwarder.grace_s = 0
            await forwarder.finish(0)
        for waiter in (hurry, drained):
            waiter.cancel()


async def _cleanup(runner: web.AppRunner, admin: web.AppRunner | None) -> None:
    if admin is not None:
        await admin.cleanup()
    await runner.cleanup()


def apart(config: Config, workdir: Path) -> Config:
    """`config` with a queue of its own in `workdir`: a dry run's or `dev`'s."""
    queue = replace(config.queue, url="", path=str(workdir / "queue.db"), forward=True)
    return replace(config, queue=queue)


async def dev(workdir: Path, *, port: int, fake: bool) -> int:
    """`segment-relay dev`: the relay on 127.0.0.1 with a throwaway queue in `workdir`,
    forwarding to a fake Infinario API in this process (`fake`) or printing (dry run)."""
    fake_runner: web.AppRunner | None = None
    base_url = "http://127.0.0.1:9"
    if fake:

        def show(command: dict[str, Any]) -> None:
            print("fake Infinario received:", jsontext.dumps(command).decode(), flush=True)

        fake_runner = web.AppRunner(FakeInfinario(on_command=show).app(), access_log=None)
        await fake_runner.setup()
        await web.TCPSite(fake_runner, "127.0.0.1", 0).start()
        base_url = f"http://127.0.0.1:{fake_runner.addresses[0][1]}"
    config = build(
        Config,
        {
            "server": {"host": "127.0.0.1", "port": port},
            "sources": [{"name": "dev", "write_key": DEV_WRITE_KEY}],
            "destination": {"base_url": base_url, "project_token": "TOKEN", "linger": "50ms"},
            "sessions": {"idle_timeout": "5m"},
            "debugger": {"enabled": True},
        },
        "",
    )
    config = apart(config, workdir)

    def announce(url: str) -> None:
        target = f"the fake Infinario API at {base_url}" if fake else "stdout (dry run)"
        api_host = url.removeprefix("http://")
        print(
            f"""
segment-relay dev: Segment API at {url}, write key {DEV_WRITE_KEY!r}, forwarding to {target}
queue (deleted on exit): {workdir / "queue.db"}
  Python   Client("{DEV_WRITE_KEY}", host="{url}")
  Node     new Analytics({{ writeKey: "{DEV_WRITE_KEY}", host: "{url}" }})
  Browser  AnalyticsBrowser.load({{ writeKey: "{DEV_WRITE_KEY}", cdnSettings: {{
             integrations: {{ "Segment.io": {{ apiKey: "{DEV_WRITE_KEY}",
             apiHost: "{api_host}/v1", protocol: "http" }} }} }} }})
  curl     curl -u {DEV_WRITE_KEY}: -d '{{"userId": "u1", "event": "Tried it"}}' {url}/v1/track
  debugger {url}/debugger
  status   {url}/ready  {url}/metrics
""",
            flush=True,
        )

    try:
        return await serve(config, dry_run=not fake, announce=announce)
    finally:
        if fake_runner is not None:
            await fake_runner.cleanup()
