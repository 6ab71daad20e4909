"""The shell around the pure rebalance schedule (`rebalance`): which open sessions to move,
and the one task that closes them at their slots.

Closing is the caller's (`close`): the connection's 1012 and the metric stay with the gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ..core.config import RebalanceConfig, RolloutConfig
from ..core.rebalance import Move, Schedule, due, plan
from ..core.routing import choose_backend, held_back

REBALANCE_TICK_SECONDS = 0.25


def moves(connections: Iterable[Any], rollout: RolloutConfig, share: float, blocks_forced: bool) -> list[Move]:
    """Every relaying session whose route changed and that is not on its new backend already."""
    found = []
    for conn in connections:
        placed = conn.placement()
        if placed is None:
            continue
        target = held_back(choose_backend(placed.user_id, rollout), rollout, share, blocks_forced).backend
        if target != placed.routed and target != placed.backend:
            found.append(Move(conn, placed.backend, target))
    return found


class Rebalancer:
    """The schedule in progress, why it was made, and the task that works through it."""

    def __init__(
        self,
        clock: Callable[[], float],
        last_frame: Callable[[Any], float | None],
        close: Callable[[Move, str], Awaitable[None]],
    ) -> None:
        """`last_frame`: a session's last activity (None once it is gone); `close(move, why)` moves one."""
        self.clock = clock
        self._last_frame = last_frame
        self._close = close
        self.schedule: Schedule | None = None
        self.why = ""
        self._task: asyncio.Task[None] | None = None

    def replan(self, config: RebalanceConfig, found: list[Move], why: str) -> None:
        """Replace any schedule in progress with one for `found` (none when rebalancing is off)."""
        if not config.enabled:
            self.schedule = None
            return
        self.schedule = plan(config, self.clock(), found, self.schedule)
        self.why = why
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while self.schedule is not None and (self.schedule.slots or self.clock() < self.schedule.ends_at):
            for move in due(self.schedule, self.clock(), self._last_frame):
                await self._close(move, self.why)
            await asyncio.sleep(REBALANCE_TICK_SECONDS)

    def status(self) -> dict[str, Any] | None:
        """For /rollout: the schedule's progress, None when there is none."""
        schedule = self.schedule
        if schedule is None:
            return None
        return {
            "scheduled": schedule.scheduled,
            "closed": schedule.closed,
            "reason": self.why,
            "ends_in_seconds": round(max(0.0, schedule.ends_at - self.clock()), 1),
        }

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
