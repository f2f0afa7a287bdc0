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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from .activity import Activity
from .batching import durable_delay
from .config import DestinationConfig
from .debugger import DebugFeed
from .destination import Destination, State, Verdict
from .errors import MappingError, PermanentSendError, StoreError, TransientSendError
from .infinario import CommandResult, CredentialsError, Outcome, cut
from .limits import ProjectLimits
from .mapping import Command, MappingSettings, map_message
from .metrics import Metrics
from .queue.protocol import Queue, Retry
from .records import Failure, QueuedMessage
from .senders import Sender
from .throttle import Throttle

log = logging.getLogger(__name__)
Items = list[tuple[QueuedMessage, Command]]


@dataclass
class ForwarderState:
    """What /ready, `status`, /metrics and the watchdog read about the forwarder."""

    # The destination's state: up, down or paused (destination.py).
    destination: Destination
    # Why the queue could not be read (its database unreachable), until a read works again.
    queue_error: str | None = None
    # time.monotonic() of the run loop's latest turn: the watchdog pings only while it moves.
    heartbeat: float = field(default_factory=time.monotonic)
    # What was delivered, retried and dead-lettered since the last summary in the log.
    activity: Activity = field(default_factory=Activity)
    # Warnings a failing destination or bad messages could repeat for every batch: at most
    # one per kind every 10 s.
    warned: Throttle = field(default_factory=lambda: Throttle(WARN_EVERY_S))


WARN_EVERY_S = 10.0
_PAUSE_ADVICE = {
    "retry_after": "every lane waits {seconds:g}s, as the destination asked",
    "credentials": "check destination.api_key / api_secret / project_token, then reload "
    "(SIGHUP) to resume at once; it is tried again every {seconds:g}s",
    "configuration": "the destination refused every command of batches of different users "
    "alike: check destination.project_token and base_url, then reload (SIGHUP) to resume at "
    "once; nothing is dead-lettered, and it is tried again every {seconds:g}s",
}


