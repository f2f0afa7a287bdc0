"""aiohttp handlers for Segment's HTTP Tracking API (docs/api.md).

Every accepted call is committed to the queue before the 200 goes out. Every error is JSON
`{"success": false, "code", "message", "error"}`; capacity problems are 503 with Retry-After,
never 500.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
from aiohttp import web

from . import jsontext
from .config import Config, SourceConfig
from .debugger import DebugFeed
from .edge import Proxies
from .errors import StoreError, StoreFullError
from .metrics import Metrics
from .queue.protocol import Queue
from .records import NewMessage, Refusal
from .segment import (
    PATH_TYPES,
    BatchEnvelope,
    InvalidMessageError,
    parse_time,
    prepare,
    user_key,
)
from .throttle import Throttle

log = logging.getLogger(__name__)

BATCH_PATHS = ("/v1/batch", "/v1/b", "/v1/import", "/v1/import/")
RETRY_AFTER_S = 5
NO_KEY = "no known write key for this message"
# Requests refused whole are logged once per reason this often (with the count held back).
REFUSED_LOG_S = 10.0
Clock = Callable[[], float]


class ApiError(Exception):
    """An answer other than 200, as the JSON error body Segment's clients read."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def response(self) -> web.Response:
        body = {"success": False, "code": self.code, "message": self.message, "error": self.message}
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return web.json_response(body, status=self.status, headers=headers, dumps=_dumps)


STOPPING_ERROR = ApiError(503, "shutting_down", "the relay is stopping; retry later", RETRY_AFTER_S)


def add_fallback(app: web.Application) -> None:
    """Answer any other path, or another method, with a JSON error (404 or 405 with Allow)
    as the Segment endpoints answer theirs, instead of aiohttp's text. Added last, as a route
    of its own: a request that matches a real route never reaches it and pays nothing."""
    fallback: web.AbstractResource | None = None

    async def not_routed(request: web.Request) -> web.StreamResponse:
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource is not fallback:
                allowed |= (await resource.resolve(request))[1]
        if not allowed:
            return ApiError(404, "not_found", f"no endpoint at {request.path}").response()
        methods = ", ".join(sorted(allowed))
        answer = ApiError(
            405, "method_not_allowed", f"{request.method} {request.path}: use {methods}"
        ).response()
        answer.headers["Allow"] = methods
        return answer

    fallback = app.router.add_route("*", "/{path:.*}", not_routed).resource


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


SUCCESS = orjson.dumps({"success": True})


class Intake(NamedTuple):
    """What one request brought: the calls accepted, those refused (kept as dead letters),
    and the error to answer when nothing was accepted."""

    accepted: list[NewMessage]
    refused: list[Refusal]
    error: ApiError | None


