"""The shared store, against a real redis-server started per test (never a mock).

Tests taking `make_store` run against both MemoryStore and RedisStore; tests taking
`replicas` build several RedisStores on one Redis, i.e. several gateway replicas.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.service.store import DayUsage, MemoryStore, RedisStore, SqliteStore, Store, StoreUnavailable, open_store, utc_day

from .helpers import TIMEOUT, Clock, eventually, make_config
from .redis_server import RedisServer, free_port, redis_server  # noqa: F401 - fixture

TTL = 1.5  # session ttl for these tests: a crashed replica's sessions free themselves after it
BACKOFF = (0.02, 0.1)
START = 1_700_000_040.0  # a whole minute
IP = "203.0.113.9"

MakeStore = Callable[..., Store]




@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[Callable[..., RedisStore]]:
    made: list[RedisStore] = []

    def make(**kwargs: Any) -> RedisStore:
        kwargs.setdefault("session_ttl", TTL)
        kwargs.setdefault("retry_backoff", BACKOFF)
        # Generous, so a loaded CI machine never passes for a Redis outage; outage tests set their own.
        kwargs.setdefault("timeout_seconds", 1.0)
        store = RedisStore(kwargs.pop("url", redis_server.url), **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> MakeStore:
    if request.param == "memory":
        return lambda **kwargs: MemoryStore(**kwargs)
    return request.getfixturevalue("replicas")


@pytest.fixture
def redis_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="gateway.store")
    return caplog


def messages(caplog: pytest.LogCaptureFixture, fragment: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gateway.store" and fragment in r.getMessage()]


# -- auth failures ---------------------------------------------------------------------------


async def test_ip_is_blocked_once_it_reaches_the_auth_failure_limit(make_store: MakeStore):
    store = make_store(wall=Clock(START))
    assert await store.auth_failed(IP, 3) is False
    assert await store.auth_failed(IP, 3) is False
    assert not await store.auth_blocked(IP, 3)
    assert await store.auth_failed(IP, 3) is True
    assert await store.auth_blocked(IP, 3)


async def test_auth_block_lasts_until_the_minute_ends(make_store: MakeStore):
    wall = Clock(START)
    store = make_store(wall=wall)
    await store.auth_failed(IP, 1)
    wall.now = START + 59.9
    assert await store.auth_blocked(IP, 1)
    wall.now = START + 60
    assert not await store.auth_blocked(IP, 1)


async def test_auth_failures_are_counted_per_ip(make_store: MakeStore):
    store = make_store(wall=Clock(START))
    await store.auth_failed(IP, 1)
    assert not await store.auth_blocked("198.51.100.1", 1)


async def test_no_auth_failure_limit_never_blocks_nor_counts(make_store: MakeStore):
    store = make_store(wall=Clock(START))
    for _ in range(5):
        assert await store.auth_failed(IP, None) is False
    assert not await store.auth_blocked(IP, None)
    assert not await store.auth_blocked(IP, 1)  # the failures above were not counted


# -- concurrent sessions ---------------------------------------------------------------------


async def test_sessions_past_the_limit_are_refused_until_one_is_released(make_store: MakeStore):
    store = make_store()
    assert await store.acquire_session("alice", "s1", 2)
    assert await store.acquire_session("alice", "s2", 2)
    assert not await store.acquire_session("alice", "s3", 2)
    await store.release_session("alice", "s1")
    assert await store.acquire_session("alice", "s3", 2)
    assert sorted(store.held_sessions()) == [("alice", "s2"), ("alice", "s3")]


async def test_acquiring_the_same_session_twice_takes_one_slot(make_store: MakeStore):
    store = make_store()
    assert await store.acquire_session("alice", "s1", 1)
    assert await store.acquire_session("alice", "s1", 1)
    assert not await store.acquire_session("alice", "s2", 1)


async def test_session_limit_is_per_user(make_store: MakeStore):
    store = make_store()
    assert await store.acquire_session("alice", "s1", 1)
    assert await store.acquire_session("bob", "s1", 1)


async def test_releasing_a_session_never_acquired_is_harmless(make_store: MakeStore):
    store = make_store()
    await store.release_session("nobody", "s1")
    assert await store.acquire_session("nobody", "s2", 1)


async def test_no_session_limit_admits_everyone_and_holds_nothing(make_store: MakeStore):
    store = make_store()
    for n in range(5):
        assert await store.acquire_session("alice", f"s{n}", None)
    assert store.held_sessions() == []


# -- usage ----------------------------------------------------------------------------------


MIX = [  # (auth style, backend, user) sessions of one day
    ("legacy", "old", "alice"),
    ("legacy", "old", "alice"),
    ("legacy", "old", "alice"),
    ("legacy", "new", "bob"),
    ("message", "new", "carol"),
    ("message", "new", "carol"),
    ("message", "old", "dave"),
    ("message", "new", "alice"),  # alice updated her app mid-day: she counts under both styles
]


async def count_mix(store: Store, day: str) -> None:
    for style, backend, user in MIX:
        await store.count_session(day, style, backend, user)


async def test_usage_counts_sessions_and_distinct_users_by_style_and_backend(make_store: MakeStore):
    store = make_store()
    today = utc_day()
    await count_mix(store, today)
    [usage] = await store.usage_days(1)
    assert usage.day == today
    assert (usage.sessions_legacy, usage.sessions_message) == (4, 4)
    assert (usage.sessions_old, usage.sessions_new) == (4, 4)
    assert (usage.users_legacy, usage.users_message) == (2, 3)
    assert (usage.users_old, usage.users_new) == (2, 3)
    assert usage.users == 4
    assert usage.legacy_share_percent == 50.0


async def test_usage_days_lists_every_day_oldest_first_including_empty_ones(make_store: MakeStore):
    store = make_store()
    today = utc_day()
    yesterday = utc_day(time.time() - 86400)
    await store.count_session(yesterday, "legacy", "old", "erin")
    days = await store.usage_days(3, today)
    assert [d.day for d in days][1:] == [yesterday, today]
    assert [d.has_data for d in days] == [False, True, False]
    assert days[1].users_legacy == 1 and days[1].sessions_legacy == 1


@pytest.mark.parametrize(
    ("day", "style", "backend"),
    [("2025-13-01", "legacy", "old"), ("yesterday", "legacy", "old"), ("2025-01-01", "query", "old"), ("2025-01-01", "legacy", "blue")],
)
async def test_count_session_refuses_unknown_days_and_labels(make_store: MakeStore, day: str, style: str, backend: str):
    store = make_store()
    with pytest.raises(ValueError):
        await store.count_session(day, style, backend, "alice")


async def test_usage_memory_is_bounded_sessions_still_counted(redis_logs: pytest.LogCaptureFixture):
    store = MemoryStore(max_usage_users=3)
    today = utc_day()
    for n in range(6):
        await store.count_session(today, "message", "new", f"user{n}")
    await store.count_session(today, "legacy", "old", "user0")  # known users are still updated
    [usage] = await store.usage_days(1)
    assert usage.sessions == 7
    assert usage.users == 3 and usage.users_legacy == 1
    assert len(messages(redis_logs, "reached its bound")) == 1



def test_day_usage_from_counts_sums_the_session_counter_by_style_and_by_backend():
    sessions = {"legacy:old": 3, "legacy:new": 1, "message:new": 2, "message:old": 1}
    usage = DayUsage.from_counts("2025-11-26", sessions, {"legacy": 2, "message": 3, "old": 2, "new": 3}, 4)
    assert (usage.sessions_legacy, usage.sessions_message, usage.sessions_old, usage.sessions_new) == (4, 3, 4, 3)
    assert (usage.users_legacy, usage.users_message, usage.users_old, usage.users_new, usage.users) == (2, 3, 2, 3, 4)
    assert DayUsage.from_counts("2025-11-26", {}, {}, 0) == DayUsage("2025-11-26")


async def test_usage_taken_out_of_memory_and_put_back_reads_as_before():
    store = MemoryStore()
    today = utc_day()
    await count_mix(store, today)
    before = await store.usage_days(1)
    assert store.held_usage_days() == [today]
    counts = store.take_usage_day(today)
    assert store.held_usage_days() == []
    assert not (await store.usage_days(1))[0].has_data
    store.put_back_usage_day(today, counts)
    assert await store.usage_days(1) == before


async def test_usage_put_back_adds_to_what_was_counted_meanwhile():
    store = MemoryStore()
    today = utc_day()
    await store.count_session(today, "legacy", "old", "alice")
    counts = store.take_usage_day(today)
    await store.count_session(today, "message", "new", "alice")
    store.put_back_usage_day(today, counts)
    [usage] = await store.usage_days(1)
    assert (usage.sessions, usage.users, usage.users_legacy, usage.users_message) == (2, 1, 1, 1)

# -- the guard -------------------------------------------------------------------------------


async def test_guard_record_reads_back_until_it_expires(make_store: MakeStore):
    store = make_store()
    assert await store.read_guard() is None
    record = {"state": "tripped", "until": 1700000100.5, "trips": 2, "detail": "9/20 failed"}
    await store.publish_guard(record, ttl_seconds=0.3)
    assert await store.read_guard() == record

    async def gone() -> bool:
        return await store.read_guard() is None

    assert await eventually(gone)


@pytest.fixture(params=["memory", "redis", "sqlite"])
async def ramp_stores(
    request: pytest.FixtureRequest, tmp_path: Any, replicas: Callable[..., RedisStore]
) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores the ramp's replicas would share: one process's memory (the same store twice),
    one Redis, or one SQLite file (``usage.path``, as the workers of one host share it)."""
    if request.param == "memory":
        memory = MemoryStore()
        yield memory, memory
        return
    if request.param == "redis":
        yield replicas(), replicas()
        return
    path = str(tmp_path / "usage.sqlite")
    first, second = SqliteStore(path), SqliteStore(path)
    await first.start()
    await second.start()
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_the_ramp_record_is_written_only_over_the_version_expected(ramp_stores: tuple[Store, Store]):
    a, b = ramp_stores
    assert await a.read_ramp() is None
    first = {"step_index": 0, "version": 1, "reason": "started"}
    assert await a.write_ramp(first, 0)
    assert not await b.write_ramp({**first, "version": 1, "reason": "also started"}, 0)  # A wrote first
    assert await b.read_ramp() == first
    assert await b.write_ramp({**first, "version": 2, "step_index": 1}, 1)
    assert not await a.write_ramp({**first, "version": 2, "step_index": 0}, 1)  # stale: B moved it on
    assert await a.read_ramp() == {**first, "version": 2, "step_index": 1}


