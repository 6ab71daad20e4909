"""What ``ws-gateway report`` reads from Redis: usage per day and per app version.

Apart from the Lua scripts that write the counts because a read has other needs: it runs
while sessions are counted, must never be answered from one process's memory, and sends
only counts across the network, however many users a day holds. `RedisStore` runs these
reads under its bulk timeout; the keys are `redis_store`'s key families.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import redis.asyncio as aioredis

from .base import USER_SETS, DayUsage, VersionUsage, sorted_versions

UsageKey = Callable[..., str]  # (day, *rest) -> the key of that day's usage family


async def read_usage_days(redis: aioredis.Redis, usage_key: UsageKey, days: list[str]) -> list[DayUsage]:
    """`days` (``YYYY-MM-DD``, UTC) in one pipeline: the session counters and the distinct users."""
    pipe = redis.pipeline(transaction=False)
    for day in days:
        pipe.hgetall(usage_key(day, "sessions"))
        for name in USER_SETS:
            pipe.pfcount(usage_key(day, "users", name))
        pipe.pfcount(usage_key(day, "users", "legacy"), usage_key(day, "users", "message"))
    replies = await pipe.execute()
    width = 2 + len(USER_SETS)
    result = []
    for index, day in enumerate(days):
        sessions, *sets, either = replies[index * width : (index + 1) * width]
        counts = {name: int(count) for name, count in sessions.items()}
        result.append(DayUsage.from_counts(day, counts, dict(zip(USER_SETS, map(int, sets))), int(either)))
    return result


async def read_app_versions(redis: aioredis.Redis, usage_key: UsageKey, days: list[str]) -> list[VersionUsage]:
    """Each version seen on `days`, users counted once over them.

    Users are counted with SUNIONSTORE into keys that live only inside one MULTI, so
    nothing but the counts crosses the network.
    """
    pipe = redis.pipeline(transaction=False)
    for day in days:
        pipe.zrange(usage_key(day, "appv", "seen"), 0, -1, withscores=True)
    seen: dict[str, float] = {}
    for pairs in await pipe.execute():
        for version, at in pairs:
            seen[version] = max(float(at), seen.get(version, 0.0))
    versions = sorted(seen)
    counts: list[int] = []
    if versions:
        scratch = [usage_key("scratch", uuid.uuid4().hex, part) for part in ("all", "legacy")]
        pipe = redis.pipeline(transaction=True)
        for version in versions:
            legacy = [usage_key(day, "appv", "legacy", version) for day in days]
            message = [usage_key(day, "appv", "message", version) for day in days]
            pipe.sunionstore(scratch[0], legacy + message)
            pipe.sunionstore(scratch[1], legacy)
        pipe.delete(*scratch)
        counts = await pipe.execute()
    return sorted_versions(
        VersionUsage(version, int(counts[2 * index]), int(counts[2 * index + 1]), seen[version])
        for index, version in enumerate(versions)
    )
