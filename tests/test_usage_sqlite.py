"""Usage in a SQLite file (`usage.path`): the store, and `ws-gateway report` reading what a
real gateway counted, without Redis. The config rules of `usage.path` are in test_config.py."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.core.configparse import parse_config
from gateway.service.store import MemoryStore, SqliteStore, StoreUnavailable, open_store, utc_day
from gateway.service.store.sqlite import read_days

from .helpers import SECRET, TIMEOUT, Servers, eventually, make_token, open_client, raw_config

TODAY = "2026-11-26"


# -- which store ------------------------------------------------------------------------------


def test_open_store_picks_the_sqlite_store_only_with_a_path(tmp_path: Path) -> None:
    with_path = open_store(parse_config(raw_config(usage={"path": str(tmp_path / "u.db"), "retention_days": 9}), env={}))
    assert isinstance(with_path, SqliteStore) and with_path.retention_days == 9
    without = open_store(parse_config(raw_config(), env={}))
    assert type(without) is MemoryStore


# -- the store --------------------------------------------------------------------------------


@pytest.fixture
async def opened(tmp_path: Path):
    """Open SqliteStores on files under tmp_path; all closed at teardown."""
    stores: list[SqliteStore] = []

    async def open_one(name: str = "usage.db", **kwargs: Any) -> SqliteStore:
        store = SqliteStore(str(tmp_path / name), **{"flush_seconds": 3600, **kwargs})
        await store.start()
        stores.append(store)
        return store

    yield open_one
    for store in stores:
        await store.close()


async def count(store: SqliteStore, *sessions: tuple[str, str, str], day: str = TODAY) -> None:
    for style, backend, user in sessions:
        await store.count_session(day, style, backend, user)


async def test_flushed_usage_reads_back_exactly(opened) -> None:
    store = await opened()
    await count(store, ("legacy", "old", "ann"), ("legacy", "old", "ann"), ("message", "new", "bob"), ("message", "old", "ann"))
    await store.flush()
    assert store.held_usage_days() == []
    [day] = read_days(store.path, [TODAY])
    assert (day.sessions_legacy, day.sessions_message, day.sessions_old, day.sessions_new) == (2, 2, 3, 1)
    assert (day.users_legacy, day.users_message, day.users_old, day.users_new, day.users) == (1, 2, 1, 1, 2)


async def test_usage_days_writes_what_is_still_in_memory_first(opened) -> None:
    store = await opened()
    await count(store, ("legacy", "new", "cy"))
    days = await store.usage_days(2, today=TODAY)
    assert [d.day for d in days] == ["2026-11-25", TODAY]
    assert (days[0].has_data, days[1].users_legacy) == (False, 1)


async def test_two_processes_sharing_the_file_add_sessions_and_merge_users(opened) -> None:
    first, second = await opened(), await opened()
    await count(first, ("legacy", "old", "ann"), ("message", "new", "bob"))
    await count(second, ("message", "old", "ann"), ("message", "new", "bob"))
    await first.flush()
    await second.flush()
    [day] = read_days(first.path, [TODAY])
    assert day.sessions == 4
    assert (day.users, day.users_legacy, day.users_message, day.users_old, day.users_new) == (2, 1, 2, 1, 1)


async def test_later_flushes_add_to_the_same_day(opened) -> None:
    store = await opened()
    await count(store, ("legacy", "old", "ann"))
    await store.flush()
    await count(store, ("legacy", "old", "ann"), ("legacy", "old", "dan"))
    await store.flush()
    [day] = read_days(store.path, [TODAY])
    assert (day.sessions_legacy, day.users_legacy) == (3, 2)


async def test_close_writes_the_last_counts(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "usage.db"), flush_seconds=3600)
    await store.start()
    await count(store, ("message", "new", "eve"))
    await store.close()
    assert read_days(str(tmp_path / "usage.db"), [TODAY])[0].users_message == 1


async def test_periodic_flush_writes_without_being_asked(opened) -> None:
    store = await opened(flush_seconds=0.01)
    await count(store, ("message", "new", "eve"))
    async def written() -> bool:
        return not store.held_usage_days()

    assert await eventually(written)  # the flusher has no event to await
    assert read_days(store.path, [TODAY])[0].sessions == 1


async def test_days_past_retention_are_deleted_as_new_ones_are_written(opened) -> None:
    store = await opened(retention_days=2, wall=lambda: 1795651200.0)  # 2026-11-26T00:00Z
    await count(store, ("legacy", "old", "ann"), day="2026-11-20")
    await store.flush()
    await count(store, ("legacy", "old", "ann"), day=TODAY)
    await store.flush()
    old, today = read_days(store.path, ["2026-11-20", TODAY])
    assert not old.has_data and today.has_data


async def test_user_ids_are_not_stored_in_clear(opened) -> None:
    store = await opened()
    await count(store, ("legacy", "old", "very-recognisable-user-id"))
    await store.flush()
    await store.close()
    data = b"".join(path.read_bytes() for path in Path(store.path).parent.iterdir())
    assert b"very-recognisable-user-id" not in data


async def test_a_failed_write_keeps_the_counts_and_logs_once_then_recovers(opened, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gateway.store")
    store = await opened()
    other = sqlite3.connect(store.path)
    other.execute("DROP TABLE usage_users")
    await count(store, ("legacy", "old", "ann"))
    await store.flush()
    await store.flush()
    assert store.held_usage_days() == [TODAY]
    failures = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(failures) == 1
    other.executescript("CREATE TABLE usage_users (day TEXT NOT NULL, user_hash BLOB NOT NULL, sets INTEGER NOT NULL, "
                        "PRIMARY KEY (day, user_hash)) WITHOUT ROWID;")
    other.close()
    await store.flush()
    assert store.held_usage_days() == []
    assert read_days(store.path, [TODAY])[0].sessions_legacy == 1
    assert any("written again" in r.getMessage() for r in caplog.records)


async def test_an_unopenable_path_is_one_clear_error(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "missing-dir" / "usage.db"))
    with pytest.raises(StoreUnavailable, match=r"usage.path .*missing-dir/usage.db: cannot open it as a SQLite file"):
        await store.start()


def test_reading_a_missing_file_fails_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="no such file"):
        read_days(str(tmp_path / "usage.db"), [TODAY])
    assert list(tmp_path.iterdir()) == []


# -- a real gateway, then `ws-gateway report` -------------------------------------------------------


def report(config_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "report", "--config", str(config_file), *args],
        cwd=config_file.parent, capture_output=True, text=True, timeout=TIMEOUT,
    )


async def test_report_reads_what_a_gateway_without_redis_counted(servers: Servers, tmp_path: Path) -> None:
    usage = {"path": str(tmp_path / "usage.db")}
    stack = await servers.stack(usage=usage, rollout={"force_new": ["nina"]})
    today = utc_day()
    for style, user in (("legacy", "otto"), ("legacy", "otto"), ("message", "nina"), ("message", "otto")):
        ws = await open_client(stack, style, make_token(user), early=["hi"])
        while await ws.recv() != "hi":
            pass
        await ws.close()
    await stack.close()  # stops the gateway: the last counts are written
    if utc_day() != today:
        pytest.skip("the UTC day changed while the sessions ran")
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(yaml.safe_dump(raw_config(usage=usage, auth={"secret": SECRET})))
    result = await asyncio.to_thread(report, config_file, "--days", "1", "--json")
    assert result.returncode == 0, result.stderr
    [day] = json.loads(result.stdout)["days"]
    assert (day["day"], day["sessions_legacy"], day["sessions_message"]) == (today, 2, 2)
    assert (day["users_legacy"], day["users_message"], day["users"], day["users_new"]) == (1, 2, 2, 1)


def test_report_without_redis_or_usage_path_exits_2(tmp_path: Path) -> None:
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(yaml.safe_dump(raw_config()))
    result = report(config_file)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "error: the usage report reads Redis or the usage.path file; this config has neither\n"


def test_report_before_any_usage_was_written_exits_1_and_creates_no_file(tmp_path: Path) -> None:
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(yaml.safe_dump(raw_config(usage={"path": "usage.db"})))
    result = report(config_file)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(f"error: cannot read usage from {tmp_path / 'usage.db'}: no such file")
    assert not (tmp_path / "usage.db").exists()
