"""The status page's data: the last hour of the gateway, sampled in-process, for on-call.

Prometheus and Grafana keep the long view, but during an incident (or on a machine where
nobody scrapes) on-call needs the few numbers that decide what to do, in a browser, with
nothing else running. The admin app takes a `Sample` every `SAMPLE_SECONDS` from the
same metric families ``/metrics`` serves (so a supervisor's merged families work as well
as one process's registry) into a `History` of the last `WINDOW_SECONDS`; ``/status.json``
is `status_json` over it, and the page (`gateway.status_assets`) draws that.

Everything here is pure: samples in, numbers out. Rates and percentiles come from the
difference between two samples, as Prometheus's ``rate`` and ``histogram_quantile`` do, so
the page and the alerts in ``deploy/prometheus-alerts.yaml`` agree (the reply-time alert is
on the average: ``_sum`` over ``_count``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import Metric

SAMPLE_SECONDS = 5.0
WINDOW_SECONDS = 3600.0
RECENT_SECONDS = 300.0  # the "last 5 minutes" of the tiles, the alerts' rate window
BACKENDS = ("old", "new")
STYLES = ("legacy", "message")
QUANTILE = 0.95

Buckets = tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending, +Inf last


@dataclass(frozen=True)
class Sample:
    """The gateway's counters and gauges at one moment (unix time `at`)."""

    at: float
    attempts: float = 0.0
    auth_failures: float = 0.0
    fallbacks: float = 0.0
    opened: Mapping[str, float] = field(default_factory=dict)  # by backend
    active: Mapping[str, float] = field(default_factory=dict)  # by backend
    active_by_style: Mapping[str, float] = field(default_factory=dict)  # by auth style
    upstream_failures: Mapping[str, float] = field(default_factory=dict)  # by backend, every reason
    reply: Mapping[str, Buckets] = field(default_factory=dict)  # ws_gateway_reply_seconds by backend
    reply_sum: Mapping[str, float] = field(default_factory=dict)  # its _sum and _count, for the average
    reply_count: Mapping[str, float] = field(default_factory=dict)
    ready: Mapping[str, Buckets] = field(default_factory=dict)  # ws_gateway_session_ready_seconds by backend
    configured_percent: float = 0.0
    effective_percent: float = 0.0
    guard_state: float = 0.0  # 0 healthy, 1 recovering, 2 tripped
    ramp_step_percent: float | None = None  # None while rollout.ramp is off (the gauge is NaN)


def sample_of(families: Iterable[Metric], at: float) -> Sample:
    """A `Sample` from metric families (a registry's ``collect()``, or parsed/merged ones)."""
    totals: dict[str, float] = {}
    by: dict[tuple[str, str], float] = {}
    buckets: dict[tuple[str, str], dict[float, float]] = {}
    for family in families:
        for s in family.samples:
            name, labels = s.name, s.labels
            totals[name] = totals.get(name, 0.0) + s.value
            for label in ("backend", "auth_style"):
                if label in labels and not name.endswith("_bucket"):
                    key = (name, labels[label])
                    by[key] = by.get(key, 0.0) + s.value
            if name.endswith("_bucket") and "backend" in labels:
                counts = buckets.setdefault((name, labels["backend"]), {})
                bound = float(labels["le"])
                counts[bound] = counts.get(bound, 0.0) + s.value

    def per_backend(name: str) -> dict[str, float]:
        return {backend: by.get((name, backend), 0.0) for backend in BACKENDS}

    def histogram(name: str) -> dict[str, Buckets]:
        return {backend: tuple(sorted(buckets.get((name, backend), {}).items())) for backend in BACKENDS}

    return Sample(
        at=at,
        attempts=totals.get("ws_gateway_connection_attempts_total", 0.0),
        auth_failures=totals.get("ws_gateway_auth_failures_total", 0.0),
        fallbacks=totals.get("ws_gateway_fallbacks_total", 0.0),
        opened=per_backend("ws_gateway_connections_opened_total"),
        active=per_backend("ws_gateway_connections_active"),
        active_by_style={style: by.get(("ws_gateway_connections_active", style), 0.0) for style in STYLES},
        upstream_failures=per_backend("ws_gateway_upstream_failures_total"),
        reply=histogram("ws_gateway_reply_seconds_bucket"),
        reply_sum=per_backend("ws_gateway_reply_seconds_sum"),
        reply_count=per_backend("ws_gateway_reply_seconds_count"),
        ready=histogram("ws_gateway_session_ready_seconds_bucket"),
        configured_percent=totals.get("ws_gateway_rollout_configured_percent", 0.0),
        effective_percent=totals.get("ws_gateway_rollout_effective_percent", 0.0),
        guard_state=totals.get("ws_gateway_guard_state", 0.0),
        ramp_step_percent=_number(totals.get("ws_gateway_ramp_step_percent")),
    )


def _number(value: float | None) -> float | None:
    """A gauge's value for JSON, where NaN (a gauge saying "off") cannot go."""
    return None if value is None or math.isnan(value) else value


