"""The public listener: accept a TCP connection, read one HTTP request, upgrade it or answer it.

Everything before the 101 happens here, on the socket's own protocol object, without a
task: the request head is read (`handshake.RequestReader`, llhttp underneath) within
`limits.max_request_header_bytes` and `limits.handshake_timeout_seconds`, checked
(`handshake.check_upgrade`), and either answered with a precise status and closed, or
upgraded into a `connection.Connection`.
A request that is not an upgrade gets one access log line; an upgrade is logged once, in
its connection's line, when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sized
from email.utils import formatdate
from typing import Protocol, cast

from ..core import closecodes
from . import deflate, handshake
from ..core.auth import Verifier
from ..core.clientip import client_ip, forwarded_proto, share_key
from ..core.config import Config
from .connection import Connection
from .services import GatewayServices
from .frames import ProtocolError
from .handshake import HttpError
from ..core.protocol import Session
from .relay import Leg

log = logging.getLogger("gateway")
access_log = logging.getLogger("gateway.access")
# After an error answer, what the client still sends is read and dropped for at most this
# long (the connection stays counted in `pending` meanwhile), then the socket is closed.
LINGER_SECONDS = 2.0
_REQUEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


class Front(GatewayServices, Protocol):
    """What the listener needs from the gateway beyond what its connections need."""

    clock: Callable[[], float]
    config: Config
    verifier: Verifier
    accepting: bool
    byte_relay: bool
    pending: int

    @property
    def connections(self) -> Sized: ...

    def upgrade_attempted(self, auth_style: str) -> None: ...

    def connection_opened(self, conn: Connection) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def close_all(self, code: int, reason: str) -> None: ...

    async def wait_closed(self, timeout: float) -> None: ...


def request_id(given: str | None) -> str:
    """The caller's X-Request-ID when it is a sane token, else a fresh one."""
    if given and len(given) <= 128 and set(given) <= _REQUEST_ID_CHARS:
        return given
    return os.urandom(16).hex()


FORWARDED_CLIENT_HEADERS = ("User-Agent", "Origin", "Accept-Language")
_FORWARDED_LOWER = frozenset(name.lower() for name in FORWARDED_CLIENT_HEADERS)


def upstream_headers(request: handshake.Request, peer: str, rid: str, proto: str) -> list[tuple[str, str]]:
    """Headers that tell the backend who the client is, as a reverse proxy would."""
    prior = request.headers.get("X-Forwarded-For")
    headers = [
        ("X-Forwarded-For", f"{prior}, {peer}" if prior else peer),
        ("X-Forwarded-Proto", proto),
        ("X-Request-ID", rid),
    ]
    for name in FORWARDED_CLIENT_HEADERS:
        value = request.headers.get(name)
        if value is not None:
            headers.append((name, value))
    return headers


def app_header(request: handshake.Request, config: Config) -> tuple[str, str] | None:
    """The ``usage.app_version`` header when it is one the backend is not sent (`upstream_headers`)."""
    settings = config.usage.app_version
    if settings is None or settings.header.lower() in _FORWARDED_LOWER:
        return None
    value = request.headers.get(settings.header)
    return (settings.header, value) if value is not None else None


def deprecation_headers(config: Config) -> list[tuple[str, str]]:
    """RFC 9745 Deprecation and RFC 8594 Sunset for URL-token clients: seen by monitoring, not by apps."""
    headers = []
    if config.auth.legacy_deprecated_at is not None:
        headers.append(("Deprecation", f"@{config.auth.legacy_deprecated_at}"))
    if config.auth.legacy_sunset is not None:
        headers.append(("Sunset", formatdate(config.auth.legacy_sunset, usegmt=True)))
    return headers


class PendingShares:
    """Sockets in their HTTP request phase per client address (`clientip.share_key`).

    The address is the TCP peer: nothing the client sent is trusted yet. Held from accept
    until the request is answered or upgraded, the phase an idle or dribbling socket
    stays in; `limits.max_pending_handshakes_per_ip` caps one address's share of
    `limits.max_pending_handshakes`, so a flood from a few addresses leaves the rest of the
    bound to everyone else.
    """

    def __init__(self) -> None:
        self.held: dict[str, int] = {}

    def take(self, key: str, limit: int) -> bool:
        held = self.held.get(key, 0)
        if held >= limit:
            return False
        self.held[key] = held + 1
        return True

    def give(self, key: str) -> None:
        held = self.held.pop(key) - 1
        if held:
            self.held[key] = held