async def test_ramp_windows_hold_each_replicas_numbers(ramp_stores: tuple[Store, Store]):
    a, b = ramp_stores
    await a.publish_ramp_window(3, "replica-a", {"attempted": 1})
    await a.publish_ramp_window(3, "replica-a", {"attempted": 2})  # replaces its own
    await b.publish_ramp_window(3, "replica-b", {"attempted": 5})
    await b.publish_ramp_window(4, "replica-b", {"attempted": 7})
    assert sorted(n["attempted"] for n in await a.read_ramp_window(3)) == [2, 5]
    assert await b.read_ramp_window(4) == [{"attempted": 7}]
    assert await a.read_ramp_window(9) == []


async def test_while_redis_is_down_the_ramp_reads_its_last_record_and_writes_nothing(replicas):
    store = replicas(url=f"redis://127.0.0.1:{free_port()}/0", timeout_seconds=0.2)
    assert await store.read_ramp() is None
    assert not await store.write_ramp({"version": 1}, 0)
    assert not store.available
    await store.publish_ramp_window(1, "r", {"attempted": 1})  # dropped, not raised
    assert await store.read_ramp_window(1) == []


async def test_a_ramp_record_read_before_an_outage_is_kept_through_it(replicas, redis_server):
    store = replicas()
    record = {"step_index": 2, "version": 4}
    assert await store.write_ramp(record, 0)
    assert await store.read_ramp() == record
    redis_server.stop()
    assert await store.read_ramp() == record
    assert not await store.write_ramp({**record, "version": 5}, 4)


