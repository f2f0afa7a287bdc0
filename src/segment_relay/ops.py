"""What operators talk to: /health, /ready, /metrics, the systemd watchdog, and SIGHUP reload."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .appkeys import CERTIFICATE, CONFIG, FORWARDER, METRICS, NOTIFIER, RECEIVER, STOPPING, STORE
from .config import Config
from .destination import PAUSE_REASONS, State
from .errors import ConfigError, StoreError
from .records import DEAD_LETTER_REASONS

log = logging.getLogger(__name__)

# Why /ready answers 503 while forwarding is paused (a Retry-After pause is short and normal).
_PAUSED = {
    "credentials": "destination credentials refused, forwarding paused",
    "configuration": "the destination refuses every command alike (check destination.*), "
    "forwarding paused",
}
# Sections SIGHUP applies; a change to the others needs a restart.
RELOADABLE = ("sources", "destination", "mapping")
FIXED = ("server", "queue", "sessions", "shutdown", "debugger")


def add_routes(app: web.Application, relay: web.Application) -> None:
    """Serve the operator endpoints of `relay` on `app` (the relay itself or its admin app)."""

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def ready(request: web.Request) -> web.Response:
        reasons = not_ready(relay)
        destination = {"destination": destination_report(relay)}
        if reasons:
            return web.json_response(
                {"ready": False, "reasons": reasons, **destination}, status=503
            )
        return web.json_response({"ready": True, **destination})

    async def metrics(request: web.Request) -> web.Response:
        with contextlib.suppress(StoreError):  # the queue's gauges keep their last values
            await refresh_gauges(relay)
        body = generate_latest(relay[METRICS].registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)


def not_ready(app: web.Application) -> list[str]:
    """Why the relay cannot accept and forward now (empty when it can)."""
    reasons = []
    if app[STOPPING].is_set():
        reasons.append("shutting down")
    if STORE not in app:
        reasons.append("the queue is not open")
    elif problem := app[STORE].unavailable:
        reasons.append(problem)
    if FORWARDER in app:
        destination = app[FORWARDER].state.destination
        if destination.state is State.PAUSED and destination.reason in _PAUSED:
            reasons.append(f"{_PAUSED[destination.reason]}: {destination.last_error}")
    return reasons


def destination_report(app: web.Application) -> dict[str, Any] | None:
    """The destination's state as /ready shows it (None: no forwarder)."""
    if FORWARDER not in app:
        return None
    forwarder = app[FORWARDER]
    return forwarder.state.destination.report(forwarder.clock())


async def refresh_gauges(app: web.Application) -> None:
    """Read the queue's state into the gauges, at scrape time."""
    metrics, store = app[METRICS], app.get(STORE)
    if store is None:
        return
    now = time.time()
    stats = await store.stats(now)
    metrics.queue_depth.set(stats.pending)
    metrics.queue_oldest_age.set(
        0 if stats.oldest_received_at is None else now - stats.oldest_received_at
    )
    metrics.queue_in_backoff.set(stats.in_backoff)
    for reason in {*DEAD_LETTER_REASONS, *stats.dead_letters}:
        metrics.dead_letters.labels(reason).set(stats.dead_letters.get(reason, 0))
    if (destination := destination_report(app)) is not None:
        for state in State:
            metrics.destination_state.labels(str(state)).set(state == destination["state"])
        for reason in PAUSE_REASONS:
            metrics.destination_paused.labels(reason).set(reason == destination["reason"])
        metrics.destination_state_seconds.set(destination["for_s"])
        metrics.destination_next_probe_seconds.set(destination["next_probe_in_s"] or 0)
    open_sessions, _ = await store.session_stats()
    metrics.sessions_open.set(open_sessions)
    metrics.sessions_started.set(store.sessions_started)
    metrics.sessions_ended.set(store.sessions_ended)
    metrics.session_commits.set(store.session_commits)
    metrics.session_commits_read.set(store.session_commits_read)


def status_line(app: web.Application) -> str:
    """The STATUS= text systemd shows: queue depth, and why not ready."""
    depth = app[STORE].pending_count if STORE in app else 0
    reasons = not_ready(app)
    return f"{depth} messages queued" + (f"; not ready: {'; '.join(reasons)}" if reasons else "")


def forwarder_alive(app: web.Application) -> bool:
    """The forwarder's loop turned within the watchdog interval (or there is none)."""
    notifier = app[NOTIFIER]
    if FORWARDER not in app or notifier.watchdog_s is None:
        return True
    return time.monotonic() - app[FORWARDER].state.heartbeat < notifier.watchdog_s


async def watchdog(app: web.Application, stop: asyncio.Event) -> None:
    """Ping systemd's watchdog at half its interval while the loop and the forwarder live.

    The pings come from this coroutine, so a blocked event loop stops them; a forwarder
    whose loop stopped turning (wedged) stops them too, and systemd restarts the relay.
    """
    notifier = app[NOTIFIER]
    assert notifier.watchdog_s is not None
    while not stop.is_set():
        if forwarder_alive(app):
            notifier.watchdog(status_line(app))
        else:
            log.error(
                "the forwarder is not moving: watchdog pings stopped",
                extra={"action": "watchdog_withheld"},
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), notifier.watchdog_s / 2)


def reload(app: web.Application, load: Callable[[], Config]) -> list[str]:
    """Apply the reloadable keys of the config `load` reads (SIGHUP); return what changed.

    Write keys, destination settings and mapping names change in place. Other sections keep
    what is running, with a warning naming those that differ from it and need a restart (a
    file changed back warns no more). A bad file changes nothing.
    """
    old: Config = app[CONFIG]
    if CERTIFICATE in app:
        # The same files, rotated (certbot), whatever the config file says; new paths need a
        # restart.
        app[CERTIFICATE].reload()
    try:
        loaded = load()
        # What runs of the sections that need a restart stays (checked again together), so
        # the checks see the running queue.forward: a receive-only relay has no forwarder but
        # takes calls all the same.
        new = replace(loaded, **{name: getattr(old, name) for name in FIXED})
        new.check_serving(dry_run=FORWARDER in app and not app[FORWARDER].sends)
    except ConfigError as exc:
        log.error(  # noqa: TRY400 - the message names the bad key; no traceback needed
            "reload refused, the running config stays: %s", exc, extra={"action": "reload_failed"}
        )
        return []
    changed = [name for name in RELOADABLE if getattr(old, name) != getattr(new, name)]
    fixed = [name for name in FIXED if getattr(old, name) != getattr(loaded, name)]
    if fixed:
        log.warning(
            "reload: %s changed and need a restart; the running values stay until then",
            ", ".join(fixed),
            extra={"action": "reload_partial"},
        )
    app[CONFIG] = new
    app[RECEIVER].reload(new)
    if FORWARDER in app:
        app[FORWARDER].reload(new)
    log.info("reloaded: %s", ", ".join(changed) or "nothing changed", extra={"action": "reloaded"})
    return changed