class RequestPhase(asyncio.Protocol):
    """A fresh TCP connection until its request is answered or upgraded.

    It is the socket's protocol only until then: an upgrade hands the transport to a
    `relay.Leg`, which from then on belongs to the connection.

    From accept until its session relays or ends, every connection counts in
    ``gateway.pending`` (``limits.max_pending_handshakes``): this object counts it until the
    upgrade, the gateway after. Over the limit, or over its address's share of it
    (`PendingShares`), a new socket gets 503 before it is read, so a flood of slow
    handshakes cannot take every file descriptor, nor a few addresses the whole bound.
    """

    def __init__(self, gateway: Front, clock: Callable[[], float], shares: PendingShares) -> None:
        self.gateway = gateway
        self.clock = clock
        self.shares = shares
        self.share: str | None = None
        self.transport: asyncio.Transport | None = None
        self.reader: handshake.RequestReader | None = None  # made by the first byte: idle sockets stay small
        self.timer: asyncio.TimerHandle | None = None
        self.started = clock()
        self.counted = False
        self.lingering = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        gateway = self.gateway
        config = gateway.config
        limits = config.limits
        if gateway.pending >= limits.max_pending_handshakes:
            self.refuse(HttpError(503, "too many connections in their handshake, retry shortly", [("Retry-After", "1")]), None)
            return
        key = share_key(_peer(self.transport), config.trusted_proxies)
        if key is not None:
            if not self.shares.take(key, limits.max_pending_handshakes_per_ip):
                message = "too many connections in their handshake from your address, retry shortly"
                self.refuse(HttpError(503, message, [("Retry-After", "1")]), None)
                return
            self.share = key
        gateway.pending += 1
        self.counted = True
        # Nothing the client sends extends this: the whole request must arrive within it.
        self.timer = asyncio.get_running_loop().call_later(limits.handshake_timeout_seconds, self.transport.abort)

    def _uncount(self) -> None:
        if self.counted:
            self.counted = False
            self.gateway.pending -= 1

    def _release_share(self) -> None:
        if self.share is not None:
            self.shares.give(self.share)
            self.share = None

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        if self.reader is None:
            self.reader = handshake.RequestReader(self.gateway.config.limits.max_request_header_bytes)
        try:
            read = self.reader.feed(data)
        except HttpError as exc:
            self.refuse(exc, None)
            return
        if read is None:
            return
        self.reader = None
        assert self.transport is not None
        self.transport.pause_reading()
        self.handle(*read)

    def connection_lost(self, exc: Exception | None) -> None:
        self._uncount()
        self._release_share()
        if self.timer is not None:
            self.timer.cancel()

    def refuse(self, error: HttpError, request: handshake.Request | None) -> None:
        """Answer and close, lingering as nginx does: a client still sending (a request head
        over the limit) would otherwise get a reset that discards the answer unread."""
        transport = self.transport
        assert transport is not None
        if self.timer is not None:
            self.timer.cancel()
        head_only = request is not None and request.method == "HEAD"
        transport.write(handshake.error_response(error.status, error.message, error.headers, head_only=head_only))
        self.access(request, error.status)
        if not self.counted:  # over the pending limit: nothing read, nothing to linger for
            transport.close()
            return
        self.reader = None
        self.lingering = True
        self.timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)
        transport.resume_reading()

    def access(self, request: handshake.Request | None, status: int) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        assert self.transport is not None
        access_log.info(
            "request",
            extra={
                "remote": _peer(self.transport),
                "method": request.method if request else None,
                "path": request.path if request else None,
                "status": status,
                "duration_s": round(self.clock() - self.started, 3),
            },
        )

    def handle(self, request: handshake.Request, rest: bytes) -> None:
        gateway = self.gateway
        config = gateway.config
        if request.path != config.path:
            self.refuse(HttpError(404, "not found"), request)
            return
        if not gateway.accepting:
            self.refuse(HttpError(503, "gateway restarting, retry shortly", [("Retry-After", "5")]), request)
            return
        if len(gateway.connections) >= config.limits.max_upstream_connections:
            self.refuse(HttpError(503, "gateway at capacity, retry shortly", [("Retry-After", "5")]), request)
            return
        try:
            key = handshake.check_upgrade(request)
        except HttpError as exc:
            self.refuse(exc, request)
            return
        self.upgrade(request, key, rest)

    def upgrade(self, request: handshake.Request, key: str, rest: bytes) -> None:
        gateway = self.gateway
        config = gateway.config
        transport = self.transport
        assert transport is not None and self.timer is not None
        self.timer.cancel()
        self.counted = False  # the connection's from here: the gateway uncounts it when it relays or ends
        self._release_share()
        rid = request_id(request.headers.get("X-Request-ID"))
        session = Session(config, gateway.verifier, request.query)
        extra = [("X-Request-ID", rid)]
        if session.auth_style == "legacy" and config.auth.legacy == "deprecate":
            extra += deprecation_headers(config)
        agreed = deflate.accept_offer(request.headers.get("Sec-WebSocket-Extensions"))
        if agreed is not None:
            extra.append(("Sec-WebSocket-Extensions", agreed[1]))
        gateway.upgrade_attempted(session.auth_style)
        transport.write(handshake.switching_protocols(key, extra))

        peer = _peer(transport)
        forwarded = ", ".join(request.headers.getall("X-Forwarded-For"))
        leg = Leg(_Upgrading(self.clock), is_client=True)
        leg.transport = transport
        conn = Connection(
            gateway,
            session,
            leg,
            request_id=rid,
            client_ip=client_ip(peer, forwarded, config.trusted_proxies),
            upstream_headers=upstream_headers(
                request, peer, rid, forwarded_proto(peer, request.headers.get("X-Forwarded-Proto"), config.trusted_proxies)
            ),
            client_deflate=agreed[0] if agreed else None,
            clock=self.clock,
            byte_relay=gateway.byte_relay,
            app_header=app_header(request, config),
        )
        conn.started = self.started
        conn.access = {"remote": peer, "method": request.method, "path": request.path, "status": 101}
        transport.set_protocol(leg)
        gateway.connection_opened(conn)
        conn.begin(rest)
        transport.resume_reading()


