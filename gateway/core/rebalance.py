"""Moving open sessions whose route changed (``rollout.rebalance``), without cutting a reply.

A pure schedule: the shell tells it which sessions are open and where each one's route
points now (`plan`), then asks it every tick which sessions to close (`due`), giving the
time and each session's last activity. Sessions are spread evenly over the window; one is
closed at its slot once it has been idle for ``idle_seconds``, or at the end of the window
whatever it is doing. A new plan replaces the old one: a session whose route is right
again is dropped from it, never closed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .config import RebalanceConfig


@dataclass(frozen=True)
class Move:
    """One session to move: from the backend it is on, to where its route points now."""

    key: Any
    source: str
    target: str


@dataclass
class Schedule:
    config: RebalanceConfig
    started: float
    slots: dict[Any, tuple[float, Move]] = field(default_factory=dict)
    closed: int = 0

    @property
    def ends_at(self) -> float:
        return self.started + self.config.window_seconds

    @property
    def scheduled(self) -> int:
        return len(self.slots)


def plan(config: RebalanceConfig, now: float, moves: Iterable[Move], previous: Schedule | None = None) -> Schedule:
    """The schedule for `moves`: each gets an evenly spread slot in a new window from `now`.

    A session already scheduled in `previous` keeps its slot if that comes sooner, so a
    second change never delays a move the first one started.
    """
    moves = list(moves)
    schedule = Schedule(config, now, closed=previous.closed if previous else 0)
    step = config.window_seconds / len(moves) if moves else 0.0
    for index, move in enumerate(moves):
        slot = now + index * step
        if previous is not None and move.key in previous.slots:
            slot = min(slot, previous.slots[move.key][0])
        schedule.slots[move.key] = (slot, move)
    return schedule


def due(schedule: Schedule, now: float, idle_since: Callable[[Any], float | None]) -> list[Move]:
    """The moves to make now; they leave the schedule. `idle_since(key)` is the session's last
    frame in either direction (None: the session is gone)."""
    ready = []
    final = now >= schedule.ends_at
    for key, (slot, move) in list(schedule.slots.items()):
        last = idle_since(key)
        if last is None:
            del schedule.slots[key]
            continue
        if now < slot:
            continue
        if final or now - last >= schedule.config.idle_seconds:
            del schedule.slots[key]
            ready.append(move)
    schedule.closed += len(ready)
    return ready
