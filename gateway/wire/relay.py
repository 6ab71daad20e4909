"""Moving bytes: the two sockets of a connection (`Leg`) and the relay between them.

Each socket is an asyncio Protocol, so an established session costs no task and no
coroutine, only two small objects and the transports. Until the session machine says
`StartRelay`, a leg hands what it reads to its connection (`connection.Connection`). Then
each direction gets a pump:

* `BytePump` (the default): frames are not reassembled into messages; a
  `forwarder.Forwarder` checks each one (size, masking, fragments, UTF-8), re-masks what goes
  to a backend, stores small frames until whole, and takes out the control frames the
  gateway answers itself (ping, pong) or maps (close). A write that fills the destination's
  buffer pauses reading from the source until it drains, so a slow reader holds back its
  sender and nothing piles up.
* `FramePump`: frames are parsed and re-encoded. Used for a direction the byte relay
  cannot carry unchanged: a client's permessage-deflate messages (the gateway inflates
  them, so a backend need not speak deflate), a backend whose compression the client
  could not read, or a message that was half-way through a fragmented send at the switch.

Frames the gateway originates on a relaying leg (pong, ping, close) are written only
between two frames of that leg's outgoing stream, never inside one (`Leg.send_own`).

The pump choice (`start_pump`) and the relay machine's actions on one leg (`Leg.apply`) live
here rather than in the connection: both are about one socket and its bytes, and need nothing
of the session but the facts the connection passes in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol, Union, cast

from ..core import relayrules

from .frames import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    Close,
    Event,
    Message,
    MessageReader,
    Ping,
    Pong,
    ProtocolError,
    encode,
    encode_close,
)
from .forwarder import Counts, Forwarder, Piece

LegAction = Union[
    relayrules.CloseRead, relayrules.EchoClose, relayrules.FailLeg, relayrules.StopReading,
    relayrules.AbandonFrame, relayrules.AbortLeg, relayrules.Ping, relayrules.Pong,
]
LEG_ACTIONS = (
    relayrules.CloseRead, relayrules.EchoClose, relayrules.FailLeg, relayrules.StopReading,
    relayrules.AbandonFrame, relayrules.AbortLeg, relayrules.Ping, relayrules.Pong,
)


class Flow(Counts):
    """What one direction carried, and how its source ended (None: the other side ended first)."""

    __slots__ = ("close_code", "close_reason", "lost", "delivered")

    def __init__(self) -> None:
        super().__init__()
        self.close_code: int | None = None
        self.close_reason = ""
        self.lost = False  # the source vanished or broke the protocol instead of closing
        self.delivered: tuple[int, str] | None = None  # the close the gateway sent to the destination


class Owner(Protocol):
    """What a leg reports to the connection that owns it."""

    clock: Callable[[], float]

    def leg_lost(self, leg: Leg) -> None: ...

    def control(self, leg: Leg, opcode: int, payload: bytes) -> None: ...

    def protocol_error(self, leg: Leg, error: ProtocolError) -> None: ...

    def relay_message(self, leg: Leg, data: str | bytes) -> None: ...


class Leg(asyncio.Protocol):
    """One socket of a connection: the client's (`is_client`) or the upstream's.

    `receive` is whoever reads it now: the connection during the handshake, a pump after.
    """

    __slots__ = (
        "owner", "is_client", "transport", "receive", "peer", "feeder", "close_sent", "close_received",
        "done", "last_read", "ping_sent_at", "deferred", "close_timer",
    )

    def __init__(self, owner: Owner, *, is_client: bool) -> None:
        self.owner = owner
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.receive: Callable[[bytes], None] = _drop
        self.peer: Leg | None = None  # the other leg, once both relay
        self.feeder: BytePump | FramePump | None = None  # the pump writing into this leg
        self.close_sent = False
        self.close_received = False
        self.done = False
        self.last_read = owner.clock()
        self.ping_sent_at: float | None = None
        self.deferred: list[bytes] = []
        self.close_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self.last_read = self.owner.clock()
        self.receive(data)

    def eof_received(self) -> None:
        return None  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done:
            return
        self.done = True
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.resume_writing()  # a peer this leg held back must be read again (its close, at least)
        self.owner.leg_lost(self)

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.done:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.done:
            peer.transport.resume_reading()

    # -- writing -------------------------------------------------------------------------------

    @property
    def masks(self) -> bool:
        """Frames written to this leg are masked: the gateway is the client of a backend."""
        return not self.is_client

    def send_own(self, frame: bytes) -> None:
        """Write a frame the gateway made, between two frames of what the relay writes here."""
        if self.done or self.transport is None or self.transport.is_closing():
            return
        if self.feeder is not None and self.feeder.mid_frame:
            self.deferred.append(frame)
        else:
            self.transport.write(frame)

    def flush_deferred(self) -> None:
        frames, self.deferred = self.deferred, []
        for frame in frames:
            self.send_own(frame)
        if self.close_sent and self.close_received:
            self.finish()  # the closing handshake completed while the close frame waited

    def send_message(self, data: str | bytes) -> None:
        if isinstance(data, str):
            self.send_own(encode(TEXT, data.encode("utf-8"), mask=self.masks))
        else:
            self.send_own(encode(BINARY, data, mask=self.masks))

    def send_close(self, code: int, reason: str, timeout: float) -> None:
        """Start (or answer) the closing handshake; the socket goes once it is done or `timeout` passes."""
        if self.close_sent or self.done:
            return
        self.close_sent = True
        self.send_own(encode_close(code, reason, mask=self.masks))
        if self.close_received and not self.deferred:
            self.finish()
        else:  # no echo yet, or the close waits behind a half-relayed frame that may never end
            self.close_timer = asyncio.get_running_loop().call_later(timeout, self.abort)

    def close_arrived(self) -> None:
        """The peer's close frame was read: once both sides sent one, the socket can go."""
        self.close_received = True
        self.receive = _drop
        if self.close_sent:
            self.finish()

    def finish(self) -> None:
        """Close the socket after what is buffered is written (or once deferred frames are)."""
        if self.transport is not None and not self.deferred:
            self.transport.close()

    def fail(self) -> None:
        """The peer broke the protocol: the close frame just sent is the last thing it gets, and
        the socket goes as soon as that is written, without waiting for an echo (RFC 6455 §7.1.7)."""
        if self.deferred:
            self.abort()  # the close waits behind a half-written frame: it cannot be sent
        else:
            self.finish()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def ping(self, now: float) -> None:
        self.ping_sent_at = now
        self.send_own(encode(PING, b"", mask=self.masks))

    def apply(self, action: LegAction, close_timeout: float) -> None:
        """Do what the relay machine asks of this leg alone (the ones that touch the record or both legs stay with the connection)."""
        kind = type(action)
        if kind is relayrules.CloseRead:
            self.close_arrived()
        elif kind is relayrules.EchoClose:
            assert isinstance(action, relayrules.EchoClose)
            self.send_close(action.code, "", close_timeout)
        elif kind is relayrules.FailLeg:
            self.fail()
        elif kind is relayrules.StopReading:
            self.receive = _ignore
        elif kind is relayrules.AbandonFrame:
            if self.deferred:
                self.abort()
        elif kind is relayrules.AbortLeg:
            self.abort()
        elif kind is relayrules.Pong:
            assert isinstance(action, relayrules.Pong)
            self.send_own(encode(PONG, action.payload, mask=self.masks))
        elif kind is relayrules.Ping:
            assert isinstance(action, relayrules.Ping)
            self.ping(action.at)


