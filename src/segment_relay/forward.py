"""The forwarder: claim -> map -> batch -> send -> ack / retry / dead-letter.

Up to `destination.concurrency` batches are in flight, each holding a disjoint set of users, so
a user's messages leave in acceptance order. This module decides what to send and when;
outcomes.py sends one batch and writes its outcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from . import jsontext
from .batching import Coverage, Selection, select_batch
from .config import Config, DestinationConfig
from .debugger import DebugFeed
from .destination import Destination, State
from .errors import StoreError
from .infinario import api_style
from .limits import ProjectLimits
from .mapping import MappingSettings, mapping_settings
from .metrics import Metrics
from .outcomes import ForwarderState, Outcomes
from .queue.protocol import Queue
from .records import Failure, QueuedMessage
from .senders import HttpSender, Sender
from .waiting import first_set

log = logging.getLogger(__name__)
Clock = Callable[[], float]
IDLE_POLL_S = 5.0
# How soon the forwarder tries again when the queue's database cannot be reached.
QUEUE_RETRY_S = 1.0


class Forwarder(Outcomes):
    """Moves messages from the queue to the destination until stopped."""

    def __init__(
        self,
        store: Queue,
        sender: Sender,
        config: DestinationConfig,
        mapping: MappingSettings,
        metrics: Metrics,
        clock: Clock = time.time,
        limits: ProjectLimits | None = None,
    ) -> None:
        self.store = store
        self.limits = limits or ProjectLimits()
        # Longest wait between turns of run() (set when a watchdog needs a heartbeat).
        self.max_wait_s: float | None = None
        # How long batches in flight may take to finish when run() stops.
        self.grace_s: float | None = None
        # The live debugger, when it is on; seq -> messageId of the messages it follows.
        self.feed: DebugFeed | None = None
        self._ids: dict[int, str] = {}
        self.sender = sender
        self.config = config
        self.mapping = mapping
        self.metrics = metrics
        self.clock = clock
        self.state = ForwarderState(
            Destination(config.probe_initial_s, config.probe_max_s, since=clock())
        )
        self._busy_users: set[str] = set()
        self._tasks: set[asyncio.Task[set[str]]] = set()
        self._slot_free = asyncio.Event()
        # Set by reload(): a wait for a pause or the rate limit ends at once.
        self._reloaded = asyncio.Event()
        self._next_send_at = 0.0
        self._crashed: BaseException | None = None
        self._dispatching = asyncio.Lock()
        self._stopped = asyncio.Event()
        # (until, queue depth then, the queue's claims then) while nothing but a batch that
        # is not full could be sent (see _linger).
        self._lingering: tuple[float, int, int] | None = None
        # Batches ended so far: one that ends during a read changes what that read saw.
        self._batches_ended = 0
        # Due rows read ahead for the next batches (see _from_prefetched).
        self._prefetched: list[QueuedMessage] = []
        # The queue's claims when the rows were read ahead (see Queue.claims).
        self._claims = store.claims
        # The earliest retry time in the queue, as last read (see _idle_wait).
        self._next_retry: float | None = None
        # Counts the starts and ends of retry writes. The earliest retry is known while the
        # count is what it was when it was read: a write since, or one that overlapped the
        # read, may have added an earlier one.
        self._retry_writes = 0
        self._next_retry_read_at: int | None = None
        # What the reads of the queue have covered (see _read).
        self._coverage = Coverage()
        self._full_read_at = 0.0
        # The destination's state last recorded in the queue (Destination.changes).
        self._noted = 0
        # Whether the last dispatch stopped for the rate limit or a pause (see _wait).
        self._paced = False

    @property
    def sends(self) -> bool:
        """Whether it sends to a real destination (not --dry-run)."""
        return isinstance(self.sender, HttpSender)

    def reload(self, config: Config) -> None:
        """Take new destination and mapping settings (SIGHUP); in-flight batches finish as sent."""
        self.config = config.destination
        self.mapping = mapping_settings(config)
        self.sender.reload(api_style(config.destination), config.destination)
        destination = self.state.destination
        destination.probe_initial_s = config.destination.probe_initial_s
        destination.probe_max_s = config.destination.probe_max_s
        if destination.state is not State.UP:
            log.info(
                "settings reloaded: forwarding resumes now (the destination was %s: %s)",
                destination.state,
                destination.last_error,
                extra={"action": "destination_resumed"},
            )
        destination.resume(self.clock())
        self._reloaded.set()  # a paced wait ends now

    # --- the loop -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Forward until `stop` is set, then let the batches in flight finish (within grace)."""
        try:
            while not stop.is_set():
                self.state.heartbeat = time.monotonic()
                wait_s = await self._dispatch_or_wait_for_queue()
                if self.max_wait_s is not None:
                    wait_s = self.max_wait_s if wait_s is None else min(wait_s, self.max_wait_s)
                await self._wait(stop, wait_s)
        finally:
            await self.finish(self.grace_s)
            self._tell(0, 0, Counter(), last=True)
            self._stopped.set()

    async def _dispatch_or_wait_for_queue(self) -> float | None:
        """dispatch(); while the queue's database cannot be reached, how long to wait before
        trying again (the messages stay queued; nothing is lost)."""
        try:
            wait_s = await self.dispatch()
        except StoreError as exc:
            if self.state.queue_error is None:
                log.warning(
                    "forwarding waits for the queue: %s", exc, extra={"action": "queue_down"}
                )
            self.state.queue_error = str(exc)
            return QUEUE_RETRY_S
        if self.state.queue_error is not None:
            log.info("forwarding again", extra={"action": "queue_up"})
            self.state.queue_error = None
        await self._note_destination()
        return wait_s

    async def _note_destination(self) -> None:
        """Record the destination's state in the queue when it changed, for `status`."""
        destination = self.state.destination
        if destination.changes == self._noted:
            return
        self._noted = destination.changes
        report = jsontext.dumps(destination.report(self.clock())).decode()
        try:
            await self.store.note_destination(report)
        except StoreError:
            self._noted = 0  # the next turn tries again

    async def stopped(self) -> None:
        """Wait until run() has stopped and its batches are settled."""
        await self._stopped.wait()

    async def drain(self, timeout_s: float = 30.0, *, until_empty: bool = True) -> None:
        """Forward until the queue is empty (tests, one-shot runs); TimeoutError after `timeout_s`.

        `until_empty=False` stops as soon as nothing is due (or the destination, down or
        paused, lets nothing go now) and nothing is in flight, leaving messages that wait.
        """
        async with asyncio.timeout(timeout_s):
            while True:
                wait_s = await self.dispatch()
                if self._tasks:
                    await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                    continue
                if until_empty:
                    if (await self.store.stats(self.clock())).pending == 0:
                        return
                elif not await self._may_send_now():
                    return
                # Bounded wait for the next retry (a retry delay is on the wall clock).
                await asyncio.sleep(min(wait_s if wait_s is not None else 0.01, 0.05))

    async def _may_send_now(self) -> bool:
        """Whether a message is due that the destination's state lets go now."""
        now = self.clock()
        destination = self.state.destination
        if destination.gate(now) is not None:
            return False
        return bool(await self.store.due(now, destination.held_users(now), 1))

    async def finish(self, grace_s: float | None = None) -> None:
        """Let the batches in flight finish and write their outcomes, for `grace_s` at most.

        Batches still sending then are cancelled: their messages stay queued and go out after
        the restart; outcomes already received are still written (docs/architecture.md).
        """
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning(
                "%d batches still in flight after the grace period were cancelled",
                len(pending),
                extra={"action": "batches_cancelled"},
            )
            await asyncio.gather(*pending, return_exceptions=True)

    async def _wait(self, stop: asyncio.Event, timeout_s: float | None) -> None:
        """One wait for new work, a free slot, a timer or stop (docs/architecture.md, "One wait").

        While the rate limit or a pause allows no request, only for the timer, a reload or
        stop: every commit sets new_work, and waking for each changed nothing before the
        timer anyway.
        """
        if self._paced:
            await first_set(stop, self._reloaded, timeout_s=timeout_s)
            self._reloaded.clear()
            return
        await first_set(stop, self.store.new_work, self._slot_free, timeout_s=timeout_s)
        self.store.new_work.clear()
        self._slot_free.clear()

    async def dispatch(self) -> float | None:
        """Start as many batches as there are free slots; return how long to wait at most."""
        # One dispatcher at a time (run() and a test's drain() may both call this): the
        # claim, from reading due rows to marking their users busy, must not interleave.
        async with self._dispatching:
            return await self._dispatch()

    async def _dispatch(self) -> float | None:
        if self._crashed is not None:
            raise self._crashed
        # Pacing runs on the monotonic clock; `now` (wall clock, injectable) decides what is
        # due, when the destination is probed, and stamps what is written.
        self._paced = False
        now = self.clock()
        size = self.config.batch_size
        destination = self.state.destination
        while len(self._tasks) < self.config.concurrency:
            if (wait_s := destination.gate(now)) is not None:
                # Down or paused: only its timer (or the probe's end) changes that.
                self._paced = not destination.probing
                return wait_s
            tick = time.monotonic()
            if tick < self._next_send_at:
                # The rate allows no request yet: no need to read the queue before then.
                self._paced = True
                return self._next_send_at - tick
            if self._lingering is not None:
                until, pending, claims = self._lingering
                # A batch is lingering: until it is due or enough has arrived to fill one,
                # another look at the queue would find the same thing.
                if (
                    now < until
                    and self.store.pending_count < pending + size
                    and claims == self.store.claims
                ):
                    return until - now
                self._lingering = None
            ended = self._batches_ended
            selection = self._from_prefetched(now)
            if selection is None:
                # A batch for every slot, free or not, in one read: what the free slots do not
                # take is read ahead (see _from_prefetched). A backlog so costs a read per
                # `concurrency` batches, not about one per batch (docs/queue.md, "Throughput").
                limit = size * self.config.concurrency
                rows = await self._expire(await self._read(now, limit), now)
                self._prefetched = rows if len(rows) >= limit else []
                selection = select_batch(rows, size, self.config.linger_s, now)
            if not selection.batch:
                if selection.wait_until is not None:
                    self._linger(selection.wait_until, ended)
                    return max(0.0, selection.wait_until - now)
                if destination.probed_users():
                    # Down, and only users whose probe failed have messages due: one of them
                    # is the next probe (see Destination.probe_anyone).
                    destination.probe_anyone()
                    continue
                wait_s = await self._idle_wait(now)
                if self._tasks:
                    # Nothing to send but batches in flight: what the read left out is their
                    # users'. Until one ends, only a full batch of new calls can go before
                    # its calls' linger: reading at every commit would find nothing again.
                    self._linger(now + min(wait_s, self.config.linger_s), ended)
                return wait_s
            self._next_send_at = (
                max(self._next_send_at, time.monotonic())
                + 1.0 / self.config.max_requests_per_second
            )
            self._start(selection.batch, probe=destination.starting())
        return None

    def _linger(self, until: float, ended: int) -> None:
        """Read the queue again only at `until`, when a full batch's worth of calls arrived,
        a batch ended or the claims changed; unless a batch ended since the read (`ended`:
        the count before it), whose users' rows that read left out."""
        if self._batches_ended == ended:
            self._lingering = (until, self.store.pending_count, self.store.claims)

    async def _read(self, now: float, limit: int) -> list[QueuedMessage]:
        """Up to `limit` due rows, skipping what earlier reads covered (see Coverage)."""
        # A copy: a batch that ends during the read takes its user out of the busy set, but
        # the read left that user's messages out all the same.
        destination = self.state.destination
        busy = self._busy_users | destination.held_users(now) | destination.probed_users()
        tick = time.monotonic()
        if tick >= self._full_read_at or self._retry_may_be_due(now):
            # A retry coming due can make a covered message due; and every IDLE_POLL_S the
            # whole queue is read, whatever happened.
            self._coverage.forget()
            self._full_read_at = tick + IDLE_POLL_S
        after = self._coverage.after(busy)
        self.metrics.queue_reads.inc()
        read = await self.store.read_due(now, busy, limit, after)
        if self._coverage.note_replays(read, after):
            after = 0
            read = await self.store.read_due(now, busy, limit)
        self._coverage.update(read, after, busy, limit)
        return read.rows

    def _from_prefetched(self, now: float) -> Selection | None:
        """A full batch from the rows read ahead, or None to read the queue again.

        The rows read ahead stay valid while their users are idle: a batch drops its users'
        rows when it starts (their state changes with its outcome), and rows added since come
        later in order, so they are read next time.
        Anything short of a full batch is decided on a fresh read, as if nothing were ahead.
        """
        if self._claims != self.store.claims:
            self._claims = self.store.claims
            self._prefetched = []
            self._coverage.forget()
        if not self._prefetched:
            return None
        if min(r.received_at for r in self._prefetched) < self._expired_before(now):
            # Read before a long wait (a batch held by the destination, an outage): a fresh
            # read dead-letters what passed destination.max_age meanwhile (_expire).
            self._prefetched = []
            return None
        destination = self.state.destination
        busy = self._busy_users | destination.held_users(now) | destination.probed_users()
        rows = [r for r in self._prefetched if r.user_key not in busy]
        selection = select_batch(rows, self.config.batch_size, self.config.linger_s, now)
        if len(selection.batch) < self.config.batch_size:
            self._prefetched = []
            return None
        return selection

    async def _idle_wait(self, now: float) -> float:
        # Bounded: rows replayed by the CLI (another process) arrive without a wake-up.
        # The earliest retry changes only when this forwarder writes retries (which forgets
        # it) or when it comes: the forwarder wakes often, so it is not read each time.
        if self._retry_may_be_due(now):
            writes = self._retry_writes
            self._next_retry = await self.store.next_retry_at()
            self._next_retry_read_at = writes
        next_retry = self._next_retry
        poll_s = min(IDLE_POLL_S, self.store.poll_s)
        return poll_s if next_retry is None else min(poll_s, max(0.0, next_retry - now))

    def _retry_may_be_due(self, now: float) -> bool:
        """Whether a message in backoff may be due at `now`, as far as this forwarder knows."""
        return self._next_retry_read_at != self._retry_writes or (
            self._next_retry is not None and self._next_retry <= now
        )

    def _expired_before(self, now: float) -> float:
        """A row received before this is past destination.max_age at `now`."""
        return now - self.config.max_age_s

    async def _expire(self, rows: list[QueuedMessage], now: float) -> list[QueuedMessage]:
        cutoff = self._expired_before(now)
        old = [r for r in rows if r.received_at < cutoff]
        if not old:
            return rows
        failure = Failure("expired", f"older than destination.max_age ({self.config.max_age_s:g}s)")
        await self._write(dead=[(r, failure) for r in old], now=now)
        expired = {r.seq for r in old}
        return [r for r in rows if r.seq not in expired]

    def _start(self, batch: list[QueuedMessage], *, probe: int) -> None:
        users = {r.user_key for r in batch}
        self._busy_users |= users
        # The batch's users' rows read ahead wait for its outcome: they are those users' next
        # messages again if every message of theirs in the batch left the queue.
        taken = {r.seq for r in batch}
        following = [r for r in self._prefetched if r.user_key in users and r.seq not in taken]
        if self._prefetched:
            self._prefetched = [r for r in self._prefetched if r.user_key not in users]
        claims = self.store.claims
        self.store.sending(batch)
        task = asyncio.create_task(
            self._forward(batch, probe=probe), name=f"forward-batch-{batch[0].seq}"
        )
        self._tasks.add(task)

        def done(t: asyncio.Task[set[str]]) -> None:
            self._tasks.discard(t)
            self._busy_users -= users
            self._batches_ended += 1
            self._lingering = None  # its users' calls may go now
            self._slot_free.set()
            self.store.done_sending(batch)
            if t.cancelled() or self.store.claims != claims:
                # Cancelled, or a lease changed meanwhile: the rows read ahead for its users
                # may be another relay's now.
                return
            if t.exception() is not None:
                # A bug, not a send failure: stop forwarding (the supervisor exits non-zero)
                # rather than loop on the same batch. Nothing is lost: it is still queued.
                self._crashed = self._crashed or t.exception()
            elif ready := [r for r in following if r.user_key not in t.result()]:
                # So one user's backlog needs no read per batch (a read fills every lane).
                self._prefetched = sorted([*self._prefetched, *ready], key=lambda r: r.seq)

        task.add_done_callback(done)
