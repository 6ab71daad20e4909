"""`Gateway`: what every connection of a running gateway shares, composed of one object per concern.

`RolloutState` (the config in force, its verifier, the ramp's step, the guard), `GuardSync`
(the guard across replicas), `RampSync` (the ramp across replicas), `Rebalancer` (moving
sessions whose route changed) and `Registry` (the open connections, their keepalive and
their close). What stays here is the wiring between
them and the metrics sink: the session outcomes a connection reports.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from ..core import closecodes
from .appversion import app_version
from ..core.auth import REASONS as AUTH_REASONS
from ..core.auth import Verifier
from ..core.config import AppVersionConfig, Config, ConfigError
from ..wire.connector import Connector, target_of
from ..core.guard import STATE_VALUES, Guard, GuardState, Transition
from .guardsync import GUARD_SYNC_SECONDS, GuardSync
from ..wire.handshake import UpgradeRefused
from .jwks import KeySet
from .metrics import Metrics
from ..core.rebalance import Move
from .rebalancer import Rebalancer, moves
from .registry import Registry, placement_answer
from ..wire.services import OpenConnection
from .rolloutstate import RolloutState
from ..core.ramp import GuardView, Window
from ..core.routing import Route
from .rampsync import RAMP_SYNC_SECONDS, Change, RampSync
from .store import Store, StoreUnavailable, open_store, utc_day

__all__ = ["GUARD_SYNC_SECONDS", "Gateway", "describe_error"]

log = logging.getLogger("gateway")
APP_VERSIONS_REFRESH_SECONDS = 5.0  # the status page's sampling interval
# Refusals that say nothing about whether the client guessed a token: not counted per IP.
NOT_THE_CLIENTS_FAULT = frozenset({"rate_limited", "too_many_sessions", "legacy_denied"})


class Gateway:
    close_timeout = 5.0

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        config_path: str | None = None,
        store: Store | None = None,
        byte_relay: bool = True,
    ) -> None:
        """`clock` (monotonic) times everything that is a duration; `wall` (unix time) what replicas share.

        Both may be replaced later (tests move them); the parts read them through the gateway.
        `byte_relay` False makes every session use the frame relay (the tests prove the
        contract on both relays; the benchmark compares them).
        """
        self.clock = clock
        self.wall = wall
        self.metrics = metrics or Metrics()
        self.draining = False
        self.accepting = True
        self.registry = Registry(self._now)
        self.metrics.add_flow_collector(self.registry.flows)
        self.store = store or open_store(config, wall=wall, on_error=self._store_error, on_availability=self._store_up)
        self.connector = Connector()
        self.byte_relay = byte_relay
        keys = (
            KeySet(
                config.auth.jwks_url,
                config.auth.algorithms,
                refresh_seconds=config.auth.jwks_refresh_seconds,
                on_result=lambda result: self.metrics.jwks_refreshes.labels(result).inc(),
            )
            if config.auth.jwks_url is not None
            else None
        )
        self.rollout = RolloutState(config, keys, config_path=config_path)
        self.guard_sync = GuardSync(self.rollout.guard, self.store, clock=self._now, wall=self._wall)
        self.rebalancer = Rebalancer(self._now, self.registry.last_frame, self._move)
        self._new_upstream = [0, 0, 0]  # new-backend attempts, opened, token refused: the ramp's gates
        self.ramp_sync = RampSync(self.store, replica=self.guard_sync.replica, wall=self._wall, totals=self._ramp_totals)
        self._ramp_due = asyncio.Event()
        self.pending = 0  # connections from accept until relaying or closed (listener.Request)
        self.upstream_errors: dict[str, dict[str, Any]] = {}  # the last one per backend, for /rollout
        self._background: set[asyncio.Task[Any]] = set()
        self._guard_sync: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._ramp: asyncio.Task[None] | None = None
        self._app_versions: dict[str, Any] | None = None  # today's usage by app version, as last read
        self._app_versions_read_at: float | None = None
        self.apply(config)

    def _now(self) -> float:
        return self.clock()

    def _wall(self) -> float:
        return self.wall()

    # -- what the parts hold, under the names the listener, admin app and tests use --------------

    @property
    def guard(self) -> Guard:
        return self.rollout.guard

    @property
    def keys(self) -> KeySet | None:
        return self.rollout.keys

    @property
    def config_path(self) -> str | None:
        return self.rollout.config_path

    @property
    def loaded_at(self) -> float:
        return self.rollout.loaded_at

    @property
    def replica(self) -> str:
        return self.guard_sync.replica

    @property
    def connections(self) -> weakref.WeakSet[OpenConnection]:
        return self.registry.connections

    # -- config ----------------------------------------------------------------------------

    def apply(self, config: Config) -> None:
        """Serve `config` to new connections; established ones keep the one they started with."""
        transitions = self.rollout.apply(config, self.wall())
        # Plain attributes, not properties: the listener's `Front` may set them.
        self.config: Config = config
        self.verifier: Verifier = self.rollout.verifier
        self._observe(transitions)
        self.store.retention_days = config.usage.retention_days
        self._ramp_due.set()  # a ramp turned on, paused or edited is acted on at once
        self.refresh_gauges()

    def reload(self, config: Config) -> None:
        """Apply a reloaded config; keys bound at start-up keep their value and are reported."""
        config, stuck = self.rollout.reloaded(config)
        if stuck:
            self.metrics.reloads.labels("restart_required").inc()
            log.warning(
                "config change needs a restart to take effect",
                extra={"file": self.config_path, "keys": stuck},
            )
        self.apply(config)
        self.replan("the rollout changed")
        self.metrics.reloads.labels("success").inc()
        log.info(
            "config reloaded",
            extra={"file": self.config_path, "new_percent": config.rollout.new_percent},
        )

    def reload_failed(self, error: ConfigError) -> None:
        self.metrics.reloads.labels("invalid").inc()
        log.error(
            "config reload refused; the previous config keeps serving",
            extra={"file": error.source or self.config_path, "problems": error.problems},
        )

    # -- routing and the guard -------------------------------------------------------------

    def route(self, user_id: str) -> Route:
        """`routing.choose_backend`, held back by the guard while it is tripped or recovering."""
        self._observe(self.guard.tick(self.clock()))
        return self.rollout.route(user_id)

    def new_backend_outcome(self, failed: bool) -> None:
        self._observe(self.guard.record(failed, self.clock()))

    def _observe(self, transitions: list[Transition], *, share: bool = True) -> None:
        for transition in transitions:
            if transition.state is GuardState.TRIPPED:
                self.metrics.guard_trips.inc()
                log.error("rollback guard " + transition.detail, extra={"guard_state": transition.state.value})
                if share:
                    self._spawn(self.store.publish_guard(self.guard_sync.own_trip(transition)))
                if self.config.rollout.rebalance.on_guard_trip:
                    self.replan("the new backend is failing")
            else:
                log.warning("rollback guard " + transition.detail, extra={"guard_state": transition.state.value})
        if transitions:
            self._set_gauges()

    async def sync_guard_once(self) -> None:
        """Share the guard with the other replicas (`GuardSync.sync_once`), and act on a trip adopted."""
        self._observe(await self.guard_sync.sync_once(self.config.rollout.guard), share=False)

    # -- the ramp -------------------------------------------------------------------------------

    def _ramp_totals(self) -> Window:
        attempted, opened, rejected = self._new_upstream
        replies = self.metrics.reply_totals()
        (new_sum, new_count), (old_sum, old_count) = replies["new"], replies["old"]
        return Window(attempted, opened, rejected, new_sum, new_count, old_sum, old_count)

    def _guard_view(self) -> GuardView:
        """The guard as the ramp judges it, its times on the wall clock every replica shares."""
        guard = self.guard
        tripped_at = guard.tripped_at
        if not guard.config.enabled or guard.state is GuardState.HEALTHY:
            return GuardView(healthy_since=self._wall_of(guard.since) if tripped_at is not None else None)
        return GuardView(False, self._wall_of(tripped_at) if tripped_at is not None else None, guard.trip_detail)

    def _wall_of(self, at: float) -> float:
        return self.wall() - (self.clock() - at)

    async def sync_ramp_once(self) -> None:
        """One round of the shared ramp (`RampSync.sync_once`), then route by its step; off: by the file's percentage."""
        plan = self.config.rollout.ramp
        if not plan.enabled:
            self._follow_ramp(None)
            return
        self._observe(self.guard.tick(self.clock()))
        change = await self.ramp_sync.sync_once(plan, self._guard_view())
        progress = self.ramp_sync.progress
        if change is not None:
            self._ramp_changed(change)
        if self.config.rollout.ramp.enabled:  # a reload may have turned it off meanwhile
            self._follow_ramp(progress.step_percent if progress is not None else None)

    def _follow_ramp(self, percent: float | None) -> None:
        if self.rollout.follow_ramp(percent):
            self._set_gauges()
            self.replan(f"the ramp moved to {percent:g}%" if percent is not None else "the ramp is off")

    def _ramp_changed(self, change: Change) -> None:
        after, before = change.after, change.before
        extra = {
            "ramp_state": after.state,
            "step_percent": after.step_percent,
            "previous_percent": before.step_percent if before is not None else None,
            "decided_by": "this replica" if change.ours else "another replica",
        }
        if before is None and not change.ours:
            where = f"step {after.step_index + 1} of {len(after.steps)} ({after.step_percent:g}%, {after.state})"
            log.info(f"ramp: following the shared ramp at {where}; its last change: {after.reason}", extra=extra)
        elif before is None or (after.reason, after.state, after.step_percent) != (before.reason, before.state, before.step_percent):
            failing = after.state in ("holding", "stepped_back") and (before is None or before.window != after.window)
            (log.warning if failing else log.info)("ramp: " + after.reason, extra=extra)

    async def _ramp_loop(self) -> None:
        """`sync_ramp_once` every RAMP_SYNC_SECONDS, and at once after a reload."""
        while True:
            try:
                async with asyncio.timeout(RAMP_SYNC_SECONDS):  # wait_for may swallow a cancel that races the event
                    await self._ramp_due.wait()
            except TimeoutError:
                pass
            self._ramp_due.clear()
            try:
                await self.sync_ramp_once()
            except Exception:  # the ramp must outlive any one round; it holds its step meanwhile
                log.exception("ramp sync failed")

    def ramp_status(self) -> dict[str, Any]:
        """The ramp in /rollout (`RampSync.status`)."""
        return self.ramp_sync.status(self.config.rollout.ramp, self._guard_view(), _iso)

    # -- rebalancing open sessions ---------------------------------------------------------------

    def replan(self, why: str) -> None:
        """Schedule the close (1012) of every relaying session whose route changed and that is
        not on its new backend already; replaces any schedule in progress."""
        config = self.config.rollout.rebalance
        found = moves(self.connections, self.rollout.routing, *self.rollout.held_back_by_guard()) if config.enabled else []
        self.rebalancer.replan(config, found, why)
        if found:
            log.warning(
                "rebalancing open sessions whose route changed",
                extra={"sessions": len(found), "window_seconds": config.window_seconds, "reason": why},
            )

    async def _move(self, move: Move, why: str) -> None:
        self.metrics.rebalance_closes.labels(move.source, move.target).inc()
        await move.key.close(
            closecodes.SERVICE_RESTART,
            f"rebalancing: {why}; reconnect to reach the {move.target} backend",
            "client moved to another backend",
        )

    # -- background work and the store -------------------------------------------------------

    def _spawn(self, work: Awaitable[Any]) -> None:
        """Fire-and-forget store work that must not hold up a chat session."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _store_error(self, operation: str) -> None:
        self.metrics.store_errors.labels(operation).inc()

    def _store_up(self, up: bool) -> None:
        self.metrics.store_up.set(1 if up else 0)

    # -- limits --------------------------------------------------------------------------------

    async def ip_blocked(self, ip: str) -> bool:
        return await self.store.auth_blocked(ip, self.config.limits.auth_failures_per_ip_per_minute)

    async def acquire_slot(self, user_id: str, connection_id: str) -> bool:
        """Take one of the user's `limits.max_sessions_per_user` slots; False when all are taken."""
        return await self.store.acquire_session(user_id, connection_id, self.config.limits.max_sessions_per_user)

    def effective_percent(self) -> float:
        return self.rollout.effective_percent()

    def refresh_gauges(self) -> None:
        """Before a scrape: gauges that only matter when someone looks."""
        self._observe(self.guard.tick(self.clock()))
        self._set_gauges()
        self.metrics.pending_handshakes.set(self.pending)

    def _set_gauges(self) -> None:
        self.metrics.configured_percent.set(self.config.rollout.new_percent)
        ramp = self.rollout.ramp_percent if self.config.rollout.ramp.enabled else None
        self.metrics.ramp_step_percent.set(ramp if ramp is not None else math.nan)
        self.metrics.effective_percent.set(self.effective_percent())
        self.metrics.guard_state.set(STATE_VALUES[self.guard.state])
        self.metrics.draining.set(1 if self.draining else 0)

    def rollout_status(self) -> dict[str, Any]:
        self.refresh_gauges()
        return {
            **self.rollout.status(self.clock(), self._utc),
            "config_loaded_at": _iso(self.loaded_at),
            "active_connections": len(self.connections),
            "draining": self.draining,
            "pending_handshakes": self.pending,
            # asyncio tasks alive: an established session has none, so this stays flat (bench/soak.py).
            "tasks": len(asyncio.all_tasks()),
            "rebalance": self.rebalancer.status(),
            "last_upstream_error": {backend: self.upstream_errors.get(backend) for backend in ("old", "new")},
            "app_versions": self._app_versions_today(),
            "ramp": self.ramp_status(),
        }

    def _utc(self, at: float) -> str:
        """A time of the monotonic `clock` as the UTC wall time an operator can compare with the log."""
        return _iso(self.wall() - (self.clock() - at))

    def session_placement(self, request_id: str) -> dict[str, Any] | None:
        """Where the open session with this X-Request-ID is, and why (`registry.placement_answer`)."""
        conn = self.registry.find(request_id)
        return placement_answer(request_id, conn.record()) if conn is not None else None

    def _app_versions_today(self) -> dict[str, Any] | None:
        """Today's usage by app version as last read from the store (None when
        ``usage.app_version`` is off). This answers at once and the store does not, so a
        fresh read starts in the background at most every `APP_VERSIONS_REFRESH_SECONDS`."""
        if self.config.usage.app_version is None:
            return None
        read_at, now = self._app_versions_read_at, self.clock()
        if read_at is None or now - read_at >= APP_VERSIONS_REFRESH_SECONDS:
            self._app_versions_read_at = now
            self._spawn(self._read_app_versions())
        return self._app_versions

    async def _read_app_versions(self) -> None:
        day = utc_day(self.wall())
        try:
            rows = await self.store.app_versions(1, day)
        except StoreUnavailable:
            return  # keep the last table; the store's outage is logged and counted already
        self._app_versions = {
            "day": day,
            "read_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.wall())),
            "versions": [row.as_dict() for row in rows],
        }

    # -- session outcomes (called by the relay) ----------------------------------------------

    def upstream_connected(self, backend: str, seconds: float) -> None:
        self.metrics.upstream_connect_seconds.labels(backend).observe(seconds)

    @property
    def ramp_window(self) -> int | None:
        return self.ramp_sync.window

    def upstream_result(self, backend: str, result: str, ramp_window: int | None) -> None:
        """How one upstream attempt ended: ok, connect, handshake, rejected (the token) or
        bad_request (the client's request); only the backend's own faults reach the guard,
        and only an attempt begun in the ramp's current window counts in it."""
        if result != "ok":
            self.metrics.upstream_failures.labels(backend, result).inc()
        if backend == "new" and result != "bad_request" and ramp_window == self.ramp_sync.window:
            counts = self._new_upstream
            counts[0] += 1
            counts[1] += result == "ok"
            counts[2] += result == "rejected"
        if backend == "new" and result not in ("rejected", "bad_request"):
            self.new_backend_outcome(failed=result != "ok")

    def upstream_error(self, backend: str, url: str, error: BaseException) -> dict[str, Any]:
        """Keep `backend`'s latest failed attempt for /rollout; returns its host, port and what
        went wrong, for the log line. Never the URL itself: its query may carry a token."""
        target = target_of(url)
        timeout = self.config.backends[backend].connect_timeout_seconds if backend in self.config.backends else None
        where: dict[str, Any] = {"host": target.host, "port": target.port, "error": describe_error(error, timeout)}
        self.upstream_errors[backend] = {"at": _iso(self.wall()), **where}
        return where

    def reply_observer(self, backend: str) -> Callable[[float], None]:
        return self.metrics.reply_by_backend[backend]

    def token_refreshed(self, result: str) -> None:
        self.metrics.token_refreshes.labels(result).inc()

    def session_expired(self) -> None:
        self.metrics.session_expiries.inc()

    def fell_back(self) -> None:
        self.metrics.fallbacks.inc()

    def session_ready(
        self, auth_style: str, backend: str, user_id: str, seconds: float, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        """`headers`: the upgrade request's, where ``usage.app_version`` finds the app version."""
        self.pending -= 1
        children = self.metrics.session_by_route[auth_style, backend]
        children.opened.inc()
        children.active.inc()
        children.ready_seconds.observe(seconds)
        self._spawn(self.store.count_session(utc_day(self.wall()), auth_style, backend, user_id))
        settings = self.config.usage.app_version
        if settings is not None:
            self._spawn(self._count_app_version(settings, app_version(settings, headers), auth_style, user_id))

    async def _count_app_version(self, settings: AppVersionConfig, version: str, auth_style: str, user_id: str) -> None:
        row = await self.store.count_app_version(self.wall(), version, auth_style, user_id, settings.max_versions)
        self.metrics.count_app_version(row, auth_style, settings.max_versions)

    def upgrade_attempted(self, auth_style: str) -> None:
        self.metrics.attempts_by_style[auth_style].inc()

    def connection_opened(self, conn: OpenConnection) -> None:
        """`conn` was upgraded; it stays in `pending` (counted by the listener) until it relays or ends."""
        self.registry.add(conn)

    def auth_failed(self, ip: str, failure: str) -> Coroutine[Any, Any, bool] | None:
        """The count of one refused client against its address (`auth_failures_per_ip_per_minute`),
        for the connection to await before it sends the 1008; None when the failure does not count."""
        limit = self.config.limits.auth_failures_per_ip_per_minute
        if limit is None or failure not in AUTH_REASONS or failure in NOT_THE_CLIENTS_FAULT:
            return None
        return self.store.auth_failed(ip, limit)

    def connection_finished(self, conn: OpenConnection) -> None:
        """Account for a finished connection, then write its log line (so a test or an operator
        that sees the line sees final metrics).

        Its session slot is released under the limits it started with: a reload that turned
        ``max_sessions_per_user`` off must not strand the slot it took."""
        self.registry.finished(conn)
        record = conn.record()
        failure, user_id = record["failure"], record["user_id"]
        if record["ready_s"] is None:
            self.pending -= 1
        else:
            self.metrics.session_by_route[record["auth_style"], record["backend"]].active.dec()
            if conn.upstream_dropped:
                self.metrics.upstream_failures.labels(record["backend"], "dropped").inc()
                if record["backend"] == "new":
                    self.new_backend_outcome(failed=True)
        if failure in AUTH_REASONS:
            self.metrics.auth_failures.labels(failure).inc()
        if user_id is None or conn.session.config.limits.max_sessions_per_user is None:
            log.info("connection closed", extra=record)
            return

        async def finish() -> None:
            await self.store.release_session(user_id, conn.connection_id)
            log.info("connection closed", extra=record)

        self._spawn(finish())

    # -- the gateway's life ------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether a load balancer should send new clients (/readyz)."""
        return not self.draining and (self.keys is None or bool(self.keys.keys))

    async def refresh_keys(self) -> None:
        if self.keys is not None:
            await self.keys.refresh_on_demand()

    async def start(self) -> None:
        if self.keys is not None:
            await self.keys.refresh()
            self.keys.start()
        await self.store.start()
        try:
            await self.sync_ramp_once()  # a restarted replica routes by the ramp's step from its first session
        except Exception:
            log.exception("ramp sync failed")
        self._guard_sync = asyncio.create_task(self.guard_sync.run(self.sync_guard_once))
        self._ramp = asyncio.create_task(self._ramp_loop())
        self._keepalive = asyncio.create_task(self.registry.keep_alive(self._ping_interval))

    def _ping_interval(self) -> float:
        return self.config.limits.ping_interval_seconds

    async def stop(self) -> None:
        for task in (self._guard_sync, self._keepalive, self._ramp):
            if task is not None:
                task.cancel()
        self.rebalancer.cancel()
        if self._background:
            await asyncio.wait(self._background, timeout=self.close_timeout)
        await self.store.close()
        await self.connector.close()
        if self.keys is not None:
            await self.keys.stop()

    async def close_all(self, code: int, reason: str) -> None:
        await self.registry.close_all(code, reason)

    async def wait_closed(self, timeout: float) -> None:
        """Until every connection has finished, or `timeout` passes."""
        await self.registry.wait_closed(timeout)

    def start_drain(self) -> None:
        self.draining = True
        self.refresh_gauges()
        log.info(
            "draining: readiness is now 503",
            extra={"grace_seconds": self.config.drain.grace_seconds, "window_seconds": self.config.drain.window_seconds},
        )

    async def close_spread(self, window: float) -> None:
        """Stop accepting, then close every session with 1012, spread evenly over `window` seconds."""
        self.accepting = False
        await self.registry.close_spread(window)


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def describe_error(error: BaseException, timeout: float | None = None) -> str:
    """What an operator can act on: the OS's own words (``Name or service not known``,
    ``Connection refused``), not the exception's class name."""
    if isinstance(error, TimeoutError) and not error.errno:
        return f"no answer within {timeout:g} s" if timeout is not None else "timed out"
    if isinstance(error, UpgradeRefused):
        return f"upgrade refused with HTTP {error.status}" if error.status else f"upgrade refused: {error}"
    if isinstance(error, OSError) and error.errno is not None and error.errno > 0:
        return os.strerror(error.errno)  # asyncio words a refusal "Connect call failed (...)"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror  # a resolver error (gaierror): its errno is the resolver's, not the OS's
    return str(error) or type(error).__name__