@dataclass
class Receiver:
    """The Segment API handlers, bound to one config, store and clock."""

    config: Config
    metrics: Metrics
    clock: Clock = time.time
    # Set when the relay begins to stop: calls get 503 + Retry-After from then on.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # Attached when the store opens (at app start-up, after the routes are frozen).
    store: Queue = field(init=False)
    # The live debugger, when it is on.
    feed: DebugFeed | None = None

    def reload(self, config: Config) -> None:
        """Take new write keys (SIGHUP); limits and CORS stay as started."""
        self._sources = config.sources

    def __post_init__(self) -> None:
        self._sources = self.config.sources
        server = self.config.server
        self.proxies = Proxies(server.trusted_proxies, server.client_ip_header)
        # Labelled counters bound once: labels() takes a lock and hashes on every call.
        received = self.metrics.messages_received
        self._received = {k: received.labels(k) for k in {*PATH_TYPES.values(), "batch"}}
        self._refusals_logged = Throttle(REFUSED_LOG_S)

    # --- routes ---------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        """Register the Segment endpoints, their browser short forms and CORS preflight."""
        for name, kind in PATH_TYPES.items():
            app.router.add_post(f"/v1/{name}", self._single(kind, name))
            app.router.add_route("OPTIONS", f"/v1/{name}", self._endpoint(name, self.preflight))
        for path in BATCH_PATHS:
            app.router.add_post(path, self._endpoint(path, self.batch))
            app.router.add_route("OPTIONS", path, self._endpoint(path, self.preflight))

    def _single(
        self, kind: str, name: str
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self.single(request, kind)

        return self._endpoint(name, handle)

    def _endpoint(
        self, label: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        endpoint = label.removeprefix("/v1/").rstrip("/") or label

        counters: dict[int, Any] = {}  # status -> the labelled counter (labels() is slow)

        async def handle(request: web.Request) -> web.StreamResponse:
            if self.stopping.is_set():
                response: web.StreamResponse = STOPPING_ERROR.response()
            else:
                try:
                    response = await handler(request)
                except ApiError as exc:
                    if 400 <= exc.status < 500:
                        self._refused_request(request, endpoint, exc)
                    response = exc.response()
            counter = counters.get(response.status)
            if counter is None:
                counter = counters[response.status] = self.metrics.requests.labels(
                    endpoint, str(response.status)
                )
            counter.inc()
            self._cors(request, response)
            return response

        return handle

    def _refused_request(self, request: web.Request, endpoint: str, exc: ApiError) -> None:
        """Count a request refused whole and log it, once per reason every REFUSED_LOG_S."""
        self.metrics.requests_refused.labels(exc.code).inc()
        held = self._refusals_logged.let_through(exc.code)
        if held is None:
            return
        source = self.source_for(self._basic_key(request))
        log.warning(
            "refused a request to /v1/%s from %s (%s): %d %s: %s%s",
            endpoint,
            f"source {source.name}" if source else "an unknown source",
            request.remote,
            exc.status,
            exc.code,
            exc.message[:300],
            f" ({held} more refused for this reason since the last such line)" if held else "",
            extra={"action": "request_refused", "reason": exc.code},
        )

    # --- CORS -----------------------------------------------------------------------------------

    def _allowed_origin(self, origin: str | None) -> str | None:
        origins = self.config.server.cors_origins
        if "*" in origins:
            return origin or "*"
        return origin if origin in origins else None

    def _cors(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is None:
            return  # not a browser's cross-origin call: CORS headers would be ignored
        allowed = self._allowed_origin(origin)
        if allowed is None:
            return
        response.headers["Access-Control-Allow-Origin"] = allowed
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"
        if allowed != "*":
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Vary"] = "Origin"

    async def preflight(self, request: web.Request) -> web.StreamResponse:
        """Answer a CORS preflight; 403 for an origin that is not configured."""
        if (
            request.headers.get("Origin")
            and self._allowed_origin(request.headers["Origin"]) is None
        ):
            return ApiError(
                403, "origin_not_allowed", "this origin is not in server.cors_origins"
            ).response()
        response = web.Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = (
            "Content-Type, Authorization, X-Retry-Count"
        )
        response.headers["Access-Control-Max-Age"] = "86400"
        self._cors(request, response)
        return response

    # --- reading and authenticating -------------------------------------------------------------

    async def _read_json(self, request: web.Request, limit: int) -> Any:
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, "request_too_large", f"the request body is over {limit} bytes")
        # aiohttp inflates a gzip body as it streams in, so the limit bounds the inflated bytes
        # and a gzip bomb stops here instead of being inflated whole.
        chunks: list[bytes] = []
        size = 0
        while chunk := await _read_chunk(request):
            size += len(chunk)
            if size > limit:
                raise ApiError(
                    413, "request_too_large", f"the (inflated) request body is over {limit} bytes"
                )
            chunks.append(chunk)
        try:
            return jsontext.loads(b"".join(chunks))
        except jsontext.InvalidJSONError as exc:
            raise ApiError(
                400, "invalid_json", f"the request body is not valid JSON: {exc}"
            ) from exc

    def source_for(self, key: Any) -> SourceConfig | None:
        """The source whose write key is `key`, compared in constant time."""
        if not isinstance(key, str) or not key:
            return None
        found = None
        given = key.encode()
        for source in self._sources:
            if hmac.compare_digest(given, source.write_key.encode()):
                found = source
        return found

    @staticmethod
    def _basic_key(request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or not value:
            return None
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[0] or None

    def _request_source(self, request: web.Request, body: dict[str, Any]) -> SourceConfig | None:
        """The source named by the request (Basic auth, else `writeKey` in the body)."""
        key = self._basic_key(request) or body.get("writeKey")
        if key is None:
            return None
        source = self.source_for(key)
        if source is None:
            raise ApiError(401, "invalid_write_key", "the write key is not known to this relay")
        return source

    # --- handlers -------------------------------------------------------------------------------

    async def single(self, request: web.Request, kind: str) -> web.StreamResponse:
        """One call on /v1/<type>: stored whole (200) or refused whole (4xx, and kept as a
        dead letter when its source is known)."""
        # No local holds the parsed body: it is dropped before the wait for the commit.
        reading = self._read_json(request, self.config.server.max_request_bytes)
        await self._take(self._accept_single(request, kind, await reading))
        return web.Response(body=SUCCESS, content_type="application/json")

    def _accept_single(self, request: web.Request, kind: str, body: Any) -> Intake:
        self._received[kind].inc()
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_message", "the request body must be a JSON object")
        source = self._request_source(request, body)
        if source is None:
            raise ApiError(
                401, "missing_write_key", "no write key: use HTTP Basic auth or writeKey"
            )
        try:
            envelope = BatchEnvelope(client_ip=self.proxies.client(request.remote, request.headers))
            return Intake([self._accept(body, kind, envelope, source)], [], None)
        except InvalidMessageError as exc:
            refusal = self._refusal(body, kind, source, exc)
            if exc.reason == "too_large":
                return Intake([], [refusal], ApiError(413, "message_too_large", str(exc)))
            return Intake([], [refusal], ApiError(400, "invalid_message", str(exc)))

    async def batch(self, request: web.Request) -> web.StreamResponse:
        """A batch: valid messages are stored, invalid ones counted and logged."""
        # Only the encoded messages wait for the commit: no local holds the parsed body
        # (about ten dicts and lists per message), which is garbage once they are made.
        # Kept alive across the wait, 64 connections' batches were ~64,000 objects that
        # every pass of the cyclic GC walked (with the GC off, the loop's CPU per event fell
        # by a quarter).
        reading = self._read_json(request, self.config.server.max_request_bytes)
        await self._take(self._accept_batch(request, await reading))
        return web.Response(body=SUCCESS, content_type="application/json")

    def _accept_batch(self, request: web.Request, body: Any) -> Intake:
        server = self.config.server
        if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
            raise ApiError(400, "invalid_batch", 'the body must be an object with a "batch" list')
        items: list[Any] = body["batch"]
        self._received["batch"].inc(len(items))
        if len(items) > server.max_batch_messages:
            raise ApiError(
                400,
                "too_many_messages",
                f"the batch has {len(items)} messages; "
                f"at most {server.max_batch_messages} are accepted",
            )
        request_source = self._request_source(request, body)
        envelope = _envelope(body, self.proxies.client(request.remote, request.headers))
        accepted: list[NewMessage] = []
        refused: list[Refusal] = []
        problems: list[str] = []
        for index, item in enumerate(items):
            source = request_source
            if source is None and isinstance(item, dict):
                source = self.source_for(item.get("writeKey"))
            if source is None:
                self.metrics.messages_rejected.labels("no_write_key").inc()
                problems.append(f"batch[{index}]: {NO_KEY}")
                continue
            try:
                accepted.append(self._accept(item, None, envelope, source))
            except InvalidMessageError as exc:
                refused.append(self._refusal(item, None, source, exc))
                problems.append(f"batch[{index}]: {exc}")
        held = self._refusals_logged.let_through("messages") if problems else None
        if held is not None:
            log.warning(
                "refused %d of %d messages in a batch (kept as dead letters, see "
                "`segment-relay dead-letters list`): %s%s",
                len(problems),
                len(items),
                "; ".join(problems[:5]),
                f" ({held} more batches with refused messages since the last such line)"
                if held
                else "",
                extra={"action": "messages_rejected"},
            )
        if items and not accepted:
            if request_source is None and all(p.endswith(NO_KEY) for p in problems):
                raise ApiError(
                    401, "missing_write_key", "no write key: use HTTP Basic auth or writeKey"
                )
            return Intake([], refused, ApiError(400, "invalid_message", "; ".join(problems[:5])))
        return Intake(accepted, refused, None)

    def _accept(
        self, raw: Any, kind: str | None, envelope: BatchEnvelope, source: SourceConfig
    ) -> NewMessage:
        received_at = self.clock()
        limit = self.config.server.max_message_bytes
        enriched, encoded = prepare(raw, kind, received_at, envelope, limit)
        key = user_key(enriched)
        rules = self.store.session_rules
        activity = rules.activity(enriched, source.name, key, received_at) if rules else None
        return NewMessage(
            source=source.name,
            message_id=str(enriched["messageId"]),
            user_key=key,
            type=str(enriched["type"]),
            body=encoded.decode(),
            received_at=received_at,
            # Kept only for the debugger: otherwise only the encoded message (and what the
            # session rules need) wait for the commit.
            message=enriched if self.feed is not None else None,
            fresh_id=not raw.get("messageId"),
            activity=activity,
        )

    def _refusal(
        self, raw: Any, kind: str | None, source: SourceConfig, exc: InvalidMessageError
    ) -> Refusal:
        self.metrics.messages_rejected.labels(exc.reason).inc()
        limit = self.config.server.max_message_bytes
        return Refusal.of(
            raw,
            kind,
            source.name,
            self.clock(),
            reason=exc.reason,
            detail=str(exc),
            max_bytes=limit,
        )

    async def _take(self, intake: Intake) -> None:
        """Store what a request brought that was accepted, keep what was refused (both
        committed before the answer), then raise the request's error if it has one."""
        if intake.accepted:
            await self._store(intake.accepted)
        if intake.refused:
            try:
                await self.store.keep_refused(intake.refused)
            except StoreError as exc:
                if not intake.accepted:
                    raise _store_unavailable() from exc
                # The calls accepted with them are committed: a 503 would have the client
                # send those again (twice, for calls without a messageId).
                self.metrics.refusals_not_kept.inc(len(intake.refused))
                log.exception(
                    "%d refused messages could not be kept as dead letters",
                    len(intake.refused),
                    extra={"action": "refusals_not_kept"},
                )
                return
            if self.feed is not None:
                for refusal in intake.refused:
                    self.feed.refused(refusal)
        if intake.error is not None:
            raise intake.error

    async def _store(self, messages: list[NewMessage]) -> None:
        try:
            stored = await self.store.enqueue(messages)
        except StoreFullError as exc:
            log.warning("refusing calls: %s", exc, extra={"action": "backpressure"})
            raise ApiError(
                503, "queue_full", "the relay's queue is full; retry later", RETRY_AFTER_S
            ) from exc
        except StoreError as exc:
            raise _store_unavailable() from exc
        self.metrics.messages_stored.inc(stored)
        if self.feed is not None:
            for m in messages:
                self.feed.received(m.source, m.message or {})
        if stored < len(messages):
            self.metrics.messages_duplicate.inc(len(messages) - stored)


def _store_unavailable() -> ApiError:
    return ApiError(
        503, "store_unavailable", "the relay cannot store calls now; retry later", RETRY_AFTER_S
    )


async def _read_chunk(request: web.Request) -> bytes:
    try:
        return await request.content.readany()
    except Exception as exc:
        raise ApiError(
            400, "invalid_encoding", f"the request body cannot be decoded: {exc}"
        ) from exc


def _envelope(body: dict[str, Any], client_ip: str | None) -> BatchEnvelope:
    context = body.get("context")
    integrations = body.get("integrations")
    return BatchEnvelope(
        sent_at=parse_time(body.get("sentAt")),
        context=context if isinstance(context, dict) else None,
        integrations=integrations if isinstance(integrations, dict) else None,
        client_ip=client_ip,
    )
