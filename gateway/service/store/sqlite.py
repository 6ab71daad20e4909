"""`SqliteStore`: the in-process store, with migration usage kept in a SQLite file.

Without Redis, usage counted in memory dies with the process and `ws-gateway report` has
nothing to read. With ``usage.path`` the counts also go to a file: sessions are counted in
memory as before (nothing on the hot path touches the disk) and written every
`FLUSH_SECONDS`, in one transaction, off the event loop (`asyncio.to_thread`), and once
more at shutdown. A write that fails keeps the counts in memory (the `MemoryStore` bound
applies) and is retried at the next flush; the failure and the recovery are each logged
once.

Several processes may share one file (the workers of ``serve --workers N`` on one host):
sessions are added up and users are merged per day with upserts, so the distinct-user
counts are exact across them. User ids are stored as BLAKE2b digests, never in clear.
Days older than ``usage.retention_days`` are deleted as new ones are written. The ramp's
progress (``rollout.ramp``) is kept in the file too, so the processes sharing it agree on
the step and a restart keeps it. Usage by app
version goes to two more tables the same way; after each write a process takes the day's
versions from the file, so the ``max_versions`` cap holds across the processes sharing it
(see `base`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar
from datetime import date, timedelta
from pathlib import Path

from .base import (
    RAMP_WINDOW_TTL_SECONDS,
    USER_SETS,
    DayUsage,
    StoreUnavailable,
    VersionUsage,
    day_list,
    ramp_version,
    sorted_versions,
    user_hash,
    utc_day,
)
from .memory import LEGACY_BIT, DayCounts, MemoryStore

log = logging.getLogger("gateway.store")
T = TypeVar("T")
FLUSH_SECONDS = 5.0
BUSY_TIMEOUT_SECONDS = 5.0  # another process holding the write lock (a worker mid-flush)

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_sessions (
    day TEXT NOT NULL, route TEXT NOT NULL, sessions INTEGER NOT NULL, PRIMARY KEY (day, route)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_users (
    day TEXT NOT NULL, user_hash BLOB NOT NULL, sets INTEGER NOT NULL, PRIMARY KEY (day, user_hash)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_version_users (
    day TEXT NOT NULL, version TEXT NOT NULL, user_hash BLOB NOT NULL, styles INTEGER NOT NULL,
    PRIMARY KEY (day, version, user_hash)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_version_seen (
    day TEXT NOT NULL, version TEXT NOT NULL, last_seen REAL NOT NULL, PRIMARY KEY (day, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ramp (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ramp_window (
    win INTEGER NOT NULL, replica TEXT NOT NULL, numbers TEXT NOT NULL, written REAL NOT NULL, PRIMARY KEY (win, replica)
) WITHOUT ROWID;
"""
_TABLES = ("usage_sessions", "usage_users", "usage_version_users", "usage_version_seen")
# `sets` holds one bit per USER_SETS entry (legacy, message, old, new), as in memory.
_STYLE_BITS = (1 << USER_SETS.index("legacy")) | (1 << USER_SETS.index("message"))
_COUNT_SETS = ", ".join(f"coalesce(sum(sets & {1 << index} != 0), 0)" for index in range(len(USER_SETS)))


def write_days(db: sqlite3.Connection, days: dict[str, DayCounts], cutoff: str) -> dict[str, list[str]]:
    """Add `days` to the file in one transaction and delete days before `cutoff`; return
    the app versions the file holds for each of `days`."""
    with db:
        db.execute("BEGIN IMMEDIATE")
        for day, counts in days.items():
            db.executemany(
                "INSERT INTO usage_sessions VALUES (?, ?, ?)"
                " ON CONFLICT (day, route) DO UPDATE SET sessions = sessions + excluded.sessions",
                [(day, route, n) for route, n in counts.sessions.items()],
            )
            db.executemany(
                "INSERT INTO usage_users VALUES (?, ?, ?)"
                " ON CONFLICT (day, user_hash) DO UPDATE SET sets = sets | excluded.sets",
                [(day, user_hash(user), bits) for user, bits in counts.users.items()],
            )
            db.executemany(
                "INSERT INTO usage_version_users VALUES (?, ?, ?, ?)"
                " ON CONFLICT (day, version, user_hash) DO UPDATE SET styles = styles | excluded.styles",
                [
                    (day, version, user_hash(user), bits)
                    for version, members in counts.versions.items()
                    for user, bits in members.items()
                ],
            )
            db.executemany(
                "INSERT INTO usage_version_seen VALUES (?, ?, ?)"
                " ON CONFLICT (day, version) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)",
                [(day, version, at) for version, at in counts.seen.items()],
            )
        for table in _TABLES:
            db.execute(f"DELETE FROM {table} WHERE day < ?", (cutoff,))
        return {
            day: [version for (version,) in db.execute("SELECT version FROM usage_version_seen WHERE day = ?", (day,))]
            for day in days
        }