async def stops_when_cancelled(call: Callable[[], Awaitable[object]]) -> None:
    """A loop of `call`, cancelled after 20 calls, 20 times over: each time the cancel stops it."""
    for _ in range(20):
        calls = 0
        looping = asyncio.Event()

        async def loop() -> None:
            nonlocal calls
            while True:
                await call()
                calls += 1
                if calls == 20:
                    looping.set()

        task = asyncio.create_task(loop())
        await asyncio.wait_for(looping.wait(), TIMEOUT)
        task.cancel()
        await asyncio.wait({task}, timeout=TIMEOUT)
        assert task.cancelled()


async def test_a_loop_of_store_calls_stops_when_cancelled(replicas):
    """redis-py can swallow a cancel that lands mid-command; the store raises it again, so a
    background loop (the ramp's, the guard's) stops with the gateway."""
    store = replicas()
    await stops_when_cancelled(store.read_ramp)


async def test_a_loop_of_session_refreshes_stops_when_cancelled(replicas):
    """The session refresher's call, cancelled mid-pipeline at shutdown, must stop the loop
    too: a refresher that lost its cancel hung the store's close."""
    store = replicas()
    await stops_when_cancelled(lambda: store.refresh_sessions([("alice", "s1"), ("bob", "s2")]))


# -- replicas sharing one Redis ----------------------------------------------------------------


