"""The aiohttp shell around `protocol.Session`: upgrade, handshake, relay, one teardown.

Two tasks per connection, because aiohttp allows only one reader per socket: the
request handler reads the client; a child task opens the upstream and reads it. Until
the relay starts, both feed the session under one lock and perform its actions in
order, so held frames always reach the backend before later ones. After that each task
runs `pump.pump` in its direction with no lock and no per-frame work.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import WSMsgType, web
from yarl import URL

from . import closecodes
from .closecodes import Leg
from .protocol import (
    Action,
    CloseClient,
    CloseUpstream,
    OpenUpstream,
    Phase,
    RouteUser,
    SendClient,
    SendUpstream,
    Session,
    StartRelay,
    UpstreamResult,
)
from .pump import Flow, WebSocket, close_leg, pump, too_big, wire_limit
from .routing import Route

log = logging.getLogger("gateway.relay")


class GatewayServices(Protocol):
    """What a connection needs from the gateway it belongs to (`runtime.Gateway` in production).

    Calls take and return plain values: the gateway never reads or writes a connection's
    fields, so a connection can be driven against a small fake.
    """

    close_timeout: float

    @property
    def client(self) -> aiohttp.ClientSession: ...

    async def ip_blocked(self, ip: str) -> bool: ...

    async def acquire_slot(self, user_id: str, connection_id: str) -> bool: ...

    def route(self, user_id: str) -> Route: ...

    def upstream_connected(self, backend: str, seconds: float) -> None: ...

    def upstream_result(self, backend: str, result: str) -> None: ...

    def fell_back(self) -> None: ...

    def session_ready(self, auth_style: str, backend: str, user_id: str, seconds: float) -> None: ...

_DATA = (WSMsgType.TEXT, WSMsgType.BINARY)
_REQUEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def request_id(request: web.Request) -> str:
    """The caller's X-Request-ID when it is a sane token, else a fresh one."""
    given = request.headers.get("X-Request-ID", "")
    if 0 < len(given) <= 128 and set(given) <= _REQUEST_ID_CHARS:
        return given
    return uuid.uuid4().hex


def upstream_headers(request: web.Request, rid: str) -> dict[str, str]:
    """Headers that tell the backend who the client is, as a reverse proxy would."""
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For")
    headers = {
        "X-Forwarded-For": f"{prior}, {peer}" if prior else peer,
        "X-Forwarded-Proto": "https" if request.secure else "http",
        "X-Request-ID": rid,
    }
    for name in ("User-Agent", "Origin", "Accept-Language"):
        value = request.headers.get(name)
        if value is not None:
            headers[name] = value
    return headers


