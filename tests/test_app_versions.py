"""Usage by app version (``usage.app_version``): the header parsed into a bounded label, the
counts in each store (memory, a real Redis, a SQLite file), the metric's cardinality, the
report and the status page. The config rules are in test_config.py."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml

import gateway as gateway_package
from gateway.service.admin import create_admin_app
from gateway.service.appversion import app_version
from gateway.core.config import AppVersionConfig
from gateway.service.metrics import Metrics
from gateway.service.runtime import Gateway
from gateway.service.server import start_site
from gateway.service.status_page import History, Sample, status_json
from gateway.service.store import MemoryStore, RedisStore, SqliteStore, Store, StoreUnavailable, VersionUsage, utc_day

from .helpers import (
    CHROMIUM, TIMEOUT, Servers, eventually, make_config, make_token, open_client, raw_config, status_page_dom,
)
from .redis_server import RedisServer, redis_server  # noqa: F401 - fixture

PATTERN = "WealthCoach/(?P<version>[0-9.]+)"
SETTINGS = AppVersionConfig(pattern=PATTERN)
NOON = 1_795_000_000.0  # 2026-11-18, a fixed UTC day
DAY = utc_day(NOON)
NEXT_DAY = utc_day(NOON + 86400)

MakeStore = Callable[..., Store]


# -- the label ----------------------------------------------------------------------------------


def test_the_version_is_the_patterns_group_in_the_user_agent() -> None:
    assert app_version(SETTINGS, [("User-Agent", "WealthCoach/2.3.1 (iPhone; iOS 17.1)")]) == "2.3.1"


def test_the_header_is_found_whatever_its_case() -> None:
    assert app_version(SETTINGS, [("user-agent", "WealthCoach/2.3.1")]) == "2.3.1"


def test_another_header_can_carry_the_version() -> None:
    settings = AppVersionConfig(pattern="^(?P<version>[0-9]+[.][0-9]+)$", header="X-App-Version")
    headers = [("User-Agent", "WealthCoach/9.9"), ("X-App-Version", "4.2")]
    assert app_version(settings, headers) == "4.2"


@pytest.mark.parametrize(
    "headers",
    [
        [],  # no header
        [("User-Agent", "okhttp/4.12.0")],  # no match
        [("User-Agent", "WealthCoach/")],  # an empty version
        [("User-Agent", "WealthCoach/" + "1." * 40)],  # longer than 64 characters
    ],
)
def test_no_usable_version_counts_as_unknown(headers: list[tuple[str, str]]) -> None:
    assert app_version(SETTINGS, headers) == "unknown"


# -- the stores ---------------------------------------------------------------------------------


@pytest.fixture
async def stores(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Callable[[str], Any]]:
    """Make stores of a kind; several of the same kind share one Redis or one file (replicas, workers)."""
    made: list[Store] = []

    async def make(kind: str) -> Store:
        store: Store
        if kind == "memory":
            store = MemoryStore()
        elif kind == "redis":
            store = RedisStore(redis_server.url, timeout_seconds=1.0)
        else:
            store = SqliteStore(str(tmp_path / "usage.db"), flush_seconds=3600)
            await store.start()
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


KINDS = ["memory", "redis", "sqlite"]


async def count(store: Store, *sessions: tuple[str, str, str], at: float = NOON, cap: int = 50) -> list[str]:
    return [await store.count_app_version(at, version, style, user, cap) for version, style, user in sessions]


def rows(versions: list[VersionUsage]) -> dict[str, tuple[int, int]]:
    return {v.version: (v.users, v.users_legacy) for v in versions}


@pytest.mark.parametrize("kind", KINDS)
async def test_each_version_counts_its_distinct_users_and_those_on_the_old_method(stores, kind: str) -> None:
    store = await stores(kind)
    await count(
        store,
        ("2.3.1", "message", "alice"),
        ("2.3.1", "message", "alice"),  # a second session of the same user
        ("2.3.1", "legacy", "bob"),
        ("2.2.0", "legacy", "carol"),
        ("2.2.0", "message", "carol"),  # carol counts once, and as a legacy user
        ("unknown", "legacy", "dave"),
    )
    await count(store, ("2.3.1", "message", "erin"), at=NOON + 60)
    versions = await store.app_versions(1, DAY)
    assert [v.version for v in versions] == ["2.3.1", "2.2.0", "unknown"]  # most users first
    assert rows(versions) == {"2.3.1": (3, 1), "2.2.0": (1, 1), "unknown": (1, 1)}
    assert versions[0].last_seen == NOON + 60 and versions[1].last_seen == NOON
    assert versions[0].legacy_share_percent == pytest.approx(100 / 3)


@pytest.mark.parametrize("kind", KINDS)
async def test_users_are_counted_once_over_several_days(stores, kind: str) -> None:
    store = await stores(kind)
    await count(store, ("2.2.0", "legacy", "carol"), ("2.2.0", "message", "dan"))
    await count(store, ("2.2.0", "message", "carol"), ("2.2.0", "message", "erin"), at=NOON + 86400)
    assert rows(await store.app_versions(2, NEXT_DAY)) == {"2.2.0": (3, 1)}
    assert rows(await store.app_versions(1, NEXT_DAY)) == {"2.2.0": (2, 0)}
    assert await store.app_versions(1, utc_day(NOON + 3 * 86400)) == []


@pytest.mark.parametrize("kind", KINDS)
async def test_versions_past_the_cap_count_as_other_and_unknown_takes_no_slot(stores, kind: str) -> None:
    store = await stores(kind)
    landed = await count(
        store,
        ("unknown", "legacy", "u0"),
        ("1.0", "legacy", "u1"),
        ("1.1", "message", "u2"),
        ("1.2", "legacy", "u3"),  # the third version of the day: past a cap of 2
        ("1.3", "message", "u4"),
        ("1.0", "message", "u5"),  # an admitted version keeps its row
        cap=2,
    )
    assert landed == ["unknown", "1.0", "1.1", "other", "other", "1.0"]
    assert rows(await store.app_versions(1, DAY)) == {"1.0": (2, 1), "1.1": (1, 0), "other": (2, 1), "unknown": (1, 1)}
    # the cap is per day: the next day starts with room again
    assert await count(store, ("1.3", "message", "u4"), at=NOON + 86400, cap=2) == ["1.3"]


async def test_two_replicas_on_one_redis_share_the_cap(stores) -> None:
    a, b = await stores("redis"), await stores("redis")
    assert await count(a, ("1.0", "legacy", "u1"), cap=2) == ["1.0"]
    assert await count(b, ("1.1", "legacy", "u2"), cap=2) == ["1.1"]
    assert await count(a, ("1.2", "legacy", "u3"), cap=2) == ["other"]
    racing = [b.count_app_version(NOON, f"2.{n}", "message", f"r{n}", 3) for n in range(6)]
    landed = await asyncio.gather(*racing)
    assert landed.count("other") == 5  # one slot was left of 3, whichever replica's call came first
    assert rows(await a.app_versions(1, DAY)).keys() == {"1.0", "1.1", "other", *(v for v in landed if v != "other")}


async def test_two_processes_on_one_file_see_each_others_versions_after_a_flush(stores) -> None:
    a, b = await stores("sqlite"), await stores("sqlite")
    await count(a, ("1.0", "legacy", "u1"), ("1.1", "legacy", "u2"), cap=2)
    await a.flush()
    await count(b, ("1.0", "message", "u3"), cap=2)
    await b.flush()  # b reads the day's versions from the file as it writes its own
    assert await count(b, ("1.2", "message", "u4"), cap=2) == ["other"]
    assert rows(await b.app_versions(1, DAY)) == {"1.0": (2, 1), "1.1": (1, 1), "other": (1, 0)}


@pytest.mark.parametrize("kind", ["memory", "redis", "sqlite"])
@pytest.mark.parametrize(("version", "style", "cap"), [("", "legacy", 5), ("x" * 65, "legacy", 5), ("1.0", "query", 5), ("1.0", "legacy", 0)])
async def test_count_app_version_refuses_bad_labels(stores, kind: str, version: str, style: str, cap: int) -> None:
    store = await stores(kind)
    with pytest.raises(ValueError):
        await store.count_app_version(NOON, version, style, "alice", cap)


async def test_versions_share_the_memory_bound_of_the_usage_book() -> None:
    store = MemoryStore(max_usage_users=3)
    await store.count_session(DAY, "legacy", "old", "u1")  # one entry
    assert await count(store, ("1.0", "legacy", "u1"), ("1.0", "legacy", "u2"), ("1.0", "legacy", "u3")) == ["1.0"] * 3
    assert rows(await store.app_versions(1, DAY)) == {"1.0": (2, 2)}  # the third user did not fit
    taken = store.take_usage_day(DAY)
    store.put_back_usage_day(DAY, taken)
    assert rows(await store.app_versions(1, DAY)) == {"1.0": (2, 2)}


async def test_redis_keys_hold_user_digests_and_expire_with_the_usage(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, timeout_seconds=1.0, retention_days=3)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        at = time.time()  # Redis expires keys on its own clock: the day must be a current one
        day = utc_day(at)
        await store.count_app_version(at, "2.3.1", "legacy", "alice", 50)
        keys = sorted(k.decode() for k in await raw.keys("*"))
        assert keys == [f"wsgw:usage:{day}:appv", f"wsgw:usage:{day}:appv:legacy:2.3.1", f"wsgw:usage:{day}:appv:seen"]
        members = await raw.smembers(f"wsgw:usage:{day}:appv:legacy:2.3.1")
        assert len(members) == 1 and b"alice" not in members and len(next(iter(members))) == 16
        for key in keys:
            assert 3 * 86400 * 1000 < await raw.pttl(key) <= 4 * 86400 * 1000
    finally:
        await raw.aclose()
        await store.close()


async def test_versions_counted_while_redis_is_down_are_written_when_it_returns(redis_server: RedisServer) -> None:
    a = RedisStore(redis_server.url, timeout_seconds=0.2, retry_backoff=(0.02, 0.1))
    b = RedisStore(redis_server.url, timeout_seconds=1.0)
    try:
        redis_server.kill()
        landed = await count(a, ("1.0", "legacy", "u1"), ("1.1", "message", "u2"), ("1.2", "message", "u3"), cap=2)
        assert landed == ["1.0", "1.1", "other"]  # the cap held in this replica's memory
        with pytest.raises(StoreUnavailable):
            await b.app_versions(1, DAY)
        redis_server.start()

        async def reconnected() -> bool:
            await a.read_guard()
            return a.available

        assert await eventually(reconnected)
        assert await a.flush_pending()
        versions = await b.app_versions(1, DAY)
        assert rows(versions) == {"1.0": (1, 1), "1.1": (1, 0), "other": (1, 0)}
        assert {v.last_seen for v in versions} == {NOON}
        assert await count(b, ("1.3", "legacy", "u4"), cap=2) == ["other"]  # the day's admitted versions were written too
    finally:
        await a.close()
        await b.close()


async def test_a_sqlite_file_from_before_app_versions_reads_as_none(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE usage_sessions (day TEXT NOT NULL, route TEXT NOT NULL, sessions INTEGER NOT NULL, "
        "PRIMARY KEY (day, route)) WITHOUT ROWID;"
    )
    db.close()
    assert await SqliteStore(str(path)).app_versions(7, DAY) == []


async def test_the_sqlite_file_keeps_digests_never_user_ids(stores, tmp_path: Path) -> None:
    store = await stores("sqlite")
    await count(store, ("2.3.1", "legacy", "alice-the-user"))
    await store.flush()
    assert b"alice-the-user" not in (tmp_path / "usage.db").read_bytes()
    assert rows(await store.app_versions(1, DAY)) == {"2.3.1": (1, 1)}


# -- the metric ---------------------------------------------------------------------------------


def label_values(metrics: Metrics) -> set[str]:
    return {
        s.labels["app_version"]
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "ws_gateway_app_version_sessions_total"
    }


def test_the_metric_never_takes_more_than_max_versions_plus_two_values() -> None:
    metrics = Metrics()
    for n in range(20):
        metrics.count_app_version(f"1.{n}", "legacy", 3)
    metrics.count_app_version("unknown", "message", 3)
    metrics.count_app_version("other", "message", 3)
    assert label_values(metrics) == {"1.0", "1.1", "1.2", "other", "unknown"}
    assert metrics.registry.get_sample_value(
        "ws_gateway_app_version_sessions_total", {"app_version": "other", "auth_style": "legacy"}
    ) == 17


# -- the gateway ----------------------------------------------------------------------------------

APP_VERSION = {"app_version": {"pattern": PATTERN, "max_versions": 2}}


async def test_a_ready_session_is_counted_under_the_version_its_headers_name() -> None:
    gateway = Gateway(make_config(usage=APP_VERSION))
    gateway.pending = 4  # what the listener counted for the four sessions
    for user, agent in (("u1", "WealthCoach/2.3.1 (iOS)"), ("u2", "WealthCoach/2.2.0"), ("u3", "WealthCoach/1.0"), ("u4", "curl/8")):
        gateway.session_ready("legacy", "old", user, 0.01, [("User-Agent", agent)])

    async def counted() -> bool:
        return len(await gateway.store.app_versions(1)) == 4

    assert await eventually(counted)
    assert rows(await gateway.store.app_versions(1)) == {"2.3.1": (1, 1), "2.2.0": (1, 1), "other": (1, 1), "unknown": (1, 1)}
    sessions = {
        s.labels["app_version"]: s.value
        for family in gateway.metrics.registry.collect()
        for s in family.samples
        if s.name == "ws_gateway_app_version_sessions_total"
    }
    assert sessions == {"2.3.1": 1, "2.2.0": 1, "other": 1, "unknown": 1}


async def test_without_usage_app_version_nothing_is_counted_by_version() -> None:
    gateway = Gateway(make_config())
    gateway.pending = 1
    gateway.session_ready("legacy", "old", "u1", 0.01, [("User-Agent", "WealthCoach/2.3.1")])
    await gateway.stop()  # waits for the background store work
    assert await gateway.store.app_versions(1) == []
    assert gateway.rollout_status()["app_versions"] is None


# -- the status page --------------------------------------------------------------------------------


async def fetch_json(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        return await response.json()


async def test_status_json_and_rollout_show_todays_table_per_version() -> None:
    gateway = Gateway(make_config(usage=APP_VERSION))
    now = time.time()
    for version, style, user in (("2.3.1", "message", "u1"), ("2.3.1", "legacy", "u2"), ("2.2.0", "legacy", "u3")):
        await gateway.store.count_app_version(now, version, style, user, 2)
    runner, port = await start_site(create_admin_app(gateway), "127.0.0.1", 0)
    try:
        async def table() -> Any:
            return (await fetch_json(f"http://127.0.0.1:{port}/status.json"))["rollout"]["app_versions"]

        async def shown() -> bool:
            return (await table()) is not None  # the first request starts the read from the store

        assert await eventually(shown)
        body = await table()
        rollout = await fetch_json(f"http://127.0.0.1:{port}/rollout")
    finally:
        await runner.cleanup()
    assert body["day"] == utc_day(now)
    assert [(v["version"], v["users"], v["users_legacy"], v["legacy_share_percent"]) for v in body["versions"]] == [
        ("2.3.1", 2, 1, 50.0),
        ("2.2.0", 1, 1, 100.0),
    ]
    assert body["versions"][0]["last_seen"] == pytest.approx(now)
    assert rollout["app_versions"]["versions"] == body["versions"]




@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
async def test_browser_draws_the_table_per_version_as_text() -> None:
    history = History(every=60, window=3600)
    history.add(Sample(at=0.0))
    history.add(Sample(at=60.0))
    table = {
        "day": "2026-11-18", "read_at": "2026-11-18T14:05:00Z",
        "versions": [
            {"version": "2.3.1", "users": 900, "users_legacy": 0, "legacy_share_percent": 0.0, "last_seen": NOON},
            {"version": "<b>2.2</b>", "users": 80, "users_legacy": 30, "legacy_share_percent": 37.5, "last_seen": NOON},
        ],
    }

    dom = await status_page_dom(status_json(history, history.samples[-1], {"guard": {}, "app_versions": table}))
    assert '<section id="versions" aria-label="usage by app version">' in dom  # no longer hidden
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(NOON))
    assert f'<tr data-version="2.3.1"><td>2.3.1</td><td>900</td><td>0</td><td>0.00 %</td><td>{when}</td></tr>' in dom
    assert '<td>&lt;b&gt;2.2&lt;/b&gt;</td><td>80</td><td>30</td><td class="bad">37.50 %</td>' in dom


# -- ws-gateway report ------------------------------------------------------------------------------


def run_report(config_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`ws-gateway report` as ops run it, on the same gateway package this test imported."""
    root = str(Path(gateway_package.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "gateway", "report", "--config", str(config_file), *args],
        cwd=config_file.parent, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )


