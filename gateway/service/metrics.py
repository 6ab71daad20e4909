"""Prometheus metrics, on a registry per gateway so tests and replicas never share one.

Names are a contract with dashboards and `deploy/prometheus-alerts.yaml`; the README
lists them. Labels are closed sets (auth style, backend, reason codes): never a user id,
a token or anything else a client controls.

Frame and byte counts are not incremented per frame: the relay keeps plain integers per
connection and the collector adds them up at scrape time, so the hot path stays free of
metric locks while long sessions still show up live.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from .store.base import OTHER_VERSION, UNKNOWN_VERSION

PREFIX = "ws_gateway"
REPLY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.attempts = Counter(
            f"{PREFIX}_connection_attempts", "Client WebSocket upgrades, by auth style.", ["auth_style"], registry=r
        )
        self.opened = Counter(
            f"{PREFIX}_connections_opened",
            "Sessions that completed the handshake and started relaying.",
            ["auth_style", "backend"],
            registry=r,
        )
        self.active = Gauge(
            f"{PREFIX}_connections_active", "Sessions currently relaying.", ["auth_style", "backend"], registry=r
        )
        self.auth_failures = Counter(
            f"{PREFIX}_auth_failures", "Clients closed with 1008 before any upstream, by reason.", ["reason"], registry=r
        )
        self.upstream_failures = Counter(
            f"{PREFIX}_upstream_failures",
            "Upstream problems: connect, handshake, rejected (backend refused the token), bad_request (backend "
            "refused the client's request: 400, 414, 431), dropped (lost mid-session).",
            ["backend", "reason"],
            registry=r,
        )
        self.fallbacks = Counter(
            f"{PREFIX}_fallbacks", "Sessions moved to the old backend because the new one failed to connect.", registry=r
        )
        self.ready_seconds = Histogram(
            f"{PREFIX}_session_ready_seconds",
            "Time from client upgrade to the session relaying.",
            ["auth_style", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.reply_seconds = Histogram(
            f"{PREFIX}_reply_seconds",
            "From a client data frame that follows a backend frame (or starts the session) to the "
            "backend's next data frame: the chat's time to first reply, per backend.",
            ["backend"],
            buckets=REPLY_BUCKETS,
            registry=r,
        )
        self.upstream_connect_seconds = Histogram(
            f"{PREFIX}_upstream_connect_seconds",
            "Time to open the upstream WebSocket (TCP + upgrade).",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.configured_percent = Gauge(
            f"{PREFIX}_rollout_configured_percent", "rollout.new_percent from the config.", registry=r
        )
        self.effective_percent = Gauge(
            f"{PREFIX}_rollout_effective_percent", "Percentage actually routed new, after the ramp and the guard.", registry=r
        )
        self.jwks_refreshes = Counter(
            f"{PREFIX}_jwks_refreshes", "Fetches of auth.jwks_url, by result (success, failure).", ["result"], registry=r
        )
        self.session_expiries = Counter(
            f"{PREFIX}_session_expiries", "Sessions closed (1008) when their token expired (auth.session_expiry: close).",
            registry=r,
        )
        self.token_refreshes = Counter(
            f"{PREFIX}_token_refreshes",
            "In-band authenticate frames during a session, by result (ok, invalid, other_user).",
            ["result"],
            registry=r,
        )
        self.rebalance_closes = Counter(
            f"{PREFIX}_rebalance_closes",
            "Sessions closed with 1012 to move them to the backend their changed route points to.",
            ["from", "to"],
            registry=r,
        )
        self.reloads = Counter(
            f"{PREFIX}_config_reloads", "Config reload attempts by result.", ["result"], registry=r
        )
        self.guard_state = Gauge(
            f"{PREFIX}_guard_state", "Rollback guard: 0 healthy, 1 recovering, 2 tripped.", registry=r
        )
        self.ramp_step_percent = Gauge(
            f"{PREFIX}_ramp_step_percent",
            "The automatic ramp's current step (rollout.ramp), the percentage routed new before the guard; NaN while the ramp is off.",
            registry=r,
        )
        self.ramp_step_percent.set(math.nan)
        self.guard_trips = Counter(f"{PREFIX}_guard_trips", "Times the rollback guard tripped.", registry=r)
        self.draining = Gauge(f"{PREFIX}_draining", "1 while the gateway drains for shutdown.", registry=r)
        self.pending_handshakes = Gauge(
            f"{PREFIX}_pending_handshakes",
            "Connections accepted but not yet relaying (HTTP request, auth, upstream handshake); "
            "capped by limits.max_pending_handshakes.",
            registry=r,
        )
        self.store_errors = Counter(
            f"{PREFIX}_store_errors", "Failed Redis round trips (answered from memory instead), by operation.",
            ["operation"], registry=r,
        )
        self.store_up = Gauge(f"{PREFIX}_store_up", "1 while Redis answers (always 1 without Redis).", registry=r)
        self.store_up.set(1)
        self.app_version_sessions = Counter(
            f"{PREFIX}_app_version_sessions",
            "Sessions that started relaying, by app version (usage.app_version: at most max_versions "
            "versions, then unknown and other) and auth style.",
            ["app_version", "auth_style"],
            registry=r,
        )
        self._app_versions: set[str] = set()
        # Children looked up once: `labels()` validates and locks on every call, and these
        # are touched several times per session.
        self.reply_by_backend = {backend: self.reply_seconds.labels(backend).observe for backend in ("old", "new")}
        self.attempts_by_style = {style: self.attempts.labels(style) for style in ("legacy", "message")}
        self.session_by_route = {
            (style, backend): SessionMetrics(
                self.opened.labels(style, backend),
                self.active.labels(style, backend),
                self.ready_seconds.labels(style, backend),
            )
            for style in ("legacy", "message")
            for backend in ("old", "new")
        }
        for result in ("success", "invalid", "restart_required"):
            self.reloads.labels(result)

    def count_app_version(self, version: str, auth_style: str, max_versions: int) -> None:
        """Count a session under its app version. The first `max_versions` versions this
        process sees keep their own label and later ones count as ``other`` (the store's cap
        is per day, a process lives longer), so the label never takes more than
        ``max_versions + 2`` values."""
        if version not in (UNKNOWN_VERSION, OTHER_VERSION) and version not in self._app_versions:
            if len(self._app_versions) < max_versions:
                self._app_versions.add(version)
            else:
                version = OTHER_VERSION
        self.app_version_sessions.labels(version, auth_style).inc()

    def reply_totals(self) -> dict[str, tuple[float, int]]:
        """Per backend, the reply-time histogram's (sum of seconds, count) so far: what the ramp's
        reply gates read, at no cost to the relay."""
        totals = {backend: [0.0, 0] for backend in ("old", "new")}
        for family in self.reply_seconds.collect():
            for sample in family.samples:
                backend = sample.labels.get("backend", "")
                if backend in totals and sample.name.endswith("_sum"):
                    totals[backend][0] = sample.value
                elif backend in totals and sample.name.endswith("_count"):
                    totals[backend][1] = int(sample.value)
        return {backend: (float(total), int(count)) for backend, (total, count) in totals.items()}

    def add_flow_collector(self, flows: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        """Expose messages/bytes totals; `flows` yields (direction, frames, bytes) at scrape time."""
        self.registry.register(_FlowCollector(flows))


class SessionMetrics(NamedTuple):
    """The children of one (auth style, backend) pair."""

    opened: Counter
    active: Gauge
    ready_seconds: Histogram


class _FlowCollector(Collector):
    def __init__(self, flows: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        self._flows = flows

    def collect(self) -> Iterator[Metric]:
        messages = CounterMetricFamily(f"{PREFIX}_messages", "Data frames relayed, by direction.", labels=["direction"])
        sizes = CounterMetricFamily(
            f"{PREFIX}_bytes", "Payload bytes relayed (UTF-8 for text; compressed size when passed through compressed), by direction.", labels=["direction"]
        )
        totals: dict[str, list[int]] = {"client_to_backend": [0, 0], "backend_to_client": [0, 0]}
        for direction, frames, size in self._flows():
            totals[direction][0] += frames
            totals[direction][1] += size
        for direction, (frames, size) in totals.items():
            messages.add_metric([direction], frames)
            sizes.add_metric([direction], size)
        yield messages
        yield sizes

    def describe(self) -> Iterator[Any]:
        return iter(())
