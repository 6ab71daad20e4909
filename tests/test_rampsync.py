"""`RampSync`: the shared ramp as each replica runs it, on an in-process store (no sockets)."""

from __future__ import annotations

import logging

import pytest

from gateway.core.config import RampConfig
from gateway.core.ramp import GuardView, Window
from gateway.service.rampsync import RampSync
from gateway.service.store import MemoryStore, SqliteStore

from .helpers import Clock

PLAN = RampConfig(enabled=True, steps=(10.0, 50.0, 100.0), hold_minutes=1, min_sessions=4)


class Counter:
    """A replica's totals since it started, as the gateway counts them."""

    def __init__(self) -> None:
        self.totals = Window()

    def sessions(self, attempted: int, opened: int) -> None:
        self.totals = self.totals + Window(attempted=attempted, opened=opened)

    def __call__(self) -> Window:
        return self.totals


def replica(store: MemoryStore, clock: Clock, name: str) -> tuple[RampSync, Counter]:
    counter = Counter()
    return RampSync(store, replica=name, wall=clock, totals=counter), counter


async def test_the_first_sync_starts_the_ramp_and_a_second_replica_follows_it() -> None:
    store, clock = MemoryStore(), Clock(1000.0)
    a, _ = replica(store, clock, "a")
    b, _ = replica(store, clock, "b")
    started = await a.sync_once(PLAN, GuardView())
    assert started is not None and started.ours and started.before is None
    assert started.after.step_percent == 10.0
    followed = await b.sync_once(PLAN, GuardView())
    assert followed is not None and not followed.ours and followed.after == started.after
    assert await a.sync_once(PLAN, GuardView()) is None  # nothing changed


async def test_a_window_adds_up_every_replicas_sessions_counted_since_it_began() -> None:
    store, clock = MemoryStore(), Clock(1000.0)
    a, count_a = replica(store, clock, "a")
    b, count_b = replica(store, clock, "b")
    count_a.sessions(50, 50)  # before the ramp's window: not the step's
    await a.sync_once(PLAN, GuardView())
    await b.sync_once(PLAN, GuardView())
    count_a.sessions(2, 2)
    count_b.sessions(2, 1)
    await a.sync_once(PLAN, GuardView())
    await b.sync_once(PLAN, GuardView())
    assert b.progress is not None and b.progress.state == "holding"  # the first step: nothing below it
    assert b.progress.reason.startswith("success_rate 0.75 < 0.95 (3 of 4 opened)")  # 2 + 2, the 50 before left out
    assert b.numbers == Window()  # the failure started a fresh window
    await a.sync_once(PLAN, GuardView())
    assert a.numbers == Window()


async def test_status_says_what_the_step_waits_for_and_when_it_is_due() -> None:
    store, clock = MemoryStore(), Clock(1000.0)
    a, count = replica(store, clock, "a")
    await a.sync_once(PLAN, GuardView())
    count.sessions(1, 1)
    clock.advance(20)
    await a.sync_once(PLAN, GuardView())
    status = a.status(PLAN, GuardView(), str)
    assert (status["state"], status["step_percent"], status["sessions"]) == ("advancing", 10.0, 1)
    assert (status["next_step_in_seconds"], status["waiting_for"]) == (40.0, "1 of 4 new-backend sessions")
    assert a.status(PLAN, GuardView(healthy=False, tripped_at=1.0), str)["waiting_for"] == "the rollback guard to recover"
    off = a.status(RampConfig(), GuardView(), str)
    assert (off["enabled"], off["state"], off["sessions"]) == (False, None, 0)


async def test_a_store_that_cannot_answer_holds_the_ramp_and_says_so_once(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    store = SqliteStore(str(tmp_path / "usage.sqlite"))  # never started: its file is not open
    sync, _ = replica(store, Clock(1000.0), "a")
    assert await sync.sync_once(PLAN, GuardView()) is None
    assert await sync.sync_once(PLAN, GuardView()) is None
    assert not sync.reachable and sync.progress is None
    unreachable = sync.status(PLAN, GuardView(), str)
    assert (unreachable["store_available"], unreachable["state"]) == (False, None)
    assert unreachable["waiting_for"] == "the shared store to answer"
    held = [r for r in caplog.records if "the ramp holds its step" in r.getMessage()]
    assert len(held) == 1
    await store.start()
    try:
        assert await sync.sync_once(PLAN, GuardView()) is not None
        assert sync.reachable
        assert any("the shared store answers again" in r.getMessage() for r in caplog.records)
    finally:
        await store.close()