DEPRECATED_DAYS_AGO = 40


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
async def test_report_shows_each_version_and_the_plan(stores, redis_server: RedisServer, tmp_path: Path, kind: str) -> None:
    store = await stores(kind)
    now = time.time()
    today = utc_day(now)
    for version, style, user in (
        ("2.3.1", "message", "u1"), ("2.3.1", "message", "u2"), ("2.3.1", "legacy", "u3"), ("2.2.0", "legacy", "u4"),
    ):
        await store.count_app_version(now, version, style, user, 50)
        await store.count_session(today, style, "old", user)
    await store.close()  # a SqliteStore writes its file
    if utc_day() != today:
        pytest.skip("the UTC day changed while counting")
    where = {"redis": {"url": redis_server.url}} if kind == "redis" else {}
    usage = {"path": str(tmp_path / "usage.db")} if kind == "sqlite" else {}
    auth = {"legacy": "deprecate", "legacy_deprecated_at": int(now) - DEPRECATED_DAYS_AGO * 86400}
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(yaml.safe_dump(raw_config(usage={**usage, **APP_VERSION}, auth=auth, **where)))

    text = await asyncio.to_thread(run_report, config_file, "--days", "7")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.rstrip("\n").splitlines()
    assert lines[7].split()[:6] == [today, "2", "2", "2", "2", "50.00%"]
    assert lines[9].split()[:4] == ["app", "version", "users", "legacy"]
    assert lines[10].split()[:4] == ["2.3.1", "3", "1", "33.33%"]
    assert lines[11].split()[:4] == ["2.2.0", "1", "1", "100.00%"]
    assert lines[10].split()[4] == today
    assert lines[-1].endswith(
        f"the plan: {DEPRECATED_DAYS_AGO} of 90 days since auth.legacy_deprecated_at; legacy share 50.00% of 1% on {today}, "
        "held up by 2.2.0 (1 of its 1 users), 2.3.1 (1 of its 3 users)"
    )

    as_json = await asyncio.to_thread(run_report, config_file, "--days", "7", "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert [(v["version"], v["users"], v["users_legacy"]) for v in data["versions"]] == [("2.3.1", 3, 1), ("2.2.0", 1, 1)]
    assert data["versions"][0]["last_seen"] == pytest.approx(now)
    assert data["plan"]["days_since_deprecated"] == DEPRECATED_DAYS_AGO
    assert [v["version"] for v in data["plan"]["held_up_by"]] == ["2.2.0", "2.3.1"]
    assert "verdict: " + data["verdict"] == lines[-1]


# -- over real sockets ------------------------------------------------------------------------------


async def test_sessions_over_real_sockets_are_counted_under_their_user_agents_version(servers: Servers) -> None:
    stack = await servers.stack(usage=APP_VERSION)
    agents = {"u1": "WealthCoach/2.3.1 (iPhone)", "u2": "WealthCoach/2.2.0 (Android)", "u3": "okhttp/4.12"}
    for (user, agent), style in zip(agents.items(), ("message", "legacy", "legacy")):
        ws = await open_client(stack, style, make_token(user), early=["hi"], user_agent_header=agent)
        while await ws.recv() != "hi":
            pass
        await ws.close()

    async def counted() -> bool:
        return sum(v.users for v in await stack.gateway.store.app_versions(1)) == 3

    assert await eventually(counted)
    assert rows(await stack.gateway.store.app_versions(1)) == {"2.3.1": (1, 0), "2.2.0": (1, 1), "unknown": (1, 1)}


async def test_a_version_header_the_backend_is_not_sent_is_still_read(servers: Servers) -> None:
    settings = {"app_version": {"header": "X-App-Version", "pattern": "^(?P<version>[0-9.]+)$"}}
    stack = await servers.stack(usage=settings)
    ws = await open_client(stack, "message", make_token("u1"), additional_headers={"X-App-Version": "3.1.4"})
    assert json.loads(await ws.recv())["type"] == "connected"
    await ws.close()

    async def counted() -> bool:
        return sum(v.users for v in await stack.gateway.store.app_versions(1)) == 1

    assert await eventually(counted)
    assert rows(await stack.gateway.store.app_versions(1)) == {"3.1.4": (1, 0)}