def quantile(q: float, before: Buckets, after: Buckets) -> float | None:
    """The q-quantile of what a histogram observed between two samples, or None if nothing.

    Prometheus's ``histogram_quantile``: linear within the bucket holding the rank, the
    largest finite bound when the rank falls in +Inf. Buckets missing from `before` count
    as 0 (a backend's first observation), and a counter that went down counts from 0.
    """
    earlier = {} if count_reset(before, after) else dict(before)
    counts = [(bound, max(0.0, count - earlier.get(bound, 0.0))) for bound, count in after]
    if not counts or counts[-1][1] <= 0:
        return None
    rank = q * counts[-1][1]
    lower, below = 0.0, 0.0
    for bound, cumulative in counts:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            if cumulative == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (cumulative - below)
        lower, below = bound, cumulative
    return lower


def count_reset(before: Buckets, after: Buckets) -> bool:
    """Whether a histogram's total went down between two samples (a process restarted)."""
    return bool(before) and bool(after) and after[-1][1] < before[-1][1]


def _delta(before: float, after: float) -> float:
    return after - before if after >= before else after  # a counter reset counts from 0


def _rate(before: float, after: float, seconds: float) -> float:
    return _delta(before, after) / seconds if seconds > 0 else 0.0


def interval(a: Sample, b: Sample) -> dict[str, Any]:
    """What happened between two samples: rates per second, ratios, p95s, and b's gauges."""
    seconds = b.at - a.at
    attempts = _delta(a.attempts, b.attempts)
    opened = sum(_delta(a.opened.get(k, 0.0), b.opened.get(k, 0.0)) for k in BACKENDS)
    point: dict[str, Any] = {
        "t": b.at,
        "attempts_per_s": _rate(a.attempts, b.attempts, seconds),
        "success_percent": min(100.0, 100.0 * opened / attempts) if attempts > 0 else None,
        "auth_failures_per_s": _rate(a.auth_failures, b.auth_failures, seconds),
        "auth_failure_percent": min(100.0, 100.0 * _delta(a.auth_failures, b.auth_failures) / attempts) if attempts > 0 else None,
        "fallbacks": _delta(a.fallbacks, b.fallbacks),
        "configured_percent": b.configured_percent,
        "effective_percent": b.effective_percent,
        "guard_state": b.guard_state,
        "ramp_step_percent": b.ramp_step_percent,
    }
    for backend in BACKENDS:
        point[f"sessions_per_s_{backend}"] = _rate(a.opened.get(backend, 0.0), b.opened.get(backend, 0.0), seconds)
        point[f"active_{backend}"] = b.active.get(backend, 0.0)
        point[f"upstream_failures_per_s_{backend}"] = _rate(
            a.upstream_failures.get(backend, 0.0), b.upstream_failures.get(backend, 0.0), seconds
        )
        point[f"upstream_failures_{backend}"] = _delta(a.upstream_failures.get(backend, 0.0), b.upstream_failures.get(backend, 0.0))
        replies = _delta(a.reply_count.get(backend, 0.0), b.reply_count.get(backend, 0.0))
        waited = _delta(a.reply_sum.get(backend, 0.0), b.reply_sum.get(backend, 0.0))
        point[f"reply_avg_{backend}"] = waited / replies if replies > 0 else None
        point[f"reply_p95_{backend}"] = quantile(QUANTILE, a.reply.get(backend, ()), b.reply.get(backend, ()))
        point[f"ready_p95_{backend}"] = quantile(QUANTILE, a.ready.get(backend, ()), b.ready.get(backend, ()))
    for style in STYLES:
        point[f"active_{style}"] = b.active_by_style.get(style, 0.0)
    return point


class History:
    """The last `window` seconds of samples, one every `every` seconds: a bounded ring buffer."""

    def __init__(self, every: float = SAMPLE_SECONDS, window: float = WINDOW_SECONDS) -> None:
        self.every = every
        self.window = window
        self.samples: deque[Sample] = deque(maxlen=int(window // every) + 1)

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def series(self) -> dict[str, list[Any]]:
        """One column per measure, one row per interval between consecutive samples."""
        points = [interval(a, b) for a, b in zip(self.samples, list(self.samples)[1:])]
        keys = points[0].keys() if points else interval(Sample(0.0), Sample(0.0)).keys()
        return {key: [point[key] for point in points] for key in keys}

    def recent(self, now: Sample, seconds: float = RECENT_SECONDS) -> dict[str, Any]:
        """The tiles: from the oldest sample within `seconds` of `now` (a fresh one) to `now`."""
        start = next((s for s in self.samples if now.at - s.at <= seconds and s.at < now.at), None)
        summary = interval(start or now, now)
        summary["seconds"] = now.at - start.at if start is not None else 0.0
        return summary


def status_json(history: History, now: Sample, rollout: Mapping[str, Any], workers: int | None = None) -> dict[str, Any]:
    """The body of ``/status.json``: the tiles, the charts' columns, and the rollout state."""
    return {
        "sampled_every_seconds": history.every,
        "window_seconds": history.window,
        "workers": workers,
        "now": now.at,
        "recent": history.recent(now),
        "series": history.series(),
        "rollout": dict(rollout),
    }
