"""Shared state for the gateway's replicas: limits, migration usage, the rollback guard.

One interface, `Store`, two implementations:

* `MemoryStore`: in-process state. The embedded default when the config has no ``redis:``
  section, and the fallback inside `RedisStore`.
* `RedisStore`: state every replica shares through Redis (redis-py asyncio, one blocking
  connection pool, socket timeouts and an ``asyncio.timeout`` of ``redis.timeout_seconds``
  around every call). Redis being slow or down never stalls a chat session: a call that
  fails or runs out of time is answered by an internal `MemoryStore`, the outage is
  logged once (logger ``gateway.store``, the URL without its password), every failed
  round trip is counted (`RedisStore.errors`, and the ``on_error`` callback), and while
  Redis is down no call waits for it: the next call after a short backoff starts one
  background probe, and once that succeeds the recovery is logged once and shared state
  resumes.

`open_store(config)` picks the implementation from the config.

What each operation promises
----------------------------
* Auth failures per client IP per minute: fixed windows of the UTC minute (``unix time //
  60``); `auth_failed` counts one (INCR and EXPIRE in one Lua script), `auth_blocked` is
  true once the window holds ``limit`` failures, until the window ends.
* Concurrent sessions per user: a sorted set per user, member = session id, score = the
  entry's expiry in milliseconds of *Redis server* time (so replicas' clocks do not
  matter). One Lua script drops expired members, checks the count and adds, so replicas
  racing cannot exceed the limit. The replica holding a session refreshes its expiry every
  ``session_ttl / 3`` (`start` runs that loop); a replica that crashes stops refreshing
  and its sessions free themselves after ``session_ttl``. While Redis is down the limit is
  enforced over this replica's own sessions; sessions opened meanwhile are written to
  Redis by the next refresh after it returns (so for up to one ttl after an outage a user
  may exceed the limit across replicas).
* Usage: per UTC day, sessions by ``{auth_style}:{backend}`` and distinct users
  (HyperLogLog) by auth style and by backend. While Redis is unreachable the counts are
  kept in memory and written when it returns (distinct users first with PFADD, which is
  idempotent, then the session counters in one MULTI), so an outage loses no usage data.
  The memory is bounded: at most ``max_usage_users`` (default 200,000, about 30 MB)
  (day, user) entries are held; past that sessions are still counted but new users are not
  recorded (the day's distinct-user numbers come out low), and that is logged once.
* Guard: one small JSON record, last writer wins, expiring after ``ttl_seconds``; every
  replica reads it every few seconds. `MemoryStore` keeps it locally.

Key families (prefix ``wsgw:`` by default)
------------------------------------------
=====================================  ===========  ===========================================  ================================
key                                    type         holds                                        expires
=====================================  ===========  ===========================================  ================================
``wsgw:authfail:{minute}:{ip}``        string       auth failures from ``ip`` in that minute     120 s after the first failure
``wsgw:sessions:{user_id}``            sorted set   open sessions: member = session id,          each member ``session_ttl`` after
                                                    score = expiry (ms, Redis server time)       its last acquire/refresh; the key
                                                                                                 with its newest member
``wsgw:usage:{day}:sessions``          hash         sessions that reached the relay, field       end of ``day`` (UTC) +
                                                    ``{legacy|message}:{old|new}``               ``usage.retention_days``
``wsgw:usage:{day}:users:{set}``       HyperLogLog  distinct user ids; set = ``legacy``,         same as above
                                                    ``message``, ``old`` or ``new``
``wsgw:guard``                         string       the guard record (JSON) last published       ``ttl_seconds`` of that publish
=====================================  ===========  ===========================================  ================================

``{day}`` is ``YYYY-MM-DD`` (UTC), ``{minute}`` is unix time // 60.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("gateway.store")

AUTH_STYLES = ("legacy", "message")
BACKENDS = ("old", "new")
USER_SETS = AUTH_STYLES + BACKENDS
AUTH_WINDOW_SECONDS = 60
AUTH_KEY_TTL_SECONDS = 2 * AUTH_WINDOW_SECONDS
SESSION_TTL_SECONDS = 60.0
GUARD_TTL_SECONDS = 600.0
MAX_USAGE_USERS = 200_000
MAX_AUTH_IPS = 100_000
DEFAULT_PREFIX = "wsgw:"

T = TypeVar("T")


class StoreUnavailable(Exception):
    """The shared store cannot answer a query that must not be answered from memory (the report)."""


def utc_day(at: float | None = None) -> str:
    """``YYYY-MM-DD`` of the UTC day holding unix time `at` (now by default)."""
    moment = datetime.now(timezone.utc) if at is None else datetime.fromtimestamp(at, timezone.utc)
    return moment.date().isoformat()


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<unparseable redis url>"


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

    @property
    def sessions(self) -> int:
        return self.sessions_legacy + self.sessions_message

    @property
    def has_data(self) -> bool:
        return self.sessions > 0 or self.users > 0

    @property
    def legacy_share_percent(self) -> float | None:
        """Legacy users as a percentage of all users that day; None when no user was recorded."""
        if self.users <= 0:
            return None
        return min(100.0, 100.0 * self.users_legacy / self.users)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sessions": self.sessions, "legacy_share_percent": self.legacy_share_percent}


def _check_usage(day: str, auth_style: str, backend: str) -> None:
    if auth_style not in AUTH_STYLES:
        raise ValueError(f"auth_style must be one of {AUTH_STYLES}, got {auth_style!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    date.fromisoformat(day)  # raises ValueError for anything but YYYY-MM-DD


def _day_list(days: int, today: date | str | None) -> list[str]:
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    if today is None:
        end = datetime.now(timezone.utc).date()
    elif isinstance(today, str):
        end = date.fromisoformat(today)
    else:
        end = today
    return [(end - timedelta(days=back)).isoformat() for back in range(days - 1, -1, -1)]


# -- the interface --------------------------------------------------------------------------


class Store(ABC):
    """What the gateway keeps across connections (and, with Redis, across replicas)."""

    session_ttl: float = SESSION_TTL_SECONDS

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

    # the shared guard --------------------------------------------------------------------

    @abstractmethod
    async def publish_guard(self, state: dict[str, Any], ttl_seconds: float = GUARD_TTL_SECONDS) -> None:
        """Publish this replica's guard record (JSON-serialisable) for `ttl_seconds`."""

    @abstractmethod
    async def read_guard(self) -> dict[str, Any] | None:
        """The last guard record any replica published, or None when there is none (or it expired)."""


