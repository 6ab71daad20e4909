"""`Rebalancer` and `moves`: which sessions move, and the task that closes them at their slots."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gateway.core.config import RebalanceConfig
from gateway.core.rebalance import Move
from gateway.service.rebalancer import Rebalancer, moves

from .helpers import TIMEOUT, Clock, make_config


@dataclass
class Placed:
    user_id: str
    routed: str
    backend: str
    last_frame: float = 0.0


@dataclass(eq=False)
class Conn:
    placed: Placed | None

    def placement(self) -> Placed | None:
        return self.placed


def test_moves_take_relaying_sessions_whose_route_changed() -> None:
    rollout = make_config(rollout={"new_percent": 100}).rollout
    stays = Conn(Placed("a", "new", "new"))
    moved = Conn(Placed("b", "old", "old"))
    fell_back = Conn(Placed("c", "new", "old"))  # routed new, on old by fallback: its route did not change
    opening = Conn(None)
    assert moves([stays, moved, fell_back, opening], rollout, 1.0, False) == [Move(moved, "old", "new")]
    # a tripped guard sends everyone old: only the ones on new move
    assert moves([stays, moved], rollout, 0.0, True) == [Move(stays, "new", "old")]


async def test_the_schedule_closes_each_move_and_reports_progress() -> None:
    clock = Clock(100.0)
    closed: list[tuple[Move, str]] = []
    done = asyncio.Event()

    async def close(move: Move, why: str) -> None:
        closed.append((move, why))
        done.set()

    rebalancer = Rebalancer(clock, lambda conn: 0.0, close)
    config = RebalanceConfig(enabled=True, window_seconds=10.0, idle_seconds=1.0)
    move = Move(object(), "old", "new")
    rebalancer.replan(config, [move], "the rollout changed")
    assert rebalancer.status() == {"scheduled": 1, "closed": 0, "reason": "the rollout changed", "ends_in_seconds": 10.0}
    await asyncio.wait_for(done.wait(), TIMEOUT)
    rebalancer.cancel()
    assert closed == [(move, "the rollout changed")]
    rebalancer.replan(RebalanceConfig(enabled=False), [], "off")
    assert rebalancer.status() is None
