"""`store.outage.Resilient` around a store that is not Redis: the outage machine alone, no sockets.

`Shelf` is a shared store kept in another `MemoryStore` that can be switched off: while
it is, every call raises ConnectionError, as a network store's client would.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import pytest

from gateway.service.store import DayUsage, MemoryStore, StoreUnavailable, VersionUsage, utc_day
from gateway.service.store.memory import DayCounts
from gateway.service.store.outage import Remote, Resilient

from .helpers import TIMEOUT, Clock

BACKOFF = (1.0, 4.0)
DAY = "2026-12-07"
AT = 1_796_601_600.0  # 2026-12-07 00:00 UTC


class Shelf(Remote):
    kind = "shelf"
    location = "shelf://ops"
    failures = (ConnectionError,)

    def __init__(self) -> None:
        self.shared = MemoryStore()
        self.session_ttl = 60.0
        self.retention_days = 120
        self.down = False
        self.calls = 0
        self.refreshed = asyncio.Event()

    async def _up(self) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("shelf://ops is off")

    async def ping(self) -> None:
        await self._up()

    async def close(self) -> None:
        await self._up()

    async def auth_blocked(self, ip: str, limit: int) -> bool:
        await self._up()
        return await self.shared.auth_blocked(ip, limit)

    async def auth_failed(self, ip: str, limit: int) -> bool:
        await self._up()
        return await self.shared.auth_failed(ip, limit)

    async def acquire_session(self, user_id: str, session_id: str, limit: int) -> bool:
        await self._up()
        return await self.shared.acquire_session(user_id, session_id, limit)

    async def release_session(self, user_id: str, session_id: str) -> None:
        await self._up()
        await self.shared.release_session(user_id, session_id)

    async def refresh_sessions(self, pairs: Iterable[tuple[str, str]]) -> None:
        await self._up()
        for user_id, session_id in pairs:
            self.shared.hold(user_id, session_id)
        self.refreshed.set()

    async def count_session(self, day: str, auth_style: str, backend: str, user_id: str) -> None:
        await self._up()
        await self.shared.count_session(day, auth_style, backend, user_id)

    async def write_usage_day(self, day: str, counts: DayCounts) -> None:
        await self._up()
        self.shared.put_back_usage_day(day, counts)

    async def usage_days(self, days: list[str]) -> list[DayUsage]:
        await self._up()
        return await self.shared.usage_days(len(days), days[-1])

    async def count_app_version(self, at: float, version: str, auth_style: str, user_id: str, max_versions: int) -> str:
        await self._up()
        return await self.shared.count_app_version(at, version, auth_style, user_id, max_versions)

    async def app_versions(self, days: list[str]) -> list[VersionUsage]:
        await self._up()
        return await self.shared.app_versions(len(days), days[-1])

    async def publish_guard(self, state: dict[str, Any], ttl_seconds: float) -> None:
        await self._up()
        await self.shared.publish_guard(state, ttl_seconds)

    async def read_guard(self) -> dict[str, Any] | None:
        await self._up()
        return await self.shared.read_guard()

    async def read_ramp(self) -> dict[str, Any] | None:
        await self._up()
        return await self.shared.read_ramp()

    async def write_ramp(self, record: dict[str, Any], expected_version: int) -> bool:
        await self._up()
        return await self.shared.write_ramp(record, expected_version)

    async def publish_ramp_window(self, window: int, replica: str, numbers: dict[str, Any]) -> None:
        await self._up()
        await self.shared.publish_ramp_window(window, replica, numbers)

    async def read_ramp_window(self, window: int) -> list[dict[str, Any]]:
        await self._up()
        return await self.shared.read_ramp_window(window)


def resilient(shelf: Shelf, clock: Clock, **kwargs: Any) -> Resilient:
    return Resilient(shelf, memory=MemoryStore(), retry_backoff=BACKOFF, clock=clock, **kwargs)


@pytest.fixture
def store_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="gateway.store")
    return caplog


async def test_calls_go_to_the_remote_store_while_it_answers() -> None:
    shelf = Shelf()
    store = resilient(shelf, Clock())
    assert await store.acquire_session("alice", "s1", 1)
    assert not await store.acquire_session("alice", "s2", 1)
    assert shelf.shared.held_sessions() == [("alice", "s1")] and store.held_sessions() == [("alice", "s1")]
    await store.count_session(DAY, "legacy", "old", "alice")
    assert (await store.usage_days(1, DAY))[0].users_legacy == 1
    assert store.available and store.errors == 0 and not store.pending_usage_days


async def test_the_ramp_holds_through_an_outage_on_the_last_record_read() -> None:
    shelf = Shelf()
    store = resilient(shelf, Clock())
    assert await store.write_ramp({"version": 1, "step_index": 2}, 0)
    await store.publish_ramp_window(1, "a", {"attempted": 3})
    assert await store.read_ramp_window(1) == [{"attempted": 3}]
    shelf.down = True
    assert await store.read_ramp() == {"version": 1, "step_index": 2}  # from memory: the step holds
    assert not await store.write_ramp({"version": 2, "step_index": 3}, 1)  # nobody advances blind
    await store.publish_ramp_window(1, "a", {"attempted": 4})
    assert await store.read_ramp_window(1) == []
    shelf.down = False
    assert await shelf.shared.read_ramp() == {"version": 1, "step_index": 2}


async def test_an_outage_is_answered_from_memory_logged_once_and_counted(store_logs: pytest.LogCaptureFixture) -> None:
    shelf, seen = Shelf(), []
    operations: list[str] = []
    store = resilient(shelf, Clock(), on_error=operations.append, on_availability=seen.append)
    shelf.down = True
    assert await store.acquire_session("alice", "s1", 1)
    assert not await store.acquire_session("alice", "s2", 1)  # the limit holds over this process's sessions
    await store.count_session(DAY, "message", "new", "bob")
    assert not store.available and seen == [False]
    assert operations == ["acquire_session"]  # down: no further call waits for the shelf
    assert store.pending_usage_days == [DAY]
    outage = [r for r in store_logs.records if "shelf unreachable" in r.getMessage()]
    assert len(outage) == 1 and outage[0].shelf == "shelf://ops" and outage[0].operation == "acquire_session"


async def test_a_report_is_never_read_from_memory() -> None:
    shelf = Shelf()
    store = resilient(shelf, Clock())
    shelf.down = True
    with pytest.raises(StoreUnavailable, match=r"^shelf at shelf://ops did not answer: ConnectionError: shelf://ops is off$"):
        await store.usage_days(1, DAY)
    with pytest.raises(StoreUnavailable):
        await store.app_versions(1, DAY)
    assert not store.available and store.errors == 2


async def test_probes_wait_for_the_backoff_which_doubles_after_each_failure() -> None:
    shelf, clock = Shelf(), Clock(100.0)
    store = resilient(shelf, clock)
    shelf.down = True
    assert not await store.probe()  # down now; the next probe after BACKOFF[0]
    calls = shelf.calls
    await store.auth_blocked("203.0.113.9", 1)
    assert store._probe_task is None and shelf.calls == calls
    clock.advance(BACKOFF[0])
    await store.auth_blocked("203.0.113.9", 1)
    assert store._probe_task is not None and not await store._probe_task
    clock.advance(BACKOFF[0])  # not enough: the backoff doubled
    await store.auth_blocked("203.0.113.9", 1)
    assert store._probe_task.done() and store.errors == 2


async def test_recovery_writes_the_usage_counted_during_the_outage(store_logs: pytest.LogCaptureFixture) -> None:
    shelf, seen = Shelf(), []
    store = resilient(shelf, Clock(), on_availability=seen.append)
    shelf.down = True
    await store.count_session(DAY, "legacy", "old", "alice")
    assert await store.count_app_version(AT, "1.2.0", "legacy", "alice", 5) == "1.2.0"
    shelf.down = False
    assert await store.probe() and store.available and seen == [False, True]
    assert await store.flush_pending() and not store.pending_usage_days
    usage = await store.usage_days(1, DAY)
    assert (usage[0].sessions_legacy, usage[0].users_legacy) == (1, 1)
    assert [(v.version, v.users_legacy) for v in await store.app_versions(1, DAY)] == [("1.2.0", 1)]
    assert any("shelf reachable again" in r.getMessage() for r in store_logs.records)


async def test_a_write_that_fails_keeps_the_day_for_the_next_recovery() -> None:
    shelf = Shelf()
    store = resilient(shelf, Clock())
    shelf.down = True
    await store.count_session(DAY, "legacy", "old", "alice")
    assert not await store.flush_pending()
    assert store.pending_usage_days == [DAY]


async def test_sessions_opened_during_an_outage_are_shared_by_the_next_refresh() -> None:
    shelf = Shelf()
    store = resilient(shelf, Clock())
    shelf.down = True
    assert await store.acquire_session("alice", "s1", 2)
    await store.refresh_sessions()  # skipped while down
    assert shelf.shared.held_sessions() == []
    shelf.down = False
    assert await store.probe()
    await store.refresh_sessions()
    assert shelf.shared.held_sessions() == [("alice", "s1")]
    await store.release_session("alice", "s1")
    assert shelf.shared.held_sessions() == [] and store.held_sessions() == []


async def test_the_guard_is_read_from_memory_during_an_outage() -> None:
    shelf = Shelf()
    store = resilient(shelf, Clock())
    await store.publish_guard({"state": "tripped"})
    assert await shelf.shared.read_guard() == {"state": "tripped"}
    shelf.down = True
    assert await store.read_guard() == {"state": "tripped"}


async def test_retention_and_session_ttl_reach_the_remote_store() -> None:
    shelf = Shelf()
    store = resilient(shelf, Clock())
    store.retention_days, store.session_ttl = 30, 9.0
    assert (shelf.retention_days, store.memory.retention_days, shelf.session_ttl) == (30, 30, 9.0)


async def test_close_with_the_store_down_says_the_pending_usage_is_lost(store_logs: pytest.LogCaptureFixture) -> None:
    shelf = Shelf()
    store = resilient(shelf, Clock())
    shelf.down = True
    await store.count_session(utc_day(AT), "legacy", "old", "alice")
    await store.close()
    lost = [r for r in store_logs.records if "shelf is unreachable at shutdown" in r.getMessage()]
    assert len(lost) == 1 and lost[0].days == [utc_day(AT)]


async def test_start_probes_and_refreshes_until_close() -> None:
    shelf = Shelf()
    shelf.session_ttl = 0.03  # the refresher runs every ttl / 3
    store = resilient(shelf, Clock())
    assert await store.acquire_session("alice", "s1", 1)
    await shelf.release_session("alice", "s1")  # as if the entry had expired in the shared store
    await store.start()
    assert store.available and store._refresh_task is not None
    await asyncio.wait_for(shelf.refreshed.wait(), TIMEOUT)  # the refresher's first round
    assert shelf.shared.held_sessions() == [("alice", "s1")]
    await store.close()
    assert store._refresh_task is None and shelf.calls > 0


async def test_close_with_the_store_up_writes_what_the_outage_left() -> None:
    shelf = Shelf()
    store = resilient(shelf, Clock())
    shelf.down = True
    await store.count_session(DAY, "legacy", "new", "alice")
    shelf.down = False
    assert await store.probe()  # its flush starts in the background; close does not wait for it to run
    await store.close()
    assert not store.pending_usage_days
    assert (await shelf.shared.usage_days(1, DAY))[0].sessions_new == 1


async def test_a_failing_callback_is_logged_and_does_not_break_the_call(store_logs: pytest.LogCaptureFixture) -> None:
    def broken(_: object) -> None:
        raise RuntimeError("metrics are gone")

    shelf = Shelf()
    store = resilient(shelf, Clock(), on_error=broken, on_availability=broken)
    shelf.down = True
    assert await store.read_guard() is None
    assert store.errors == 1
    assert {"store on_error callback failed", "store on_availability callback failed"} <= {r.getMessage() for r in store_logs.records}


async def test_calls_without_a_limit_or_a_held_session_never_reach_the_remote_store() -> None:
    shelf = Shelf()
    store = resilient(shelf, Clock())
    assert not await store.auth_failed("203.0.113.9", None)
    assert not await store.auth_blocked("203.0.113.9", None)
    assert await store.acquire_session("alice", "s1", None)
    await store.release_session("alice", "s1")
    assert shelf.calls == 0


async def test_a_refresh_that_fails_takes_the_store_down() -> None:
    shelf = Shelf()
    store = resilient(shelf, Clock())
    assert await store.acquire_session("alice", "s1", 1)
    shelf.down = True
    await store.refresh_sessions()
    assert not store.available and store.errors == 1
    await store.release_session("alice", "s1")  # down: the shared entry is left to expire
    assert store.held_sessions() == [] and shelf.shared.held_sessions() == [("alice", "s1")]
