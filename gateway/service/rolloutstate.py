"""The rollout as new sessions meet it: the config in force, the verifier built from it, and
the rollback guard that may hold the configured percentage back.

No I/O and no clock of its own: the caller passes the time and acts on the guard's
transitions (log, metrics, sharing a trip with the other replicas), so all of it is
unit-tested with plain numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.auth import Verifier
from ..core.config import Config, keep_restart_keys, restart_required
from ..core.guard import Guard, GuardState, Transition
from .jwks import KeySet
from ..core.routing import Route, choose_backend, held_back


class RolloutState:
    """A reload swaps the config whole; a session keeps the one it started with (its `Session.config`)."""

    def __init__(self, config: Config, keys: KeySet | None, *, config_path: str | None = None) -> None:
        """`keys`: bound at start (``auth.jwks_url`` is a restart key), one key set for the process's life."""
        self.keys = keys
        self.config_path = config_path
        self.guard = Guard(config.rollout.guard)
        self.config = config
        self.verifier = Verifier(config.auth, keys)
        self.loaded_at = 0.0

    def apply(self, config: Config, wall: float) -> list[Transition]:
        """Serve `config` to new connections from `wall` (unix time) on; the guard's transitions."""
        self.config = config
        self.verifier = Verifier(config.auth, self.keys)
        self.loaded_at = wall
        return self.guard.configure(config.rollout.guard)

    def reloaded(self, config: Config) -> tuple[Config, list[str]]:
        """What a reload may apply: keys bound at start-up keep their value; those it tried to change."""
        stuck = restart_required(self.config, config)
        return (keep_restart_keys(self.config, config) if stuck else config), stuck

    def route(self, user_id: str) -> Route:
        """`routing.choose_backend`, held back by the guard while it is tripped or recovering
        (tick the guard first: its state moves with time)."""
        rollout = self.config.rollout
        return held_back(choose_backend(user_id, rollout), rollout, self.guard.share(), self.guard.blocks_forced())

    def held_back_by_guard(self) -> tuple[float, bool]:
        """The guard's share and forced-user block as rebalancing sees them (``on_guard_trip`` off: none)."""
        if self.config.rollout.rebalance.on_guard_trip:
            return self.guard.share(), self.guard.blocks_forced()
        return 1.0, False

    def effective_percent(self) -> float:
        return self.config.rollout.new_percent * self.guard.share()

    def status(self, now: float, utc: Callable[[float], str]) -> dict[str, Any]:
        """The rollout part of /rollout at `now` (the monotonic clock); `utc` words one of its times."""
        rollout = self.config.rollout
        guard = self.guard
        retry_at = guard.retry_at()
        return {
            "configured_percent": rollout.new_percent,
            "effective_percent": self.effective_percent(),
            "force_new_count": len(rollout.force_new),
            "force_old_count": len(rollout.force_old),
            "fallback_to_old": rollout.fallback_to_old,
            "legacy_auth": self.config.auth.legacy,
            "guard": {
                "enabled": rollout.guard.enabled,
                "state": guard.state.value,
                "since": utc(guard.since) if guard.state is not GuardState.HEALTHY else None,
                "step": guard.step + 1 if guard.state is GuardState.RECOVERING else None,
                "share_of_configured": guard.share(),
                "trips": guard.trips,
                "retries_at": utc(retry_at) if retry_at is not None else None,
                "retries_in_seconds": round(max(0.0, retry_at - now), 1) if retry_at is not None else None,
            },
            "config_file": self.config_path,
        }
