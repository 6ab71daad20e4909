"""The admin listener: health, readiness, metrics and rollout state, never on the public port."""

from __future__ import annotations

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from .runtime import Gateway


def create_admin_app(gateway: Gateway) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        if gateway.draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(request: web.Request) -> web.Response:
        """Prometheus text (0.0.4 unless the scraper asks for newer) or OpenMetrics, by Accept."""
        gateway.refresh_gauges()
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(gateway.metrics.registry), headers={"Content-Type": content_type})

    async def rollout(request: web.Request) -> web.Response:
        return web.json_response(gateway.rollout_status())

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/rollout", rollout)
    return app
