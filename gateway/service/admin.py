"""The admin listener: health, readiness, metrics, rollout state and the status page, never
on the public port.

One route table (`admin_app`), two sources of answers: `create_admin_app` serves one gateway
process (`GatewayAnswers`). With ``serve --workers N`` the supervisor serves
`create_supervisor_admin_app` on the configured admin port instead (`WorkersAnswers`), and
reads each worker's own admin app (on a private unix socket) to answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol
from urllib.parse import quote

from aiohttp import web
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from . import status_assets
from ..core.auth import MAX_USER_ID_CHARS
from ..core.routing import Route, choose_backend
from .runtime import Gateway
from .status_page import History, Sample, sample_of, status_json


class Answers(Protocol):
    """What the admin port answers, whoever knows it: one gateway process (`GatewayAnswers`)
    or the supervisor of ``serve --workers N`` asking its workers (`WorkersAnswers`). The
    routes and the checks of what a request gives are `admin_app`'s, once for both."""

    async def healthz(self) -> web.Response: ...

    async def readyz(self) -> web.Response: ...

    async def metrics(self, accept: str) -> web.Response: ...

    async def rollout(self) -> web.Response: ...

    async def route(self, user_id: str) -> web.Response: ...

    async def session(self, request_id: str) -> web.Response: ...

    async def sample(self) -> Sample: ...

    async def status(self, history: History) -> dict[str, Any]: ...


def admin_app(answers: Answers) -> web.Application:
    """The admin routes, answered by `answers`."""

    async def healthz(request: web.Request) -> web.Response:
        return await answers.healthz()

    async def readyz(request: web.Request) -> web.Response:
        return await answers.readyz()

    async def metrics(request: web.Request) -> web.Response:
        """Prometheus text (0.0.4 unless the scraper asks for newer) or OpenMetrics, by Accept."""
        return await answers.metrics(request.headers.get("Accept", ""))

    async def rollout(request: web.Request) -> web.Response:
        return await answers.rollout()

    async def route(request: web.Request) -> web.Response:
        user_id = request.query.get("user", "")
        problem = _user_problem(user_id)
        if problem is not None:
            return web.json_response({"error": problem}, status=400)
        return await answers.route(user_id)

    async def session(request: web.Request) -> web.Response:
        return await answers.session(request.match_info["request_id"])

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/rollout", rollout)
    app.router.add_get("/route", route)
    app.router.add_get("/sessions/{request_id}", session)
    add_status_page(app, answers.sample, answers.status)
    return app


def create_admin_app(gateway: Gateway) -> web.Application:
    return admin_app(GatewayAnswers(gateway))