def _drop(data: bytes) -> None:
    """What a leg does with bytes that arrive after its peer's close frame: nothing."""


def _ignore(data: bytes) -> None:
    """What a leg that broke the protocol gets to say afterwards: nothing."""


def start_pump(
    src: Leg, dst: Leg, reader: MessageReader, flow: Flow, reply: Reply, *, bytes_ok: bool, rsv1_allowed: bool, store_bound: int
) -> bytes:
    """Give `src` its pump at the switch to the relay: the byte relay where the connection says
    bytes may pass (`bytes_ok`) and no message is half-read, else the frame relay. Returns what
    `reader` had buffered and not parsed, which the byte pump must be fed; the frame relay
    keeps reading with `reader` itself."""
    if bytes_ok and not reader.in_message:
        forwarder = Forwarder(
            flow, masked=reader.masked, max_message=reader.max_message, rsv1_allowed=rsv1_allowed, store_bound=store_bound
        )
        src.receive = BytePump(src, dst, forwarder, reply).data_received
        return reader.take_buffer()
    src.receive = FramePump(src, dst, reader).data_received
    return b""


class Reply:
    """The chat's time to first reply on one session: from a client data frame that follows
    a backend frame (or starts the session) to the backend's next data frame.

    Fed one call per read that carried a data frame (the leg's read timestamp, no parsing);
    each reply goes to `observe` (the backend's histogram) and is kept, up to `KEEP`, for the
    session's log line.
    """

    __slots__ = ("observe", "asked_at", "times")
    KEEP = 1000

    def __init__(self, observe: Callable[[float], None]) -> None:
        self.observe = observe
        self.asked_at: float | None = None
        self.times: list[float] = []

    def seen(self, src: Leg) -> None:
        if src.is_client:
            if self.asked_at is None:
                self.asked_at = src.last_read
        elif self.asked_at is not None:
            took = src.last_read - self.asked_at
            self.asked_at = None
            self.observe(took)
            if len(self.times) < self.KEEP:
                self.times.append(took)

    def summary(self) -> tuple[float | None, float | None]:
        """(median, maximum) in seconds, None without a reply."""
        if not self.times:
            return None, None
        ordered = sorted(self.times)
        return ordered[len(ordered) // 2], ordered[-1]


class BytePump:
    """One direction of the byte relay: `src`'s frames go to `dst` through a `Forwarder`."""

    __slots__ = ("src", "dst", "forwarder", "reply", "_write", "_closing")

    def __init__(self, src: Leg, dst: Leg, forwarder: Forwarder, reply: Reply) -> None:
        self.src = src
        self.dst = dst
        self.forwarder = forwarder
        self.reply = reply
        assert dst.transport is not None
        self._write = dst.transport.write
        # uvloop raises on a write to a transport closed by either side before connection_lost
        # runs (asyncio drops it): ask the transport, not only the leg.
        self._closing = dst.transport.is_closing
        dst.feeder = self

    @property
    def mid_frame(self) -> bool:
        return self.forwarder.mid_frame

    def data_received(self, data: bytes) -> None:
        dst = self.dst
        forwarder = self.forwarder
        # Nothing goes to a socket that is gone, nor, once the gateway has closed `dst`, anything
        # but the end of a frame it was half-way through: its close waits behind that (`Leg.send_own`).
        finishing = dst.close_sent and dst.deferred and forwarder.mid_frame and not self._closing()
        frames = forwarder.counts.frames
        pieces = forwarder.feed(data)
        if forwarder.counts.frames != frames:
            self.reply.seen(self.src)
        if finishing and pieces and type(pieces[0]) is not tuple:
            self._write(pieces[0])  # type: ignore[arg-type]
            pieces = pieces[1:]
        if len(pieces) == 1 and type(pieces[0]) is not tuple:
            if not dst.close_sent and not self._closing():
                self._write(pieces[0])  # type: ignore[arg-type]
        elif pieces:
            self._deliver(pieces)
        if forwarder.error is not None and not self.src.close_received:
            self.src.owner.protocol_error(self.src, forwarder.error)
            return
        if dst.deferred and not forwarder.mid_frame:
            dst.flush_deferred()

    def _deliver(self, pieces: list[Piece]) -> None:
        """Write the data in one go between control frames, and hand each control frame over in order."""
        src = self.src
        data: list[Piece] = []
        for piece in pieces:
            if type(piece) is tuple:
                if data:
                    self._send(data)
                    data = []
                if src.close_received:
                    return  # nothing counts after the peer's close frame
                opcode, payload = piece
                src.owner.control(src, opcode, payload)
            else:
                data.append(piece)
        if data and not src.close_received:
            self._send(data)

    def _send(self, data: list[Piece]) -> None:
        if not self.dst.close_sent and not self._closing():
            self._write(data[0] if len(data) == 1 else b"".join(data))  # type: ignore[arg-type]


class FramePump:
    """One direction of the frame relay: `src`'s messages are parsed and written anew to `dst`."""

    __slots__ = ("src", "dst", "reader")

    mid_frame = False

    def __init__(self, src: Leg, dst: Leg, reader: MessageReader) -> None:
        self.src = src
        self.dst = dst
        self.reader = reader
        dst.feeder = self

    def data_received(self, data: bytes) -> None:
        self.deliver(self.reader.feed(data))

    def deliver(self, events: list[Event]) -> None:
        src = self.src
        for event in events:
            if src.close_received:
                return
            if type(event) is Message:
                src.owner.relay_message(src, event.data)
            elif type(event) is Close:
                src.owner.control(src, CLOSE, _close_payload(event))
            elif type(event) is Ping:
                src.owner.control(src, PING, event.payload)
            elif type(event) is Pong:
                src.owner.control(src, PONG, event.payload)
        if self.reader.error is not None and not src.close_received:
            src.owner.protocol_error(src, self.reader.error)


def _close_payload(event: Close) -> bytes:
    """A parsed close back into its payload, so both pumps hand the owner the same thing."""
    if event.code is None:
        return b""
    return event.code.to_bytes(2, "big") + event.reason.encode("utf-8")

