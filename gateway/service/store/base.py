"""The `Store` interface, what each operation promises, and the types both stores share.

What each operation promises
----------------------------
* Auth failures per client IP per minute: fixed windows of the UTC minute (``unix time //
  60``, read from the store's ``wall`` clock); `auth_failed` counts one, `auth_blocked` is
  true once the window holds ``limit`` failures, until the window ends.
* Concurrent sessions per user: at most ``limit`` sessions per user id, acquired and
  released by session id. In `RedisStore` every entry expires ``session_ttl`` after its
  last acquire or refresh; the replica holding a session refreshes it every
  ``session_ttl / 3`` (20 s with the default ttl of 60 s; `start` runs that loop), so a
  replica that crashes stops refreshing and its sessions free themselves after
  ``session_ttl``. While Redis is down the limit is enforced over this replica's own
  sessions; sessions opened meanwhile are written to Redis by the next refresh after it
  returns (so for up to one ttl after an outage a user may exceed the limit across
  replicas). `MemoryStore` sessions do not expire.
* Usage: per UTC day, sessions by ``{auth_style}:{backend}`` and distinct users by auth
  style and by backend. While Redis is unreachable the counts are kept in memory and
  written when it returns, so an outage loses no usage data. The memory is bounded: at
  most ``max_usage_users`` (default 200,000, about 30 MB) (day, user) entries are held;
  past that sessions are still counted but new users are not recorded (the day's
  distinct-user numbers come out low), and that is logged once.
* Usage by app version (``usage.app_version``): per UTC day, the exact set of users per
  version and auth style (user ids kept as BLAKE2b digests outside memory) and when the
  version was last seen. The first ``max_versions`` distinct versions of a day get their
  own row, later ones count as ``other``; ``unknown`` (no match) takes no slot. Each store
  keeps the day's admitted versions where every replica sees them, so the cap holds
  across replicas approximately: exactly in Redis (one Lua script admits), per process
  while Redis is down (written as counted when it returns, so a day may then hold a few
  more), and across processes sharing a SQLite file up to the versions first seen
  elsewhere within one flush (each process reloads the file's versions after a flush).
* Guard: one small JSON record, last writer wins, expiring after ``ttl_seconds`` (of the
  ``wall`` clock in `MemoryStore`, of Redis's in `RedisStore`); every replica reads it
  once a second (``guardsync.GUARD_SYNC_SECONDS``).
* Ramp (``rollout.ramp``): one JSON record, its progress, written only by compare-and-set
  on its ``version`` (so of the replicas that decide at once, one writes and the others
  read its result), and kept until overwritten (a ramp lasts days); and per window of the
  ramp, one small JSON record of numbers per replica, kept `RAMP_WINDOW_TTL_SECONDS` after
  its last write. Redis holds both for every replica; SQLite (``usage.path``) for the
  processes sharing the file and across restarts; memory for this process's life.
* `available` is False while the shared store cannot be reached (always True in memory);
  `retention_days` (``usage.retention_days``) may be reassigned on config reload.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

AUTH_STYLES = ("legacy", "message")
BACKENDS = ("old", "new")
USER_SETS = AUTH_STYLES + BACKENDS
AUTH_WINDOW_SECONDS = 60
AUTH_KEY_TTL_SECONDS = 2 * AUTH_WINDOW_SECONDS
SESSION_TTL_SECONDS = 60.0
GUARD_TTL_SECONDS = 600.0
RAMP_WINDOW_TTL_SECONDS = 86400.0
MAX_USAGE_USERS = 200_000
MAX_AUTH_IPS = 100_000
DEFAULT_PREFIX = "wsgw:"
RETENTION_DAYS = 120
UNKNOWN_VERSION = "unknown"  # the header is missing or the pattern did not match
OTHER_VERSION = "other"  # a version past the day's max_versions
MAX_VERSION_CHARS = 64


class StoreUnavailable(Exception):
    """The shared store cannot answer a query that must not be answered from memory (the report)."""


def utc_day(at: float | None = None) -> str:
    """``YYYY-MM-DD`` of the UTC day holding unix time `at` (now by default)."""
    moment = datetime.now(timezone.utc) if at is None else datetime.fromtimestamp(at, timezone.utc)
    return moment.date().isoformat()


@dataclass(frozen=True)
class DayUsage:
    """One UTC day of migration usage. `users` is the distinct users over both auth styles."""

    day: str
    sessions_legacy: int = 0
    sessions_message: int = 0
    sessions_old: int = 0
    sessions_new: int = 0
    users_legacy: int = 0
    users_message: int = 0
    users_old: int = 0
    users_new: int = 0
    users: int = 0

    @classmethod
    def from_counts(cls, day: str, sessions: Mapping[str, int], users: Mapping[str, int], all_users: int) -> DayUsage:
        """The day from its session counter (by ``{auth_style}:{backend}``), its distinct users
        per set (by `USER_SETS` name) and its distinct users over both auth styles."""

        def count(style: str, backend: str) -> int:
            return sessions.get(f"{style}:{backend}", 0)

        return cls(
            day=day,
            sessions_legacy=count("legacy", "old") + count("legacy", "new"),
            sessions_message=count("message", "old") + count("message", "new"),
            sessions_old=count("legacy", "old") + count("message", "old"),
            sessions_new=count("legacy", "new") + count("message", "new"),
            users_legacy=users.get("legacy", 0),
            users_message=users.get("message", 0),
            users_old=users.get("old", 0),
            users_new=users.get("new", 0),
            users=all_users,
        )

    @property
    def sessions(self) -> int:
        return self.sessions_legacy + self.sessions_message

    @property
    def has_data(self) -> bool:
        return self.sessions > 0 or self.users > 0

    @property
    def legacy_share_percent(self) -> float | None:
        """Legacy users as a percentage of all users that day; None when no user was recorded."""
        return legacy_share(self.users_legacy, self.users)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sessions": self.sessions, "legacy_share_percent": self.legacy_share_percent}


def legacy_share(legacy: int, users: int) -> float | None:
    """Legacy users as a percentage of `users`, capped at 100 (distinct counts are estimates
    on Redis); None without users."""
    if users <= 0:
        return None
    return min(100.0, 100.0 * legacy / users)


@dataclass(frozen=True)
class VersionUsage:
    """One app version over some days: its distinct users, those of them on the legacy
    auth style (at least once), and the unix time it was last seen."""

    version: str
    users: int
    users_legacy: int
    last_seen: float

    @property
    def legacy_share_percent(self) -> float | None:
        return legacy_share(self.users_legacy, self.users)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "legacy_share_percent": self.legacy_share_percent}


def sorted_versions(versions: Iterable[VersionUsage]) -> list[VersionUsage]:
    """Most users first (then most legacy users, then by name): the table's order."""
    return sorted(versions, key=lambda v: (-v.users, -v.users_legacy, v.version))