@dataclass(eq=False)
class Connection:
    """Everything one client connection owns; `app.chat` creates it, `run` drives it."""

    gateway: GatewayServices
    request: web.Request
    ws: web.WebSocketResponse
    session: Session
    request_id: str
    client_ip: str
    clock: Callable[[], float] = time.monotonic
    connection_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = 0.0
    ready_at: float | None = None
    upstream: aiohttp.ClientWebSocketResponse | None = None
    upstream_task: asyncio.Task[None] | None = None
    relaying: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    to_upstream: Flow = field(default_factory=Flow)
    to_client: Flow = field(default_factory=Flow)

    def __post_init__(self) -> None:
        self.started = self.clock()

    @property
    def upstream_dropped(self) -> bool:
        """The backend vanished (or broke the protocol) mid-session rather than closing."""
        return self.to_client.lost

    # -- actions -----------------------------------------------------------------------

    async def perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendUpstream):
                assert self.upstream is not None
                await _send(self.upstream, action.data)
                if self.session.phase is not Phase.UPSTREAM_HANDSHAKE:  # not the authenticate frame
                    self.to_upstream.frames += 1
                    self.to_upstream.bytes += len(action.data)
            elif isinstance(action, SendClient):
                await _send(self.ws, action.data)
            elif isinstance(action, UpstreamResult):
                self.gateway.upstream_result(action.backend, action.result)
            elif isinstance(action, RouteUser):
                if await self.gateway.acquire_slot(action.user_id, self.connection_id):
                    await self.perform(self.session.routed(self.gateway.route(action.user_id)))
                else:
                    await self.perform(self.session.refuse("too_many_sessions"))
            elif isinstance(action, OpenUpstream):
                if action.fallback:
                    self.gateway.fell_back()
                    log.warning(
                        "new backend failed; falling back to the old one",
                        extra={"request_id": self.request_id, "reason": self.session.fallback_reason},
                    )
                self.upstream_task = asyncio.create_task(self.run_upstream(action))
            elif isinstance(action, CloseClient):
                await self.close_client(action.code, action.reason)
            elif isinstance(action, CloseUpstream):
                await self.close_upstream(action.code, action.reason)
            elif isinstance(action, StartRelay):
                self.ready_at = self.clock()
                self.relaying = True
                session = self.session
                assert session.backend is not None and session.identity is not None
                self.gateway.session_ready(session.auth_style, session.backend, session.identity.user_id, self.ready_at - self.started)

    async def close_client(self, code: int, reason: str) -> None:
        if self.to_client.delivered is None and not self.ws.closed:
            self.to_client.delivered = (code, reason)
        await close_leg(self.ws, code, reason)

    async def close_upstream(self, code: int, reason: str) -> None:
        if self.upstream is None:
            return
        if self.to_upstream.delivered is None and not self.upstream.closed:
            self.to_upstream.delivered = (code, reason)
        await close_leg(self.upstream, code, reason)

    async def feed(self, event: Callable[..., list[Action]], *args: Any) -> None:
        """Feed one event to the session and perform its actions, atomically w.r.t. the other task."""
        async with self.lock:
            await self.perform(event(*args))

    # -- the client side (request handler task) ------------------------------------------

    async def run(self) -> None:
        session = self.session
        if await self.gateway.ip_blocked(self.client_ip):
            await self.perform(session.refuse("rate_limited"))
            return
        await self.perform(session.start())
        if session.phase is Phase.AUTHENTICATING:
            await self.authenticate()
        limit = session.config.limits.max_message_bytes
        while session.phase in (Phase.CONNECTING, Phase.UPSTREAM_HANDSHAKE) and not self.relaying:
            msg = await self.ws.receive()
            if msg.type in _DATA:
                if too_big(msg.data, limit):
                    await self.client_oversize()
                    return
                await self.feed(session.client_frame, msg.data)
            elif msg.type is WSMsgType.CLOSING:
                return  # the upstream task closed the client
            elif self.ws.close_code == closecodes.MESSAGE_TOO_BIG:
                await self.client_oversize()
                return
            else:
                await self.client_left(*_close_of(msg), echo=msg.type is WSMsgType.CLOSE)
                return
        if self.relaying:
            async with self.lock:  # wait until the held frames are flushed
                pass
            assert self.upstream is not None
            await pump(self.ws, self.upstream, Leg.UPSTREAM, self.to_upstream, self.session.config.limits.max_message_bytes)

    async def authenticate(self) -> None:
        session = self.session
        deadline = asyncio.get_running_loop().time() + session.auth_timeout
        while session.phase is Phase.AUTHENTICATING:
            try:
                msg = await _receive_before(self.ws, deadline)
            except TimeoutError:
                await self.perform(session.auth_timed_out())
                return
            if msg.type in _DATA:
                await self.perform(session.client_frame(msg.data))
            else:
                await self.client_left(*_close_of(msg), echo=msg.type is WSMsgType.CLOSE)
                return

    async def client_oversize(self) -> None:
        """A frame over the limit before the relay started: 1009 to the client; the backend
        still gets what was held before it, then a clean close."""
        self.to_upstream.lost = True
        await self.close_client(closecodes.MESSAGE_TOO_BIG, "message too big")
        await self.client_left(*closecodes.oversize(Leg.UPSTREAM), echo=False)

    async def client_left(self, code: int | None, reason: str, *, echo: bool) -> None:
        """The client closed or vanished while this task was not yet pumping: tell the session,
        pass the close on if the relay has started meanwhile (as the pump would), echo a close."""
        self.to_upstream.close_code, self.to_upstream.close_reason = code, reason
        async with self.lock:  # `relaying` only changes under the lock
            relaying = self.relaying
            await self.perform(self.session.client_closed(code, reason))
        closing = []
        if relaying:
            closing.append(self.close_upstream(*closecodes.forward(code, reason, Leg.UPSTREAM)))
        if echo:
            closing.append(close_leg(self.ws, closecodes.echo(code), ""))
        await asyncio.gather(*closing)

    # -- the upstream side (child task) ----------------------------------------------------

    async def run_upstream(self, action: OpenUpstream) -> None:
        session = self.session
        started = self.clock()
        try:
            async with asyncio.timeout(session.connect_timeout):
                upstream = await self.gateway.client.ws_connect(
                    URL(action.url, encoded=True),
                    headers=upstream_headers(self.request, self.request_id),
                    autoclose=False,
                    autoping=True,
                    heartbeat=session.config.limits.ping_interval_seconds or None,
                    max_msg_size=wire_limit(session.config.limits.max_message_bytes),
                    compress=15 if action.config.compress else 0,
                )
        except aiohttp.WSServerHandshakeError as exc:
            log.warning(
                "upstream refused the upgrade",
                extra={"request_id": self.request_id, "backend": action.backend, "status": exc.status},
            )
            if exc.status in (401, 403):
                await self.feed(session.upstream_closed, closecodes.POLICY_VIOLATION, "")
            else:
                await self.feed(session.upstream_failed, "connect")
            return
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning(
                "upstream unreachable",
                extra={"request_id": self.request_id, "backend": action.backend, "error": type(exc).__name__},
            )
            await self.feed(session.upstream_failed, "connect")
            return

        self.upstream = upstream
        self.gateway.upstream_connected(action.backend, self.clock() - started)
        if session.phase is Phase.CLOSED:  # the client left or overflowed while we connected
            await self.close_upstream(closecodes.GOING_AWAY, "client closed")
            return
        await self.feed(session.upstream_opened)
        if session.phase is Phase.UPSTREAM_HANDSHAKE:
            await self.upstream_handshake(upstream)
        if self.relaying:
            await pump(upstream, self.ws, Leg.CLIENT, self.to_client, session.config.limits.max_message_bytes)

    async def upstream_handshake(self, upstream: aiohttp.ClientWebSocketResponse) -> None:
        session = self.session
        deadline = asyncio.get_running_loop().time() + session.handshake_timeout
        while session.phase is Phase.UPSTREAM_HANDSHAKE:
            try:
                msg = await _receive_before(upstream, deadline)
            except TimeoutError:
                log.warning("upstream handshake timed out", extra={"request_id": self.request_id, "backend": session.backend})
                await self.feed(session.upstream_failed, "handshake")
                return
            if msg.type in _DATA:
                await self.feed(session.upstream_frame, msg.data)
            elif msg.type is WSMsgType.CLOSING:
                return
            else:
                code, reason = _close_of(msg)
                self.to_client.close_code, self.to_client.close_reason = code, reason
                await self.feed(session.upstream_closed, code, reason)
                if msg.type is WSMsgType.CLOSE:
                    await close_leg(upstream, closecodes.echo(code), "")
                return

    # -- teardown ----------------------------------------------------------------------------

    async def close(self, code: int, reason: str) -> None:
        """Close the client with (`code`, `reason`) and the upstream as going away (drain, shutdown)."""
        await asyncio.gather(
            self.close_client(code, reason), self.close_upstream(closecodes.GOING_AWAY, "gateway shutting down")
        )

    async def finish(self) -> None:
        """Leave no leg half-open, whichever way the connection ended."""
        task = self.upstream_task
        if task is not None:
            if self.upstream is not None or self.session.phase is not Phase.CLOSED:
                # The upstream task may still be owed work: frames held for the backend, a close
                # to pass on, the last frames of a pump. It bounds each step itself.
                budget = self.session.connect_timeout + self.session.handshake_timeout + self.gateway.close_timeout
                await asyncio.wait({task}, timeout=budget)
            task.cancel()  # a no-op once it is done
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # e.g. a send on a leg that died under it: still close both legs
                log.warning("upstream task failed", extra={"request_id": self.request_id, "error": type(exc).__name__})
        if self.upstream is not None and not self.upstream.closed:
            await self.close_upstream(closecodes.GOING_AWAY, "client closed")
        if not self.ws.closed:
            await self.close_client(closecodes.INTERNAL_ERROR, "gateway error")


async def _receive_before(ws: WebSocket, deadline: float) -> aiohttp.WSMessage:
    """`ws.receive()` bounded by an absolute event-loop deadline; TimeoutError once it passes.

    aiohttp's receive timeout leaves the socket open, so the caller decides how to close.
    """
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining <= 0:
        raise TimeoutError
    return await ws.receive(timeout=remaining)


def _close_of(msg: aiohttp.WSMessage) -> tuple[int | None, str]:
    if msg.type is WSMsgType.CLOSE:
        return msg.data, msg.extra or ""
    return closecodes.ABNORMAL, ""


async def _send(ws: WebSocket, data: str | bytes) -> None:
    if isinstance(data, str):
        await ws.send_str(data)
    else:
        await ws.send_bytes(data)
