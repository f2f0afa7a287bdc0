"""How a batch of commands goes out: over HTTP to the destination, or printed (--dry-run)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TextIO

import aiohttp

from . import jsontext
from .config import DestinationConfig
from .errors import TransientSendError
from .infinario import ApiStyle, CommandResult, Outcome
from .mapping import Command
from .metrics import Metrics

Clock = Callable[[], float]


class Sender(Protocol):
    """Sends one batch of commands; returns one result per command or raises a SendError."""

    style: ApiStyle

    async def send(self, commands: Sequence[Command]) -> list[CommandResult]: ...

    def reload(self, style: ApiStyle, config: DestinationConfig) -> None: ...


class HttpSender:
    """Sends batches to the configured Infinario-style API over HTTP."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        style: ApiStyle,
        config: DestinationConfig,
        metrics: Metrics,
        clock: Clock = time.time,
    ) -> None:
        self.session = session
        self.style = style
        self.timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self.metrics = metrics
        self.clock = clock

    def reload(self, style: ApiStyle, config: DestinationConfig) -> None:
        self.style = style
        self.timeout = aiohttp.ClientTimeout(total=config.timeout_s)

    async def send(self, commands: Sequence[Command]) -> list[CommandResult]:
        request = self.style.request(commands)
        started = time.perf_counter()
        try:
            async with self.session.post(
                request.url, data=request.body, headers=request.headers, timeout=self.timeout
            ) as response:
                body = await response.read()
                status, headers = response.status, response.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientSendError(
                f"cannot reach the destination: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            self.metrics.send_seconds.observe(time.perf_counter() - started)
        return self.style.outcomes(status, headers, body, len(commands), self.clock())


class DryRunSender:
    """Prints each command it would send as one JSON line, and reports it accepted."""

    def __init__(self, style: ApiStyle, out: TextIO | None = None) -> None:
        self.style = style
        self.out = out or sys.stdout

    def reload(self, style: ApiStyle, config: DestinationConfig) -> None:
        self.style = style

    async def send(self, commands: Sequence[Command]) -> list[CommandResult]:
        for command in commands:
            self.out.write(jsontext.dumps(self.style.render(command)).decode() + "\n")
        self.out.flush()
        return [CommandResult(Outcome.OK) for _ in commands]
