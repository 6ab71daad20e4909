"""`GuardSync` against a real in-memory store and hand-moved clocks: no sockets, no sleeps."""

from __future__ import annotations

from gateway.core.config import GuardConfig
from gateway.core.guard import Guard, GuardState
from gateway.service.guardsync import GuardSync
from gateway.service.store import MemoryStore

from .helpers import Clock

GUARD = GuardConfig(min_samples=1, max_failure_ratio=0.5, cooldown_seconds=60, step_seconds=30, recovery_steps=(50, 100))


def replica(wall: Clock, store: MemoryStore, clock: Clock) -> GuardSync:
    return GuardSync(Guard(GUARD), store, clock=clock, wall=wall)


async def test_a_trip_published_by_one_replica_is_adopted_by_another_on_its_schedule() -> None:
    wall = Clock(1_000_000.0)
    store = MemoryStore(wall=wall)
    a, b = replica(wall, store, Clock(10.0)), replica(wall, store, Clock(5_000.0))
    [trip] = a.guard.record(True, 10.0)
    await store.publish_guard(a.own_trip(trip))
    wall.advance(20)  # B reads it 20 s after the trip: 40 s of cooldown are left on its clock too
    transitions = await b.sync_once(GUARD)
    assert [t.state for t in transitions] == [GuardState.TRIPPED]
    assert "by another replica" in transitions[0].detail
    assert b.guard.retry_at() == 5_000.0 - 20 + 60
    assert await b.sync_once(GUARD) == []  # the same trip is adopted once


async def test_own_trip_is_republished_while_the_store_lacks_it() -> None:
    wall = Clock(1_000_000.0)
    store = MemoryStore(wall=wall)
    a = replica(wall, store, Clock(10.0))
    [trip] = a.guard.record(True, 10.0)
    record = a.own_trip(trip)  # the publish was lost (Redis was down)
    assert await a.sync_once(GUARD) == []
    assert await store.read_guard() == record
    assert await a.sync_once(GUARD) == []  # its own record: nothing to adopt


async def test_a_trip_whose_schedule_is_over_or_a_disabled_guard_adopts_nothing() -> None:
    wall = Clock(1_000_000.0)
    store = MemoryStore(wall=wall)
    a, b = replica(wall, store, Clock()), replica(wall, store, Clock())
    [trip] = a.guard.record(True, 0.0)
    await store.publish_guard(a.own_trip(trip))
    assert await b.sync_once(GuardConfig(enabled=False)) == []
    assert b.guard.state is GuardState.HEALTHY

    c = replica(wall, store, Clock())
    wall.advance(60 + 2 * 30)  # cooldown and both recovery steps: the trip is over everywhere
    assert await c.sync_once(GUARD) == []
    assert c.guard.state is GuardState.HEALTHY
