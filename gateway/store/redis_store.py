"""`RedisStore`: state every replica shares through Redis, with a `MemoryStore` for outages.

redis-py asyncio, one blocking connection pool, socket timeouts and an ``asyncio.timeout``
of ``redis.timeout_seconds`` around every call. Redis being slow or down never stalls a
chat session: a call that fails or runs out of time is answered by an internal
`MemoryStore`, the outage is logged once (logger ``gateway.store``, the URL without its
password), every failed round trip is counted (`RedisStore.errors`, and the ``on_error``
callback), and while Redis is down no call waits for it: the next call after a short
backoff starts one background probe, and once that succeeds the recovery is logged once,
shared state resumes and the usage counted in memory meanwhile is written (`flush_pending`:
distinct users first with PFADD, which is idempotent, then the session counters in one
MULTI).

Time: ``wall`` (unix time, default `time.time`) names the auth-failure minute; ``clock``
(monotonic, default `time.monotonic`) times the probe backoff and the outage. Session and
guard expiry run on Redis's own clock, so replicas' clocks do not matter.

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
``wsgw:usage:{day}:appv``              set          app versions with a row of their own that    same as above
                                                    day (at most ``max_versions``)
``wsgw:usage:{day}:appv:seen``         sorted set   member = app version, score = unix time      same as above
                                                    it was last seen
``wsgw:usage:{day}:appv:{style}:{v}``  set          users of version ``v`` (BLAKE2b digests);    same as above
                                                    style = ``legacy`` or ``message``
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
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .base import (
    AUTH_KEY_TTL_SECONDS,
    AUTH_WINDOW_SECONDS,
    DEFAULT_PREFIX,
    GUARD_TTL_SECONDS,
    AUTH_STYLES,
    MAX_USAGE_USERS,
    OTHER_VERSION,
    RETENTION_DAYS,
    SESSION_TTL_SECONDS,
    UNKNOWN_VERSION,
    USER_SETS,
    DayUsage,
    Store,
    StoreUnavailable,
    VersionUsage,
    check_usage,
    check_version,
    day_list,
    sorted_versions,
    user_hash,
    utc_day,
)
from .memory import DayCounts, MemoryStore

if TYPE_CHECKING:
    from ..config import Config, SentinelConfig

log = logging.getLogger("gateway.store")

T = TypeVar("T")

# Each script is one atomic step, so replicas racing cannot exceed a limit or lose a count.
# KEYS[1] = the IP's key for this minute; ARGV = its expiry in seconds.
_AUTH_FAILED = """
local n = redis.call('INCR', KEYS[1])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""

# Drop expired members, check the count, add. KEYS[1] = the user's sorted set; ARGV = session id, limit, ttl in ms.
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

# Admit the version while the day has room (else count it as other), add the user, keep the
# newest time seen. KEYS = the day's admitted versions, its last-seen sorted set, the users of
# the version for this style, those of other; ARGV = version, user digest, unix time,
# expire-at, max_versions, the unknown and other labels.
_COUNT_VERSION = """
local version, users = ARGV[1], KEYS[3]
if version ~= ARGV[6] and version ~= ARGV[7] and redis.call('SISMEMBER', KEYS[1], version) == 0 then
  if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[5]) then
    redis.call('SADD', KEYS[1], version)
    redis.call('EXPIREAT', KEYS[1], ARGV[4])
  else
    version, users = ARGV[7], KEYS[4]
  end
end
redis.call('SADD', users, ARGV[2])
redis.call('EXPIREAT', users, ARGV[4])
local seen = redis.call('ZSCORE', KEYS[2], version)
if not seen or tonumber(seen) < tonumber(ARGV[3]) then redis.call('ZADD', KEYS[2], ARGV[3], version) end
redis.call('EXPIREAT', KEYS[2], ARGV[4])
return version
"""

