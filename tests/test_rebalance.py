"""Rebalancing: the pure schedule (gateway.rebalance) and, over real sockets, the gateway moving sessions."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from gateway.core.config import RebalanceConfig
from gateway.core.rebalance import Move, due, plan

from .helpers import TIMEOUT, Servers, closed, eventually, make_token, metric, open_client

CONFIG = RebalanceConfig(enabled=True, window_seconds=10, idle_seconds=2)


def moves(n: int) -> list[Move]:
    return [Move(f"s{i}", "new", "old") for i in range(n)]


def test_moves_are_spread_evenly_over_the_window():
    schedule = plan(CONFIG, 100.0, moves(5))
    assert [slot for slot, _ in schedule.slots.values()] == [100.0, 102.0, 104.0, 106.0, 108.0]
    assert schedule.ends_at == 110.0 and schedule.scheduled == 5


def test_an_idle_session_goes_at_its_slot_and_a_busy_one_waits_for_its_gap():
    schedule = plan(CONFIG, 100.0, moves(2))
    last = {"s0": 99.5, "s1": 90.0}
    assert due(schedule, 100.0, last.get) == []  # s0 active half a second ago
    assert due(schedule, 101.6, last.get) == [Move("s0", "new", "old")]
    assert due(schedule, 104.9, last.get) == []  # s1's slot is at 105
    assert due(schedule, 105.0, last.get) == [Move("s1", "new", "old")]
    assert schedule.closed == 2 and schedule.scheduled == 0


def test_the_end_of_the_window_closes_even_a_busy_session():
    schedule = plan(CONFIG, 100.0, moves(1))
    assert due(schedule, 109.9, lambda key: 109.9) == []
    assert due(schedule, 110.0, lambda key: 110.0) == [Move("s0", "new", "old")]


def test_a_session_that_ended_leaves_the_schedule_uncounted():
    schedule = plan(CONFIG, 100.0, moves(1))
    assert due(schedule, 105.0, lambda key: None) == []
    assert schedule.scheduled == 0 and schedule.closed == 0


def test_a_second_plan_replaces_the_first_and_drops_sessions_whose_route_is_right_again():
    first = plan(CONFIG, 100.0, moves(4))
    due(first, 100.0, lambda key: 0.0)  # s0 moved
    second = plan(CONFIG, 103.0, [Move("s3", "new", "old"), Move("s9", "new", "old")], first)
    assert set(second.slots) == {"s3", "s9"}
    assert second.slots["s3"][0] == 103.0  # min(103 + 0, 107.5 from the first plan)
    assert second.closed == 1 and second.ends_at == 113.0


def test_no_moves_no_slots():
    schedule = plan(CONFIG, 0.0, [])
    assert schedule.scheduled == 0 and due(schedule, 100.0, lambda key: 0.0) == []


# -- over real sockets ---------------------------------------------------------------------------

REBALANCE = {"enabled": True, "window_seconds": 1, "idle_seconds": 0.2}


def with_percent(stack, percent: float, **rollout):
    config = stack.gateway.config
    return replace(config, rollout=replace(config.rollout, new_percent=percent, **rollout))


async def chatting(stack, user: str):
    ws = await open_client(stack, "message", make_token(user))
    assert json.loads(await ws.recv())["type"] == "connected"
    await ws.send("hi")
    assert await ws.recv() == "hi"
    return ws


async def test_lowering_the_percentage_moves_exactly_the_affected_sessions(servers: Servers):
    stack = await servers.stack(rollout={"new_percent": 100, "rebalance": REBALANCE, "force_old": ["olga"]})
    moved = [await chatting(stack, f"user-{n}") for n in range(4)]
    kept = await chatting(stack, "olga")  # forced old: its route does not change
    stack.gateway.reload(with_percent(stack, 0))
    for ws in moved:
        code, reason = await closed(ws)
        assert code == 1012 and "old backend" in reason
    await kept.send("still here")
    assert await kept.recv() == "still here"
    again = await chatting(stack, "user-0")
    await again.send('{"type":"stub.info"}')
    info = json.loads(await again.recv())
    assert info["style"] == "old"  # the reconnect lands on the old backend
    status = stack.gateway.rollout_status()["rebalance"]
    assert status["closed"] == 4 and status["scheduled"] == 0
    assert metric(stack, "ws_gateway_rebalance_closes_total", **{"from": "new", "to": "old"}) == 4
    await kept.close()
    await again.close()


async def test_an_active_session_is_closed_only_in_a_gap_and_no_reply_is_cut(servers: Servers):
    rebalance = {**REBALANCE, "window_seconds": 30, "idle_seconds": 0.5}
    stack = await servers.stack(rollout={"new_percent": 100, "rebalance": rebalance})
    ws = await chatting(stack, "busy")
    stack.gateway.reload(with_percent(stack, 0))
    loop = asyncio.get_running_loop()
    until = loop.time() + 1.5
    sent = 0
    while loop.time() < until:  # a frame every 0.1 s: never idle for 0.5 s
        await ws.send(f"m{sent}")
        assert await ws.recv() == f"m{sent}"
        sent += 1
    assert stack.gateway.rollout_status()["rebalance"]["closed"] == 0
    code, _ = await closed(ws)  # now idle: it goes
    assert code == 1012


async def test_a_second_change_mid_window_never_closes_a_session_whose_route_is_right_again(servers: Servers):
    rebalance = {**REBALANCE, "window_seconds": 60, "idle_seconds": 0}
    stack = await servers.stack(rollout={"new_percent": 100, "rebalance": rebalance})
    sockets = [await chatting(stack, f"user-{n}") for n in range(30)]
    stack.gateway.reload(with_percent(stack, 0))  # 30 moves spread over 60 s: 2 s apart
    first = await asyncio.wait_for(asyncio.wait([asyncio.ensure_future(closed(ws)) for ws in sockets],
                                                return_when=asyncio.FIRST_COMPLETED), TIMEOUT)
    assert first
    stack.gateway.reload(with_percent(stack, 100))  # every route is right again
    assert stack.gateway.rollout_status()["rebalance"]["scheduled"] == 0
    still_open = [ws for ws in sockets if ws.close_code is None]
    assert len(still_open) >= 25
    for ws in still_open:
        await ws.send("ok")
        assert await ws.recv() == "ok"
        await ws.close()


async def test_off_by_default_a_reload_touches_no_session(servers: Servers):
    stack = await servers.stack(rollout={"new_percent": 100})
    ws = await chatting(stack, "user-1")
    stack.gateway.reload(with_percent(stack, 0))
    assert stack.gateway.rollout_status()["rebalance"] is None
    await ws.send("still")
    assert await ws.recv() == "still"
    await ws.close()


async def test_a_guard_trip_moves_new_sessions_only_with_on_guard_trip(servers: Servers):
    guard = {"min_samples": 1, "max_failure_ratio": 0.01, "window_seconds": 600}
    stack = await servers.stack(
        rollout={"new_percent": 100, "guard": guard, "rebalance": {**REBALANCE, "on_guard_trip": True}}
    )
    ws = await chatting(stack, "user-1")
    stack.gateway.new_backend_outcome(failed=True)  # what a failed new upstream reports
    code, reason = await closed(ws)
    assert code == 1012 and "failing" in reason

    async def tripped() -> bool:
        return stack.gateway.guard.state.value == "tripped"

    assert await eventually(tripped)
