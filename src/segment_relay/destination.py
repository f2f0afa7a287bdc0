"""The destination's state, as the forwarder sees it (docs/architecture.md, "Outages").

Pure: no I/O. Times are the forwarder's clock (`now`: the wall clock, injected by tests), on
which the probes are timed as the retries are; `sent_at` is when a batch's last request went.

- **up**: batches go as the rate limit allows.
- **down**: a batch failed for the destination's state (a refused connection, a timeout, a
  5xx, after the quick retries) and no batch was answered since it was sent. One probe batch
  goes at a time, `probe_initial_s` after the failure, then at an interval doubling up to
  `probe_max_s`; only a probe's failure doubles it. No message is charged an attempt or a
  backoff; the first batch answered makes the destination up, and every lane resumes at once.
  A probe that failed sends its users' messages to the back: the next probe is other users'
  (so one batch that fails on its own cannot hold the relay), and once another probe ended
  the outage, a failure of theirs is about their messages (per-user backoff).
- **paused**: the destination said to wait (Retry-After), refused the credentials, or
  refused every command of consecutive batches of different users with the same error (a
  configuration problem, such as a wrong project token). Nothing goes until `next_probe`,
  then one probe batch; only the probe, or a batch sent after the pause began, can end it;
  a reload (SIGHUP) ends it at once. Nothing is dead-lettered for it.

A batch of several commands refused alike is first held (its users wait, its messages stay
queued) until another batch decides: refused alike for other users, it is the configuration;
a command taken from another batch, the error is about those messages, which are then
dead-lettered as usual. Held with nothing else coming, it is sent again after `hold_s` and
then dead-lettered. A batch of one command refused is dead-lettered as before, and a batch
refused whole (a 4xx) is split as before, but each counts: the next batch refused alike for
other users pauses forwarding all the same. A batch that failed while another was answered
is about its own messages (per-user backoff).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

# Users remembered whose probe failed in an outage another probe ended (see the docstring).
MAX_SUSPECTS = 10_000


# Why forwarding pauses: a 401/403, every command refused alike, or a Retry-After.
PAUSE_REASONS = ("credentials", "configuration", "retry_after")


class State(enum.StrEnum):
    UP = "up"
    DOWN = "down"
    PAUSED = "paused"


class Verdict(enum.Enum):
    """What to do with a batch whose every command was refused with the same error."""

    DEAD_LETTER = "dead-letter"  # the error is about these messages
    HOLD = "hold"  # undecided: keep them queued, their users waiting
    PAUSE = "pause"  # a configuration problem: forwarding is paused


@dataclass(frozen=True)
class Suspect:
    """The latest batch refused alike, while nothing has said what its error is about."""

    error: str
    users: frozenset[str]
    until: float  # held until then at most
    held: bool  # its users wait (a batch of several commands)


@dataclass
class Destination:
    """The destination's state (see the module's docstring)."""

    probe_initial_s: float = 1.0
    probe_max_s: float = 30.0
    state: State = State.UP
    # When the state last changed, and the error that changed it.
    since: float = 0.0
    last_error: str = ""
    # Why it is paused: retry_after, credentials or configuration.
    reason: str = ""
    # When the next probe may go (down or paused).
    next_probe: float = 0.0
    # Grows at every change of state or probe time (the forwarder records it then).
    changes: int = 1
    _interval_s: float = 0.0
    _down_at: float = 0.0
    _paused_at: float = 0.0
    _answered_at: float = -math.inf  # the latest batch answered was sent then
    _probe: int = 0  # the probe in flight (0: none)
    _probes: int = 0
    _probe_failed: set[str] = field(default_factory=set)  # users of failed probes (this outage)
    _suspects: set[str] = field(default_factory=set)
    _suspect: Suspect | None = None
    # Errors refused alike that proved to be about the messages (until a reload).
    _message_errors: set[str] = field(default_factory=set)

    # --- what may go ---------------------------------------------------------------------------

    @property
    def probing(self) -> bool:
        return self._probe != 0

    def gate(self, now: float) -> float | None:
        """None: a batch may start now (the probe, when not up); else how long to wait."""
        if self.state is State.UP:
            return None
        if self.probing:
            return max(self._interval_s, 0.05)  # the probe's end wakes the forwarder first
        return None if now >= self.next_probe else self.next_probe - now

    def starting(self) -> int:
        """A batch starts: 0, or (down or paused) the probe's number, one at a time."""
        if self.state is State.UP:
            return 0
        self._probes += 1
        self._probe = self._probes
        return self._probe

    def ended(self, probe: int) -> None:
        """A batch's outcome is known (`probe`: what starting() returned for it)."""
        if probe and probe == self._probe:
            self._probe = 0

    def held_users(self, now: float) -> frozenset[str]:
        """Users whose messages wait while a batch of theirs refused alike is decided on."""
        s = self._suspect
        return s.users if s is not None and s.held and now < s.until else frozenset()

    def probed_users(self) -> frozenset[str]:
        """Users to leave out of the next probe while others have messages due: theirs failed."""
        return frozenset(self._probe_failed) if self.state is not State.UP else frozenset()

    def probe_anyone(self) -> None:
        """Nothing else is due: the next probe may be the users whose probe failed."""
        self._probe_failed.clear()

    # --- what happened -------------------------------------------------------------------------

    def answered(self, sent_at: float, users: frozenset[str], now: float) -> float | None:
        """A batch sent at `sent_at` was answered (commands taken, refused or to retry, or a
        4xx: the destination works); return how long it was down or paused, when this ends it."""
        self._answered_at = max(self._answered_at, sent_at)
        self._suspects -= users
        if self.state is State.UP:
            return None
        if self.state is State.PAUSED and (
            sent_at < self._paused_at or self.reason == "configuration"
        ):
            return None  # sent before the pause, or refused_alike() decides
        return self._up(now)

    def failed(
        self, sent_at: float, error: str, users: frozenset[str], probe: int, now: float
    ) -> bool:
        """A batch of `users` sent at `sent_at` failed for the destination's state; return
        whether that is an outage (False: it is about this batch, whose users back off)."""
        if self.state is State.UP:
            if self._answered_at > sent_at or users & self._suspects:
                return False
            self.state, self.since, self._down_at, self.reason = State.DOWN, now, now, ""
            self.last_error, self._interval_s = error, self.probe_initial_s
            self.next_probe = now + self._interval_s
            self.changes += 1
        elif probe and probe == self._probe:
            if self.state is State.PAUSED:
                self.state, self.since, self.reason = State.DOWN, now, ""
            self._probe_failed |= users
            self.last_error = error
            self._interval_s = min(
                max(self._interval_s, self.probe_initial_s) * 2, self.probe_max_s
            )
            self.next_probe = now + self._interval_s
            self.changes += 1
        # Else a batch sent before, failing while down or paused: nothing more to learn.
        return True

    def pause(self, reason: str, error: str, until: float, now: float) -> None:
        """Nothing goes until `until`, then a probe: `reason` is retry_after, credentials or
        configuration."""
        if self.state is State.UP:
            self._down_at = now
        if self.state is not State.PAUSED or self.reason != reason:
            self.since, self._paused_at = now, now
        elif until < self.next_probe:
            until = self.next_probe  # a shorter wait does not shorten the pause
        self.state, self.reason, self.last_error = State.PAUSED, reason, error
        self.next_probe = max(until, now)
        self._interval_s = self.next_probe - now
        self.changes += 1

    def refused_alike(
        self, error: str, users: frozenset[str], commands: int, now: float, hold_s: float
    ) -> Verdict:
        """Every one of the `commands` of a batch of `users` was refused with `error` (see
        the module's docstring); a batch held waits `hold_s` at most."""
        if error in self._message_errors:
            return Verdict.DEAD_LETTER
        paused_for_it = self.state is State.PAUSED and self.reason == "configuration"
        if paused_for_it and error == self.last_error:
            return Verdict.PAUSE  # the probe says it still is
        s = self._suspect
        if s is not None and s.error == error and users != s.users:
            self._suspect = None
            return Verdict.PAUSE
        if s is not None and s.error == error and s.held:
            # Sent again after its hold with nothing between to tell: these messages go, and
            # the next batch refused alike is judged afresh.
            self._suspect = None
            return Verdict.DEAD_LETTER
        self._suspect = Suspect(error, users, now + hold_s, held=commands > 1)
        return Verdict.HOLD if commands > 1 else Verdict.DEAD_LETTER

    def taken(self, now: float) -> float | None:
        """A batch had a command taken: a batch held as refused alike was about its messages;
        a pause for the configuration ends (return how long it lasted)."""
        if self._suspect is not None:
            if self._suspect.held:
                self._message_errors.add(self._suspect.error)
            self._suspect = None
        if self.state is State.PAUSED and self.reason == "configuration":
            return self._up(now)
        return None

    def resume(self, now: float) -> None:
        """Settings were reloaded: go now, and judge errors afresh."""
        self._message_errors.clear()
        self._suspect = None
        if self.state is State.PAUSED:
            self._up(now)
        elif self.state is State.DOWN:
            self.next_probe = now
            self.changes += 1

    def _up(self, now: float) -> float:
        outage = now - self._down_at
        self.state, self.since, self.reason = State.UP, now, ""
        self._suspects |= self._probe_failed
        if len(self._suspects) > MAX_SUSPECTS:
            self._suspects.clear()
        self._probe_failed.clear()
        self.changes += 1
        return outage

    def report(self, now: float) -> dict[str, Any]:
        """The state as /ready, /metrics and `segment-relay status` show it."""
        up = self.state is State.UP
        return {
            "state": str(self.state),
            "since": self.since,
            "for_s": round(max(0.0, now - self.since), 1),
            "reason": self.reason or None,
            "last_error": self.last_error or None,
            "next_probe_at": None if up else self.next_probe,
            "next_probe_in_s": None if up else round(max(0.0, self.next_probe - now), 1),
            "at": now,
        }