# -- in-process state -----------------------------------------------------------------------


@dataclass
class _Day:
    sessions: Counter[str] = field(default_factory=Counter)
    users: dict[str, int] = field(default_factory=dict)  # user id -> bit per USER_SETS entry


class _UsageBook:
    """Usage counts in memory, with at most `max_users` (day, user) entries."""

    def __init__(self, max_users: int, retention_days: int) -> None:
        self.max_users = max_users
        self.retention_days = retention_days
        self.days: dict[str, _Day] = {}
        self.entries = 0
        self.full_logged = False

    def count(self, day: str, auth_style: str, backend: str, user_id: str) -> None:
        book = self.days.get(day)
        if book is None:
            book = self.days[day] = _Day()
            self._prune(day)
        book.sessions[f"{auth_style}:{backend}"] += 1
        bits = (1 << USER_SETS.index(auth_style)) | (1 << USER_SETS.index(backend))
        known = book.users.get(user_id)
        if known is not None:
            book.users[user_id] = known | bits
        elif self.entries < self.max_users:
            book.users[user_id] = bits
            self.entries += 1
        elif not self.full_logged:
            self.full_logged = True
            log.warning(
                "usage kept in memory reached its bound: sessions are still counted, further distinct users are not",
                extra={"max_users": self.max_users},
            )

    def pop(self, day: str) -> _Day:
        book = self.days.pop(day)
        self.entries -= len(book.users)
        if not self.days:
            self.full_logged = False
        return book

    def merge(self, day: str, other: _Day) -> None:
        """Put back a day that could not be written (may overshoot the bound by that day)."""
        book = self.days.setdefault(day, _Day())
        book.sessions.update(other.sessions)
        for user, bits in other.users.items():
            if user not in book.users:
                self.entries += 1
            book.users[user] = book.users.get(user, 0) | bits

    def usage(self, day: str) -> DayUsage:
        book = self.days.get(day)
        if book is None:
            return DayUsage(day)
        sizes = {name: 0 for name in USER_SETS}
        either_style = 0
        style_mask = (1 << USER_SETS.index("legacy")) | (1 << USER_SETS.index("message"))
        for bits in book.users.values():
            for index, name in enumerate(USER_SETS):
                if bits & (1 << index):
                    sizes[name] += 1
            if bits & style_mask:
                either_style += 1
        s = book.sessions
        return DayUsage(
            day=day,
            sessions_legacy=s["legacy:old"] + s["legacy:new"],
            sessions_message=s["message:old"] + s["message:new"],
            sessions_old=s["legacy:old"] + s["message:old"],
            sessions_new=s["legacy:new"] + s["message:new"],
            users_legacy=sizes["legacy"],
            users_message=sizes["message"],
            users_old=sizes["old"],
            users_new=sizes["new"],
            users=either_style,
        )

    def _prune(self, newest: str) -> None:
        cutoff = (date.fromisoformat(newest) - timedelta(days=self.retention_days)).isoformat()
        for day in [d for d in self.days if d < cutoff]:
            self.pop(day)


