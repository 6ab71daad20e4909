"""The rollback guard across replicas: one trip, wherever it happens, holds back every replica.

A replica publishes its own trip in the store (stamped with wall time, which replicas
share; their monotonic clocks are not comparable), and on every sync adopts a newer trip
another replica published, so the recovery schedule follows the first trip's time on all
of them. Both clocks are injected.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

from ..core.config import GuardConfig
from ..core.guard import Guard, GuardState, Transition
from .store import Store

log = logging.getLogger("gateway")
GUARD_SYNC_SECONDS = 1.0


class GuardSync:
    """What this replica knows of the shared guard record, and the loop that keeps it in step."""

    def __init__(self, guard: Guard, store: Store, *, clock: Callable[[], float], wall: Callable[[], float]) -> None:
        self.guard = guard
        self.store = store
        self.clock = clock
        self.wall = wall
        self.replica = uuid.uuid4().hex
        self._seen = 0.0  # wall time of the newest trip this replica knows of
        self._own: dict[str, Any] | None = None

    def own_trip(self, transition: Transition) -> dict[str, Any]:
        """The record that publishes this replica's trip; it is republished until the store holds it."""
        tripped_at = self.wall() - (self.clock() - transition.at)
        self._seen = tripped_at
        self._own = {
            "state": GuardState.TRIPPED.value, "tripped_at": tripped_at, "replica": self.replica, "detail": transition.detail
        }
        return self._own

    async def sync_once(self, config: GuardConfig) -> list[Transition]:
        """Share the guard with the other replicas; the transitions of a trip adopted from one.

        Republishes this replica's own trip while it is in force if the store does not hold
        it (Redis was down when it tripped).
        """
        record = await self.store.read_guard()
        published_at = float(record.get("tripped_at", 0.0)) if record else 0.0
        own = self._own
        if own is not None and self.guard.state is not GuardState.HEALTHY and published_at < own["tripped_at"]:
            await self.store.publish_guard(own)
            return []
        if not record or record.get("replica") == self.replica:
            return []
        if published_at <= self._seen or not config.enabled:
            return []
        self._seen = published_at
        if self.wall() - published_at >= config.cooldown_seconds + len(config.recovery_steps) * config.step_seconds:
            return []  # that trip's whole schedule is over: nothing to adopt
        at = self.clock() - max(0.0, self.wall() - published_at)
        transition = self.guard.trip(at, f"by another replica ({record.get('detail', 'no detail')})")
        return [transition, *self.guard.tick(self.clock())]

    async def run(self, sync: Callable[[], Any]) -> None:
        """Call `sync` (the gateway's, which observes what it adopts) every GUARD_SYNC_SECONDS, for ever."""
        while True:
            await asyncio.sleep(GUARD_SYNC_SECONDS)
            try:
                await sync()
            except Exception as exc:  # the store answers from memory when Redis is down; be safe anyway
                log.warning("guard sync failed", extra={"error": type(exc).__name__})
