"""The automatic ramp (``rollout.ramp``) in a running gateway, over real sockets.

Real gateways, stub backends and (for replicas) a real redis-server. Time is injected: each
gateway's wall clock is a `Clock` the test moves, and the test runs the ramp's sync itself
(`Gateway.sync_ramp_once`, with the background loop stopped), so no test waits out a hold.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.core.routing import bucket
from gateway.service.reload import Reloader

from .helpers import (
    TIMEOUT, Clock, Servers, Stack, closed, eventually, make_config, make_token, metric, open_client, raw_config,
)
from .redis_server import RedisServer, redis_server  # noqa: F401 - fixture

HOLD_MINUTES = 10
HOLD = HOLD_MINUTES * 60.0
IN_FLIGHT_SECONDS = 2.0  # how long the new backend holds an upgrade while the test moves the ramp
SALT = "test-salt"


def users_between(low: float, high: float, count: int) -> list[str]:
    """`count` user ids whose bucket is in [low, high)."""
    found = [f"user-{n}" for n in range(100_000) if low <= bucket(SALT, f"user-{n}") < high]
    assert len(found) >= count
    return found[:count]


def ramp(**changes: Any) -> dict[str, Any]:
    plan: dict[str, Any] = {"enabled": True, "steps": [10, 50, 100], "hold_minutes": HOLD_MINUTES, "min_sessions": 3}
    return {"new_percent": 0, "salt": SALT, "force_new": ["qa-1", "qa-2", "qa-3", "qa-4"], "ramp": {**plan, **changes}}


async def ramped(servers: Servers, clock: Clock, **sections: Any) -> Stack:
    """A stack whose ramp runs only when the test calls `sync_ramp_once`, on `clock`, which is
set to when the ramp's current step started."""
    sections.setdefault("rollout", ramp())
    sections.setdefault("admin", {"host": "127.0.0.1", "port": 0})
    stack = await servers.stack(**sections)
    task = stack.gateway._ramp
    assert task is not None
    task.cancel()
    progress = stack.gateway.ramp_sync.progress
    assert progress is not None  # read or started as the gateway started, on the real clock
    clock.now = progress.since
    stack.gateway.wall = clock
    return stack


async def rollout(stack: Stack) -> dict[str, Any]:
    """GET /rollout from the admin port, as an operator would."""
    url = f"http://127.0.0.1:{stack.running.admin_port}/rollout"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        answer: dict[str, Any] = await response.json()
        return answer


async def session(stack: Stack, user: str) -> str:
    """One session of `user` (message auth): the backend that served it, as the stub says."""
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, "message", make_token(user))
        try:
            greeting = json.loads(await ws.recv())
            assert greeting["type"] == "connected", greeting
            await ws.send(json.dumps({"type": "stub.info"}))
            answer = json.loads(await ws.recv())
        finally:
            await ws.close()
    backend: str = answer["style"]  # each stub is named after its backend
    return backend


async def sessions(stack: Stack, users: list[str]) -> list[str]:
    return [await session(stack, user) for user in users]


async def set_faults(port: int, **faults: Any) -> None:
    async with aiohttp.ClientSession() as http, http.post(f"http://127.0.0.1:{port}/stub/faults", json=faults) as response:
        assert response.status == 200, await response.text()


def ramp_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gateway" and r.getMessage().startswith("ramp: ")]


async def test_a_ramp_starts_at_its_first_step_and_routes_by_it(servers: Servers) -> None:
    stack = await ramped(servers, Clock())
    status = await rollout(stack)
    ramp_status = status["ramp"]
    assert ramp_status["enabled"] is True
    assert (ramp_status["step_percent"], ramp_status["step_index"], ramp_status["state"]) == (10.0, 0, "advancing")
    assert ramp_status["reason"] == "started at step 1 of 3 (10%)"
    assert ramp_status["next_step_in_seconds"] == HOLD
    assert ramp_status["waiting_for"] == "0 of 3 new-backend sessions"
    assert [gate["name"] for gate in ramp_status["gates"]] == [
        "success_rate", "auth_failure_rate", "reply_seconds_avg", "reply_ratio"
    ]
    assert (status["configured_percent"], status["effective_percent"]) == (0.0, 10.0)
    assert metric(stack, "ws_gateway_ramp_step_percent") == 10.0
    low, high = users_between(0, 10, 1) + users_between(10, 50, 1)
    assert await sessions(stack, [low, high]) == ["new", "old"]
    url = f"http://127.0.0.1:{stack.running.admin_port}/route?user={high}"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        answer = await response.json()
    assert answer["line"] == f"old (bucket {bucket(SALT, high):.4f} >= percentage 10)"