def read_days(path: str, days: list[str]) -> list[DayUsage]:
    """`days` from the file at `path`, opened read-only (the report never creates a file)."""
    try:
        db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_SECONDS)
    except sqlite3.Error:
        raise StoreUnavailable(f"cannot read usage from {path}: no such file (has a gateway with usage.path run yet?)") from None
    try:
        result = []
        for day in days:
            sessions = dict(db.execute("SELECT route, sessions FROM usage_sessions WHERE day = ?", (day,)).fetchall())
            row = db.execute(
                f"SELECT {_COUNT_SETS}, coalesce(sum(sets & {_STYLE_BITS} != 0), 0) FROM usage_users WHERE day = ?", (day,)
            ).fetchone()
            sizes = dict(zip(USER_SETS, row[: len(USER_SETS)]))
            result.append(DayUsage.from_counts(day, sessions, sizes, row[-1]))
        return result
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot read usage from {path}: {exc}") from None
    finally:
        db.close()


def read_versions(path: str, days: list[str]) -> list[VersionUsage]:
    """The per-version rows of `days` from the file at `path`, opened read-only; none from a
    file written before usage by app version existed."""
    try:
        db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_SECONDS)
    except sqlite3.Error:
        raise StoreUnavailable(f"cannot read usage from {path}: no such file (has a gateway with usage.path run yet?)") from None
    marks = ", ".join("?" * len(days))
    try:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'usage_version_seen'").fetchone() is None:
            return []
        seen = dict(db.execute(f"SELECT version, max(last_seen) FROM usage_version_seen WHERE day IN ({marks}) GROUP BY version", days))
        rows = db.execute(
            "SELECT version, count(*), sum(legacy) FROM"
            f" (SELECT version, max(styles & ? != 0) AS legacy FROM usage_version_users WHERE day IN ({marks})"
            " GROUP BY version, user_hash) GROUP BY version",
            (LEGACY_BIT, *days),
        ).fetchall()
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot read usage from {path}: {exc}") from None
    finally:
        db.close()
    return sorted_versions(VersionUsage(version, users, legacy, seen.get(version, 0.0)) for version, users, legacy in rows)


def read_ramp(db: sqlite3.Connection) -> dict[str, Any] | None:
    row = db.execute("SELECT record FROM ramp WHERE id = 1").fetchone()
    record = json.loads(row[0]) if row is not None else None
    return record if isinstance(record, dict) else None


def write_ramp(db: sqlite3.Connection, record: dict[str, Any], expected_version: int) -> bool:
    """Compare-and-set in one transaction: the file's version must still be `expected_version`."""
    with db:
        db.execute("BEGIN IMMEDIATE")
        row = db.execute("SELECT version FROM ramp WHERE id = 1").fetchone()
        if (row[0] if row is not None else 0) != expected_version:
            return False
        db.execute(
            "INSERT OR REPLACE INTO ramp VALUES (1, ?, ?)", (ramp_version(record), json.dumps(record, separators=(",", ":")))
        )
        return True


def publish_ramp_window(db: sqlite3.Connection, window: int, replica: str, numbers: dict[str, Any], now: float) -> None:
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT OR REPLACE INTO ramp_window VALUES (?, ?, ?, ?)", (window, replica, json.dumps(numbers), now))
        db.execute("DELETE FROM ramp_window WHERE written < ?", (now - RAMP_WINDOW_TTL_SECONDS,))