class MemoryStore(Store):
    """Everything in this process: the embedded default, and RedisStore's fallback.

    Sessions held here have no expiry (a crash takes them with the process); the auth
    windows track at most `max_auth_ips` IPs per minute (past that, new IPs are not
    counted until the next minute).
    """

    def __init__(
        self,
        *,
        retention_days: int = 120,
        max_usage_users: int = MAX_USAGE_USERS,
        max_auth_ips: int = MAX_AUTH_IPS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.max_auth_ips = max_auth_ips
        self._auth_window: int | None = None
        self._auth_counts: dict[str, int] = {}
        self._sessions: dict[str, set[str]] = {}
        self._usage = _UsageBook(max_usage_users, retention_days)
        self._guard: tuple[dict[str, Any], float] | None = None

    @property
    def retention_days(self) -> int:
        return self._usage.retention_days

    @retention_days.setter
    def retention_days(self, days: int) -> None:
        self._usage.retention_days = days

    # auth failures -----------------------------------------------------------------------

    def _window(self) -> dict[str, int]:
        window = int(self.clock() // AUTH_WINDOW_SECONDS)
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
        """Record a session acquired elsewhere (RedisStore keeps its own sessions here)."""
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
        _check_usage(day, auth_style, backend)
        self._usage.count(day, auth_style, backend, user_id)

    async def usage_days(self, days: int, today: date | str | None = None) -> list[DayUsage]:
        return [self._usage.usage(day) for day in _day_list(days, today)]

    # the shared guard --------------------------------------------------------------------

    async def publish_guard(self, state: dict[str, Any], ttl_seconds: float = GUARD_TTL_SECONDS) -> None:
        record = json.loads(json.dumps(state))  # a copy, and the same JSON check Redis gets
        self._guard = (record, self.clock() + ttl_seconds)

    async def read_guard(self) -> dict[str, Any] | None:
        if self._guard is None:
            return None
        record, until = self._guard
        if self.clock() >= until:
            self._guard = None
            return None
        return dict(record)


# -- Redis ---------------------------------------------------------------------------------

_AUTH_FAILED = """
local n = redis.call('INCR', KEYS[1])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""

# KEYS[1] = the user's sorted set; ARGV = session id, limit, ttl in ms.
_ACQUIRE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""

# KEYS[1] = the user's sorted set; ARGV = ttl in ms, session ids...
_REFRESH = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + ttl, ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl)
return #ARGV - 1
"""

# KEYS = sessions hash, users HLL by style, users HLL by backend; ARGV = field, user id, expire-at.
_COUNT = """
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PFADD', KEYS[2], ARGV[2])
redis.call('PFADD', KEYS[3], ARGV[2])
for i = 1, 3 do redis.call('EXPIREAT', KEYS[i], ARGV[3]) end
return 1
"""

# What counts as Redis failing (answered from memory instead). Anything else is a bug and propagates.
_FAILURES = (RedisError, OSError, TimeoutError)


class RedisStore(Store):
    """Shared state in Redis, answered from an internal MemoryStore while Redis is unreachable.

    `errors` counts failed Redis round trips; `on_error(operation)` is called for each (wire
    a Prometheus counter to it) and `on_availability(up)` on every outage and recovery.
    `available` is False from a failure until a probe succeeds.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_seconds: float = 0.25,
        session_ttl: float = SESSION_TTL_SECONDS,
        retention_days: int = 120,
        prefix: str = DEFAULT_PREFIX,
        max_connections: int = 64,
        max_usage_users: int = MAX_USAGE_USERS,
        retry_backoff: tuple[float, float] = (0.5, 5.0),
        on_error: Callable[[str], None] | None = None,
        on_availability: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.timeout = timeout_seconds
        self.bulk_timeout = max(2.0, 10 * timeout_seconds)
        self.session_ttl = session_ttl
        self.prefix = prefix
        self.clock = clock
        self.on_error = on_error
        self.on_availability = on_availability
        self.errors = 0
        self._backoff_min, self._backoff_max = retry_backoff
        self._backoff = self._backoff_min
        self._retry_at = 0.0
        self._up = True
        self._down_since: float | None = None
        self._probe_task: asyncio.Task[bool] | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._flush_task: asyncio.Task[bool] | None = None
        self._closed = False
        self.memory = MemoryStore(retention_days=retention_days, max_usage_users=max_usage_users, clock=clock)
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_seconds,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 1),  # one immediate retry on a stale pooled connection
            decode_responses=True,
        )
        self._redis = aioredis.Redis(connection_pool=self._pool)
        self._auth_script = self._redis.register_script(_AUTH_FAILED)
        self._acquire_script = self._redis.register_script(_ACQUIRE)
        self._refresh_script = self._redis.register_script(_REFRESH)
        self._count_script = self._redis.register_script(_COUNT)

    @classmethod
    def from_config(cls, config: Config, **kwargs: Any) -> RedisStore:
        assert config.redis is not None
        return cls(
            config.redis.url,
            timeout_seconds=config.redis.timeout_seconds,
            retention_days=config.usage.retention_days,
            **kwargs,
        )

    @property
    def available(self) -> bool:
        return self._up

    @property
    def retention_days(self) -> int:
        """``usage.retention_days``; assignable on config reload (applies to keys written from then on)."""
        return self.memory.retention_days

    @retention_days.setter
    def retention_days(self, days: int) -> None:
        self.memory.retention_days = days

    @property
    def pending_usage_days(self) -> list[str]:
        """UTC days with usage counted in memory and not yet written to Redis."""
        return sorted(self.memory._usage.days)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Probe Redis once (an outage at start-up is logged now) and start the session refresher."""
        if self._refresh_task is None or self._refresh_task.done():
            await self.probe()
            self._refresh_task = asyncio.create_task(self._refresh_loop(), name="store-session-refresher")

    async def close(self) -> None:
        """Stop the background tasks; usage still held from an outage is written first if Redis is up."""
        if not self._closed and self._up and self.memory._usage.days:
            try:
                async with asyncio.timeout(self.bulk_timeout):
                    await self.flush_pending()
            except TimeoutError:
                log.error("usage counted during the redis outage could not be written before shutdown")
        elif not self._closed and self.memory._usage.days:
            log.error(
                "redis is unreachable at shutdown: usage counted during the outage is lost",
                extra={"days": self.pending_usage_days},
            )
        for task in (self._refresh_task, self._probe_task, self._flush_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:  # noqa: BLE001 - cancelled or already failed and counted
                    pass
        self._refresh_task = self._probe_task = self._flush_task = None
        if not self._closed:
            self._closed = True
            try:
                async with asyncio.timeout(self.bulk_timeout):
                    await self._redis.aclose()
                    await self._pool.aclose()
            except _FAILURES:
                pass  # nothing left to tell a Redis that is gone

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.session_ttl / 3)
            try:
                await self.refresh_sessions()
            except Exception:  # never let the loop die; failures are counted in _run
                log.exception("session refresh failed")

    # -- availability ------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def _run(self, op: str, remote: Callable[[], Awaitable[T]], fallback: Callable[[], Awaitable[T]]) -> T:
        if not self._up:
            self._maybe_probe()
            return await fallback()
        try:
            async with asyncio.timeout(self.timeout):
                return await remote()
        except _FAILURES as exc:
            self._failed(op, exc)
            return await fallback()

    def _count_error(self, op: str) -> None:
        self.errors += 1
        if self.on_error is not None:
            try:
                self.on_error(op)
            except Exception:
                log.exception("store on_error callback failed")

    def _failed(self, op: str, exc: BaseException) -> None:
        self._count_error(op)
        if not self._up:
            return
        self._up = False
        self._down_since = time.monotonic()
        self._backoff = self._backoff_min
        self._retry_at = time.monotonic() + self._backoff
        log.error(
            "redis unreachable: limits, usage counts and the guard use in-process state until it returns",
            extra={"redis": redact_url(self.url), "operation": op, "error": self._describe(exc)},
        )
        self._notify(False)

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        try:
            password = urlsplit(self.url).password
        except ValueError:
            password = None
        return text.replace(password, "***") if password else text

    def _notify(self, up: bool) -> None:
        if self.on_availability is not None:
            try:
                self.on_availability(up)
            except Exception:
                log.exception("store on_availability callback failed")

    def _maybe_probe(self) -> None:
        if time.monotonic() < self._retry_at:
            return
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.create_task(self.probe(), name="store-redis-probe")

    async def probe(self) -> bool:
        """PING Redis now (whatever the backoff); returns whether it is available afterwards."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._redis.ping()
        except _FAILURES as exc:
            if self._up:
                self._failed("probe", exc)
            else:
                self._count_error("probe")
                self._backoff = min(self._backoff * 2, self._backoff_max)
                self._retry_at = time.monotonic() + self._backoff
            return False
        if not self._up:
            self._recovered()
        return True

    def _recovered(self) -> None:
        self._up = True
        outage = time.monotonic() - self._down_since if self._down_since is not None else 0.0
        self._down_since = None
        log.warning(
            "redis reachable again: shared limits, usage and guard resumed",
            extra={
                "redis": redact_url(self.url),
                "outage_s": round(outage, 1),
                "pending_usage_days": len(self.memory._usage.days),
            },
        )
        self._notify(True)
        if self.memory._usage.days and (self._flush_task is None or self._flush_task.done()):
            self._flush_task = asyncio.create_task(self.flush_pending(), name="store-usage-flush")

    # -- auth failures -----------------------------------------------------------------------

    def _auth_key(self, ip: str) -> str:
        return self._key("authfail", str(int(self.clock() // AUTH_WINDOW_SECONDS)), ip)

    async def auth_blocked(self, ip: str, limit: int | None) -> bool:
        if limit is None:
            return False
        key = self._auth_key(ip)

        async def remote() -> bool:
            value = await self._redis.get(key)
            return value is not None and int(value) >= limit

        return await self._run("auth_blocked", remote, lambda: self.memory.auth_blocked(ip, limit))

    async def auth_failed(self, ip: str, limit: int | None) -> bool:
        if limit is None:
            return False
        key = self._auth_key(ip)

        async def remote() -> bool:
            count = int(await self._auth_script(keys=[key], args=[AUTH_KEY_TTL_SECONDS]))
            return count >= limit

        return await self._run("auth_failed", remote, lambda: self.memory.auth_failed(ip, limit))

    # -- concurrent sessions ---------------------------------------------------------------

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.session_ttl * 1000))

    async def acquire_session(self, user_id: str, session_id: str, limit: int | None) -> bool:
        if limit is None:
            return True
        key = self._key("sessions", user_id)

        async def remote() -> bool:
            ok = bool(await self._acquire_script(keys=[key], args=[session_id, limit, self._ttl_ms]))
            if ok:
                self.memory.hold(user_id, session_id)
            return ok

        return await self._run(
            "acquire_session", remote, lambda: self.memory.acquire_session(user_id, session_id, limit)
        )

    async def release_session(self, user_id: str, session_id: str) -> None:
        if not self.memory.holds(user_id, session_id):
            return  # never acquired here (no limit at the time): nothing to give back
        await self.memory.release_session(user_id, session_id)
        key = self._key("sessions", user_id)

        async def remote() -> None:
            await self._redis.zrem(key, session_id)

        async def fallback() -> None:
            return None  # the entry expires on its own after session_ttl

        await self._run("release_session", remote, fallback)

    def held_sessions(self) -> list[tuple[str, str]]:
        return self.memory.held_sessions()

    async def refresh_sessions(self, pairs: Iterable[tuple[str, str]] | None = None) -> None:
        """Push the expiry of these sessions (default: all this replica holds) to now + session_ttl.

        Also re-registers sessions opened while Redis was down. Skipped while Redis is down.
        """
        by_user: dict[str, list[str]] = {}
        for user_id, session_id in self.held_sessions() if pairs is None else pairs:
            by_user.setdefault(user_id, []).append(session_id)
        if not self._up:
            self._maybe_probe()
            return
        users = list(by_user)
        for start in range(0, len(users), 500):
            try:
                async with asyncio.timeout(self.bulk_timeout):
                    pipe = self._redis.pipeline(transaction=False)
                    for user_id in users[start : start + 500]:
                        await self._refresh_script(
                            keys=[self._key("sessions", user_id)], args=[self._ttl_ms, *by_user[user_id]], client=pipe
                        )
                    await pipe.execute()
            except _FAILURES as exc:
                self._failed("refresh_sessions", exc)
                return

    # -- migration usage -------------------------------------------------------------------

    def _usage_key(self, day: str, *rest: str) -> str:
        return self._key("usage", day, *rest)

    def _expire_at(self, day: str) -> int:
        end = datetime.combine(date.fromisoformat(day), datetime.min.time(), timezone.utc) + timedelta(days=1)
        return int((end + timedelta(days=self.retention_days)).timestamp())

    async def count_session(self, day: str, auth_style: str, backend: str, user_id: str) -> None:
        _check_usage(day, auth_style, backend)
        keys = [
            self._usage_key(day, "sessions"),
            self._usage_key(day, "users", auth_style),
            self._usage_key(day, "users", backend),
        ]

        async def remote() -> None:
            await self._count_script(keys=keys, args=[f"{auth_style}:{backend}", user_id, self._expire_at(day)])

        await self._run("count_session", remote, lambda: self.memory.count_session(day, auth_style, backend, user_id))

    async def flush_pending(self) -> bool:
        """Write usage counted in memory during an outage; True when nothing is left pending.

        Per day: distinct users first (PFADD, idempotent), then the session counters in one
        MULTI, then the day leaves memory. A day that fails goes back to memory for the next
        recovery. Runs by itself after a recovery; callers may await it too.
        """
        async with self._flush_lock:
            book = self.memory._usage
            written = 0
            for day in sorted(book.days):
                pending = book.pop(day)
                try:
                    async with asyncio.timeout(self.bulk_timeout):
                        await self._write_day(day, pending)
                except _FAILURES as exc:
                    book.merge(day, pending)
                    self._failed("flush_pending", exc)
                    return False
                except BaseException:
                    book.merge(day, pending)
                    raise
                written += 1
            if written:
                log.info("usage counted during the redis outage written to redis", extra={"days": written})
            return not book.days

    async def _write_day(self, day: str, pending: _Day) -> None:
        expire_at = self._expire_at(day)
        members: dict[str, list[str]] = {name: [] for name in USER_SETS}
        for user, bits in pending.users.items():
            for index, name in enumerate(USER_SETS):
                if bits & (1 << index):
                    members[name].append(user)
        for name, users in members.items():
            key = self._usage_key(day, "users", name)
            for start in range(0, len(users), 1000):
                pipe = self._redis.pipeline(transaction=False)
                pipe.pfadd(key, *users[start : start + 1000])
                pipe.expireat(key, expire_at)
                await pipe.execute()
        if pending.sessions:
            key = self._usage_key(day, "sessions")
            pipe = self._redis.pipeline(transaction=True)
            for name, count in pending.sessions.items():
                pipe.hincrby(key, name, count)
            pipe.expireat(key, expire_at)
            await pipe.execute()

    async def usage_days(self, days: int, today: date | str | None = None) -> list[DayUsage]:
        """Read from Redis (never from memory); raises StoreUnavailable when Redis cannot answer."""
        day_list = _day_list(days, today)
        try:
            async with asyncio.timeout(self.bulk_timeout):
                pipe = self._redis.pipeline(transaction=False)
                for day in day_list:
                    pipe.hgetall(self._usage_key(day, "sessions"))
                    for name in USER_SETS:
                        pipe.pfcount(self._usage_key(day, "users", name))
                    pipe.pfcount(self._usage_key(day, "users", "legacy"), self._usage_key(day, "users", "message"))
                replies = await pipe.execute()
        except _FAILURES as exc:
            self._failed("usage_days", exc)
            raise StoreUnavailable(f"redis at {redact_url(self.url)} did not answer: {self._describe(exc)}") from None
        if not self._up:
            self._recovered()
        result = []
        for index, day in enumerate(day_list):
            sessions, legacy, message, old, new, either = replies[index * 6 : index * 6 + 6]
            s = Counter({name: int(value) for name, value in sessions.items()})
            result.append(
                DayUsage(
                    day=day,
                    sessions_legacy=s["legacy:old"] + s["legacy:new"],
                    sessions_message=s["message:old"] + s["message:new"],
                    sessions_old=s["legacy:old"] + s["message:old"],
                    sessions_new=s["legacy:new"] + s["message:new"],
                    users_legacy=int(legacy),
                    users_message=int(message),
                    users_old=int(old),
                    users_new=int(new),
                    users=int(either),
                )
            )
        return result

    # -- the shared guard ------------------------------------------------------------------

    async def publish_guard(self, state: dict[str, Any], ttl_seconds: float = GUARD_TTL_SECONDS) -> None:
        await self.memory.publish_guard(state, ttl_seconds)
        payload = json.dumps(state, separators=(",", ":"))
        key = self._key("guard")

        async def remote() -> None:
            await self._redis.set(key, payload, px=max(1, math.ceil(ttl_seconds * 1000)))

        async def fallback() -> None:
            return None

        await self._run("publish_guard", remote, fallback)

    async def read_guard(self) -> dict[str, Any] | None:
        key = self._key("guard")

        async def remote() -> dict[str, Any] | None:
            raw = await self._redis.get(key)
            if raw is None:
                return None
            try:
                record = json.loads(raw)
            except ValueError:
                return None
            return record if isinstance(record, dict) else None

        return await self._run("read_guard", remote, self.memory.read_guard)


def open_store(config: Config, **kwargs: Any) -> Store:
    """`RedisStore` when the config has a ``redis:`` section, else `MemoryStore`.

    Keyword arguments go to the RedisStore (on_error, on_availability, session_ttl, ...);
    call ``await store.start()`` once the event loop runs and ``await store.close()`` at shutdown.
    """
    if config.redis is None:
        return MemoryStore(retention_days=config.usage.retention_days)
    return RedisStore.from_config(config, **kwargs)
