"""The aiohttp application: one route, one `Gateway` holding what connections share."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref

import aiohttp
from aiohttp import web

from . import closecodes
from .auth import Verifier
from .config import Config
from .protocol import Session
from .pump import close_leg
from .relay import Connection, request_id
from .routing import Route, choose_backend

log = logging.getLogger("gateway")
GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")


class Gateway:
    """The live config and the resources every connection shares."""

    close_timeout = 5.0

    def __init__(self, config: Config, client: aiohttp.ClientSession | None = None) -> None:
        self._client = client
        self.connections: weakref.WeakSet[Connection] = weakref.WeakSet()
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Serve `config` to new connections; established ones keep the one they started with."""
        self.config = config
        self.verifier = Verifier(config.auth)

    def route(self, user_id: str) -> Route:
        return choose_backend(user_id, self.config.rollout)

    @property
    def client(self) -> aiohttp.ClientSession:
        assert self._client is not None, "the app has not started"
        return self._client

    async def start(self) -> None:
        if self._client is None:
            connector = aiohttp.TCPConnector(limit=self.config.limits.max_upstream_connections, limit_per_host=0)
            self._client = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),
                skip_auto_headers=("User-Agent",),
            )

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def close_all(self, code: int, reason: str) -> None:
        """Close every open connection on both legs (shutdown)."""
        closing = []
        for conn in list(self.connections):
            closing.append(close_leg(conn.ws, code, reason))
            if conn.upstream is not None:
                closing.append(close_leg(conn.upstream, closecodes.GOING_AWAY, "gateway shutting down"))
        await asyncio.gather(*closing)


async def chat(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    config = gateway.config
    ws = web.WebSocketResponse(
        autoclose=False,
        autoping=True,
        heartbeat=config.limits.ping_interval_seconds or None,
        max_msg_size=config.limits.max_message_bytes + 1,
        compress=True,
    )
    if not ws.can_prepare(request).ok:
        return web.Response(status=426, text="WebSocket upgrade required\n", headers={"Upgrade": "websocket"})
    rid = request_id(request)
    ws.headers["X-Request-ID"] = rid
    await ws.prepare(request)

    raw_query = request.raw_path.partition("?")[2]
    session = Session(config, gateway.verifier, gateway.route, raw_query)
    conn = Connection(gateway=gateway, request=request, ws=ws, session=session, request_id=rid)
    gateway.connections.add(conn)
    try:
        await conn.run()
    except Exception as exc:
        log.error("connection failed", extra={"request_id": rid, "error": type(exc).__name__})
    finally:
        await conn.finish()
        gateway.connections.discard(conn)
        log_connection(conn)
    return ws


def log_connection(conn: Connection) -> None:
    """One line per finished connection: who, which path, how it ended. Never the token."""
    session = conn.session
    now = time.monotonic()
    log.info(
        "connection closed",
        extra={
            "request_id": conn.request_id,
            "user_id": session.identity.user_id if session.identity else None,
            "auth_style": session.auth_style,
            "backend": session.backend,
            "failure": session.failure,
            "ready_s": round(conn.ready_at - conn.started, 4) if conn.ready_at else None,
            "duration_s": round(now - conn.started, 3),
            "client_frames": conn.to_upstream.frames,
            "client_bytes": conn.to_upstream.bytes,
            "backend_frames": conn.to_client.frames,
            "backend_bytes": conn.to_client.bytes,
            "client_close": conn.to_upstream.close_code,
            "backend_close": conn.to_client.close_code,
        },
    )


def create_app(config: Config, *, gateway: Gateway | None = None) -> web.Application:
    gateway = gateway or Gateway(config)
    app = web.Application()
    app[GATEWAY] = gateway
    app.router.add_get(config.path, chat)

    async def on_startup(app: web.Application) -> None:
        await gateway.start()

    async def on_shutdown(app: web.Application) -> None:
        await gateway.close_all(closecodes.GOING_AWAY, "server shutting down")

    async def on_cleanup(app: web.Application) -> None:
        await gateway.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
