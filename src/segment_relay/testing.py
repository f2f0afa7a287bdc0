"""A fake Infinario-style API on 127.0.0.1, for tests and local development.

It speaks both API styles of docs/api.md, validates every command's shape as the real
API would (a malformed command gets a per-command error), records the commands it accepted,
and can be scripted: per-command `retry`/`error`, whole-request statuses (429, 5xx, 4xx) with
headers, and delays.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hmac
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import jsontext

LEGACY_NAMES = ("crm/customers", "crm/events")
V2_NAMES = ("customers", "customers/events")


@dataclass
class Reply:
    """How the fake answers one request.

    `status` other than 200 answers the whole request (with `body` and `headers`);
    `commands` gives per-command statuses by position (`ok`, `retry`, `error`), the rest `ok`.
    `drop` closes the connection after `delay_s` without processing the request, as a server
    that stalled or reset would (the client sees a timeout or a reset).
    """

    status: int = 200
    commands: list[str] = field(default_factory=list)
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    drop: bool = False


@dataclass
class Received:
    """One request as the fake saw it."""

    path: str
    headers: dict[str, str]
    commands: list[dict[str, Any]]
    reply_status: int
    results: list[dict[str, Any]]
    # time.monotonic() when the fake answered (or dropped) the request.
    at: float = 0.0


def _ids_ok(ids: Any) -> bool:
    return (
        isinstance(ids, dict)
        and bool(ids)
        and all(isinstance(k, str) and isinstance(v, str) and v for k, v in ids.items())
    )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def legacy_problems(command: Any, token_field: str, token: str) -> list[str]:
    """What is wrong with one legacy `/bulk` command (empty when it is well formed)."""
    if not isinstance(command, dict) or command.get("name") not in LEGACY_NAMES:
        return [f"unknown command name, expected one of {LEGACY_NAMES}"]
    data = command.get("data")
    if not isinstance(data, dict):
        return ["data must be an object"]
    problems = []
    if data.get(token_field) != token:
        problems.append(f"{token_field} is missing or not this project's token")
    if not isinstance(data.get("properties"), dict):
        problems.append("properties must be an object")
    if command["name"] == "crm/customers":
        if not _ids_ok(data.get("ids")):
            problems.append("ids must be a non-empty object of string ids")
    else:
        if not _ids_ok(data.get("customer_ids")):
            problems.append("customer_ids must be a non-empty object of string ids")
        if not isinstance(data.get("type"), str) or not data["type"]:
            problems.append("type must be a non-empty string")
        if not _number(data.get("timestamp")):
            problems.append("timestamp must be a number of Unix seconds")
    return problems


def v2_problems(command: Any) -> list[str]:
    """What is wrong with one v2 batch command (empty when it is well formed)."""
    if not isinstance(command, dict) or command.get("name") not in V2_NAMES:
        return [f"unknown command name, expected one of {V2_NAMES}"]
    data = command.get("data")
    if not isinstance(data, dict):
        return ["data must be an object"]
    problems = []
    if not isinstance(command.get("command_id"), str):
        problems.append("command_id must be a string")
    if not _ids_ok(data.get("customer_ids")):
        problems.append("customer_ids must be a non-empty object of string ids")
    if not isinstance(data.get("properties"), dict):
        problems.append("properties must be an object")
    if command["name"] == "customers":
        if "update_timestamp" in data and not _number(data["update_timestamp"]):
            problems.append("update_timestamp must be a number")
    else:
        if not isinstance(data.get("event_type"), str) or not data["event_type"]:
            problems.append("event_type must be a non-empty string")
        if not _number(data.get("timestamp")):
            problems.append("timestamp must be a number of Unix seconds")
    return problems


def random_faults(
    rng: random.Random, *, retry: int = 12, error: int = 8, drop_delay_s: float = 0.3
) -> Callable[[list[Any]], Reply]:
    """A responder failing at random: 8% 500, 4% 429 (Retry-After: 0), 3% a stalled and
    dropped request, and otherwise per-command `retry` and `error` at the given percentages."""

    def respond(commands: list[Any]) -> Reply:
        roll = rng.random()
        if roll < 0.08:
            return Reply(status=500)
        if roll < 0.12:
            return Reply(status=429, headers={"Retry-After": "0"})
        if roll < 0.15:
            return Reply(drop=True, delay_s=drop_delay_s)
        weights = [100 - retry - error, retry, error]
        return Reply(commands=[rng.choices(["ok", "retry", "error"], weights)[0] for _ in commands])

    return respond


class FakeInfinario:
    """The fake API: an aiohttp app plus what it received and what it will answer."""

    def __init__(
        self,
        *,
        token: str = "TOKEN",
        token_field: str = "project_id",
        api_key: str = "KEY",
        api_secret: str = "",
        on_command: Callable[[dict[str, Any]], None] | None = None,
        record: bool = True,
    ) -> None:
        self.token = token
        self.token_field = token_field
        self.api_key = api_key
        self.api_secret = api_secret
        self.on_command = on_command
        # False keeps only counts (long benchmarks), not every request and command.
        self.record = record
        self.accepted_count = 0
        self.script: collections.deque[Reply] = collections.deque()
        # Called with the request's commands when the script is empty; None answers all ok.
        self.responder: Callable[[list[Any]], Reply] | None = None
        # When set to an unset Event, requests wait for it before they are answered.
        self.gate: asyncio.Event | None = None
        self.held = 0  # requests that have waited at the gate
        self.held_commands: list[dict[str, Any]] = []  # their commands
        self.requests: list[Received] = []
        self.accepted: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    # --- the app --------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/bulk", self._bulk)
        app.router.add_post("/track/v2/projects/{token}/batch", self._v2)
        return app

    async def _bulk(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(
            request, lambda c: legacy_problems(c, self.token_field, self.token), legacy=True
        )

    async def _v2(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return await self._refuse(request, 404, "project not found")
        if not self._authorized(request.headers.get("Authorization", "")):
            return await self._refuse(request, 401, "invalid credentials")
        return await self._handle(request, v2_problems, legacy=False)

    async def _refuse(self, request: web.Request, status: int, message: str) -> web.StreamResponse:
        await self._record(Received(request.path, dict(request.headers), [], status, []), [])
        return web.json_response({"success": False, "message": message}, status=status)

    def _authorized(self, header: str) -> bool:
        if self.api_secret:
            expected = (
                "Basic " + base64.b64encode(f"{self.api_key}:{self.api_secret}".encode()).decode()
            )
        else:
            expected = f"Token {self.api_key}"
        return hmac.compare_digest(header.encode(), expected.encode())

    async def _handle(
        self, request: web.Request, check: Callable[[Any], list[str]], *, legacy: bool
    ) -> web.StreamResponse:
        try:
            payload = jsontext.loads(await request.read())
        except jsontext.InvalidJSONError:
            return web.json_response({"success": False, "message": "body is not JSON"}, status=400)
        commands = payload.get("commands") if isinstance(payload, dict) else None
        if not isinstance(commands, list):
            return web.json_response(
                {"success": False, "message": "commands must be a list"}, status=400
            )
        reply = (
            self.script.popleft()
            if self.script
            else (self.responder(commands) if self.responder else Reply())
        )
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if self.gate is not None and not self.gate.is_set():
            async with self._changed:
                self.held += 1
                self.held_commands.extend(commands)
                self._changed.notify_all()
            await self.gate.wait()
        headers = dict(request.headers)
        if reply.drop:
            await self._record(Received(request.path, headers, commands, 0, []), [])
            if request.transport is not None:
                request.transport.close()
            # Nothing reaches the client: its transport is closed.
            return web.Response(status=500)
        if reply.status != 200:
            body = (
                reply.body
                if reply.body is not None
                else {"success": False, "message": "scripted failure"}
            )
            await self._record(Received(request.path, headers, commands, reply.status, []), [])
            return web.json_response(body, status=reply.status, headers=reply.headers)
        results: list[dict[str, Any]] = []
        accepted: list[dict[str, Any]] = []
        for i, command in enumerate(commands):
            wanted = reply.commands[i] if i < len(reply.commands) else "ok"
            problems = check(command)
            if problems:
                wanted = "error"
            if wanted == "ok":
                accepted.append(command)
            results.append(self._result(wanted, problems or ["scripted error"], legacy))
        await self._record(Received(request.path, headers, commands, 200, results), accepted)
        return web.json_response({"success": True, "results": results}, headers=reply.headers)

    @staticmethod
    def _result(wanted: str, problems: list[str], legacy: bool) -> dict[str, Any]:
        if legacy:
            if wanted == "error":
                return {"status": "error", "errors": problems}
            return {"status": wanted}
        if wanted == "ok":
            return {"success": True}
        if wanted == "retry":
            # v2 has no retry status; a result without `success` reads as "not processed".
            return {"retry": True}
        return {"success": False, "errors": problems}

    async def _record(self, received: Received, accepted: list[dict[str, Any]]) -> None:
        received.at = time.monotonic()
        async with self._changed:
            self.accepted_count += len(accepted)
            if self.record:
                self.requests.append(received)
                self.accepted.extend(accepted)
            if self.on_command:
                for command in accepted:
                    self.on_command(command)
            self._changed.notify_all()

    # --- waiting, for tests ---------------------------------------------------------------------

    async def wait_for(
        self, predicate: Callable[[FakeInfinario], bool], timeout_s: float = 20.0
    ) -> None:
        """Wait until `predicate(self)` holds after a request; TimeoutError after `timeout_s`."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def wait_for_commands(self, count: int, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        """Wait until at least `count` commands were accepted; return them all."""
        await self.wait_for(lambda fake: len(fake.accepted) >= count, timeout_s)
        return list(self.accepted)


async def run_fake(
    host: str, port: int, fake: FakeInfinario, started: Callable[[int], None]
) -> None:
    """Run the fake API until cancelled (the CLI's `fake-infinario`)."""
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    started(int(runner.addresses[0][1]))
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
