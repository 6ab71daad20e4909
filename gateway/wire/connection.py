"""The shell around one session: feed it what the sockets say, do what it answers, tear down once.

A `Connection` exists from the client's 101 to the moment both sockets are closed. Until
the session machine says `StartRelay` it reads both legs frame by frame (`MessageReader`);
`prerelay` turns each frame and broken frame into the session's event and the legs' part,
and the actions that come back are performed in order, synchronously, so held frames
always reach the backend before later ones. Waiting happens only where something must be
awaited — the per-user and per-IP limits when a store holds them, and opening the
upstream — each in a short task that feeds the session when it is done. Then the legs get
their pumps (`relay.start_pump`) and this object only hears about control frames,
protocol errors and lost sockets: it feeds them to the relay machine
(`relayrules.RelayRules`) and performs what it answers (`act`; what concerns one leg alone
is the leg's own `Leg.apply`), which all ends in the same teardown. What stays here is
what needs both legs, the session and the gateway at once: the record, the deadlines,
the tasks and the teardown.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from ..core import closecodes
from . import deflate, prerelay
from ..core.auth import might_be_authenticate
from ..core.closecodes import Side
from .connector import HeadReader
from .connlog import record
from .deflate import Deflate, Inflater
from .frames import CLOSE, PING, Close, Event, Message, MessageReader, Ping, ProtocolError
from ..core.protocol import (
    Action,
    CloseClient,
    CloseUpstream,
    ExpireAt,
    FetchKeys,
    OpenUpstream,
    Phase,
    RouteUser,
    SendClient,
    SendUpstream,
    Session,
    StartRelay,
    TokenRefreshed,
    UpstreamResult,
)
from .relay import LEG_ACTIONS, Flow, Leg, Reply, start_pump
from ..core.relayrules import Action as RelayAction
from ..core.relayrules import CloseLeg, Ended, Pong, RelayRules, gateway_close, keepalive
from .services import GatewayServices, Placement
from .upstream import REFUSED, Opened, open_upstream

log = logging.getLogger("gateway.connection")


class Connection:
    """Everything one client connection owns; the listener creates it after the 101."""

    def __init__(
        self,
        services: GatewayServices,
        session: Session,
        client: Leg,
        *,
        request_id: str,
        client_ip: str,
        upstream_headers: list[tuple[str, str]],
        client_deflate: Deflate | None,
        clock: Callable[[], float],
        byte_relay: bool = True,
        app_header: tuple[str, str] | None = None,
    ) -> None:
        """`app_header`: the ``usage.app_version`` header when it is not among `upstream_headers`
        (counted with the session, not forwarded)."""
        self.services = services
        self.session = session
        self.client = client
        self.request_id = request_id
        self.client_ip = client_ip
        self.connection_id = os.urandom(16).hex()
        self.clock = clock
        self.started = client.last_read
        self.ready_at: float | None = None
        self.to_upstream = Flow()
        self.to_client = Flow()
        self.upstream: Leg | None = None
        self.upstream_deflate: Deflate | None = None
        self.finished = False
        self.byte_relay = byte_relay
        self.access: dict[str, Any] = {}  # the upgrade request, for the log line (remote, method, path, status)
        self._upstream_headers = upstream_headers
        self._reported_headers = upstream_headers if app_header is None else [*upstream_headers, app_header]
        self._client_deflate = client_deflate
        limit = session.config.limits.max_message_bytes
        inflater = Inflater(no_context_takeover=client_deflate.client_no_context_takeover) if client_deflate else None
        self._client_reader = MessageReader(masked=True, max_message=limit, inflater=inflater)
        self._upstream_reader: MessageReader | None = None
        self._started = False
        self._pending = bytearray()
        self._reading: Leg | None = None  # a leg whose batch of parsed frames is being handled
        self._carry: dict[Leg, bytes] = {}  # unparsed bytes a leg's new pump gets after its batch
        self._timers: list[asyncio.TimerHandle] = []
        self._expiry: asyncio.TimerHandle | None = None
        self.reply: Reply | None = None  # from the switch to the relay
        self._asked_at: float | None = None  # the first chat frame read before it
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connecting: asyncio.Task[None] | None = None
        self._ramp_window: int | None = None  # the ramp's window as the upstream attempt began
        self.relay: RelayRules | None = None  # from the switch to the relay
        client.owner = self

    # -- the start ------------------------------------------------------------------------------

    def begin(self, early: bytes) -> None:
        """The 101 is written; `early` is what the client sent right behind its request."""
        self.client.receive = self._client_bytes
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(self.session.auth_timeout, self._auth_deadline))
        self._pending += early
        if self.session.config.limits.auth_failures_per_ip_per_minute is None:
            self._start()
        else:
            assert self.client.transport is not None
            self.client.transport.pause_reading()
            self._spawn(self._check_ip())

    async def _check_ip(self) -> None:
        blocked = await self.services.ip_blocked(self.client_ip)
        if self.client.done:
            return
        assert self.client.transport is not None
        self.client.transport.resume_reading()
        if blocked:
            self.perform(self.session.refuse("rate_limited"))
        # Read the client even when refused (the session ignores its frames then): its answer
        # to the close ends the closing handshake, which would otherwise wait out close_timeout.
        self._start()

    def _start(self) -> None:
        self._started = True
        self.perform(self.session.start())
        if self._pending:
            early, self._pending = bytes(self._pending), bytearray()
            self._client_bytes(early)

    # -- performing actions ---------------------------------------------------------------------

    def perform(self, actions: list[Action]) -> None:
        session = self.session
        for action in actions:
            kind = type(action)
            if kind is SendUpstream:
                assert self.upstream is not None and isinstance(action, SendUpstream)
                data = action.data
                self.upstream.send_message(data)
                if session.phase is not Phase.UPSTREAM_HANDSHAKE:  # not the authenticate frame
                    self._count(self.to_upstream, data)
            elif kind is SendClient:
                assert isinstance(action, SendClient)
                self.client.send_message(action.data)
            elif kind is UpstreamResult:
                assert isinstance(action, UpstreamResult)
                self.services.upstream_result(action.backend, action.result, self._ramp_window)
            elif kind is FetchKeys:
                self._spawn(self._fetch_keys())
            elif kind is RouteUser:
                assert isinstance(action, RouteUser)
                if session.config.limits.max_sessions_per_user is None:
                    self.perform(session.routed(self.services.route(action.user_id)))
                else:
                    self._spawn(self._admit(action.user_id))
            elif kind is OpenUpstream:
                assert isinstance(action, OpenUpstream)
                if action.fallback:
                    self.services.fell_back()
                    log.warning(
                        "new backend failed; falling back to the old one",
                        extra={"request_id": self.request_id, "reason": session.fallback_reason},
                    )
                self._connecting = self._spawn(self._open(action))
            elif kind is CloseClient:
                assert isinstance(action, CloseClient)
                counting = self.services.auth_failed(self.client_ip, session.failure) if session.failure else None
                if counting is None:
                    self.close_leg(self.client, action.code, action.reason)
                else:  # counted on every replica before the client can see its 1008 and retry
                    self._spawn(self._close_when_counted(counting, action))
            elif kind is CloseUpstream:
                assert isinstance(action, CloseUpstream)
                if self.upstream is not None:
                    self.close_leg(self.upstream, action.code, action.reason)
            elif kind is StartRelay:
                self._start_relay()
            elif kind is ExpireAt:
                assert isinstance(action, ExpireAt)
                self._expire_at(action.at)
            elif kind is TokenRefreshed:
                assert isinstance(action, TokenRefreshed)
                self.services.token_refreshed(action.result)

    def act(self, actions: Sequence[RelayAction]) -> None:
        """Perform the relay machine's actions in order; the session's among them go to `perform`."""
        for action in actions:
            kind = type(action)
            if kind is CloseLeg:
                assert isinstance(action, CloseLeg)
                self.close_leg(self._leg(action.side), action.code, action.reason)
            elif kind is Ended:
                assert isinstance(action, Ended)
                flow = self.to_upstream if action.side is Side.CLIENT else self.to_client
                if action.code is not None:
                    flow.close_code, flow.close_reason = action.code, action.reason
                if action.lost:
                    flow.lost = True
            elif isinstance(action, LEG_ACTIONS):
                self._leg(action.side).apply(action, self.services.close_timeout)
            else:
                self.perform([action])  # type: ignore[list-item]

    def _leg(self, side: Side) -> Leg:
        leg = self.client if side is Side.CLIENT else self.upstream
        assert leg is not None
        return leg

    def _side(self, leg: Leg) -> Side | None:
        """The side `leg` is on; None for an upstream given up on (fallback)."""
        if leg is self.client:
            return Side.CLIENT
        return Side.UPSTREAM if leg is self.upstream else None

    async def _close_when_counted(self, counting: Awaitable[bool], action: CloseClient) -> None:
        try:
            await counting
        finally:
            self.close_leg(self.client, action.code, action.reason)

    async def _admit(self, user_id: str) -> None:
        allowed = await self.services.acquire_slot(user_id, self.connection_id)
        if allowed:
            self.perform(self.session.routed(self.services.route(user_id)))
        else:
            self.perform(self.session.refuse("too_many_sessions"))

    def close_leg(self, leg: Leg, code: int, reason: str) -> None:
        """Send `leg` the gateway's close (mapped for the wire) and remember what it got."""
        if leg.close_sent or leg.done:
            return
        code, reason = closecodes.sendable(code, reason)
        flow = self.to_client if leg.is_client else self.to_upstream
        if flow.delivered is None:
            flow.delivered = (code, reason)
        leg.send_close(code, reason, self.services.close_timeout)

    def _count(self, flow: Flow, data: str | bytes) -> None:
        flow.frames += 1
        flow.bytes += len(data.encode("utf-8")) if isinstance(data, str) else len(data)

    # -- the client's frames before the relay ---------------------------------------------------

    def _client_bytes(self, data: bytes) -> None:
        if not self._started:
            self._pending += data
            return
        reader = self._client_reader
        self._handle(self.client, reader.feed(data), reader.error)

    def _expire_at(self, at: float | None) -> None:
        """(Re)arm the deadline of ``auth.session_expiry: close``; `at` is wall-clock time."""
        if self._expiry is not None:
            self._expiry.cancel()
        if at is not None:
            self._expiry = asyncio.get_running_loop().call_later(max(0.0, at - self.services.wall()), self._expired)
            self._timers.append(self._expiry)

    def _expired(self) -> None:
        assert self.relay is not None  # the deadline is armed from the switch to the relay on
        self.services.session_expired()
        log.info("token expired: closing the session", extra={"request_id": self.request_id})
        self.act(self.relay.expired())

    async def _fetch_keys(self) -> None:
        await self.services.refresh_keys()
        self.perform(self.session.keys_fetched())

    # -- the upstream ------------------------------------------------------------------------------

    async def _open(self, action: OpenUpstream) -> None:
        session = self.session
        started = self.clock()
        services = self.services
        self._ramp_window = services.ramp_window
        try:
            opened = await open_upstream(
                services.connector, action, self._upstream_headers, self._client_deflate, session.connect_timeout,
                self.request_id, services.upstream_error,
            )
            if not isinstance(opened, Opened):
                if opened == REFUSED:
                    self.perform(session.upstream_closed(closecodes.POLICY_VIOLATION, ""))
                else:
                    self.perform(session.upstream_failed(opened))
                return
        finally:
            if self._connecting is asyncio.current_task():
                self._connecting = None
        self.upstream_deflate = opened.deflate
        services.upstream_connected(action.backend, self.clock() - started)
        self._attach_upstream(opened.transport, opened.head)

    def _attach_upstream(self, transport: asyncio.Transport, head: HeadReader) -> None:
        leg = Leg(self, is_client=False)
        transport.set_protocol(leg)
        leg.transport = transport
        self.upstream = leg
        upstream_deflate = self.upstream_deflate
        inflater = Inflater(no_context_takeover=upstream_deflate.server_no_context_takeover) if upstream_deflate else None
        limit = self.session.config.limits.max_message_bytes
        reader = self._upstream_reader = MessageReader(masked=False, max_message=limit, inflater=inflater)
        leg.receive = lambda data: self._upstream_bytes(leg, reader, data)
        session = self.session
        if session.phase is Phase.CLOSED:  # the client left or overflowed while we connected
            self.close_leg(leg, closecodes.GOING_AWAY, "client closed")
        else:
            self.perform(session.upstream_opened())
            if session.phase is Phase.UPSTREAM_HANDSHAKE:
                loop = asyncio.get_running_loop()
                self._timers.append(loop.call_later(session.handshake_timeout, self._handshake_deadline))
        transport.resume_reading()
        if head.rest:
            leg.data_received(head.rest)
        if head.lost:
            leg.connection_lost(None)

    def _upstream_bytes(self, leg: Leg, reader: MessageReader, data: bytes) -> None:
        if leg is not self.upstream:  # an upstream given up on (fallback): only its close matters
            for event in reader.feed(data):
                if type(event) is Close:
                    leg.close_arrived()
            if reader.error is not None:
                leg.abort()
            return
        self._handle(leg, reader.feed(data), reader.error)

    def _handle(self, leg: Leg, events: list[Event], error: ProtocolError | None) -> None:
        """One read's frames: to the session until the relay starts, then as the relay would."""
        side = self._side(leg)
        assert side is not None
        self._reading = leg
        try:
            for event in events:
                if leg.close_received:
                    break
                if self.relay is None:
                    if leg.is_client and type(event) is Message and self._asked_at is None and not leg.close_sent:
                        if self.session.phase is not Phase.AUTHENTICATING:
                            self._asked_at = leg.last_read  # a chat frame held before the relay: its reply counts
                    self.act(prerelay.frame_read(self.session, side, event, leg.close_sent))
                elif type(event) is Message:
                    self.relay_message(leg, event.data)
                elif type(event) is Close:
                    self.act(self.relay.peer_closed(side, event.code, event.reason))
                elif type(event) is Ping:
                    self.act([Pong(side, event.payload)])
            if error is not None and not leg.close_received:
                self.protocol_error(leg, error)
        finally:
            self._reading = None
        carried = self._carry.pop(leg, None)
        if carried:
            leg.receive(carried)

    # -- deadlines ---------------------------------------------------------------------------------

    def _auth_deadline(self) -> None:
        self.perform(self.session.auth_timed_out())

    def _handshake_deadline(self) -> None:
        if self.session.phase is Phase.UPSTREAM_HANDSHAKE:
            log.warning(
                "upstream handshake timed out", extra={"request_id": self.request_id, "backend": self.session.backend}
            )
        self.perform(self.session.upstream_failed("handshake"))

    def keepalive(self, now: float) -> None:
        """Ping a leg that has been quiet for the ping interval; drop one that did not answer the last ping."""
        interval = self.session.config.limits.ping_interval_seconds
        if not interval:
            return
        for side, leg in ((Side.CLIENT, self.client), (Side.UPSTREAM, self.upstream)):
            if leg is None or leg.done or leg.close_sent:
                continue
            self.act(keepalive(side, now, interval, leg.last_read, leg.ping_sent_at))

    # -- the relay -----------------------------------------------------------------------------------

    def _start_relay(self) -> None:
        session = self.session
        client, upstream = self.client, self.upstream
        assert upstream is not None and session.backend is not None and session.identity is not None
        self.relay = RelayRules(session)
        self.ready_at = self.clock()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self.services.session_ready(
            session.auth_style, session.backend, session.identity.user_id, self.ready_at - self.started, self._reported_headers
        )
        client.peer, upstream.peer = upstream, client
        reply = self.reply = Reply(self.services.reply_observer(session.backend))
        reply.asked_at = self._asked_at
        store = session.config.limits.store_and_forward_bytes
        client_reader, upstream_reader = self._client_reader, self._upstream_reader
        assert upstream_reader is not None
        # With session_expiry: close the client's frames are parsed, to see in-band refreshes.
        refreshes = session.config.auth.session_expiry == "close"
        bytes_in = self.byte_relay and client_reader.inflater is None and not refreshes
        bytes_out = self.byte_relay and deflate.passes_through(self.upstream_deflate, self._client_deflate)
        rsv1 = self.upstream_deflate is not None
        carry = [
            (client, start_pump(client, upstream, client_reader, self.to_upstream, reply, bytes_ok=bytes_in, rsv1_allowed=False, store_bound=store)),
            (upstream, start_pump(upstream, client, upstream_reader, self.to_client, reply, bytes_ok=bytes_out, rsv1_allowed=rsv1, store_bound=store)),
        ]
        for leg, rest in carry:
            if not rest:
                continue
            if leg is self._reading:
                self._carry[leg] = rest  # after the frames of this read already parsed
            else:
                leg.receive(rest)

    def relay_message(self, leg: Leg, data: str | bytes) -> None:
        """A message a `FramePump` (or the last read before the switch) parsed: write it to the other leg."""
        other = self.upstream if leg.is_client else self.client
        if other is None or other.close_sent or other.done:
            return
        if self.reply is not None:
            self.reply.seen(leg)
        if leg.is_client and self._expiry is not None and type(data) is str and might_be_authenticate(data):
            assert self.relay is not None
            self.act(self.relay.refresh(data))
            return
        other.send_message(data)
        self._count(self.to_upstream if leg.is_client else self.to_client, data)

    def control(self, leg: Leg, opcode: int, payload: bytes) -> None:
        assert self.relay is not None
        side = self._side(leg)
        assert side is not None
        if opcode == PING:
            self.act(self.relay.ping(side, payload))
        elif opcode == CLOSE:
            self.act(self.relay.close_frame(side, payload))

    def protocol_error(self, leg: Leg, error: ProtocolError) -> None:
        """`leg`'s peer broke the protocol or a limit: close it with the code that says how."""
        side = self._side(leg)
        assert side is not None
        if self.relay is not None:
            self.act(self.relay.protocol_error(side, error.code, error.reason))
            return
        self.act(prerelay.protocol_error(self.session, side, error.code, error.reason))

    # -- losing a socket, and the teardown ----------------------------------------------------------

    def leg_lost(self, leg: Leg) -> None:
        """`leg`'s socket is gone. Without a close frame first, its peer vanished."""
        side = self._side(leg)
        if self.relay is not None and side is not None:
            self.act(self.relay.leg_lost(side))
        elif side is not None and not leg.close_received and not leg.close_sent:
            flow = self.to_upstream if side is Side.CLIENT else self.to_client
            if flow.close_code is None:
                flow.close_code = closecodes.ABNORMAL
            if side is Side.CLIENT:
                self.perform(self.session.client_closed(closecodes.ABNORMAL, ""))
            else:
                self.perform(self.session.upstream_closed(closecodes.ABNORMAL, ""))
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.finished or not self.client.done or self._connecting is not None:
            return
        upstream = self.upstream
        if upstream is not None and not upstream.done:
            # The client is gone: nothing may stay half-open, unless the session still owes the
            # backend frames the client sent before it left (it closes the upstream itself then).
            if not upstream.close_sent and self.relay is None and self.session.phase is Phase.CLOSED:
                self.close_leg(upstream, closecodes.GOING_AWAY, "client closed")
            return
        self.finished = True
        for timer in self._timers:
            timer.cancel()
        for task in self._tasks:
            task.cancel()
        self.services.connection_finished(self)

    async def close(self, code: int, reason: str, upstream_reason: str = "gateway shutting down") -> None:
        """Close the client with (`code`, `reason`) and the upstream as going away (drain, shutdown, rebalance)."""
        if self.relay is not None:
            self.act(self.relay.close(code, reason, upstream_reason))
            return
        for close in gateway_close(code, reason, upstream_reason):
            if close.side is Side.CLIENT or self.upstream is not None:
                self.close_leg(self._leg(close.side), close.code, close.reason)

    def placement(self) -> Placement | None:
        """Where this session is, while it relays (for rebalancing)."""
        session, upstream = self.session, self.upstream
        if session.phase is not Phase.RELAYING or session.route is None or session.identity is None or upstream is None:
            return None
        assert session.backend is not None
        return Placement(
            session.identity.user_id, session.route.backend, session.backend, max(self.client.last_read, upstream.last_read)
        )

    @property
    def upstream_dropped(self) -> bool:
        """The backend vanished (or broke the protocol) mid-session rather than closing."""
        return self.to_client.lost and self.ready_at is not None

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(self._guarded(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guarded(self, work: Awaitable[None]) -> None:
        """Run a piece of the handshake; a bug in it closes this connection, never the process."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("connection failed", extra={"request_id": self.request_id, "error": type(exc).__name__})
            self.close_leg(self.client, closecodes.INTERNAL_ERROR, "gateway error")
            if self.upstream is not None:
                self.close_leg(self.upstream, closecodes.GOING_AWAY, "gateway error")
        finally:
            self._maybe_finish()

    def record(self) -> dict[str, Any]:
        """The connection log line's fields (`connlog.record`)."""
        return record(
            self.session, self.to_upstream, self.to_client, self.reply, request_id=self.request_id,
            started=self.started, ready_at=self.ready_at, now=self.clock(), access=self.access,
        )
