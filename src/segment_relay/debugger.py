"""The live debugger: what each call became and where it is, as server-sent events.

The receiver reports the calls it stored, the forwarder the commands it sent and their
outcome; the feed keeps the latest `history` entries for a page that opens later and pushes
every new one to the open pages. Disabled (no feed), none of this costs anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import deque
from collections.abc import Iterable
from importlib import resources
from typing import Any

from aiohttp import web

from . import jsontext
from .edge import Proxies
from .records import Refusal

log = logging.getLogger(__name__)
QUEUE_LIMIT = 10_000  # entries a slow page may fall behind before it is dropped


class DebugFeed:
    """Recent debugger entries and the queues of the pages that watch them."""

    def __init__(self, history: int) -> None:
        self.history: deque[bytes] = deque(maxlen=history)
        self.watchers: set[asyncio.Queue[bytes]] = set()

    def publish(self, entry: dict[str, Any]) -> None:
        try:
            data = jsontext.dumps({**entry, "at": time.time()})
        except jsontext.InvalidJSONError:
            return  # a message refused for that very reason, too deep to show
        self.history.append(data)
        for queue in list(self.watchers):
            if queue.qsize() >= QUEUE_LIMIT:
                self.watchers.discard(queue)  # too slow: it reconnects and gets the history
            else:
                queue.put_nowait(data)

    def received(self, source: str, message: dict[str, Any]) -> None:
        entry = {"kind": "received", "id": message.get("messageId"), "source": source}
        self.publish({**entry, "message": message})

    def refused(self, refusal: Refusal) -> None:
        """A message refused at ingest, shown with its reason (never queued)."""
        try:
            message = jsontext.loads(refusal.body.encode())
        except jsontext.InvalidJSONError:  # cut at the size limit
            message = refusal.body
        self.publish(
            {
                "kind": "refused",
                "id": f"refused:{refusal.source}:{refusal.received_at}:{refusal.message_id}",
                "source": refusal.source,
                "message": message if isinstance(message, dict) else {"value": message},
                "reason": refusal.reason,
                "detail": refusal.detail,
            }
        )

    def sending(self, message_id: str, command: dict[str, Any]) -> None:
        self.publish({"kind": "command", "id": message_id, "command": command})

    def state(self, message_id: str, state: str, detail: str = "") -> None:
        self.publish({"kind": "state", "id": message_id, "state": state, "detail": detail})


def allowed(remote: str | None, networks: Iterable[str]) -> bool:
    """Whether a request from `remote` may open the debugger."""
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n, strict=False) for n in networks)


def add_routes(
    app: web.Application,
    feed: DebugFeed,
    allow: tuple[str, ...],
    stopping: asyncio.Event,
    proxies: Proxies,
) -> None:
    """GET /debugger (the page) and GET /debugger/events (the stream, ended on stopping);
    `allow` is checked against the client's address as `proxies` find it."""
    page = resources.files(__package__).joinpath("static/debugger.html").read_bytes()

    def refuse(request: web.Request) -> web.Response | None:
        if allowed(proxies.client(request.remote, request.headers), allow):
            return None
        message = "the debugger is open only to the addresses in debugger.allow"
        return web.json_response(
            {"success": False, "code": "forbidden", "message": message, "error": message},
            status=403,
        )

    async def show(request: web.Request) -> web.StreamResponse:
        return refuse(request) or web.Response(body=page, content_type="text/html")

    async def events(request: web.Request) -> web.StreamResponse:
        refused = refuse(request)
        if refused is not None:
            return refused
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        backlog = list(feed.history)
        feed.watchers.add(queue)
        try:
            for data in backlog:
                await response.write(b"data: " + data + b"\n\n")
            while not stopping.is_set():
                entry = await _next(queue, stopping)
                await response.write(
                    b": keep-alive\n\n" if entry is None else b"data: " + entry + b"\n\n"
                )
        except ConnectionResetError:
            return response  # the page went away
        finally:
            feed.watchers.discard(queue)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    app.router.add_get("/debugger", show)
    app.router.add_get("/debugger/events", events)


async def _next(queue: asyncio.Queue[bytes], stopping: asyncio.Event) -> bytes | None:
    """The next entry; None after 15 s without one (a keep-alive) or when stopping."""
    get = asyncio.ensure_future(queue.get())
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait([get, stop], timeout=15, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not get.done():
            get.cancel()
    return get.result() if get.done() and not get.cancelled() else None