def user_hash(user_id: str) -> bytes:
    """How a user id is stored outside this process's memory: never in clear."""
    return hashlib.blake2b(user_id.encode("utf-8"), digest_size=16).digest()


def check_version(version: str, auth_style: str, max_versions: int) -> None:
    """Raise ValueError unless the version label, auth style and cap are usable."""
    if not version or len(version) > MAX_VERSION_CHARS:
        raise ValueError(f"version must be 1 to {MAX_VERSION_CHARS} characters, got {len(version)}")
    if auth_style not in AUTH_STYLES:
        raise ValueError(f"auth_style must be one of {AUTH_STYLES}, got {auth_style!r}")
    if max_versions < 1:
        raise ValueError(f"max_versions must be at least 1, got {max_versions}")


def check_usage(day: str, auth_style: str, backend: str) -> None:
    """Raise ValueError unless `day` is ``YYYY-MM-DD`` and the labels are known ones."""
    if auth_style not in AUTH_STYLES:
        raise ValueError(f"auth_style must be one of {AUTH_STYLES}, got {auth_style!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    date.fromisoformat(day)  # raises ValueError for anything but YYYY-MM-DD


def day_list(days: int, today: date | str | None) -> list[str]:
    """The `days` UTC days ending with `today` (default: today, UTC), oldest first."""
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    if today is None:
        end = date.fromisoformat(utc_day())
    elif isinstance(today, str):
        end = date.fromisoformat(today)
    else:
        end = today
    return [(end - timedelta(days=back)).isoformat() for back in range(days - 1, -1, -1)]


def ramp_version(record: Mapping[str, Any] | None) -> int:
    """A ramp record's ``version``: 0 for none (the first write expects 0)."""
    version = record.get("version") if record is not None else 0
    return version if isinstance(version, int) and not isinstance(version, bool) else 0


class Store(ABC):
    """What the gateway keeps across connections (and, with Redis, across replicas)."""

    session_ttl: float = SESSION_TTL_SECONDS

    @property
    @abstractmethod
    def available(self) -> bool:
        """False while the shared store cannot be reached and calls are answered from memory."""

    @property
    @abstractmethod
    def retention_days(self) -> int:
        """``usage.retention_days``; assignable on config reload (applies to usage recorded from then on)."""

    @retention_days.setter
    @abstractmethod
    def retention_days(self, days: int) -> None: ...

    async def start(self) -> None:
        """Start background work (the session refresher). Idempotent."""

    async def close(self) -> None:
        """Stop background work and release connections. Idempotent."""

    # auth failures -----------------------------------------------------------------------

    @abstractmethod
    async def auth_blocked(self, ip: str, limit: int | None) -> bool:
        """True while `ip` has `limit` or more auth failures in the current minute."""

    @abstractmethod
    async def auth_failed(self, ip: str, limit: int | None) -> bool:
        """Count one auth failure for `ip`; True when the IP is now over its budget. No limit: nothing is counted."""

    # concurrent sessions -----------------------------------------------------------------

    @abstractmethod
    async def acquire_session(self, user_id: str, session_id: str, limit: int | None) -> bool:
        """Take one of `user_id`'s `limit` session slots; False when all are taken. None = no limit."""

    @abstractmethod
    async def release_session(self, user_id: str, session_id: str) -> None:
        """Give the slot back. Safe to call for a session never acquired."""

    @abstractmethod
    async def refresh_sessions(self, pairs: Iterable[tuple[str, str]] | None = None) -> None:
        """Extend the expiry of (user_id, session_id) pairs; by default every session this store holds."""

    @abstractmethod
    def held_sessions(self) -> list[tuple[str, str]]:
        """The (user_id, session_id) pairs acquired through this store and not yet released."""

    # migration usage ---------------------------------------------------------------------

    @abstractmethod
    async def count_session(self, day: str, auth_style: str, backend: str, user_id: str) -> None:
        """Count one session that reached the relay on UTC `day` (``YYYY-MM-DD``)."""

    @abstractmethod
    async def usage_days(self, days: int, today: date | str | None = None) -> list[DayUsage]:
        """The `days` UTC days ending with `today` (default: today, UTC), oldest first; empty days included."""

    @abstractmethod
    async def count_app_version(self, at: float, version: str, auth_style: str, user_id: str, max_versions: int) -> str:
        """Count one session of app `version` at unix time `at`; return the row it went to
        (`version`, or ``other`` once the day holds `max_versions` other versions)."""

    @abstractmethod
    async def app_versions(self, days: int, today: date | str | None = None) -> list[VersionUsage]:
        """Each version seen over the `days` UTC days ending with `today`, users counted
        once over those days, in `sorted_versions` order."""

    # the shared guard --------------------------------------------------------------------

    @abstractmethod
    async def publish_guard(self, state: dict[str, Any], ttl_seconds: float = GUARD_TTL_SECONDS) -> None:
        """Publish this replica's guard record (JSON-serialisable) for `ttl_seconds`."""

    @abstractmethod
    async def read_guard(self) -> dict[str, Any] | None:
        """The last guard record any replica published, or None when there is none (or it expired)."""

    # the ramp's progress ---------------------------------------------------------------------

    @abstractmethod
    async def read_ramp(self) -> dict[str, Any] | None:
        """The ramp's progress record, or None before a ramp ever ran."""

    @abstractmethod
    async def write_ramp(self, record: dict[str, Any], expected_version: int) -> bool:
        """Replace the record if its ``version`` is still `expected_version` (0: there is none);
        False when another replica wrote first, or (`Resilient`) while the store is down."""

    @abstractmethod
    async def publish_ramp_window(self, window: int, replica: str, numbers: dict[str, Any]) -> None:
        """This replica's numbers for ramp window `window` (replacing what it published before)."""

    @abstractmethod
    async def read_ramp_window(self, window: int) -> list[dict[str, Any]]:
        """Every replica's numbers for ramp window `window`."""