class GatewayAnswers:
    """The answers of one gateway process."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def healthz(self) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self) -> web.Response:
        gateway = self.gateway
        if gateway.draining:
            return web.json_response({"status": "draining"}, status=503)
        if not gateway.ready:
            return web.json_response({"status": "no signing keys yet (auth.jwks_url)"}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(self, accept: str) -> web.Response:
        self.gateway.refresh_gauges()
        encode, content_type = choose_encoder(accept)
        return web.Response(body=encode(self.gateway.metrics.registry), headers={"Content-Type": content_type})

    async def rollout(self) -> web.Response:
        return web.json_response(self.gateway.rollout_status())

    async def route(self, user_id: str) -> web.Response:
        gateway = self.gateway
        return web.json_response(route_answer(user_id, choose_backend(user_id, gateway.rollout.routing), gateway.route(user_id)))

    async def session(self, request_id: str) -> web.Response:
        placed = self.gateway.session_placement(request_id)
        if placed is None:
            return web.json_response({"error": f"no open session with X-Request-ID {request_id!r} in this process"}, status=404)
        return web.json_response(placed)

    async def sample(self) -> Sample:
        gateway = self.gateway
        gateway.refresh_gauges()
        return sample_of(gateway.metrics.registry.collect(), gateway.wall())

    async def status(self, history: History) -> dict[str, Any]:
        gateway = self.gateway
        rollout = gateway.rollout_status()  # refreshes the gauges the sample reads
        return status_json(history, sample_of(gateway.metrics.registry.collect(), gateway.wall()), rollout)


def _user_problem(user_id: str) -> str | None:
    if not user_id:
        return "give a user id: /route?user=ID"
    if len(user_id) > MAX_USER_ID_CHARS or not user_id.isprintable():
        return f"a user id is at most {MAX_USER_ID_CHARS} printable characters, as in a token"
    return None


def route_answer(user_id: str, configured: Route, now: Route) -> dict[str, Any]:
    """``/route``: `configured` is what ``ws-gateway route`` prints (the config alone, same
    function, same words; with ``rollout.ramp`` on, at the ramp's current step); `now` is
    what a connection made now gets, the rollback guard included, so the page can say when
    the two differ."""
    return {
        "user_id": user_id,
        "backend": configured.backend,
        "why": configured.explain(),
        "line": f"{configured.backend} ({configured.explain()})",
        "now": {"backend": now.backend, "why": now.explain()},
    }


# -- the status page --------------------------------------------------------------------------


def add_status_page(
    app: web.Application,
    sample: Callable[[], Awaitable[Sample]],
    status: Callable[[History], Awaitable[dict[str, Any]]],
) -> None:
    """``/`` (the page), its script and style, and ``/status.json``; and the loop that adds
    a `sample` to the page's `History` every `History.every` seconds while the app runs."""
    history = History()

    async def sampling(app: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                history.add(await sample())
                await asyncio.sleep(history.every)

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def asset(body: str, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(text=body, content_type=content_type, headers=_PAGE_HEADERS)

        return handler

    async def status_handler(request: web.Request) -> web.Response:
        return web.json_response(await status(history), headers={**_PAGE_HEADERS, "Cache-Control": "no-store"})

    app.cleanup_ctx.append(sampling)
    app.router.add_get("/", asset(status_assets.PAGE, "text/html"))
    app.router.add_get("/status.js", asset(status_assets.SCRIPT, "text/javascript"))
    app.router.add_get("/status.css", asset(status_assets.STYLE, "text/css"))
    app.router.add_get("/status.json", status_handler)


_PAGE_HEADERS = {
    "Content-Security-Policy": status_assets.CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


# -- several workers behind one admin port ---------------------------------------------------

# Gauges that describe the config or state every worker shares rather than something each
# worker counts: adding them up would be wrong. The supervisor's /metrics shows the largest
# value across workers (they agree unless a reload or a guard trip is on its way through
# them, and then the largest is the one the slowest worker is about to reach or has just
# left) — except `store_up`, where the smallest says "some worker cannot reach Redis".
def _highest_known(seen: list[float]) -> float:
    """The highest value, NaN (the ramp off) only when every worker says so."""
    return max((value for value in seen if not math.isnan(value)), default=math.nan)


SHARED_GAUGES: dict[str, Callable[[list[float]], float]] = {
    "ws_gateway_rollout_configured_percent": max,
    "ws_gateway_ramp_step_percent": _highest_known,
    "ws_gateway_rollout_effective_percent": max,
    "ws_gateway_guard_state": max,
    "ws_gateway_draining": max,
    "ws_gateway_store_up": min,
}


def merge_metrics(expositions: Iterable[Iterable[Metric]]) -> list[Metric]:
    """Metric families of several workers as the families of one gateway.

    Samples with the same family, sample name and labels are combined: added up (counters,
    histogram buckets, counts and sums, and gauges that count, like open sessions), except
    the `SHARED_GAUGES` (see there) and ``*_created`` timestamps (the earliest). Families
    and samples keep the order in which they first appear.
    """
    kinds: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for families in expositions:
        for family in families:
            if family.name not in kinds:
                kinds[family.name] = family
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                samples.setdefault((sample.name, tuple(sorted(sample.labels.items()))), []).append(sample.value)
    merged = []
    for name, first in kinds.items():
        family = Metric(name, first.documentation, first.type, first.unit)
        shared = SHARED_GAUGES.get(name)
        for (sample_name, labels), seen in values[name].items():
            if sample_name.endswith("_created"):
                value = min(seen)
            elif shared is not None:
                value = shared(seen)
            else:
                value = sum(seen)
            family.add_sample(sample_name, dict(labels), value)
        merged.append(family)
    return merged


class _Families(Collector):
    """Metric families as a prometheus-client collector, for its encoders."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class Workers(Protocol):
    """What the supervisor's admin app needs of the supervisor (gateway.workers.Supervisor)."""

    draining: bool

    def workers_ready(self) -> int: ...

    async def worker_metrics(self) -> list[list[Metric]]: ...

    def own_metrics(self) -> list[Metric]: ...

    async def worker_rollouts(self) -> list[dict[str, Any]]: ...

    async def worker_answers(self, path: str, params: Mapping[str, str] | None = None) -> list[tuple[int, Any]]: ...


def create_supervisor_admin_app(workers: Workers) -> web.Application:
    return admin_app(WorkersAnswers(workers))


class WorkersAnswers:
    """The admin port of ``serve --workers N``: the same routes, answered for all workers.

    * ``/healthz``: 200 while the supervisor is alive.
    * ``/readyz``: 503 while the supervisor drains, or while no worker is listening.
    * ``/metrics``: every worker's metrics added up (`merge_metrics`), plus
      ``ws_gateway_workers`` and ``ws_gateway_worker_restarts_total``.
    * ``/rollout``: the first worker's answer, with ``active_connections`` summed and
      ``draining`` true when the supervisor or any worker drains, ``last_upstream_error``
      the newest of any worker per backend, and ``workers``: every worker's own answer, with
      its ``worker`` number and ``pid``.
    * ``/sessions/ID``: the worker that holds that session answers (the kernel chose which
      one did); 404 when none does.
    * ``/route?user=ID``: the first worker's answer (they run the same config; each has its
      own rollback guard unless they share Redis).
    * ``/`` and ``/status.json``: the status page over the merged metrics and ``/rollout``.
    """

    def __init__(self, workers: Workers) -> None:
        self.workers = workers

    async def healthz(self) -> web.Response:
        return web.json_response({"status": "alive", "workers": self.workers.workers_ready()})

    async def readyz(self) -> web.Response:
        if self.workers.draining:
            return web.json_response({"status": "draining"}, status=503)
        ready = self.workers.workers_ready()
        if not ready:
            return web.json_response({"status": "no worker listening", "workers": 0}, status=503)
        return web.json_response({"status": "ready", "workers": ready})

    async def metrics(self, accept: str) -> web.Response:
        families = merge_metrics(await self.workers.worker_metrics()) + self.workers.own_metrics()
        encode, content_type = choose_encoder(accept)
        return web.Response(body=encode(_Families(families)), headers={"Content-Type": content_type})

    async def _merged_rollout(self) -> dict[str, Any] | None:
        workers = self.workers
        states = await workers.worker_rollouts()
        if not states:
            return None
        first = {key: value for key, value in states[0].items() if key not in ("worker", "pid")}
        first["active_connections"] = sum(state.get("active_connections", 0) for state in states)
        first["draining"] = workers.draining or any(state.get("draining") for state in states)
        first["last_upstream_error"] = _latest_upstream_errors(states)
        first["workers"] = states
        return first

    async def rollout(self) -> web.Response:
        merged = await self._merged_rollout()
        if merged is None:
            return web.json_response({"status": "no worker answered"}, status=503)
        return web.json_response(merged)

    async def route(self, user_id: str) -> web.Response:
        answers = await self.workers.worker_answers("/route", {"user": user_id})
        if not answers:
            return web.json_response({"status": "no worker answered"}, status=503)
        status, body = answers[0]
        return web.json_response(body, status=status)

    async def session(self, request_id: str) -> web.Response:
        for status, body in await self.workers.worker_answers(f"/sessions/{quote(request_id, safe='')}"):
            if status == 200:
                return web.json_response(body)
        return web.json_response({"error": f"no open session with X-Request-ID {request_id!r} in any worker"}, status=404)

    async def sample(self) -> Sample:
        return sample_of(merge_metrics(await self.workers.worker_metrics()), time.time())

    async def status(self, history: History) -> dict[str, Any]:
        rollout_state = await self._merged_rollout() or {"draining": self.workers.draining}
        return status_json(history, await self.sample(), rollout_state, workers=self.workers.workers_ready())


def _latest_upstream_errors(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Per backend, the newest upstream error any worker saw (each worker only knows its own)."""
    latest: dict[str, Any] = {"old": None, "new": None}
    for state in states:
        for backend, error in (state.get("last_upstream_error") or {}).items():
            if error is not None and (latest.get(backend) is None or error["at"] > latest[backend]["at"]):
                latest[backend] = error
    return latest
