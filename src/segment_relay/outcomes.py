"""One batch: map its rows, send the commands, write the outcome (docs/architecture.md). A
part of the Forwarder (forward.py), which decides what to send and when.

The outcome of every send is written in a task awaited through `asyncio.shield`, so
cancellation (SIGTERM) cannot lose an ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from .batching import durable_delay
from .config import DestinationConfig
from .debugger import DebugFeed
from .errors import MappingError, PermanentSendError, StoreError, TransientSendError
from .infinario import CommandResult, CredentialsError, Outcome, cut
from .limits import ProjectLimits
from .mapping import Command, MappingSettings, map_message
from .metrics import Metrics
from .queue.protocol import Queue, Retry
from .records import Failure, QueuedMessage
from .senders import Sender

log = logging.getLogger(__name__)
Items = list[tuple[QueuedMessage, Command]]


@dataclass
class ForwarderState:
    """What /ready and the watchdog read about the forwarder."""

    credentials_error: str | None = None
    # Why the queue could not be read (its database unreachable), until a read works again.
    queue_error: str | None = None
    paused_until: float = 0.0
    # time.monotonic() of the run loop's latest turn: the watchdog pings only while it moves.
    heartbeat: float = field(default_factory=time.monotonic)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, TransientSendError) and exc.retry_after_s is None


class Outcomes:
    """Sending one batch and writing what became of each of its messages."""

    store: Queue
    sender: Sender
    config: DestinationConfig
    mapping: MappingSettings
    metrics: Metrics
    clock: Callable[[], float]
    limits: ProjectLimits
    feed: DebugFeed | None
    state: ForwarderState
    _ids: dict[int, str]
    _prefetched: list[QueuedMessage]
    _retry_writes: int

    def _show(
        self,
        acked: Sequence[QueuedMessage],
        retry: Sequence[Retry],
        dead: Sequence[tuple[QueuedMessage, Failure]],
    ) -> None:
        """Tell the debugger where these messages are now."""
        assert self.feed is not None
        for row in acked:
            self.feed.state(self._ids.pop(row.seq, ""), "sent")
        for row, _, error, _ in retry:
            self.feed.state(self._ids.pop(row.seq, ""), "retrying", error)
        for row, failure in dead:
            self._ids.pop(row.seq, None)
            self.feed.state(row.message_id, "dead-lettered", f"{failure.reason}: {failure.detail}")

    async def _forward(self, batch: list[QueuedMessage]) -> set[str]:
        """Send one batch and write its outcome; return the users with a message left queued."""
        now = self.clock()
        if self.feed is not None:
            for row in batch:
                self._ids[row.seq] = row.message_id
                if row.type.startswith("session_") and row.attempts == 0:
                    self.feed.received(row.source, row.message)
        to_send: list[tuple[QueuedMessage, Command]] = []
        skipped: list[QueuedMessage] = []
        dead: list[tuple[QueuedMessage, Failure]] = []
        names: list[tuple[str, str]] = []
        for row in batch:
            try:
                command = map_message(row.message, self.mapping)
            except MappingError as exc:
                dead.append((row, Failure("mapping_error", str(exc))))
                continue
            if command is None:
                self.metrics.messages_skipped.labels(row.type).inc()
                skipped.append(row)
                continue
            if command.dropped_keys:
                self.metrics.dropped_keys.labels(command.event_type or "customer").inc(
                    command.dropped_keys
                )
            refusal, new_names = self.limits.admit(command)
            if refusal is not None:
                dead.append((row, Failure("project_limit", refusal)))
                continue
            names.extend(new_names)
            to_send.append((row, command))
        if (skipped or dead or names) and not await self._write(
            acked=skipped, dead=dead, names=names, now=now
        ):
            # Not written (the queue's database went away, or the lease passed to another
            # relay): nothing of these users is sent; their rows stay as they were.
            return {row.user_key for row in batch}
        # (New names are remembered before the send: two lanes cannot both take the last slot.)
        return await self._send(to_send) if to_send else set()

    async def _send(self, items: Items) -> set[str]:
        """Send one batch and write its outcome; return the users with a message left queued."""
        retry = self.config.retry
        commands = [c for _, c in items]
        self.metrics.batch_size.observe(len(commands))
        if self.feed is not None:
            for row, command in items:
                self.feed.sending(row.message_id, self.sender.style.render(command))
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(retry.quick_attempts),
                wait=wait_random_exponential(
                    multiplier=retry.quick_initial_s, max=retry.quick_max_s
                ),
                retry=retry_if_exception(_transient),
                reraise=True,
            ):
                with attempt:
                    self.metrics.commands_sent.inc(len(commands))
                    results = await self.sender.send(commands)
        except TransientSendError as exc:
            return await self._backoff(items, exc)
        except CredentialsError as exc:
            return await self._credentials_refused(items, exc)
        except PermanentSendError as exc:
            return await self._split(items, exc)
        self.state.credentials_error = None
        return await self._settle(items, results)

    async def _settle(self, items: Items, results: list[CommandResult]) -> set[str]:
        now = self.clock()
        acked: list[QueuedMessage] = []
        retry: list[Retry] = []
        dead: list[tuple[QueuedMessage, Failure]] = []
        held: set[str] = set()
        order_lost = 0
        for (row, _), result in zip(items, results, strict=True):
            if result.outcome is Outcome.OK:
                acked.append(row)
                # The destination took this one after asking to retry an earlier one of the
                # same user: that user's order is lost (never for customer updates, which
                # are not batched with their user's later commands).
                order_lost += row.user_key in held
            elif result.outcome is Outcome.RETRY:
                held.add(row.user_key)
                retry.append(
                    (
                        row,
                        now + self.config.retry.command_retry_s,
                        "destination asked to retry",
                        False,
                    )
                )
            else:
                detail = "; ".join(result.errors) or "refused by the destination"
                dead.append((row, Failure("rejected", detail)))
        self.metrics.commands_acked.inc(len(acked))
        self.metrics.order_lost.inc(order_lost)
        if retry:
            self.metrics.commands_retried.labels("command_retry").inc(len(retry))
        if not await self._write(acked=acked, retry=retry, dead=dead, now=now):
            # Delivered but not written down: the rows are sent again, so nothing of these
            # users may be sent before them.
            held |= {row.user_key for row, _ in items}
        log.info(
            "batch sent: %d acked, %d to retry, %d dead-lettered",
            len(acked),
            len(retry),
            len(dead),
            extra={"action": "batch_sent"},
        )
        return held

    async def _backoff(self, items: Items, exc: TransientSendError) -> set[str]:
        now = self.clock()
        if exc.retry_after_s is not None:
            # The limit is per client address: every lane waits, not only this batch.
            self.state.paused_until = max(
                self.state.paused_until, time.monotonic() + exc.retry_after_s
            )
        retry = []
        for row, _ in items:
            delay = durable_delay(row.attempts + 1, self.config.retry)
            if exc.retry_after_s is not None:
                delay = max(delay, exc.retry_after_s)
            retry.append((row, now + delay, cut(str(exc), 500), True))
        self.metrics.commands_retried.labels("transient").inc(len(retry))
        log.warning(
            "batch of %d to be retried: %s", len(items), exc, extra={"action": "batch_retry"}
        )
        await self._write(retry=retry, now=now)
        return {row.user_key for row, _ in items}

    async def _credentials_refused(self, items: Items, exc: CredentialsError) -> set[str]:
        now = self.clock()
        probe_s = self.config.credentials_probe_s
        self.state.credentials_error = str(exc)
        self.state.paused_until = time.monotonic() + probe_s
        log.error(
            "forwarding paused for %gs: %s", probe_s, exc, extra={"action": "credentials_refused"}
        )
        # Not an attempt: nothing is wrong with the messages.
        await self._hold(items, now + probe_s, str(exc))
        return {row.user_key for row, _ in items}

    async def _hold(self, items: Items, until: float, reason: str) -> None:
        retry = [(row, until, cut(reason, 500), False) for row, _ in items]
        await self._write(retry=retry, now=self.clock())

    async def _split(self, items: Items, exc: PermanentSendError) -> set[str]:
        """A 4xx for the whole request: halve the batch until the bad commands stand alone.

        The halves go in order; a user with a message left queued by the first half has its
        messages in the second half held back too, so per-user order holds.
        """
        if len(items) == 1:
            row, _ = items[0]
            failure = Failure("refused", str(exc), exc.status, exc.body)
            log.warning(
                "message %s dead-lettered: %s", row.message_id, exc, extra={"action": "dead_letter"}
            )
            await self._write(dead=[(row, failure)], now=self.clock())
            return set()
        middle = len(items) // 2
        held = await self._send(items[:middle])
        rest = [item for item in items[middle:] if item[0].user_key not in held]
        waiting = [item for item in items[middle:] if item[0].user_key in held]
        if waiting:
            await self._hold(waiting, self.clock(), "held behind an earlier message of its user")
        return held | await self._send(rest) if rest else held

    async def _write(
        self,
        *,
        acked: Sequence[QueuedMessage] = (),
        retry: Sequence[Retry] = (),
        dead: Sequence[tuple[QueuedMessage, Failure]] = (),
        names: Sequence[tuple[str, str]] = (),
        now: float,
    ) -> bool:
        """Write outcomes so that cancellation cannot lose them (docs/architecture.md); return
        whether all were written (not when the queue's database cannot be reached, nor for
        messages whose lease passed to another relay, which sends them again)."""
        for _, failure in dead:
            self.metrics.commands_dead.labels(failure.reason).inc()
        if self.feed is not None:
            self._show(acked, retry, dead)
        counters = {"delivered": len(acked), "retried": len(retry), "dead_lettered": len(dead)}
        settle = self.store.settle(
            acked=acked,
            retry=retry,
            dead=dead,
            names=names,
            now=now,
            counters={k: v for k, v in counters.items() if v},
        )
        if retry:
            self._retry_writes += 1
        task = asyncio.ensure_future(settle)
        try:
            fenced = await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await task
            raise
        except StoreError as exc:
            # The queue's database went away: these messages stay queued as they were and
            # are sent again (at least once), in their users' order, after what was read.
            self._prefetched = []
            log.warning(
                "the outcome of %d messages could not be written, they will be sent again: %s",
                len(acked) + len(retry) + len(dead),
                exc,
                extra={"action": "outcome_not_written"},
            )
            return False
        finally:
            if retry:
                # Once written: an earliest retry read meanwhile may not know these.
                self._retry_writes += 1
        return fenced == 0
