"""The ramp across replicas: every replica reads the shared progress, adds its numbers to the
step's window and runs the same decision (`core.ramp.decide`); a change is written by
compare-and-set, so when several decide at once one writes and the others follow it.

A replica counts its window from the moment it learns of it (its totals then are the
window's baseline), within `RAMP_SYNC_SECONDS` of the change. A new-backend attempt counts
in the window it began in, or in none (`window`): the handshakes a failing step left in
flight end after the step back, and must not fail the step it stepped back to. While the
store is down the ramp holds its step on every replica (none may write), and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.config import RampConfig
from ..core.ramp import GuardView, Progress, Window, decide, hold_ends, judge
from .store import Store, StoreUnavailable
from .store.base import ramp_version

log = logging.getLogger("gateway")
RAMP_SYNC_SECONDS = 1.0


@dataclass(frozen=True)
class Change:
    """The progress this replica knew before a sync and after it; `ours` when this replica wrote it."""

    before: Progress | None
    after: Progress
    ours: bool


class RampSync:
    """This replica's view of the shared ramp: the progress, and the step's window numbers over every replica."""

    def __init__(self, store: Store, *, replica: str, wall: Callable[[], float], totals: Callable[[], Window]) -> None:
        """`totals`: this replica's numbers since it started (a window is their difference)."""
        self.store = store
        self.replica = replica
        self.wall = wall
        self.totals = totals
        self.progress: Progress | None = None
        self.numbers = Window()  # the current window's, over every replica, as last read
        self.reachable = True
        self._window: int | None = None
        self._base = Window()

    async def sync_once(self, plan: RampConfig, guard: GuardView) -> Change | None:
        """Publish, read, decide, and write if the decision changed the progress; the change
        this replica saw (written by it or by another), None when there was none."""
        before = self.progress
        try:
            raw = await self.store.read_ramp()
            progress = Progress.from_record(raw)
            if progress is not None:
                self._follow(progress.window)
                await self.store.publish_ramp_window(progress.window, self.replica, (self.totals() - self._base).as_dict())
                published = await self.store.read_ramp_window(progress.window)
                self.numbers = sum((Window.from_dict(numbers) for numbers in published), Window())
            ours = False
            if self.store.available:
                decided = decide(plan, progress, self.numbers, guard, self.wall())
                if decided != progress and await self.store.write_ramp(decided.as_record(), ramp_version(raw)):
                    progress, ours = decided, True
                    if self._follow(decided.window):
                        self.numbers = Window()
        except StoreUnavailable as exc:
            self._unreachable(str(exc))
            return None
        self._reachable(self.store.available)
        self.progress = progress
        if progress is None or progress == before:
            return None
        return Change(before, progress, ours)

    def status(self, plan: RampConfig, guard: GuardView, utc: Callable[[float], str]) -> dict[str, Any]:
        """The ramp in /rollout: its plan, step, state and why, each gate against its
        threshold, and when the next step is due or what it waits for; `utc` words a time."""
        progress = self.progress if plan.enabled else None
        numbers = self.numbers if progress is not None else Window()
        status: dict[str, Any] = {
            "enabled": plan.enabled,
            "state": None, "step_percent": None, "step_index": None, "reason": None, "since": None,
            "next_step_in_seconds": None, "waiting_for": None,
            "steps": list(plan.steps), "hold_minutes": plan.hold_minutes, "min_sessions": plan.min_sessions,
            "on_failure": plan.on_failure, "paused": plan.paused,
            "sessions": numbers.attempted,
            "gates": [gate.as_dict() for gate in judge(plan.gates, numbers)],
            "store_available": self.reachable,
        }
        if progress is None:
            if plan.enabled and not self.reachable:
                status["waiting_for"] = "the shared store to answer"
            return status
        status.update(
            state=progress.state, step_percent=progress.step_percent, step_index=progress.step_index,
            reason=progress.reason, since=utc(progress.since),
        )
        if progress.state in ("paused", "done"):
            return status
        if not guard.healthy:
            status["waiting_for"] = "the rollback guard to recover"
            return status
        status["next_step_in_seconds"] = round(max(0.0, hold_ends(plan, progress, guard) - self.wall()), 1)
        if numbers.attempted < plan.min_sessions:
            status["waiting_for"] = f"{numbers.attempted} of {plan.min_sessions} new-backend sessions"
        if not self.reachable:
            status["waiting_for"] = "the shared store to answer"
        return status

    @property
    def window(self) -> int | None:
        """The window this replica counts for (None before its first sync)."""
        return self._window

    def _follow(self, window: int) -> bool:
        """Count from now on for `window`; whether it is a window this replica had not counted for."""
        if window == self._window:
            return False
        self._window, self._base = window, self.totals()
        return True

    def _reachable(self, up: bool) -> None:
        if up and not self.reachable:
            log.warning("ramp: the shared store answers again; the ramp goes on")
        elif not up and self.reachable:
            log.error("ramp: the shared store is unreachable; the ramp holds its step until it answers")
        self.reachable = up

    def _unreachable(self, why: str) -> None:
        if self.reachable:
            log.error("ramp: its progress cannot be read or written; the ramp holds its step", extra={"error": why})
        self.reachable = False
