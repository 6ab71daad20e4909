"""The automatic rollback guard over the new backend's session outcomes.

States, driven only by `record` and `tick` with the caller's clock (no I/O, no timers). Their
names are the ones every surface shows an operator (log, `/rollout`, metrics help, status
page, drill): circuit-breaker words were dropped because at 3 a.m. "open" reads as healthy.

* ``healthy``: traffic follows the configured percentage. Every new-backend session
  attempt is a sample (a failure if connecting or the handshake failed); an established
  session the backend drops abnormally is one more failure. When the window holds at
  least ``min_samples`` and the failure ratio exceeds ``max_failure_ratio``, it trips.
* ``tripped``: nobody new is sent to the new backend (forced-new users too, unless
  ``spare_forced``) for ``cooldown_seconds``. Established sessions are never touched.
* ``recovering``: traffic returns in ``recovery_steps`` (percent of the configured
  percentage), one step per ``step_seconds``; the same trip rule over a fresh window
  trips it again. After the last step it is ``healthy`` again.

Routing stays monotonic throughout: a step lowers the percentage, so it only ever holds
back users whose bucket is highest.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from .config import GuardConfig


class GuardState(Enum):
    HEALTHY = "healthy"
    TRIPPED = "tripped"
    RECOVERING = "recovering"


STATE_VALUES = {GuardState.HEALTHY: 0, GuardState.RECOVERING: 1, GuardState.TRIPPED: 2}


@dataclass(frozen=True)
class Transition:
    """A state change, for the log and the metrics."""

    state: GuardState
    at: float
    detail: str


class Guard:
    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.state = GuardState.HEALTHY
        self.since = 0.0
        self.step = 0
        self.trips = 0
        self.tripped_at: float | None = None  # the last trip, and what it said (the ramp reports it)
        self.trip_detail = ""
        self._samples: deque[tuple[float, bool]] = deque()
        self._failures = 0

    # -- what routing asks ---------------------------------------------------------------

    def share(self) -> float:
        """The fraction of the configured new-backend percentage that may go new now."""
        if not self.config.enabled or self.state is GuardState.HEALTHY:
            return 1.0
        if self.state is GuardState.TRIPPED:
            return 0.0
        return self.config.recovery_steps[self.step] / 100.0

    def blocks_forced(self) -> bool:
        return self.config.enabled and self.state is GuardState.TRIPPED and not self.config.spare_forced

    def retry_at(self) -> float | None:
        """While tripped: when the cooldown ends and the new backend gets its first recovery step."""
        return self.since + self.config.cooldown_seconds if self.state is GuardState.TRIPPED else None

    # -- events --------------------------------------------------------------------------

    def record(self, failed: bool, now: float) -> list[Transition]:
        """One new-backend outcome. Returns the transitions it caused."""
        transitions = self.tick(now)
        if not self.config.enabled or self.state is GuardState.TRIPPED:
            return transitions
        self._samples.append((now, failed))
        self._failures += failed
        self._expire(now)
        total = len(self._samples)
        if total >= self.config.min_samples and self._failures / total > self.config.max_failure_ratio:
            detail = f"{self._failures}/{total} new-backend sessions failed within {self.config.window_seconds:g}s"
            transitions.append(self.trip(now, detail))
        return transitions

    def tick(self, now: float) -> list[Transition]:
        """Advance time-driven transitions (end of cooldown, next recovery step)."""
        transitions: list[Transition] = []
        if self.state is GuardState.TRIPPED and now >= self.since + self.config.cooldown_seconds:
            self._enter(GuardState.RECOVERING, self.since + self.config.cooldown_seconds, 0)
            transitions.append(Transition(self.state, self.since, self._step_detail()))
        while self.state is GuardState.RECOVERING and now >= self.since + self.config.step_seconds:
            start = self.since + self.config.step_seconds
            if self.step + 1 >= len(self.config.recovery_steps):
                self._enter(GuardState.HEALTHY, start, 0)
                transitions.append(Transition(self.state, start, "recovered: back to the configured percentage"))
            else:
                self._enter(GuardState.RECOVERING, start, self.step + 1, keep_samples=True)
                transitions.append(Transition(self.state, start, self._step_detail()))
        return transitions

    def trip(self, now: float, detail: str) -> Transition:
        """Trip the guard (also used to adopt a trip another replica saw)."""
        self.trips += 1
        self.tripped_at, self.trip_detail = now, detail
        self._enter(GuardState.TRIPPED, now, 0)
        return Transition(self.state, now, f"tripped: {detail}; new backend paused for {self.config.cooldown_seconds:g}s")

    def configure(self, config: GuardConfig) -> list[Transition]:
        """Apply a reloaded config; disabling the guard makes it healthy."""
        self.config = config
        if not config.enabled and self.state is not GuardState.HEALTHY:
            self._enter(GuardState.HEALTHY, self.since, 0)
            return [Transition(self.state, self.since, "guard disabled by config")]
        self.step = min(self.step, len(config.recovery_steps) - 1)
        return []

    # -- internals -------------------------------------------------------------------------

    def _enter(self, state: GuardState, at: float, step: int, *, keep_samples: bool = False) -> None:
        self.state, self.since, self.step = state, at, step
        if not keep_samples:
            self._samples.clear()
            self._failures = 0

    def _expire(self, now: float) -> None:
        horizon = now - self.config.window_seconds
        samples = self._samples
        while samples and samples[0][0] < horizon:
            _, failed = samples.popleft()
            self._failures -= failed

    def _step_detail(self) -> str:
        percent = self.config.recovery_steps[self.step]
        return f"recovering: step {self.step + 1}/{len(self.config.recovery_steps)}, {percent:g}% of the configured percentage"
