"""The aiohttp application: the chat route in front of a shared `Gateway`."""

from __future__ import annotations

import logging
from email.utils import formatdate

from aiohttp import web

from . import closecodes
from .clientip import client_ip
from .config import Config
from .logs import install_redaction
from .protocol import Session
from .pump import Flow, wire_limit
from .relay import Connection, request_id
from .runtime import Gateway

log = logging.getLogger("gateway")
GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")


async def chat(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    config = gateway.config
    if not gateway.accepting:
        return web.Response(status=503, text="gateway restarting, retry shortly\n", headers={"Retry-After": "5"})
    ws = web.WebSocketResponse(
        autoclose=False,
        autoping=True,
        heartbeat=config.limits.ping_interval_seconds or None,
        max_msg_size=wire_limit(config.limits.max_message_bytes),
        compress=True,
    )
    if not ws.can_prepare(request).ok:
        return web.Response(status=426, text="WebSocket upgrade required\n", headers={"Upgrade": "websocket"})
    rid = request_id(request)
    ws.headers["X-Request-ID"] = rid
    raw_query = request.raw_path.partition("?")[2]
    session = Session(config, gateway.verifier, raw_query)
    if session.auth_style == "legacy" and config.auth.legacy == "deprecate":
        ws.headers.update(deprecation_headers(config))
    gateway.metrics.attempts.labels(session.auth_style).inc()
    await ws.prepare(request)

    forwarded = ", ".join(request.headers.getall("X-Forwarded-For", []))
    ip = client_ip(request.remote, forwarded, config.trusted_proxies)
    conn = Connection(gateway=gateway, request=request, ws=ws, session=session, request_id=rid, client_ip=ip, clock=gateway.clock)
    gateway.connections.add(conn)
    try:
        await conn.run()
    except Exception as exc:
        log.error("connection failed", extra={"request_id": rid, "error": type(exc).__name__})
    finally:
        await conn.finish()
        await gateway.session_ended(
            conn,
            connection_id=conn.connection_id,
            client_ip=ip,
            user_id=session.identity.user_id if session.identity else None,
            failure=session.failure,
            relayed=(session.auth_style, session.backend) if conn.ready_at is not None and session.backend else None,
            dropped=conn.upstream_dropped,
        )
        log_connection(conn)
    return ws


def deprecation_headers(config: Config) -> dict[str, str]:
    """RFC 9745 Deprecation and RFC 8594 Sunset for URL-token clients: seen by monitoring, not by apps."""
    headers = {}
    if config.auth.legacy_deprecated_at is not None:
        headers["Deprecation"] = f"@{config.auth.legacy_deprecated_at}"
    if config.auth.legacy_sunset is not None:
        headers["Sunset"] = formatdate(config.auth.legacy_sunset, usegmt=True)
    return headers


def log_connection(conn: Connection) -> None:
    """One line per finished connection: who, which path, how it ended. Never the token."""
    session = conn.session
    log.info(
        "connection closed",
        extra={
            "request_id": conn.request_id,
            "user_id": session.identity.user_id if session.identity else None,
            "auth_style": session.auth_style,
            "backend": session.backend,
            "route": session.route.reason if session.route else None,
            "fell_back": session.fell_back,
            "failure": session.failure,
            "ready_s": round(conn.ready_at - conn.started, 4) if conn.ready_at else None,
            "duration_s": round(conn.clock() - conn.started, 3),
            "client_frames": conn.to_upstream.frames,
            "client_bytes": conn.to_upstream.bytes,
            "backend_frames": conn.to_client.frames,
            "backend_bytes": conn.to_client.bytes,
            # what each peer sent (null: it did not close first) ...
            "client_close_code": conn.to_upstream.close_code,
            "client_close_reason": conn.to_upstream.close_reason,
            "backend_close_code": conn.to_client.close_code,
            "backend_close_reason": conn.to_client.close_reason,
            # ... and what the gateway sent each peer (an echo when that peer closed first)
            "client_got": _got(conn.to_client.delivered, conn.to_upstream),
            "backend_got": _got(conn.to_upstream.delivered, conn.to_client),
        },
    )


def _got(delivered: tuple[int, str] | None, own: Flow) -> list[object] | None:
    if delivered is not None:
        return list(delivered)
    return [own.close_code, ""] if own.close_code is not None else None


def create_app(config: Config, *, gateway: Gateway | None = None) -> web.Application:
    gateway = gateway or Gateway(config)
    install_redaction(config.auth.query_param)
    app = web.Application()
    app[GATEWAY] = gateway
    app.router.add_get(config.path, chat)

    async def on_startup(app: web.Application) -> None:
        await gateway.start()

    async def on_shutdown(app: web.Application) -> None:
        await gateway.close_all(closecodes.SERVICE_RESTART, "server restarting")

    async def on_cleanup(app: web.Application) -> None:
        await gateway.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
