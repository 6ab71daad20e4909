"""`RedisStore`: state every replica shares through Redis, with a `MemoryStore` for outages.

Two parts: `RedisRemote`, the operations on Redis (redis-py asyncio, one blocking
connection pool, socket timeouts, one atomic Lua script per write), and `outage.Resilient`
around it, which answers from memory while Redis is slow or down and writes the usage
counted meanwhile when it returns (distinct users first with PFADD, which is idempotent,
then the session counters in one MULTI). The report's reads are in `report_reader`.

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
``wsgw:ramp``                          string       the ramp's progress (JSON), written by       never
                                                    compare-and-set on its ``version``
``wsgw:ramp:window:{n}``               hash         field = replica id, value = its numbers      ``RAMP_WINDOW_TTL_SECONDS`` after
                                                    for ramp window ``n`` (JSON)                 the last publish
=====================================  ===========  ===========================================  ================================

``{day}`` is ``YYYY-MM-DD`` (UTC), ``{minute}`` is unix time // 60.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Iterable
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .base import (
    AUTH_KEY_TTL_SECONDS,
    AUTH_STYLES,
    AUTH_WINDOW_SECONDS,
    DEFAULT_PREFIX,
    MAX_USAGE_USERS,
    RAMP_WINDOW_TTL_SECONDS,
    OTHER_VERSION,
    RETENTION_DAYS,
    SESSION_TTL_SECONDS,
    UNKNOWN_VERSION,
    DayUsage,
    VersionUsage,
    check_usage,
    check_version,
    user_hash,
    utc_day,
)
from .memory import DayCounts, MemoryStore
from .outage import Remote, Resilient
from .report_reader import read_app_versions, read_usage_days

if TYPE_CHECKING:
    from ...core.config import Config, SentinelConfig

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

# Compare-and-set of the ramp's record: ARGV[1] the version expected (0: no record), ARGV[2] the new record.
_WRITE_RAMP = """
local current = redis.call('GET', KEYS[1])
local version = 0
if current then
  local ok, record = pcall(cjson.decode, current)
  if ok and type(record) == 'table' and type(record['version']) == 'number' then version = record['version'] end
end
if version ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
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


