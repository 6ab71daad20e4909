"""Reference chat backends, one per auth style, for the demo, staging and the tests.

``old`` reads the JWT from ``?token=``; ``new`` expects ``{"type":"authenticate","token":…}``
as the first frame and answers ``{"type":"connected",…}``. Both verify the token with the
gateway's own rules, close 1008 on a bad one, and then echo every frame unchanged (text
as text, binary as binary). A few text commands let tests and QA drive the edges:

* ``{"type":"stub.info"}`` answers with what the backend saw at the upgrade: style, user,
  query parameter names, and the forwarding headers (never the token).
* ``{"type":"stub.burst","count":N,"close":CODE,"reason":R}`` sends N numbered frames,
  then closes with CODE (omit ``close`` to stay open).
* ``{"type":"stub.close","code":CODE,"reason":R}`` closes with that code.
* ``{"type":"stub.drop"}`` drops the TCP connection without a close frame.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import WSMsgType, web

from .auth import AuthError, Identity, Verifier, parse_authenticate_frame
from .config import AuthConfig

log = logging.getLogger("gateway.stub")
STYLES = ("old", "new")
FORWARDED_HEADERS = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Request-ID", "User-Agent", "Origin")


def create_stub_app(
    style: str, auth: AuthConfig, *, path: str = "/ws/chat", greeting: str | None = None, max_message_bytes: int = 1024 * 1024
) -> web.Application:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}")
    verifier = Verifier(auth)

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=max_message_bytes + 1, heartbeat=20)
        await ws.prepare(request)
        identity = await (_query_auth(ws, request, verifier, auth) if style == "old" else _message_auth(ws, verifier, greeting))
        if identity is None:
            return ws
        info = {
            "type": "stub.info",
            "style": style,
            "user_id": identity.user_id,
            "path": request.path,
            "query": {k: v for k, v in request.query.items() if k != auth.query_param},
            "query_names": list(request.query.keys()),
            "headers": {h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers},
        }
        await _echo(ws, request, info)
        return ws

    app = web.Application()
    app.router.add_get(path, handler)
    return app


async def _query_auth(ws: web.WebSocketResponse, request: web.Request, verifier: Verifier, auth: AuthConfig) -> Identity | None:
    try:
        return verifier.verify(request.query.get(auth.query_param))
    except AuthError as exc:
        await ws.close(code=1008, message=exc.close_reason.encode())
        return None


async def _message_auth(ws: web.WebSocketResponse, verifier: Verifier, greeting: str | None) -> Identity | None:
    try:
        msg = await ws.receive(timeout=10)
    except asyncio.TimeoutError:
        await ws.close(code=1008, message=b"authentication timed out")
        return None
    if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
        return None
    try:
        token, _ = parse_authenticate_frame(msg.data)
        identity = verifier.verify(token)
    except AuthError as exc:
        await ws.close(code=1008, message=exc.close_reason.encode())
        return None
    connected: dict[str, Any] = {"type": "connected", "message": "Connected to Wealth Coach AI", "user_id": identity.user_id}
    await ws.send_str(greeting or json.dumps(connected))
    return identity


async def _echo(ws: web.WebSocketResponse, request: web.Request, info: dict[str, Any]) -> None:
    async for msg in ws:
        if msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
            continue
        if msg.type is not WSMsgType.TEXT:
            continue
        command = _command(msg.data) or {}
        kind = command.get("type")
        if kind == "stub.info":
            await ws.send_str(json.dumps(info))
        elif kind == "stub.burst":
            for n in range(int(command.get("count", 0))):
                await ws.send_str(json.dumps({"type": "stub.burst", "n": n}))
            if "close" in command:
                await ws.close(code=int(command["close"]), message=str(command.get("reason", "")).encode())
                return
        elif kind == "stub.close":
            await ws.close(code=int(command.get("code", 1000)), message=str(command.get("reason", "")).encode())
            return
        elif kind == "stub.drop":
            assert request.transport is not None
            request.transport.abort()
            return
        else:
            await ws.send_str(msg.data)


def _command(text: str) -> dict[str, Any] | None:
    if not text.startswith('{"type":"stub.') and not text.startswith('{"type": "stub.'):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
