"""`MemoryStore`: the gateway's state in this process, and its bounded usage book.

The embedded default when the config has no ``redis:`` section, and the fallback of
`outage.Resilient` (`RedisStore`) while its shared store is unreachable: then its usage
book holds the counts that store has not seen yet, which `Resilient` takes out day by
day (`take_usage_day`) to write them, and puts back (`put_back_usage_day`) when a write
fails.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from .base import (
    AUTH_STYLES,
    AUTH_WINDOW_SECONDS,
    GUARD_TTL_SECONDS,
    MAX_AUTH_IPS,
    MAX_USAGE_USERS,
    OTHER_VERSION,
    RETENTION_DAYS,
    UNKNOWN_VERSION,
    USER_SETS,
    DayUsage,
    Store,
    VersionUsage,
    check_usage,
    check_version,
    ramp_version,
    day_list,
    sorted_versions,
    utc_day,
)

log = logging.getLogger("gateway.store")

_STYLE_BITS = (1 << USER_SETS.index("legacy")) | (1 << USER_SETS.index("message"))
LEGACY_BIT = 1 << AUTH_STYLES.index("legacy")  # of a user's bits in DayCounts.versions


@dataclass
class DayCounts:
    """One UTC day of usage in memory: `sessions` by ``{auth_style}:{backend}``, and the users seen."""

    sessions: Counter[str] = field(default_factory=Counter)
    users: dict[str, int] = field(default_factory=dict)  # user id -> bit per USER_SETS entry
    versions: dict[str, dict[str, int]] = field(default_factory=dict)  # app version -> user id -> bit per AUTH_STYLES entry
    seen: dict[str, float] = field(default_factory=dict)  # app version -> unix time last seen

    @property
    def entries(self) -> int:
        """(user) and (version, user) entries: what the memory bound counts."""
        return len(self.users) + sum(len(users) for users in self.versions.values())

    def user_sets(self) -> dict[str, list[str]]:
        """The user ids in each of `USER_SETS` (a user is in one auth-style set and one backend set, or more)."""
        members: dict[str, list[str]] = {name: [] for name in USER_SETS}
        for user, bits in self.users.items():
            for index, name in enumerate(USER_SETS):
                if bits & (1 << index):
                    members[name].append(user)
        return members

    def usage(self, day: str) -> DayUsage:
        sizes = {name: 0 for name in USER_SETS}
        either_style = 0
        for bits in self.users.values():
            for index, name in enumerate(USER_SETS):
                if bits & (1 << index):
                    sizes[name] += 1
            if bits & _STYLE_BITS:
                either_style += 1
        return DayUsage.from_counts(day, self.sessions, sizes, either_style)


def version_usage(days: list[DayCounts]) -> list[VersionUsage]:
    """The per-version rows of `days`, each user counted once over them."""
    users: dict[str, dict[str, int]] = {}
    seen: dict[str, float] = {}
    for counts in days:
        for version, members in counts.versions.items():
            merged = users.setdefault(version, {})
            for user, bits in members.items():
                merged[user] = merged.get(user, 0) | bits
        for version, at in counts.seen.items():
            seen[version] = max(at, seen.get(version, at))
    return sorted_versions(
        VersionUsage(version, len(members), sum(1 for bits in members.values() if bits & LEGACY_BIT), seen.get(version, 0.0))
        for version, members in users.items()
    )


class _UsageBook:
    """Usage counts in memory, with at most `max_users` (day, user) entries."""

    def __init__(self, max_users: int, retention_days: int) -> None:
        self.max_users = max_users
        self.retention_days = retention_days
        self.days: dict[str, DayCounts] = {}
        self.admitted: dict[str, set[str]] = {}  # day -> the app versions with a row of their own
        self.entries = 0
        self.full_logged = False

    def _day(self, day: str) -> DayCounts:
        book = self.days.get(day)
        if book is None:
            book = self.days[day] = DayCounts()
            self._prune(day)
        return book

    def _add(self, members: dict[str, int], user_id: str, bits: int) -> None:
        known = members.get(user_id)
        if known is not None:
            members[user_id] = known | bits
        elif self.entries < self.max_users:
            members[user_id] = bits
            self.entries += 1
        elif not self.full_logged:
            self.full_logged = True
            log.warning(
                "usage kept in memory reached its bound: sessions are still counted, further distinct users are not",
                extra={"max_users": self.max_users},
            )

    def count(self, day: str, auth_style: str, backend: str, user_id: str) -> None:
        book = self._day(day)
        book.sessions[f"{auth_style}:{backend}"] += 1
        self._add(book.users, user_id, (1 << USER_SETS.index(auth_style)) | (1 << USER_SETS.index(backend)))

    def count_version(self, day: str, at: float, version: str, auth_style: str, user_id: str, max_versions: int) -> str:
        book = self._day(day)
        admitted = self.admitted.setdefault(day, set())
        if version not in (UNKNOWN_VERSION, OTHER_VERSION) and version not in admitted:
            if len(admitted) < max_versions:
                admitted.add(version)
            else:
                version = OTHER_VERSION
        self._add(book.versions.setdefault(version, {}), user_id, 1 << AUTH_STYLES.index(auth_style))
        book.seen[version] = max(at, book.seen.get(version, at))
        return version

    def pop(self, day: str) -> DayCounts:
        book = self.days.pop(day)
        self.entries -= book.entries
        if not self.days:
            self.full_logged = False
        return book

    def merge(self, day: str, other: DayCounts) -> None:
        """Put back a day that could not be written (may overshoot the bound by that day)."""
        book = self.days.setdefault(day, DayCounts())
        book.sessions.update(other.sessions)
        self.entries -= book.entries
        for user, bits in other.users.items():
            book.users[user] = book.users.get(user, 0) | bits
        for version, members in other.versions.items():
            mine = book.versions.setdefault(version, {})
            for user, bits in members.items():
                mine[user] = mine.get(user, 0) | bits
        for version, at in other.seen.items():
            book.seen[version] = max(at, book.seen.get(version, at))
        self.entries += book.entries

    def usage(self, day: str) -> DayUsage:
        book = self.days.get(day)
        return DayUsage(day) if book is None else book.usage(day)

    def _prune(self, newest: str) -> None:
        cutoff = (date.fromisoformat(newest) - timedelta(days=self.retention_days)).isoformat()
        for day in [d for d in self.days if d < cutoff]:
            self.pop(day)
        for day in [d for d in self.admitted if d < cutoff]:
            del self.admitted[day]


class MemoryStore(Store):
    """Everything in this process: the embedded default, and the outage fallback of `Resilient` (RedisStore).

    Sessions held here have no expiry (a crash takes them with the process); the auth
    windows track at most `max_auth_ips` IPs per minute (past that, new IPs are not
    counted until the next minute). `wall` is the unix-time clock of the auth windows and
    the guard record's expiry.
    """

    def __init__(
        self,
        *,
        retention_days: int = RETENTION_DAYS,
        max_usage_users: int = MAX_USAGE_USERS,
        max_auth_ips: int = MAX_AUTH_IPS,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.wall = wall
        self.max_auth_ips = max_auth_ips
        self._auth_window: int | None = None
        self._auth_counts: dict[str, int] = {}
        self._sessions: dict[str, set[str]] = {}
        self._usage = _UsageBook(max_usage_users, retention_days)
        self._guard: tuple[dict[str, Any], float] | None = None
        self._ramp: dict[str, Any] | None = None
        self._ramp_windows: dict[int, dict[str, dict[str, Any]]] = {}

    @property
    def available(self) -> bool:
        return True

    @property
    def retention_days(self) -> int:
        return self._usage.retention_days

    @retention_days.setter
    def retention_days(self, days: int) -> None:
        self._usage.retention_days = days

    # auth failures -----------------------------------------------------------------------

    def _window(self) -> dict[str, int]:
        window = int(self.wall() // AUTH_WINDOW_SECONDS)
        if window != self._auth_window:
            self._auth_window = window
            self._auth_counts = {}
        return self._auth_counts

    async def auth_blocked(self, ip: str, limit: int | None) -> bool:
        return limit is not None and self._window().get(ip, 0) >= limit

    async def auth_failed(self, ip: str, limit: int | None) -> bool:
        if limit is None:
            return False
        counts = self._window()
        if ip in counts or len(counts) < self.max_auth_ips:
            counts[ip] = counts.get(ip, 0) + 1
        return counts.get(ip, 0) >= limit

    # concurrent sessions -----------------------------------------------------------------

    async def acquire_session(self, user_id: str, session_id: str, limit: int | None) -> bool:
        if limit is None:
            return True
        held = self._sessions.setdefault(user_id, set())
        if session_id not in held and len(held) >= limit:
            if not held:
                del self._sessions[user_id]
            return False
        held.add(session_id)
        return True

    def hold(self, user_id: str, session_id: str) -> None:
        """Record a session acquired elsewhere (`Resilient` keeps its own sessions here)."""
        self._sessions.setdefault(user_id, set()).add(session_id)

    def holds(self, user_id: str, session_id: str) -> bool:
        return session_id in self._sessions.get(user_id, ())

    async def release_session(self, user_id: str, session_id: str) -> None:
        held = self._sessions.get(user_id)
        if held is not None:
            held.discard(session_id)
            if not held:
                del self._sessions[user_id]

    async def refresh_sessions(self, pairs: Iterable[tuple[str, str]] | None = None) -> None:
        return None  # in-process sessions do not expire

    def held_sessions(self) -> list[tuple[str, str]]:
        return [(user, sid) for user, sids in self._sessions.items() for sid in sids]

    # migration usage ---------------------------------------------------------------------

    async def count_session(self, day: str, auth_style: str, backend: str, user_id: str) -> None:
        check_usage(day, auth_style, backend)
        self._usage.count(day, auth_style, backend, user_id)

    async def usage_days(self, days: int, today: date | str | None = None) -> list[DayUsage]:
        return [self._usage.usage(day) for day in day_list(days, today)]

    async def count_app_version(self, at: float, version: str, auth_style: str, user_id: str, max_versions: int) -> str:
        check_version(version, auth_style, max_versions)
        return self._usage.count_version(utc_day(at), at, version, auth_style, user_id, max_versions)

    async def app_versions(self, days: int, today: date | str | None = None) -> list[VersionUsage]:
        return version_usage([self._usage.days[day] for day in day_list(days, today) if day in self._usage.days])

    def admit_versions(self, day: str, versions: Iterable[str]) -> None:
        """Versions other processes gave a row of their own on `day` (from a shared file)."""
        self._usage.admitted.setdefault(day, set()).update(v for v in versions if v not in (UNKNOWN_VERSION, OTHER_VERSION))

    def held_usage_days(self) -> list[str]:
        """The UTC days with usage held here, oldest first."""
        return sorted(self._usage.days)

    def take_usage_day(self, day: str) -> DayCounts:
        """Remove one of `held_usage_days` from this store and return its counts (KeyError if not held)."""
        return self._usage.pop(day)

    def put_back_usage_day(self, day: str, counts: DayCounts) -> None:
        """Add counts taken with `take_usage_day` back (to whatever was counted for `day` since).

        The memory bound may be overshot by that day's users.
        """
        self._usage.merge(day, counts)

    # the shared guard --------------------------------------------------------------------

    async def publish_guard(self, state: dict[str, Any], ttl_seconds: float = GUARD_TTL_SECONDS) -> None:
        record = json.loads(json.dumps(state))  # a copy, and the same JSON check Redis gets
        self._guard = (record, self.wall() + ttl_seconds)

    async def read_guard(self) -> dict[str, Any] | None:
        if self._guard is None:
            return None
        record, until = self._guard
        if self.wall() >= until:
            self._guard = None
            return None
        return dict(record)

    # the ramp's progress ---------------------------------------------------------------------

    async def read_ramp(self) -> dict[str, Any] | None:
        return dict(self._ramp) if self._ramp is not None else None

    async def write_ramp(self, record: dict[str, Any], expected_version: int) -> bool:
        if ramp_version(self._ramp) != expected_version:
            return False
        self.keep_ramp(record)
        return True

    def keep_ramp(self, record: dict[str, Any] | None) -> None:
        """Hold `record` as the ramp's progress (`Resilient` keeps the last one it read here)."""
        self._ramp = json.loads(json.dumps(record)) if record is not None else None

    async def publish_ramp_window(self, window: int, replica: str, numbers: dict[str, Any]) -> None:
        for old in [w for w in self._ramp_windows if w < window - 1]:  # only the live window is read
            del self._ramp_windows[old]
        self._ramp_windows.setdefault(window, {})[replica] = json.loads(json.dumps(numbers))

    async def read_ramp_window(self, window: int) -> list[dict[str, Any]]:
        return [dict(numbers) for numbers in self._ramp_windows.get(window, {}).values()]
