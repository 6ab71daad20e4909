"""Shared state for the gateway's replicas: limits, migration usage, the rollback guard.

One interface, two implementations; `open_store(config)` picks one from the config:

* `base` — the `Store` interface and what each operation promises; `DayUsage`,
  `VersionUsage`, `StoreUnavailable`, `utc_day` and the limits' constants.
* `memory` — `MemoryStore`: in-process state. The embedded default when the config has no
  ``redis:`` section, and the fallback inside `RedisStore`.
* `outage` — `Resilient`: how a shared store that may be unreachable rides out an outage
  (answers from memory, probe, backoff, recovery, writing the usage counted meanwhile),
  around any `outage.Remote`.
* `redis_store` — `RedisStore`: `Resilient` around `RedisRemote`, state every replica
  shares through Redis, its key families and Lua scripts.
* `report_reader` — what the report reads from Redis: usage per day and per app version.
* `sqlite` — `SqliteStore`: `MemoryStore` with usage also written to the SQLite file
  ``usage.path`` names, so the report works without Redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import OTHER_VERSION, UNKNOWN_VERSION, DayUsage, Store, StoreUnavailable, VersionUsage, utc_day
from .memory import MemoryStore
from .redis_store import RedisStore
from .sqlite import SqliteStore

if TYPE_CHECKING:
    from ...core.config import Config

__all__ = [
    "OTHER_VERSION", "UNKNOWN_VERSION", "DayUsage", "MemoryStore", "RedisStore", "SqliteStore", "Store", "StoreUnavailable",
    "VersionUsage", "open_store", "utc_day",
]


def open_store(config: Config, **kwargs: Any) -> Store:
    """`RedisStore` when the config has a ``redis:`` section, else `SqliteStore` when it has
    ``usage.path``, else `MemoryStore`.

    Keyword arguments go to the RedisStore (on_error, on_availability, session_ttl, wall,
    clock, ...); the others take only ``wall`` of them. Call ``await store.start()`` once
    the event loop runs and ``await store.close()`` at shutdown.
    """
    if config.redis is None:
        memory_kwargs = {"wall": kwargs["wall"]} if "wall" in kwargs else {}
        if config.usage.path is not None:
            return SqliteStore(config.usage.path, retention_days=config.usage.retention_days, **memory_kwargs)
        return MemoryStore(retention_days=config.usage.retention_days, **memory_kwargs)
    return RedisStore.from_config(config, **kwargs)