class RedisRemote(Remote):
    """The shared operations on Redis; each raises one of `failures` when Redis cannot answer."""

    kind = "redis"
    failures = _FAILURES

    def __init__(
        self,
        url: str | None,
        *,
        sentinel: SentinelConfig | None,
        timeout_seconds: float,
        session_ttl: float,
        retention_days: int,
        prefix: str,
        max_connections: int,
        wall: Callable[[], float],
    ) -> None:
        self.url = url or _sentinel_name(sentinel)  # may hold the password: log `location` instead
        self.location = redact_url(self.url)
        self._password = urlsplit(url).password if url else sentinel.password if sentinel else None
        self.bulk_timeout = max(2.0, 10 * timeout_seconds)
        self.session_ttl = session_ttl
        self.retention_days = retention_days
        self.prefix = prefix
        self.wall = wall
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
        self._ramp_script = self._redis.register_script(_WRITE_RAMP)

    def describe(self, exc: BaseException) -> str:
        text = super().describe(exc)
        password = self._password
        return text.replace(password, "***") if password else text

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()
        await self._pool.aclose()

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _usage_key(self, day: str, *rest: str) -> str:
        return self._key("usage", day, *rest)

    def _expire_at(self, day: str) -> int:
        end = datetime.combine(date.fromisoformat(day), datetime.min.time(), timezone.utc) + timedelta(days=1)
        return int((end + timedelta(days=self.retention_days)).timestamp())

    # -- auth failures -----------------------------------------------------------------------

    def _auth_key(self, ip: str) -> str:
        return self._key("authfail", str(int(self.wall() // AUTH_WINDOW_SECONDS)), ip)

    async def auth_blocked(self, ip: str, limit: int) -> bool:
        value = await self._redis.get(self._auth_key(ip))
        return value is not None and int(value) >= limit

    async def auth_failed(self, ip: str, limit: int) -> bool:
        count = int(await self._auth_script(keys=[self._auth_key(ip)], args=[AUTH_KEY_TTL_SECONDS]))
        return count >= limit

    # -- concurrent sessions ---------------------------------------------------------------

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.session_ttl * 1000))

    async def acquire_session(self, user_id: str, session_id: str, limit: int) -> bool:
        key = self._key("sessions", user_id)
        return bool(await self._acquire_script(keys=[key], args=[session_id, limit, self._ttl_ms]))

    async def release_session(self, user_id: str, session_id: str) -> None:
        await self._redis.zrem(self._key("sessions", user_id), session_id)

    async def refresh_sessions(self, pairs: Iterable[tuple[str, str]]) -> None:
        """In pipelines of 500 users, each bounded by the bulk timeout."""
        by_user: dict[str, list[str]] = {}
        for user_id, session_id in pairs:
            by_user.setdefault(user_id, []).append(session_id)
        users = list(by_user)
        for start in range(0, len(users), 500):
            async with asyncio.timeout(self.bulk_timeout):
                pipe = self._redis.pipeline(transaction=False)
                for user_id in users[start : start + 500]:
                    await self._refresh_script(
                        keys=[self._key("sessions", user_id)], args=[self._ttl_ms, *by_user[user_id]], client=pipe
                    )
                await pipe.execute()

    # -- migration usage -------------------------------------------------------------------

    async def count_session(self, day: str, auth_style: str, backend: str, user_id: str) -> None:
        check_usage(day, auth_style, backend)
        keys = [
            self._usage_key(day, "sessions"),
            self._usage_key(day, "users", auth_style),
            self._usage_key(day, "users", backend),
        ]
        await self._count_script(keys=keys, args=[f"{auth_style}:{backend}", user_id, self._expire_at(day)])

    async def write_usage_day(self, day: str, counts: DayCounts) -> None:
        """Distinct users first (PFADD, idempotent), then the session counters in one MULTI."""
        expire_at = self._expire_at(day)
        for name, users in counts.user_sets().items():
            key = self._usage_key(day, "users", name)
            for start in range(0, len(users), 1000):
                pipe = self._redis.pipeline(transaction=False)
                pipe.pfadd(key, *users[start : start + 1000])
                pipe.expireat(key, expire_at)
                await pipe.execute()
        if counts.sessions:
            key = self._usage_key(day, "sessions")
            pipe = self._redis.pipeline(transaction=True)
            for name, count in counts.sessions.items():
                pipe.hincrby(key, name, count)
            pipe.expireat(key, expire_at)
            await pipe.execute()
        await self._write_versions(day, counts, expire_at)

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

    async def usage_days(self, days: list[str]) -> list[DayUsage]:
        return await read_usage_days(self._redis, self._usage_key, days)

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
        return str(await self._version_script(keys=keys, args=args))

    async def app_versions(self, days: list[str]) -> list[VersionUsage]:
        return await read_app_versions(self._redis, self._usage_key, days)

    # -- the shared guard ------------------------------------------------------------------

    async def publish_guard(self, state: dict[str, Any], ttl_seconds: float) -> None:
        payload = json.dumps(state, separators=(",", ":"))
        await self._redis.set(self._key("guard"), payload, px=max(1, math.ceil(ttl_seconds * 1000)))

    async def read_guard(self) -> dict[str, Any] | None:
        return _json_object(await self._redis.get(self._key("guard")))

    # -- the ramp's progress -----------------------------------------------------------------------

    async def read_ramp(self) -> dict[str, Any] | None:
        return _json_object(await self._redis.get(self._key("ramp")))

    async def write_ramp(self, record: dict[str, Any], expected_version: int) -> bool:
        payload = json.dumps(record, separators=(",", ":"))
        return bool(await self._ramp_script(keys=[self._key("ramp")], args=[expected_version, payload]))

    async def publish_ramp_window(self, window: int, replica: str, numbers: dict[str, Any]) -> None:
        key = self._key("ramp", "window", str(window))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, replica, json.dumps(numbers, separators=(",", ":")))
            pipe.expire(key, int(RAMP_WINDOW_TTL_SECONDS))
            await pipe.execute()

    async def read_ramp_window(self, window: int) -> list[dict[str, Any]]:
        values = await self._redis.hvals(self._key("ramp", "window", str(window)))
        return [record for record in map(_json_object, values) if record is not None]


def _json_object(raw: str | bytes | None) -> dict[str, Any] | None:
    """A JSON object as Redis holds it; None for nothing or anything else."""
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class RedisStore(Resilient):
    """`RedisRemote` wrapped in the outage machine: see `outage.Resilient` for `errors`,
    ``on_error``, ``on_availability`` and `available`."""

    remote: RedisRemote

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
        remote = RedisRemote(
            url,
            sentinel=sentinel,
            timeout_seconds=timeout_seconds,
            session_ttl=session_ttl,
            retention_days=retention_days,
            prefix=prefix,
            max_connections=max_connections,
            wall=wall,
        )
        super().__init__(
            remote,
            memory=MemoryStore(retention_days=retention_days, max_usage_users=max_usage_users, wall=wall),
            timeout_seconds=timeout_seconds,
            retry_backoff=retry_backoff,
            on_error=on_error,
            on_availability=on_availability,
            clock=clock,
        )

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
    def url(self) -> str:
        """The Redis URL as configured (the sentinels' when there is none); redact it before logging."""
        return self.remote.url

    @property
    def wall(self) -> Callable[[], float]:
        """The unix-time clock naming the auth-failure minute."""
        return self.remote.wall

    @wall.setter
    def wall(self, wall: Callable[[], float]) -> None:
        self.remote.wall = wall