async def test_green_gates_over_the_hold_move_the_ramp_to_the_next_step(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    clock = Clock()
    stack = await ramped(servers, clock)
    assert await sessions(stack, ["qa-1", "qa-2", "qa-3"]) == ["new", "new", "new"]

    clock.advance(HOLD - 1)
    await stack.gateway.sync_ramp_once()
    before = (await rollout(stack))["ramp"]
    assert (before["step_percent"], before["sessions"], before["next_step_in_seconds"]) == (10.0, 3, 1.0)
    assert [gate["ok"] for gate in before["gates"]] == [True, True, True, True]
    assert before["gates"][0]["value"] == 1.0

    clock.advance(1)
    await stack.gateway.sync_ramp_once()
    after = (await rollout(stack))["ramp"]
    assert (after["step_percent"], after["step_index"], after["state"]) == (50.0, 1, "advancing")
    assert after["sessions"] == 0  # a fresh window for the new step
    assert "10% -> 50%" in after["reason"]
    assert metric(stack, "ws_gateway_ramp_step_percent") == 50.0
    assert await session(stack, users_between(10, 50, 1)[0]) == "new"
    assert any("10% -> 50%" in r.getMessage() for r in ramp_lines(caplog))


async def test_too_few_sessions_hold_the_step_past_its_hold(servers: Servers) -> None:
    clock = Clock()
    stack = await ramped(servers, clock)
    await sessions(stack, ["qa-1", "qa-2"])
    clock.advance(10 * HOLD)
    await stack.gateway.sync_ramp_once()
    status = (await rollout(stack))["ramp"]
    assert (status["step_percent"], status["next_step_in_seconds"]) == (10.0, 0.0)
    assert status["waiting_for"] == "2 of 3 new-backend sessions"


async def test_a_failed_gate_steps_the_ramp_back_and_says_which_gate_by_how_much(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    clock = Clock()
    stack = await ramped(servers, clock, rollout=ramp(steps=[10, 50, 100]))
    await sessions(stack, ["qa-1", "qa-2", "qa-3"])
    clock.advance(HOLD)
    await stack.gateway.sync_ramp_once()
    assert stack.gateway.ramp_sync.progress is not None and stack.gateway.ramp_sync.progress.step_percent == 50.0

    await set_faults(stack.new_port, refuse_status=503)
    assert await sessions(stack, ["qa-1", "qa-2", "qa-3"]) == ["old", "old", "old"]  # fallback: the apps see nothing
    clock.advance(5)
    await stack.gateway.sync_ramp_once()

    status = await rollout(stack)
    assert (status["ramp"]["step_percent"], status["ramp"]["state"]) == (10.0, "stepped_back")
    reason = status["ramp"]["reason"]
    assert reason.startswith("success_rate 0 < 0.95 (0 of 3 opened)")
    assert reason.endswith("stepped back from 50% to 10%")
    assert status["effective_percent"] == 10.0
    warned = [r for r in ramp_lines(caplog) if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warned] == ["ramp: " + reason]
    assert (warned[0].ramp_state, warned[0].step_percent, warned[0].previous_percent) == ("stepped_back", 10.0, 50.0)


async def test_a_new_backend_refusing_tokens_fails_the_auth_gate(servers: Servers) -> None:
    clock = Clock()
    stack = await ramped(servers, clock, rollout=ramp(on_failure="hold", min_sessions=2))
    await set_faults(stack.new_port, reject_token=True)
    for user in ("qa-1", "qa-2"):
        ws = await open_client(stack, "message", make_token(user))
        await closed(ws)
    await stack.gateway.sync_ramp_once()
    status = (await rollout(stack))["ramp"]
    assert (status["step_percent"], status["state"]) == (10.0, "holding")
    assert "auth_failure_rate 1 > 0.05 (2 of 2 tokens refused by the new backend)" in status["reason"]
    assert status["reason"].endswith("holding at 10%")


async def test_on_failure_hold_keeps_the_step_and_starts_the_hold_again(servers: Servers) -> None:
    clock = Clock()
    stack = await ramped(servers, clock, rollout=ramp(on_failure="hold"))
    await sessions(stack, ["qa-1", "qa-2", "qa-3"])
    clock.advance(HOLD)
    await stack.gateway.sync_ramp_once()
    await set_faults(stack.new_port, refuse_status=503)
    await sessions(stack, ["qa-1", "qa-2", "qa-3"])
    await stack.gateway.sync_ramp_once()
    status = (await rollout(stack))["ramp"]
    assert (status["step_percent"], status["state"], status["next_step_in_seconds"]) == (50.0, "holding", HOLD)
    assert status["reason"].endswith("holding at 50%")


async def test_a_guard_trip_steps_the_ramp_back(servers: Servers) -> None:
    clock = Clock()
    guard = {"min_samples": 2, "max_failure_ratio": 0.1, "cooldown_seconds": 3600}
    stack = await ramped(servers, clock, rollout={**ramp(min_sessions=100), "guard": guard})
    assert await stack.gateway.store.write_ramp(_record(step_index=1), 1)  # as if it had reached 50% already
    await stack.gateway.sync_ramp_once()
    assert (await rollout(stack))["ramp"]["step_percent"] == 50.0

    await set_faults(stack.new_port, refuse_status=503)
    await sessions(stack, ["qa-1", "qa-2"])
    assert stack.gateway.guard.state.value == "tripped"
    clock.advance(1)
    await stack.gateway.sync_ramp_once()
    status = await rollout(stack)
    assert (status["ramp"]["step_percent"], status["ramp"]["state"]) == (10.0, "stepped_back")
    assert status["ramp"]["reason"].startswith("the rollback guard tripped (2/2 new-backend sessions failed within 60s)")
    assert status["ramp"]["waiting_for"] == "the rollback guard to recover"
    assert status["effective_percent"] == 0.0  # the guard still overrides the step


def _record(
    *, step_index: int, steps: tuple[float, ...] = (10.0, 50.0, 100.0), version: int = 2, window: int = 5
) -> dict[str, Any]:
    return {
        "step_index": step_index, "step_percent": steps[step_index], "steps": list(steps), "state": "advancing",
        "reason": "set by the test", "since": 0.0, "window": window, "version": version,
    }


async def test_an_attempt_counts_in_the_window_it_began_in_not_the_next(servers: Servers) -> None:
    """A failing step's handshakes still in flight when the ramp steps back end in the next
    step's window: they must not fail that step too."""
    stack = await ramped(servers, Clock(), rollout=ramp(min_sessions=1))
    assert await stack.gateway.store.write_ramp(_record(step_index=1), 1)
    await stack.gateway.sync_ramp_once()
    await set_faults(stack.new_port, refuse_status=503, upgrade_delay=IN_FLIGHT_SECONDS)
    app = asyncio.create_task(session(stack, "qa-1"))

    async def upgrade_held() -> bool:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{stack.new_port}/stub/faults") as response:
            return (await response.json())["upgrades"] == 1

    assert await eventually(upgrade_held)
    assert await stack.gateway.store.write_ramp(_record(step_index=0, version=3, window=6), 2)  # a step back meanwhile
    await stack.gateway.sync_ramp_once()
    assert await app == "old"  # refused after the step back; the app fell back
    await stack.gateway.sync_ramp_once()
    status = (await rollout(stack))["ramp"]
    assert (status["step_percent"], status["state"], status["sessions"]) == (10.0, "advancing", 0)
    assert metric(stack, "ws_gateway_upstream_failures_total", backend="new", reason="connect") == 1.0  # a failure all the same


async def test_paused_and_enabled_false_take_effect_on_reload_of_the_file(servers: Servers, tmp_path: Path) -> None:
    clock = Clock()
    stack = await ramped(servers, clock, rollout={**ramp(), "new_percent": 30})
    gateway = stack.gateway
    await sessions(stack, ["qa-1", "qa-2", "qa-3"])
    path = tmp_path / "gateway.yaml"

    def edit(**plan: Any) -> None:
        """The operator's edit, read by the gateway's file watcher (`Reloader.check`)."""
        raw = raw_config(stack.old_port, stack.new_port, rollout={**ramp(**plan), "new_percent": 30})
        path.write_text(yaml.safe_dump(raw))

    edit()
    reloader = Reloader(str(path), gateway.reload, gateway.reload_failed)
    edit(paused=True)
    reloader.check()
    await gateway.sync_ramp_once()
    clock.advance(10 * HOLD)
    await gateway.sync_ramp_once()
    status = (await rollout(stack))["ramp"]
    assert (status["state"], status["step_percent"], status["reason"]) == ("paused", 10.0, "paused by rollout.ramp.paused")
    assert status["next_step_in_seconds"] is None

    edit(enabled=False)
    reloader.check()
    status = await rollout(stack)
    assert (status["ramp"]["enabled"], status["ramp"]["state"], status["effective_percent"]) == (False, None, 30.0)
    assert metric(stack, "ws_gateway_ramp_step_percent") != metric(stack, "ws_gateway_ramp_step_percent")  # NaN
    assert await session(stack, users_between(10, 30, 1)[0]) == "new"

    edit()
    reloader.check()
    await gateway.sync_ramp_once()
    status = await rollout(stack)
    assert (status["ramp"]["state"], status["ramp"]["step_percent"], status["effective_percent"]) == ("advancing", 10.0, 10.0)
    assert status["ramp"]["reason"] == "resumed: rollout.ramp.paused is off"
    assert status["ramp"]["next_step_in_seconds"] == HOLD  # a fresh hold from the resume


async def test_an_edited_plan_takes_effect_on_reload(servers: Servers) -> None:
    clock = Clock()
    stack = await ramped(servers, clock)
    stack.gateway.reload(make_config(stack.old_port, stack.new_port, rollout=ramp(steps=[20, 100])))
    await stack.gateway.sync_ramp_once()
    status = await rollout(stack)
    assert (status["ramp"]["steps"], status["ramp"]["step_percent"], status["effective_percent"]) == ([20.0, 100.0], 20.0, 20.0)
    assert status["ramp"]["reason"] == "the plan changed: now at step 1 of 2 (20%)"


async def test_stepping_down_rebalances_the_sessions_whose_route_changed(servers: Servers) -> None:
    clock = Clock()
    rollout_section = {**ramp(), "rebalance": {"enabled": True, "window_seconds": 0, "idle_seconds": 0}}
    stack = await ramped(servers, clock, rollout=rollout_section)
    await sessions(stack, ["qa-1", "qa-2", "qa-3"])
    clock.advance(HOLD)
    await stack.gateway.sync_ramp_once()
    mover, stayer = users_between(10, 50, 1)[0], users_between(0, 10, 1)[0]
    moving = await open_client(stack, "message", make_token(mover))
    staying = await open_client(stack, "message", make_token(stayer))
    for ws in (moving, staying):
        assert json.loads(await ws.recv())["type"] == "connected"

    await set_faults(stack.new_port, refuse_status=503)
    await sessions(stack, ["qa-1", "qa-2", "qa-3"])
    await stack.gateway.sync_ramp_once()

    code, reason = await closed(moving)
    assert code == 1012 and "the ramp moved to 10%" in reason
    await staying.send("still here")
    assert await staying.recv() == "still here"
    await staying.close()


async def test_two_replicas_on_one_redis_add_up_their_sessions_and_agree_on_the_step(
    redis_server: RedisServer, servers: Servers
) -> None:
    clock = Clock()
    shared = {"redis": {"url": redis_server.url, "timeout_seconds": 1.0}, "rollout": ramp(min_sessions=4)}
    a = await ramped(servers, clock, **shared)
    b = await ramped(servers, clock, **shared)
    for stack in (a, b):
        await stack.gateway.sync_ramp_once()
    await sessions(a, ["qa-1", "qa-2"])
    await sessions(b, ["qa-3", "qa-4"])
    clock.advance(HOLD)
    await a.gateway.sync_ramp_once()  # publishes A's two; B's are not in yet
    await b.gateway.sync_ramp_once()  # sees four, decides and writes
    await a.gateway.sync_ramp_once()  # follows B's write

    for stack in (a, b):
        status = await rollout(stack)
        assert (status["ramp"]["step_percent"], status["effective_percent"]) == (50.0, 50.0)
    user = users_between(10, 50, 1)[0]
    assert [await session(a, user), await session(b, user)] == ["new", "new"]


async def test_replicas_deciding_at_once_move_the_ramp_one_step_written_once(
    redis_server: RedisServer, servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    clock = Clock()
    shared = {"redis": {"url": redis_server.url, "timeout_seconds": 1.0}, "rollout": ramp(min_sessions=0)}
    a = await ramped(servers, clock, **shared)
    b = await ramped(servers, clock, **shared)
    clock.advance(HOLD)
    await asyncio.gather(a.gateway.sync_ramp_once(), b.gateway.sync_ramp_once())
    await asyncio.gather(a.gateway.sync_ramp_once(), b.gateway.sync_ramp_once())
    steps = [s.gateway.ramp_sync.progress.step_percent for s in (a, b) if s.gateway.ramp_sync.progress]
    assert steps == [50.0, 50.0]
    moved = [r for r in ramp_lines(caplog) if "10% -> 50%" in r.getMessage()]
    assert sorted(r.decided_by for r in moved) == ["another replica", "this replica"]


async def test_the_step_survives_a_restart_with_usage_path(servers: Servers, tmp_path: Path) -> None:
    clock = Clock()
    usage = {"path": str(tmp_path / "usage.sqlite")}
    first = await ramped(servers, clock, usage=usage)
    await sessions(first, ["qa-1", "qa-2", "qa-3"])
    clock.advance(HOLD)
    await first.gateway.sync_ramp_once()
    assert (await rollout(first))["ramp"]["step_percent"] == 50.0
    await first.close()

    second = await servers.stack(usage=usage, rollout=ramp(), admin={"host": "127.0.0.1", "port": 0})
    status = await rollout(second)  # no sync by the test: the restarted gateway read it as it started
    assert (status["ramp"]["step_percent"], status["ramp"]["state"], status["effective_percent"]) == (50.0, "advancing", 50.0)
    assert await session(second, users_between(10, 50, 1)[0]) == "new"


async def test_the_background_sync_moves_the_ramp_without_the_test(servers: Servers) -> None:
    stack = await servers.stack(rollout=ramp(hold_minutes=0, min_sessions=0), admin={"host": "127.0.0.1", "port": 0})

    async def done() -> bool:
        return (await rollout(stack))["ramp"]["state"] == "done"

    assert await eventually(done)
    assert (await rollout(stack))["ramp"]["step_percent"] == 100.0


async def test_the_step_survives_a_restart_on_redis(redis_server: RedisServer, servers: Servers) -> None:
    clock = Clock()
    shared = {"redis": {"url": redis_server.url, "timeout_seconds": 1.0}, "rollout": ramp(min_sessions=0)}
    first = await ramped(servers, clock, **shared)
    clock.advance(HOLD)
    await first.gateway.sync_ramp_once()
    await first.close()

    second = await servers.stack(**shared, admin={"host": "127.0.0.1", "port": 0})
    status = await rollout(second)
    assert (status["ramp"]["step_percent"], status["effective_percent"]) == (50.0, 50.0)
