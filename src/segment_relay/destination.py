"""The destination's state, as the forwarder sees it (docs/architecture.md, "Outages").

Pure: no I/O; `tick` is time.monotonic() (waits), `wall` the wall clock (what is shown).

- **up**: batches go as the rate limit allows.
- **down**: a batch failed for the destination's state (a refused connection, a timeout, a
  5xx, after the quick retries) and no batch was answered since it was sent. One probe batch
  goes at a time, `probe_initial_s` after the failure, then at an interval doubling up to
  `probe_max_s`. No message is charged an attempt or a backoff for it; the first batch
  answered makes the destination up, and every lane resumes at once.
- **paused**: the destination said to wait (Retry-After), refused the credentials, or
  refused every command of consecutive batches of different users with the same error (a
  configuration problem, such as a wrong project token). Nothing goes until `next_probe`,
  then one probe batch; a reload (SIGHUP) resumes at once. Nothing is dead-lettered for it.

A batch of several commands refused alike is first held (its users wait, its messages stay
queued) until another batch decides: refused alike for other users, it is the
configuration; anything else, the error is about those messages, which are then
dead-lettered as usual. A batch of one command refused is dead-lettered as before, but
counts: the next batch refused alike for other users pauses forwarding all the same. A batch
that failed while another was answered is about its own messages too (per-user backoff).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any


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
    until: float  # tick: held until then at most
    held: bool  # its users wait (a batch of several commands)


@dataclass
class Destination:
    """The destination's state (see the module's docstring)."""

    probe_initial_s: float = 1.0
    probe_max_s: float = 30.0
    state: State = State.UP
    # Wall clock of the latest change of state, and what caused it.
    since: float = 0.0
    last_error: str = ""
    # Why it is paused: retry_after, credentials or configuration.
    reason: str = ""
    # Tick when the next probe may go (down or paused).
    next_probe: float = 0.0
    probing: bool = False
    # Grows at every change of state or probe time (the forwarder records it then).
    changes: int = 1
    _interval_s: float = 0.0
    _down_at: float = 0.0  # tick
    _answered_at: float = -math.inf  # tick of the latest batch answered
    _suspect: Suspect | None = None
    # Errors refused alike that proved to be about the messages (until a reload).
    _message_errors: set[str] = field(default_factory=set)

    # --- what may go ---------------------------------------------------------------------------

    def gate(self, tick: float) -> float | None:
        """None: a batch may start now (the probe, when not up); else how long to wait."""
        if self.state is State.UP:
            return None
        if self.probing:
            return max(self._interval_s, 0.05)  # the probe's end wakes the forwarder first
        return None if tick >= self.next_probe else self.next_probe - tick

    def starting(self) -> bool:
        """A batch starts; return whether it is the probe (one at a time, when not up)."""
        if self.state is State.UP:
            return False
        self.probing = True
        return True

    def ended(self, probe: bool) -> None:
        """A batch's outcome is known."""
        if probe:
            self.probing = False

    def held_users(self, tick: float) -> frozenset[str]:
        """Users whose messages wait for a decision on a batch refused alike."""
        s = self._suspect
        return s.users if s is not None and s.held and tick < s.until else frozenset()

    # --- what happened -------------------------------------------------------------------------

    def answered(self, tick: float, wall: float) -> float | None:
        """A batch was answered (commands taken, refused or to retry: the destination works);
        return how long it was down or paused, when this ends that."""
        self._answered_at = max(self._answered_at, tick)
        if self.state is State.UP:
            return None
        if self.state is State.PAUSED and self.reason == "configuration":
            return None  # answered, but refused alike: refused_alike() decides
        return self._up(tick, wall)

    def failed(self, sent_at: float, error: str, tick: float, wall: float) -> bool:
        """A batch sent at `sent_at` failed for the destination's state; return whether that
        is an outage (False: another batch was answered since it was sent, so it is about
        this batch)."""
        if self.state is State.UP and self._answered_at > sent_at:
            return False
        self.last_error = error
        if self.state is not State.DOWN:
            self.state, self.since, self._down_at, self.reason = State.DOWN, wall, tick, ""
            self._interval_s = self.probe_initial_s
        else:
            self._interval_s = min(self._interval_s * 2, self.probe_max_s)
        self.next_probe = tick + self._interval_s
        self.changes += 1
        return True

    def pause(self, reason: str, error: str, until: float, tick: float, wall: float) -> None:
        """Nothing goes until `until` (tick), then a probe: `reason` is retry_after,
        credentials or configuration."""
        if self.state is not State.PAUSED or self.reason != reason:
            self.since = wall
            if self.state is State.UP:
                self._down_at = tick
        self.state, self.reason, self.last_error = State.PAUSED, reason, error
        self.next_probe = max(until, tick)
        self._interval_s = until - tick
        self.changes += 1

    def refused_alike(
        self, error: str, users: frozenset[str], commands: int, tick: float, hold_s: float
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
            # Sent again after its hold with no other batch between: nothing says more.
            self._suspect = None
            self._message_errors.add(error)
            return Verdict.DEAD_LETTER
        self._suspect = Suspect(error, users, tick + hold_s, held=commands > 1)
        return Verdict.HOLD if commands > 1 else Verdict.DEAD_LETTER

    def taken(self, tick: float, wall: float) -> float | None:
        """A batch was answered with a command taken: a batch held as refused alike was about
        its messages; a pause for the configuration ends (return how long it lasted)."""
        if self._suspect is not None:
            if self._suspect.held:
                self._message_errors.add(self._suspect.error)
            self._suspect = None
        if self.state is State.PAUSED and self.reason == "configuration":
            return self._up(tick, wall)
        return None

    def resume(self, tick: float, wall: float) -> None:
        """Settings were reloaded: go now, and judge errors afresh."""
        self._message_errors.clear()
        self._suspect = None
        if self.state is State.PAUSED:
            self._up(tick, wall)
        elif self.state is State.DOWN:
            self.next_probe = tick
            self.changes += 1

    def _up(self, tick: float, wall: float) -> float:
        outage = tick - self._down_at
        self.state, self.since, self.reason, self.probing = State.UP, wall, "", False
        self.changes += 1
        return outage

    def report(self, now: float) -> dict[str, Any]:
        """The state as /ready, /metrics and `segment-relay status` show it (`now`: the
        forwarder's clock, on which `since` and `next_probe` are)."""
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
