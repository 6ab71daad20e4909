"""The rollout as new sessions meet it: the config in force, the verifier built from it, the
ramp's step that replaces the configured percentage while ``rollout.ramp`` is on, and the
rollback guard that may hold that percentage back.

No I/O and no clock of its own: the caller passes the time and acts on the guard's
transitions (log, metrics, sharing a trip with the other replicas), so all of it is
unit-tested with plain numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..core.auth import Verifier
from ..core.config import Config, keep_restart_keys, restart_required
from ..core.guard import Guard, GuardState, Transition
from .jwks import KeySet
from ..core.config import RolloutConfig
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
        self.ramp_percent: float | None = None  # the ramp's step, once one is known
        self.routing: RolloutConfig = config.rollout  # what routing reads: the file's, or the ramp's step in it

    def apply(self, config: Config, wall: float) -> list[Transition]:
        """Serve `config` to new connections from `wall` (unix time) on; the guard's transitions."""
        self.config = config
        self.verifier = Verifier(config.auth, self.keys)
        self.loaded_at = wall
        self._route_by(self.ramp_percent)
        return self.guard.configure(config.rollout.guard)

    def follow_ramp(self, percent: float | None) -> bool:
        """Route by the ramp's step `percent` (None: by ``rollout.new_percent``) while the ramp
        is on; whether the percentage routing uses changed."""
        before = self.routing.new_percent
        self.ramp_percent = percent
        self._route_by(percent)
        return self.routing.new_percent != before

    def _route_by(self, percent: float | None) -> None:
        rollout = self.config.rollout
        self.routing = replace(rollout, new_percent=percent) if rollout.ramp.enabled and percent is not None else rollout

    def reloaded(self, config: Config) -> tuple[Config, list[str]]:
        """What a reload may apply: keys bound at start-up keep their value; those it tried to change."""
        stuck = restart_required(self.config, config)
        return (keep_restart_keys(self.config, config) if stuck else config), stuck

    def route(self, user_id: str) -> Route:
        """`routing.choose_backend`, held back by the guard while it is tripped or recovering
        (tick the guard first: its state moves with time)."""
        rollout = self.routing
        return held_back(choose_backend(user_id, rollout), rollout, self.guard.share(), self.guard.blocks_forced())

    def held_back_by_guard(self) -> tuple[float, bool]:
        """The guard's share and forced-user block as rebalancing sees them (``on_guard_trip`` off: none)."""
        if self.config.rollout.rebalance.on_guard_trip:
            return self.guard.share(), self.guard.blocks_forced()
        return 1.0, False

    def effective_percent(self) -> float:
        return self.routing.new_percent * self.guard.share()

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
