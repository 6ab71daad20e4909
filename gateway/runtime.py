"""`Gateway`: what every connection of a running gateway shares.

The live config (swapped whole on reload; a session keeps the one it started with), the
token verifier built from it, the upstream connector, the rollback guard, the metrics,
and the set of open connections that keepalive pings and shutdown drains.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, Protocol

from . import closecodes
from .appversion import app_version
from .auth import REASONS as AUTH_REASONS
from .auth import Verifier
from .config import AppVersionConfig, Config, ConfigError, keep_restart_keys, restart_required
from .connector import Connector, target_of
from .guard import STATE_VALUES, Guard, GuardState, Transition
from .handshake import UpgradeRefused
from .jwks import KeySet
from .metrics import Metrics
from .rebalance import Move, Schedule, due, plan
from .relay import Flow
from .routing import Route, choose_backend, held_back
from .store import Store, StoreUnavailable, open_store, utc_day

log = logging.getLogger("gateway")
GUARD_SYNC_SECONDS = 1.0
REBALANCE_TICK_SECONDS = 0.25
APP_VERSIONS_REFRESH_SECONDS = 5.0  # the status page's sampling interval
# Refusals that say nothing about whether the client guessed a token: not counted per IP.
NOT_THE_CLIENTS_FAULT = frozenset({"rate_limited", "too_many_sessions", "legacy_denied"})


class OpenConnection(Protocol):
    """What the gateway needs of an open connection: its live counts, its keepalive, its close."""

    to_upstream: Flow
    to_client: Flow
    client_ip: str
    connection_id: str
    request_id: str

    @property
    def upstream_dropped(self) -> bool: ...

    def keepalive(self, now: float) -> None: ...

    async def close(self, code: int, reason: str, upstream_reason: str = ...) -> None: ...

    def record(self) -> dict[str, Any]: ...

    def placement(self) -> Any: ...


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

        `byte_relay` False makes every session use the frame relay (the tests prove the
        contract on both relays; the benchmark compares them).
        """
        self.clock = clock
        self.wall = wall
        self.metrics = metrics or Metrics()
        self.connections: weakref.WeakSet[OpenConnection] = weakref.WeakSet()
        self.config_path = config_path
        self.draining = False
        self.accepting = True
        self.guard = Guard(config.rollout.guard)
        self._closed_flows = {"client_to_backend": [0, 0], "backend_to_client": [0, 0]}
        self.metrics.add_flow_collector(self._flows)
        self.store = store or open_store(config, wall=wall, on_error=self._store_error, on_availability=self._store_up)
        self.connector = Connector()
        self.byte_relay = byte_relay
        # auth.jwks_url is bound at start (a restart key): one key set for the process's life.
        self.keys = (
            KeySet(
                config.auth.jwks_url,
                config.auth.algorithms,
                refresh_seconds=config.auth.jwks_refresh_seconds,
                on_result=lambda result: self.metrics.jwks_refreshes.labels(result).inc(),
            )
            if config.auth.jwks_url is not None
            else None
        )
        self.pending = 0  # connections from accept until relaying or closed (listener.Request)
        self.upstream_errors: dict[str, dict[str, Any]] = {}  # the last one per backend, for /rollout
        self.replica = uuid.uuid4().hex
        self._guard_seen = 0.0  # wall time of the newest trip this replica knows of
        self._own_trip: dict[str, Any] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._guard_sync: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self.rebalance: Schedule | None = None
        self._rebalance_why = ""
        self._rebalancer: asyncio.Task[None] | None = None
        self._app_versions: dict[str, Any] | None = None  # today's usage by app version, as last read
        self._app_versions_read_at: float | None = None
        self.apply(config)

    # -- config ----------------------------------------------------------------------------

    def apply(self, config: Config) -> None:
        """Serve `config` to new connections; established ones keep the one they started with."""
        self.config = config
        self.verifier = Verifier(config.auth, self.keys)
        self.loaded_at = self.wall()
        self._observe(self.guard.configure(config.rollout.guard))
        self.store.retention_days = config.usage.retention_days
        self.refresh_gauges()

    def reload(self, config: Config) -> None:
        """Apply a reloaded config; keys bound at start-up keep their value and are reported."""
        stuck = restart_required(self.config, config)
        if stuck:
            config = keep_restart_keys(self.config, config)
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
        rollout = self.config.rollout
        return held_back(choose_backend(user_id, rollout), rollout, self.guard.share(), self.guard.blocks_forced())

    def new_backend_outcome(self, failed: bool) -> None:
        self._observe(self.guard.record(failed, self.clock()))

    def _observe(self, transitions: list[Transition], *, share: bool = True) -> None:
        for transition in transitions:
            if transition.state is GuardState.TRIPPED:
                self.metrics.guard_trips.inc()
                log.error("rollback guard " + transition.detail, extra={"guard_state": transition.state.value})
                if share:
                    self._share_trip(transition)
                if self.config.rollout.rebalance.on_guard_trip:
                    self.replan("the new backend is failing")
            else:
                log.warning("rollback guard " + transition.detail, extra={"guard_state": transition.state.value})
        if transitions:
            self._set_gauges()

    # -- rebalancing open sessions ---------------------------------------------------------------

    def replan(self, why: str) -> None:
        """Schedule the close (1012) of every relaying session whose route changed and that is
        not on its new backend already; replaces any schedule in progress."""
        config = self.config.rollout.rebalance
        if not config.enabled:
            self.rebalance = None
            return
        rollout = self.config.rollout
        share, blocks = (self.guard.share(), self.guard.blocks_forced()) if config.on_guard_trip else (1.0, False)
        moves = []
        for conn in self.connections:
            placed = conn.placement()
            if placed is None:
                continue
            target = held_back(choose_backend(placed.user_id, rollout), rollout, share, blocks).backend
            if target != placed.routed and target != placed.backend:
                moves.append(Move(conn, placed.backend, target))
        self.rebalance = plan(config, self.clock(), moves, self.rebalance)
        self._rebalance_why = why
        if moves:
            log.warning(
                "rebalancing open sessions whose route changed",
                extra={"sessions": len(moves), "window_seconds": config.window_seconds, "reason": why},
            )
        if self._rebalancer is None or self._rebalancer.done():
            self._rebalancer = asyncio.create_task(self._rebalance())

    async def _rebalance(self) -> None:
        while self.rebalance is not None and (self.rebalance.slots or self.clock() < self.rebalance.ends_at):
            schedule = self.rebalance
            for move in due(schedule, self.clock(), self._last_frame):
                self.metrics.rebalance_closes.labels(move.source, move.target).inc()
                await move.key.close(
                    closecodes.SERVICE_RESTART,
                    f"rebalancing: {self._rebalance_why}; reconnect to reach the {move.target} backend",
                    "client moved to another backend",
                )
            await asyncio.sleep(REBALANCE_TICK_SECONDS)

    def _last_frame(self, conn: Any) -> float | None:
        placed = conn.placement() if conn in self.connections else None
        return placed.last_frame if placed is not None else None

    def _rebalance_status(self, schedule: Schedule | None) -> dict[str, Any] | None:
        if schedule is None:
            return None
        return {
            "scheduled": schedule.scheduled,
            "closed": schedule.closed,
            "reason": self._rebalance_why,
            "ends_in_seconds": round(max(0.0, schedule.ends_at - self.clock()), 1),
        }

    # -- the guard across replicas -----------------------------------------------------------

    def _share_trip(self, transition: Transition) -> None:
        """Publish a local trip so every replica stops sending users to the new backend."""
        tripped_at = self.wall() - (self.clock() - transition.at)
        self._guard_seen = tripped_at
        self._own_trip = {
            "state": GuardState.TRIPPED.value, "tripped_at": tripped_at, "replica": self.replica, "detail": transition.detail
        }
        self._spawn(self.store.publish_guard(self._own_trip))

    async def sync_guard_once(self) -> None:
        """Share the guard with the other replicas.

        Adopts a newer trip another replica published (the recovery schedule follows its
        trip time), and republishes this replica's own trip while it is in force if the
        store does not hold it (Redis was down when it tripped).
        """
        record = await self.store.read_guard()
        published_at = float(record.get("tripped_at", 0.0)) if record else 0.0
        own = self._own_trip
        if own is not None and self.guard.state is not GuardState.HEALTHY and published_at < own["tripped_at"]:
            await self.store.publish_guard(own)
            return
        if not record or record.get("replica") == self.replica:
            return
        tripped_at = published_at
        if tripped_at <= self._guard_seen or not self.config.rollout.guard.enabled:
            return
        self._guard_seen = tripped_at
        guard = self.config.rollout.guard
        if self.wall() - tripped_at >= guard.cooldown_seconds + len(guard.recovery_steps) * guard.step_seconds:
            return  # that trip's whole schedule is over: nothing to adopt
        at = self.clock() - max(0.0, self.wall() - tripped_at)
        transition = self.guard.trip(at, f"by another replica ({record.get('detail', 'no detail')})")
        self._observe([transition, *self.guard.tick(self.clock())], share=False)

    async def _sync_guard(self) -> None:
        while True:
            await asyncio.sleep(GUARD_SYNC_SECONDS)
            try:
                await self.sync_guard_once()
            except Exception as exc:  # the store answers from memory when Redis is down; be safe anyway
                log.warning("guard sync failed", extra={"error": type(exc).__name__})

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
        return self.config.rollout.new_percent * self.guard.share()

    def refresh_gauges(self) -> None:
        """Before a scrape: gauges that only matter when someone looks."""
        self._observe(self.guard.tick(self.clock()))
        self._set_gauges()
        self.metrics.pending_handshakes.set(self.pending)

    def _set_gauges(self) -> None:
        self.metrics.configured_percent.set(self.config.rollout.new_percent)
        self.metrics.effective_percent.set(self.effective_percent())
        self.metrics.guard_state.set(STATE_VALUES[self.guard.state])
        self.metrics.draining.set(1 if self.draining else 0)

    def rollout_status(self) -> dict[str, Any]:
        self.refresh_gauges()
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
                "since": self._utc(guard.since) if guard.state is not GuardState.HEALTHY else None,
                "step": guard.step + 1 if guard.state is GuardState.RECOVERING else None,
                "share_of_configured": guard.share(),
                "trips": guard.trips,
                "retries_at": self._utc(retry_at) if retry_at is not None else None,
                "retries_in_seconds": round(max(0.0, retry_at - self.clock()), 1) if retry_at is not None else None,
            },
            "config_file": self.config_path,
            "config_loaded_at": _iso(self.loaded_at),
            "active_connections": len(self.connections),
            "draining": self.draining,
            "pending_handshakes": self.pending,
            # asyncio tasks alive: an established session has none, so this stays flat (bench/soak.py).
            "tasks": len(asyncio.all_tasks()),
            "rebalance": self._rebalance_status(self.rebalance),
            "last_upstream_error": {backend: self.upstream_errors.get(backend) for backend in ("old", "new")},
            "app_versions": self._app_versions_today(),
        }

    def _utc(self, at: float) -> str:
        """A time of the monotonic `clock` as the UTC wall time an operator can compare with the log."""
        return _iso(self.wall() - (self.clock() - at))

    def session_placement(self, request_id: str) -> dict[str, Any] | None:
        """Where the open session with this X-Request-ID is, and why (for ``probe --admin``):
        a probe learns the backend that served it without the public port telling apps anything.

        ``why`` is ``fallback`` (the new backend failed, the old one took the session),
        ``forced`` (``rollout.force_new``/``force_old``), ``guard`` (held back by the rollback
        guard) or ``route`` (the user's bucket against the percentage); ``relaying`` is false
        while the upstream is still being opened (the backend may yet change by a fallback).
        """
        conn = next((c for c in list(self.connections) if c.request_id == request_id), None)
        if conn is None:
            return None
        record = conn.record()
        if record["backend"] is None:
            return {"request_id": request_id, "user_id": record["user_id"], "backend": None, "why": None, "relaying": False}
        route = record["route"]
        why = "fallback" if record["fell_back"] else "forced" if route in ("force_new", "force_old") else route
        return {
            "request_id": request_id,
            "user_id": record["user_id"],
            "backend": record["backend"],
            "why": "route" if why == "bucket" else why,
            "relaying": record["ready_s"] is not None,
        }

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

    def upstream_result(self, backend: str, result: str) -> None:
        """How one upstream attempt ended: ok, connect, handshake, rejected (the token) or
        bad_request (the client's request); only the backend's own faults reach the guard."""
        if result != "ok":
            self.metrics.upstream_failures.labels(backend, result).inc()
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
        self.connections.add(conn)

    def auth_failed(self, ip: str, failure: str) -> Coroutine[Any, Any, bool] | None:
        """The count of one refused client against its address (`auth_failures_per_ip_per_minute`),
        for the connection to await before it sends the 1008; None when the failure does not count."""
        limit = self.config.limits.auth_failures_per_ip_per_minute
        if limit is None or failure not in AUTH_REASONS or failure in NOT_THE_CLIENTS_FAULT:
            return None
        return self.store.auth_failed(ip, limit)

    def connection_finished(self, conn: OpenConnection) -> None:
        """Account for a finished connection, then write its log line (so a test or an operator
        that sees the line sees final metrics)."""
        self.connections.discard(conn)
        for direction, flow in (("client_to_backend", conn.to_upstream), ("backend_to_client", conn.to_client)):
            self._closed_flows[direction][0] += flow.frames
            self._closed_flows[direction][1] += flow.bytes
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
        store_work: list[Coroutine[Any, Any, object]] = []
        if failure in AUTH_REASONS:
            self.metrics.auth_failures.labels(failure).inc()
        if user_id is not None and self.config.limits.max_sessions_per_user is not None:
            store_work.append(self.store.release_session(user_id, conn.connection_id))
        if not store_work:
            log.info("connection closed", extra=record)
            return

        async def finish() -> None:
            for work in store_work:
                await work
            log.info("connection closed", extra=record)

        self._spawn(finish())

    # -- connections -------------------------------------------------------------------------

    def _flows(self) -> Iterator[tuple[str, int, int]]:
        for direction, (frames, size) in self._closed_flows.items():
            yield direction, frames, size
        for conn in list(self.connections):
            yield "client_to_backend", conn.to_upstream.frames, conn.to_upstream.bytes
            yield "backend_to_client", conn.to_client.frames, conn.to_client.bytes

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
        self._guard_sync = asyncio.create_task(self._sync_guard())
        self._keepalive = asyncio.create_task(self._keep_alive())

    async def stop(self) -> None:
        for task in (self._guard_sync, self._keepalive, self._rebalancer):
            if task is not None:
                task.cancel()
        if self._background:
            await asyncio.wait(self._background, timeout=self.close_timeout)
        await self.store.close()
        await self.connector.close()
        if self.keys is not None:
            await self.keys.stop()

    async def _keep_alive(self) -> None:
        """Ping quiet legs and drop dead ones: one loop for every connection, no timer per socket."""
        while True:
            interval = self.config.limits.ping_interval_seconds
            await asyncio.sleep(interval / 2 if interval else 5.0)
            now = self.clock()
            for conn in list(self.connections):
                conn.keepalive(now)

    async def close_all(self, code: int, reason: str) -> None:
        await asyncio.gather(*(conn.close(code, reason) for conn in list(self.connections)))

    async def wait_closed(self, timeout: float) -> None:
        """Until every connection has finished, or `timeout` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)

    # -- shutdown ------------------------------------------------------------------------------

    def start_drain(self) -> None:
        self.draining = True
        self.refresh_gauges()
        log.info(
            "draining: readiness is now 503",
            extra={"grace_seconds": self.config.drain.grace_seconds, "window_seconds": self.config.drain.window_seconds},
        )

    async def close_spread(self, window: float) -> None:
        """Close every session with 1012, spread evenly over `window` seconds."""
        self.accepting = False
        pending = list(self.connections)
        log.info("closing sessions", extra={"sessions": len(pending), "window_seconds": window})
        if not pending:
            return
        interval = window / len(pending)
        closing = []
        for index, conn in enumerate(pending):
            if index and interval > 0:
                await asyncio.sleep(interval)
            closing.append(asyncio.create_task(conn.close(closecodes.SERVICE_RESTART, "server restarting")))
        await asyncio.gather(*closing)


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