def read_ramp_window(db: sqlite3.Connection, window: int) -> list[dict[str, Any]]:
    rows = db.execute("SELECT numbers FROM ramp_window WHERE win = ?", (window,)).fetchall()
    return [record for (text,) in rows if isinstance(record := json.loads(text), dict)]


def _open(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")  # the report reads while gateways write
        db.executescript(SCHEMA)
    except sqlite3.Error:
        db.close()
        raise
    return db


class SqliteStore(MemoryStore):
    """`MemoryStore`, plus usage written to the SQLite file at `path` (see the module docstring)."""

    def __init__(
        self,
        path: str,
        *,
        flush_seconds: float = FLUSH_SECONDS,
        wall: Callable[[], float] = time.time,
        **kwargs: int,
    ) -> None:
        super().__init__(wall=wall, **kwargs)
        self.path = path
        self.flush_seconds = flush_seconds
        self._db: sqlite3.Connection | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one flush at a time: the connection is not shared across threads at once
        self._failing = False

    async def start(self) -> None:
        """Open (or create) the file; `StoreUnavailable` names it when that is impossible."""
        if self._db is not None:
            return
        try:
            self._db = await asyncio.to_thread(_open, self.path)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"usage.path {self.path}: cannot open it as a SQLite file: {exc}") from None
        self._flusher = asyncio.create_task(self._flush_every())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self._db is None:
            return
        await self.flush()
        if self.held_usage_days():
            log.error("usage could not be written at shutdown and is lost", extra={"days": self.held_usage_days()})
        db, self._db = self._db, None
        await asyncio.to_thread(db.close)

    async def flush(self) -> None:
        """Write the usage counted since the last flush; on failure keep it for the next one."""
        async with self._lock:
            db = self._db
            if db is None or not self.held_usage_days():
                return
            days = {day: self.take_usage_day(day) for day in self.held_usage_days()}
            newest = max(days)
            cutoff = (date.fromisoformat(max(newest, utc_day(self.wall()))) - timedelta(days=self.retention_days)).isoformat()
            try:
                in_file = await asyncio.to_thread(write_days, db, days, cutoff)
            except sqlite3.Error as exc:
                for day, counts in days.items():
                    self.put_back_usage_day(day, counts)
                if not self._failing:
                    self._failing = True
                    log.error(
                        "usage file cannot be written; counts are kept in memory until it can",
                        extra={"path": self.path, "error": str(exc)},
                    )
                return
        for day, versions in in_file.items():
            self.admit_versions(day, versions)
        if self._failing:
            self._failing = False
            log.warning("usage file is written again", extra={"path": self.path})

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            await self.flush()

    async def usage_days(self, days: int, today: date | str | None = None) -> list[DayUsage]:
        """The report's rows, read from the file after writing what is still in memory."""
        await self.flush()
        return await asyncio.to_thread(read_days, self.path, day_list(days, today))

    async def app_versions(self, days: int, today: date | str | None = None) -> list[VersionUsage]:
        """The report's per-version rows, read from the file after writing what is still in memory."""
        await self.flush()
        return await asyncio.to_thread(read_versions, self.path, day_list(days, today))

    # -- the ramp's progress, in the file ----------------------------------------------------------

    async def _in_file(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` on the file, off the event loop; `StoreUnavailable` naming the file when it fails."""
        async with self._lock:
            db = self._db
            if db is None:
                raise StoreUnavailable(f"usage.path {self.path}: not open")
            try:
                return await asyncio.to_thread(work, db)
            except (sqlite3.Error, ValueError) as exc:
                raise StoreUnavailable(f"usage.path {self.path}: the ramp's progress: {exc}") from None

    async def read_ramp(self) -> dict[str, Any] | None:
        return await self._in_file(read_ramp)

    async def write_ramp(self, record: dict[str, Any], expected_version: int) -> bool:
        return await self._in_file(lambda db: write_ramp(db, record, expected_version))

    async def publish_ramp_window(self, window: int, replica: str, numbers: dict[str, Any]) -> None:
        now = self.wall()
        await self._in_file(lambda db: publish_ramp_window(db, window, replica, numbers, now))

    async def read_ramp_window(self, window: int) -> list[dict[str, Any]]:
        return await self._in_file(lambda db: read_ramp_window(db, window))