# KEYS[1] = a day's last-seen sorted set; ARGV = expire-at, then (version, unix time) pairs.
_SEEN = """
for i = 2, #ARGV, 2 do
  local seen = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if not seen or tonumber(seen) < tonumber(ARGV[i + 1]) then redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i]) end
end
redis.call('EXPIREAT', KEYS[1], ARGV[1])
return 1
"""

# What counts as Redis failing (answered from memory instead). Anything else is a bug and propagates.
_FAILURES = (RedisError, OSError, TimeoutError)


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


def _sentinel_name(sentinel: SentinelConfig | None) -> str:
    if sentinel is None:
        return ""
    hosts = ",".join(f"{host}:{port}" for host, port in sentinel.hosts)
    return f"sentinel://{hosts}/{sentinel.service_name}"


class RedisStore(Store):
    """Shared state in Redis, answered from an internal MemoryStore while Redis is unreachable.

    `errors` counts failed Redis round trips; `on_error(operation)` is called for each (wire
    a Prometheus counter to it) and `on_availability(up)` on every outage and recovery.
    `available` is False from a failure until a probe succeeds.
    """

    def __init__(
        self,
        url: str | None,
        *,
        sentinel: SentinelConfig | None = None,
        timeout_seconds: float = 0.25,
        session_ttl: float = SESSION_TTL_SECONDS,
        retention_days: int = RETENTION_DAYS,
        prefix: str = DEFAULT_PREFIX,
        max_connections: int = 64,
        max_usage_users: int = MAX_USAGE_USERS,
        retry_backoff: tuple[float, float] = (0.5, 5.0),
        on_error: Callable[[str], None] | None = None,
        on_availability: Callable[[bool], None] | None = None,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url or _sentinel_name(sentinel)  # for log lines: no password
        self._password = urlsplit(url).password if url else sentinel.password if sentinel else None
        self.timeout = timeout_seconds
        self.bulk_timeout = max(2.0, 10 * timeout_seconds)
        self.session_ttl = session_ttl
        self.prefix = prefix
        self.wall = wall
        self.clock = clock
        self.on_error = on_error
        self.on_availability = on_availability
        self.errors = 0
        # The outage state machine: up -> (a call fails) down -> (backoff passes, a call
        # starts a probe) probing -> up, or down again with the backoff doubled.
        self._backoff_min, self._backoff_max = retry_backoff
        self._backoff = self._backoff_min
        self._retry_at = 0.0  # clock() time
        self._up = True
        self._down_since: float | None = None  # clock() time
        self._probe_task: asyncio.Task[bool] | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._flush_task: asyncio.Task[bool] | None = None
        self._closed = False
        self.memory = MemoryStore(retention_days=retention_days, max_usage_users=max_usage_users, wall=wall)
        options: dict[str, Any] = {
            "max_connections": max_connections,
            "socket_timeout": timeout_seconds,
            "socket_connect_timeout": timeout_seconds,
            "retry": Retry(NoBackoff(), 1),  # one immediate retry on a stale pooled connection
            "decode_responses": True,
        }
        self._pool: aioredis.ConnectionPool
        if sentinel is not None:
            # Each new connection asks the sentinels for the current master, and one that
            # finds its server demoted disconnects: after a failover the next call (the
            # outage probe) reaches the new master.
            sentinels = Sentinel(
                list(sentinel.hosts),
                sentinel_kwargs={"socket_timeout": timeout_seconds, "socket_connect_timeout": timeout_seconds},
            )
            self._pool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
                sentinel.service_name, sentinels, password=sentinel.password, check_connection=True, **options
            )
        else:
            assert url is not None
            self._pool = aioredis.BlockingConnectionPool.from_url(url, timeout=timeout_seconds, **options)
        self._redis = aioredis.Redis(connection_pool=self._pool)
        self._auth_script = self._redis.register_script(_AUTH_FAILED)
        self._acquire_script = self._redis.register_script(_ACQUIRE)
        self._refresh_script = self._redis.register_script(_REFRESH)
        self._count_script = self._redis.register_script(_COUNT)
        self._version_script = self._redis.register_script(_COUNT_VERSION)
        self._seen_script = self._redis.register_script(_SEEN)

    @classmethod
    def from_config(cls, config: Config, **kwargs: Any) -> RedisStore:
        assert config.redis is not None
        return cls(
            config.redis.url,
            sentinel=config.redis.sentinel,
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
        return self.memory.held_usage_days()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Probe Redis once (an outage at start-up is logged now) and start the session refresher."""
        if self._refresh_task is None or self._refresh_task.done():
            await self.probe()
            self._refresh_task = asyncio.create_task(self._refresh_loop(), name="store-session-refresher")

    async def close(self) -> None:
        """Stop the background tasks; usage still held from an outage is written first if Redis is up."""
        if not self._closed and self._up and self.pending_usage_days:
            try:
                async with asyncio.timeout(self.bulk_timeout):
                    await self.flush_pending()
            except TimeoutError:
                log.error("usage counted during the redis outage could not be written before shutdown")
        elif not self._closed and self.pending_usage_days:
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
        """Refresh every held session every ``session_ttl / 3`` (20 s with the default 60 s ttl)."""
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
        self._down_since = now = self.clock()
        self._backoff = self._backoff_min
        self._retry_at = now + self._backoff
        log.error(
            "redis unreachable: limits, usage counts and the guard use in-process state until it returns",
            extra={"redis": redact_url(self.url), "operation": op, "error": self._describe(exc)},
        )
        self._notify(False)

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        password = self._password
        return text.replace(password, "***") if password else text

    def _notify(self, up: bool) -> None:
        if self.on_availability is not None:
            try:
                self.on_availability(up)
            except Exception:
                log.exception("store on_availability callback failed")

    def _maybe_probe(self) -> None:
        if self.clock() < self._retry_at:
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
                self._retry_at = self.clock() + self._backoff
            return False
        if not self._up:
            self._recovered()
        return True

    def _recovered(self) -> None:
        self._up = True
        outage = self.clock() - self._down_since if self._down_since is not None else 0.0
        self._down_since = None
        pending = self.pending_usage_days
        log.warning(
            "redis reachable again: shared limits, usage and guard resumed",
            extra={
                "redis": redact_url(self.url),
                "outage_s": round(outage, 1),
                "pending_usage_days": len(pending),
            },
        )
        self._notify(True)
        if pending and (self._flush_task is None or self._flush_task.done()):
            self._flush_task = asyncio.create_task(self.flush_pending(), name="store-usage-flush")

    # -- auth failures -----------------------------------------------------------------------

    def _auth_key(self, ip: str) -> str:
        return self._key("authfail", str(int(self.wall() // AUTH_WINDOW_SECONDS)), ip)

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
        check_usage(day, auth_style, backend)
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
            written = 0
            for day in self.memory.held_usage_days():
                pending = self.memory.take_usage_day(day)
                try:
                    async with asyncio.timeout(self.bulk_timeout):
                        await self._write_day(day, pending)
                except _FAILURES as exc:
                    self.memory.put_back_usage_day(day, pending)
                    self._failed("flush_pending", exc)
                    return False
                except BaseException:
                    self.memory.put_back_usage_day(day, pending)
                    raise
                written += 1
            if written:
                log.info("usage counted during the redis outage written to redis", extra={"days": written})
            return not self.pending_usage_days

    async def _write_day(self, day: str, pending: DayCounts) -> None:
        expire_at = self._expire_at(day)
        for name, users in pending.user_sets().items():
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
        await self._write_versions(day, pending, expire_at)

    async def _write_versions(self, day: str, pending: DayCounts, expire_at: int) -> None:
        """The day's usage by app version: admitted without the cap (the outage may have let a
        few more in), users per style, then the newest times seen."""
        admitted = [v for v in pending.versions if v not in (UNKNOWN_VERSION, OTHER_VERSION)]
        if admitted:
            key = self._usage_key(day, "appv")
            await self._redis.sadd(key, *admitted)
            await self._redis.expireat(key, expire_at)
        for version, members in pending.versions.items():
            for index, style in enumerate(AUTH_STYLES):
                users = [user_hash(user) for user, bits in members.items() if bits & (1 << index)]
                key = self._usage_key(day, "appv", style, version)
                for start in range(0, len(users), 1000):
                    pipe = self._redis.pipeline(transaction=False)
                    pipe.sadd(key, *users[start : start + 1000])
                    pipe.expireat(key, expire_at)
                    await pipe.execute()
        if pending.seen:
            pairs = [item for version, at in pending.seen.items() for item in (version, at)]
            await self._seen_script(keys=[self._usage_key(day, "appv", "seen")], args=[expire_at, *pairs])

    async def usage_days(self, days: int, today: date | str | None = None) -> list[DayUsage]:
        """Read from Redis (never from memory); raises StoreUnavailable when Redis cannot answer."""
        days_asked = day_list(days, today)
        try:
            async with asyncio.timeout(self.bulk_timeout):
                pipe = self._redis.pipeline(transaction=False)
                for day in days_asked:
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
        width = 2 + len(USER_SETS)
        result = []
        for index, day in enumerate(days_asked):
            sessions, *sets, either = replies[index * width : (index + 1) * width]
            counts = {name: int(count) for name, count in sessions.items()}
            result.append(DayUsage.from_counts(day, counts, dict(zip(USER_SETS, map(int, sets))), int(either)))
        return result

    async def count_app_version(self, at: float, version: str, auth_style: str, user_id: str, max_versions: int) -> str:
        check_version(version, auth_style, max_versions)
        day = utc_day(at)
        keys = [
            self._usage_key(day, "appv"),
            self._usage_key(day, "appv", "seen"),
            self._usage_key(day, "appv", auth_style, version),
            self._usage_key(day, "appv", auth_style, OTHER_VERSION),
        ]
        args: list[str | bytes | float] = [version, user_hash(user_id), at, self._expire_at(day), max_versions, UNKNOWN_VERSION, OTHER_VERSION]

        async def remote() -> str:
            return str(await self._version_script(keys=keys, args=args))

        async def fallback() -> str:
            return await self.memory.count_app_version(at, version, auth_style, user_id, max_versions)

        return await self._run("count_app_version", remote, fallback)

    async def app_versions(self, days: int, today: date | str | None = None) -> list[VersionUsage]:
        """Read from Redis (never from memory); raises StoreUnavailable when Redis cannot answer.

        Users are counted once over the days with SUNIONSTORE into keys that live only
        inside one MULTI, so nothing but the counts crosses the network.
        """
        days_asked = day_list(days, today)
        try:
            async with asyncio.timeout(self.bulk_timeout):
                pipe = self._redis.pipeline(transaction=False)
                for day in days_asked:
                    pipe.zrange(self._usage_key(day, "appv", "seen"), 0, -1, withscores=True)
                seen: dict[str, float] = {}
                for pairs in await pipe.execute():
                    for version, at in pairs:
                        seen[version] = max(float(at), seen.get(version, 0.0))
                versions = sorted(seen)
                counts: list[int] = []
                if versions:
                    scratch = [self._key("usage", "scratch", uuid.uuid4().hex, part) for part in ("all", "legacy")]
                    pipe = self._redis.pipeline(transaction=True)
                    for version in versions:
                        legacy = [self._usage_key(day, "appv", "legacy", version) for day in days_asked]
                        message = [self._usage_key(day, "appv", "message", version) for day in days_asked]
                        pipe.sunionstore(scratch[0], legacy + message)
                        pipe.sunionstore(scratch[1], legacy)
                    pipe.delete(*scratch)
                    counts = await pipe.execute()
        except _FAILURES as exc:
            self._failed("app_versions", exc)
            raise StoreUnavailable(f"redis at {redact_url(self.url)} did not answer: {self._describe(exc)}") from None
        if not self._up:
            self._recovered()
        return sorted_versions(
            VersionUsage(version, int(counts[2 * index]), int(counts[2 * index + 1]), seen[version])
            for index, version in enumerate(versions)
        )

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