class _Upgrading:
    """A leg's owner for the instant between its creation and its connection's."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock

    def leg_lost(self, leg: Leg) -> None: ...

    def control(self, leg: Leg, opcode: int, payload: bytes) -> None: ...

    def protocol_error(self, leg: Leg, error: ProtocolError) -> None: ...

    def relay_message(self, leg: Leg, data: str | bytes) -> None: ...


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


class Listener:
    """The public port of a running gateway."""

    def __init__(self, gateway: Front, server: asyncio.Server, port: int) -> None:
        self.gateway = gateway
        self.server = server
        self.port = port

    async def close(self) -> None:
        """Stop accepting, close every session with 1012, wait (bounded) until they are gone."""
        self.server.close()
        gateway = self.gateway
        await gateway.close_all(closecodes.SERVICE_RESTART, "server restarting")
        await gateway.wait_closed(gateway.close_timeout)
        await gateway.stop()


async def listen(gateway: Front, host: str, port: int, *, reuse_port: bool = False) -> Listener:
    """Start `gateway` and listen on host:port (0 picks a free port)."""
    await gateway.start()
    loop = asyncio.get_running_loop()
    shares = PendingShares()
    try:
        server = await loop.create_server(
            lambda: RequestPhase(gateway, gateway.clock, shares), host, port, reuse_port=reuse_port or None, backlog=4096
        )
    except OSError as exc:
        await gateway.stop()
        # asyncio's own text repeats the address; the errno's name says it once.
        reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {reason}") from None
    return Listener(gateway, server, server.sockets[0].getsockname()[1])