async def test_two_replicas_share_the_auth_failure_limit(replicas):
    wall = Clock(START)
    a, b = replicas(wall=wall), replicas(wall=wall)
    await a.auth_failed(IP, 3)
    await b.auth_failed(IP, 3)
    assert not await a.auth_blocked(IP, 3)
    await a.auth_failed(IP, 3)
    assert await b.auth_blocked(IP, 3)


async def test_racing_acquires_across_two_replicas_never_exceed_the_limit(replicas, redis_server):
    a, b = replicas(), replicas()
    attempts = [(a if n % 2 else b).acquire_session("alice", f"s{n}", 3) for n in range(50)]
    results = await asyncio.gather(*attempts)
    assert results.count(True) == 3
    assert len(a.held_sessions()) + len(b.held_sessions()) == 3
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await raw.zcard("wsgw:sessions:alice") == 3
    finally:
        await raw.aclose()


async def test_a_crashed_replicas_sessions_expire_after_the_ttl(replicas):
    crashed, live = replicas(), replicas()
    await live.start()
    assert await live.acquire_session("alice", "s0", 3)  # refreshed all along: the key itself never expires
    assert await crashed.acquire_session("alice", "s1", 3)
    assert await crashed.acquire_session("alice", "s2", 3)
    await crashed.close()  # no release, no refresh: as if the process died
    assert not await live.acquire_session("alice", "s3", 3)

    def admitted(session: str) -> Callable[[], Awaitable[bool]]:
        return lambda: live.acquire_session("alice", session, 3)

    # s1 and s2 were taken one after the other, so they expire one after the other.
    assert await eventually(admitted("s3"), within=TIMEOUT)
    assert await eventually(admitted("s4"), within=TIMEOUT)
    assert not await live.acquire_session("alice", "s5", 3)


async def test_a_live_replica_keeps_its_sessions_past_the_ttl(replicas):
    holder, other = replicas(), replicas()
    await holder.start()
    assert await holder.acquire_session("alice", "s1", 1)
    loop = asyncio.get_running_loop()
    until = loop.time() + 2 * TTL
    while loop.time() < until:  # over two ttls the refresher must keep the slot taken
        assert not await other.acquire_session("alice", "s2", 1)
        await asyncio.sleep(TTL / 10)
    await holder.release_session("alice", "s1")
    assert await other.acquire_session("alice", "s2", 1)


async def test_guard_published_by_one_replica_is_read_by_the_other(replicas):
    a, b = replicas(), replicas()
    record = {"state": "tripped", "until": 1700000100, "trips": 1, "detail": "tripped: 12/20 failed"}
    await a.publish_guard(record)
    assert await b.read_guard() == record
    await b.publish_guard({"state": "healthy", "trips": 1})
    assert await a.read_guard() == {"state": "healthy", "trips": 1}


async def test_keys_follow_the_documented_families_and_expire(replicas, redis_server):
    store = replicas(retention_days=3)
    await store.auth_failed(IP, 5)
    await store.acquire_session("alice", "s1", 2)
    await count_mix(store, utc_day())
    await store.publish_guard({"state": "healthy"}, ttl_seconds=30)
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        keys = sorted(await raw.keys("*"))
        families = {
            r"wsgw:authfail:\d+:" + re.escape(IP): (0, 120),
            r"wsgw:sessions:alice": (0, TTL),
            r"wsgw:usage:\d{4}-\d\d-\d\d:sessions": (3 * 86400, 4 * 86400),
            r"wsgw:usage:\d{4}-\d\d-\d\d:users:(legacy|message|old|new)": (3 * 86400, 4 * 86400),
            r"wsgw:guard": (0, 30),
        }
        assert len(keys) == 1 + 1 + 1 + 4 + 1
        for key in keys:
            [(low, high)] = [bounds for pattern, bounds in families.items() if re.fullmatch(pattern, key)]
            ttl_ms = await raw.pttl(key)
            assert low * 1000 < ttl_ms <= high * 1000, key
    finally:
        await raw.aclose()


# -- Redis going away ---------------------------------------------------------------------------