def _refused_alike(results: list[CommandResult]) -> str | None:
    """The error every command was refused with, when it is the same for all (else None)."""
    if not results or any(r.outcome is not Outcome.ERROR for r in results):
        return None
    errors = {"; ".join(r.errors) for r in results}
    return (errors.pop() or "refused by the destination") if len(errors) == 1 else None


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

    async def _forward(self, batch: list[QueuedMessage], *, probe: int = 0) -> set[str]:
        """Send one batch (`probe`: the destination's probe, when it is not up) and write its
        outcome; return the users with a message left queued."""
        try:
            return await self._map_and_send(batch, probe)
        finally:
            self.state.destination.ended(probe)

    async def _map_and_send(self, batch: list[QueuedMessage], probe: int) -> set[str]:
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
        return await self._send(to_send, probe) if to_send else set()

    async def _send(self, items: Items, probe: int = 0, *, splitting: bool = False) -> set[str]:
        """Send one batch and write its outcome; return the users with a message left queued.
        (`splitting`: a half of a batch refused whole, see _split.)"""
        retry = self.config.retry
        commands = [c for _, c in items]
        self.metrics.batch_size.observe(len(commands))
        if self.feed is not None:
            for row, command in items:
                self.feed.sending(row.message_id, self.sender.style.render(command))
        sent_at = self.clock()
        # A probe of a destination down or paused is one request: its answer is the news.
        up = self.state.destination.state is State.UP
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(retry.quick_attempts if up else 1),
                wait=wait_random_exponential(
                    multiplier=retry.quick_initial_s, max=retry.quick_max_s
                ),
                retry=retry_if_exception(_transient),
                reraise=True,
            ):
                with attempt:
                    sent_at = self.clock()
                    self.metrics.commands_sent.inc(len(commands))
                    results = await self.sender.send(commands)
        except TransientSendError as exc:
            if exc.retry_after_s is not None:
                return self._pause(items, "retry_after", str(exc), exc.retry_after_s)
            return await self._failed(items, exc, sent_at, probe)
        except CredentialsError as exc:
            return self._pause(items, "credentials", str(exc), self.config.credentials_probe_s)
        except PermanentSendError as exc:
            return await self._refused_whole(items, exc, sent_at, splitting=splitting)
        taken = any(r.outcome is Outcome.OK for r in results)
        waiting = self._answered(items, sent_at, _refused_alike(results), taken=taken)
        return waiting if waiting is not None else await self._settle(items, results)

    async def _refused_whole(
        self, items: Items, exc: PermanentSendError, sent_at: float, *, splitting: bool
    ) -> set[str]:
        """A 4xx for the whole request: split as always (the bad command may be one of many),
        but the next batch of other users refused so pauses (a wrong base_url)."""
        if not splitting:
            error = f"{exc.status}: {exc.body}"
            waiting = self._answered(items, sent_at, error, taken=False, can_hold=False)
            if waiting is not None:
                return waiting
        return await self._split(items, exc)

    # --- the destination's state (destination.py) -----------------------------------------------

    async def _failed(
        self, items: Items, exc: TransientSendError, sent_at: float, probe: int
    ) -> set[str]:
        """A batch failed for the destination's state: an outage charges no message; a batch
        that failed while others went through backs its users off."""
        destination = self.state.destination
        was = destination.state
        users = frozenset(row.user_key for row, _ in items)
        if not destination.failed(sent_at, cut(str(exc), 500), users, probe, self.clock()):
            return await self._backoff(items, exc)
        if was is not State.DOWN:
            log.warning(
                "the destination is down: %s; one batch probes it after %gs (the interval "
                "doubling up to %gs), and no message is charged a retry meanwhile",
                exc,
                destination.probe_initial_s,
                destination.probe_max_s,
                extra={"action": "destination_down"},
            )
        return {row.user_key for row, _ in items}

    def _pause(self, items: Items, reason: str, error: str, seconds: float) -> set[str]:
        """Pause forwarding for `seconds` (then probe); the batch's messages stay as they are."""
        destination = self.state.destination
        now = self.clock()
        first = destination.state is not State.PAUSED or destination.reason != reason
        destination.pause(reason, cut(error, 500), now + seconds, now)
        if first:
            level = logging.WARNING if reason == "retry_after" else logging.ERROR
            log.log(
                level,
                "forwarding paused (%s): %s; %s",
                reason,
                error,
                _PAUSE_ADVICE[reason].format(seconds=seconds),
                extra={"action": "destination_paused", "reason": reason},
            )
        return {row.user_key for row, _ in items}

    def _answered(
        self,
        items: Items,
        sent_at: float,
        refused: str | None,
        *,
        taken: bool,
        can_hold: bool = True,
    ) -> set[str] | None:
        """Take in that the destination answered a batch sent at `sent_at` (`refused`: the
        error every command of it was refused with, None when not all alike; `taken`: a
        command was taken); return the batch's users when it is to wait (held, or forwarding
        paused), else None."""
        destination = self.state.destination
        now = self.clock()
        users = frozenset(row.user_key for row, _ in items)
        came_back = destination.answered(sent_at, users, now)
        if refused is not None:
            probe_s = self.config.credentials_probe_s
            commands = len(items) if can_hold else 1  # one command is never held
            verdict = destination.refused_alike(refused, users, commands, now, probe_s)
            if verdict is Verdict.PAUSE:
                return self._pause(items, "configuration", refused, probe_s)
            if verdict is Verdict.HOLD:
                return set(users)
        elif taken:
            came_back = destination.taken(now) or came_back
        if came_back is not None:
            log.info(
                "the destination is back after %.1fs; %d messages queued",
                came_back,
                self.store.pending_count,
                extra={"action": "destination_up"},
            )
        return None

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
        log.debug(
            "batch sent: %d acked, %d to retry, %d dead-lettered",
            len(acked),
            len(retry),
            len(dead),
            extra={"action": "batch_sent"},
        )
        return held

    async def _backoff(self, items: Items, exc: TransientSendError) -> set[str]:
        now = self.clock()
        retry = [
            (
                row,
                now + durable_delay(row.attempts + 1, self.config.retry),
                cut(str(exc), 500),
                True,
            )
            for row, _ in items
        ]
        self.metrics.commands_retried.labels("transient").inc(len(retry))
        if (held := self.state.warned.let_through("batch_retry")) is not None:
            log.warning(
                "batch of %d to be retried: %s%s",
                len(items),
                exc,
                f" ({held} more such batches since the last of these lines)" if held else "",
                extra={"action": "batch_retry"},
            )
        await self._write(retry=retry, now=now)
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
            await self._write(dead=[(row, failure)], now=self.clock())
            return set()
        middle = len(items) // 2
        held = await self._send(items[:middle], splitting=True)
        if self.state.destination.state is not State.UP:
            # The first half found the destination down or paused: the rest stays as it is.
            return held | {row.user_key for row, _ in items[middle:]}
        rest = [item for item in items[middle:] if item[0].user_key not in held]
        waiting = [item for item in items[middle:] if item[0].user_key in held]
        if waiting:
            await self._hold(waiting, self.clock(), "held behind an earlier message of its user")
        return held | await self._send(rest, splitting=True) if rest else held

    def _tell_dead(self, dead: Sequence[tuple[QueuedMessage, Failure]]) -> None:
        """Dead letters at WARNING with their reason, one line per reason every 10 s."""
        by_reason: dict[str, list[tuple[QueuedMessage, Failure]]] = {}
        for row, failure in dead:
            by_reason.setdefault(failure.reason, []).append((row, failure))
        for reason, rows in by_reason.items():
            held = self.state.warned.let_through(f"dead:{reason}")
            if held is None:
                continue
            row, failure = rows[0]
            log.warning(
                "%d messages dead-lettered (%s), %s: %s%s; see segment-relay dead-letters list",
                len(rows),
                reason,
                f"message {row.message_id}" + (" and others" if len(rows) > 1 else ""),
                failure.detail,
                f" ({held} more such writes since the last of these lines)" if held else "",
                extra={"action": "dead_lettered", "reason": reason, "count": len(rows)},
            )

    def _tell(
        self, delivered: int, retried: int, dead: Counter[str], *, last: bool = False
    ) -> None:
        """Count outcomes; once a summary interval has passed (or at the `last`), log what
        the interval saw."""
        activity = self.state.activity
        activity.add(delivered=delivered, retried=retried, dead_lettered=dead)
        if (summary := activity.flush() if last else activity.due()) is not None:
            log.info(str(summary), extra={"action": "forwarded", **summary.fields()})

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
        if dead:
            self._tell_dead(dead)
        self._tell(len(acked), len(retry), Counter(failure.reason for _, failure in dead))
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