async def test_redis_killed_mid_session_keeps_answering_and_loses_no_usage(
    replicas, redis_server: RedisServer, redis_logs: pytest.LogCaptureFixture
):
    failed_ops: list[str] = []
    availability: list[bool] = []
    a = replicas(on_error=failed_ops.append, on_availability=availability.append)
    b = replicas()
    await a.start()
    today = utc_day()
    assert await a.acquire_session("alice", "s1", 2)

    redis_server.kill()
    await asyncio.gather(*(a.read_guard() for _ in range(10)))  # in flight together, all fail
    for _ in range(2):
        await a.auth_failed(IP, 2)
    assert await a.auth_blocked(IP, 2)  # limits now come from this replica's memory
    assert await a.acquire_session("alice", "s2", 2)
    assert not await a.acquire_session("alice", "s3", 2)  # s1 (taken before the outage) still counts
    await count_mix(a, today)
    await a.publish_guard({"state": "tripped", "trips": 1})
    assert await a.read_guard() == {"state": "tripped", "trips": 1}
    assert not a.available
    assert a.errors >= 1 and len(failed_ops) == a.errors
    assert a.pending_usage_days == [today]
    with pytest.raises(StoreUnavailable):
        await b.usage_days(1)
    assert len(messages(redis_logs, "redis unreachable")) == 2  # once per replica, not per call

    redis_server.start()  # same port, empty: what was in Redis before is gone, our outage counts are not

    async def reconnected() -> bool:
        await a.auth_blocked(IP, 2)  # any call lets the store try again on its own
        return a.available

    assert await eventually(reconnected)
    assert await a.flush_pending()
    assert a.pending_usage_days == []
    [usage] = await b.usage_days(1)
    assert (usage.sessions_legacy, usage.sessions_message, usage.users) == (4, 4, 4)
    assert (usage.users_legacy, usage.users_message) == (2, 3)
    assert availability == [False, True]
    for _ in range(3):
        await a.read_guard()
    assert len(messages(redis_logs, "reachable again")) == 2  # a's, then b's when it read the report

    await a.refresh_sessions()  # sessions held through the outage are shared again
    assert not await b.acquire_session("alice", "s9", 2)


async def test_redis_down_at_start_serves_from_memory_and_logs_once(replicas, redis_logs: pytest.LogCaptureFixture):
    store = replicas(url=f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    await store.start()
    assert not store.available
    assert await store.acquire_session("alice", "s1", 1)
    assert not await store.acquire_session("alice", "s2", 1)
    await store.count_session(utc_day(), "legacy", "old", "alice")
    assert not await store.auth_blocked(IP, 1)
    outage = messages(redis_logs, "redis unreachable")
    assert len(outage) == 1
    assert outage[0].redis == f"redis://:***@127.0.0.1:{store.url.rsplit(':', 1)[1]}"
    assert "hunter2" not in redis_logs.text and all("hunter2" not in repr(vars(r)) for r in redis_logs.records)


async def test_a_stalled_redis_does_not_stall_calls(replicas, redis_server: RedisServer):
    store = replicas(timeout_seconds=0.1)
    assert await store.acquire_session("alice", "s1", 2)
    redis_server.pause()
    try:
        # Redis accepts nothing now; without the per-call bound these would wait until SIGCONT.
        assert await asyncio.wait_for(store.acquire_session("alice", "s2", 2), TIMEOUT)
        assert not await asyncio.wait_for(store.auth_blocked(IP, 1), TIMEOUT)
        assert not store.available
    finally:
        redis_server.resume()



async def test_probes_of_a_down_redis_wait_for_the_backoff_on_the_monotonic_clock(replicas):
    clock = Clock(1_000.0)
    store = replicas(url=f"redis://127.0.0.1:{free_port()}/0", clock=clock)
    await store.start()  # the first probe fails: down, next probe after BACKOFF[0]
    assert not store.available and store.errors == 1
    await store.auth_blocked(IP, 1)
    assert store._probe_task is None  # the clock has not moved: no probe yet
    clock.advance(BACKOFF[0])
    await store.auth_blocked(IP, 1)
    assert store._probe_task is not None
    await store._probe_task
    assert store.errors == 2
    clock.advance(BACKOFF[0])  # the backoff doubled after that failure
    await store.auth_blocked(IP, 1)
    assert store._probe_task.done() and store.errors == 2


def test_memory_store_is_always_available():
    assert MemoryStore().available

# -- wiring ---------------------------------------------------------------------------------------


async def test_open_store_picks_memory_without_redis_and_redis_with_it(redis_server: RedisServer):
    assert isinstance(open_store(make_config()), MemoryStore)
    wall = Clock(START)
    assert open_store(make_config(), wall=wall).wall is wall  # type: ignore[attr-defined]
    store = open_store(make_config(redis={"url": redis_server.url, "timeout_seconds": 0.5}, usage={"retention_days": 30}))
    try:
        assert isinstance(store, RedisStore)
        assert store.timeout == 0.5 and store.retention_days == 30
        assert await store.probe()
    finally:
        await store.close()

