"""A client and a backend that decide what goes into each TCP write, for tests of the relay's edges.

Both are built on `websockets`' sans-I/O protocols (an implementation independent of the
gateway's own framing): they parse what they receive, answer pings and close frames as
RFC 6455 asks, and record everything in arrival order. What they *send* is up to the
test: whole frames through the protocol, or any bytes at all (`write`), so a test can put
an upgrade request and fifty frames into one write, or cut a frame in two and send the
second half only once the other side has seen something.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from .helpers import CONNECTED, Frame as Data, authenticate_frame

Entry = tuple[str, Any]
"""What arrived, in order: ("text", str), ("binary", bytes), ("ping", bytes), ("pong", bytes),
("close", (code, reason)) — code None for a close frame without one."""


def frame_bytes(data: Data, *, mask: bool, fin: bool = True, continuation: bool = False) -> bytes:
    """One data frame on the wire (masked: as a client sends it)."""
    if continuation:
        opcode = Opcode.CONT
    else:
        opcode = Opcode.TEXT if isinstance(data, str) else Opcode.BINARY
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return Frame(opcode, payload, fin=fin).serialize(mask=mask)


def control_bytes(opcode: Opcode, payload: bytes, *, mask: bool) -> bytes:
    return Frame(opcode, payload).serialize(mask=mask)


class _Peer:
    """What both ends share: a sans-I/O protocol, a log of what arrived, and a way to wait on it."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        self.log: list[Entry] = []
        self.raw = bytearray()  # every byte received, the HTTP head included, for checks of the wire form
        self.received_bytes = 0
        self.eof = False  # the other side closed the TCP connection (or it broke)
        self._changed = asyncio.Event()
        self._parts: list[bytes] = []
        self._opcode: Opcode | None = None

    @property
    def messages(self) -> list[Data]:
        return [data for kind, data in self.log if kind in ("text", "binary")]

    @property
    def close(self) -> tuple[int | None, str] | None:
        """The close frame that arrived, if one did."""
        return next((data for kind, data in self.log if kind == "close"), None)

    async def until(self, condition: Callable[[], bool]) -> None:
        """Until `condition` holds; re-checked whenever something arrives (bound it with a timeout)."""
        while not condition():
            self._changed.clear()
            await self._changed.wait()

    def _changed_now(self) -> None:
        self._changed.set()

    def _record(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            if opcode is not Opcode.CONT:
                self._opcode = opcode
            self._parts.append(bytes(frame.data))
            if frame.fin:
                data = b"".join(self._parts)
                self._parts = []
                if self._opcode is Opcode.TEXT:
                    self.log.append(("text", data.decode("utf-8")))
                else:
                    self.log.append(("binary", data))
        elif opcode is Opcode.PING:
            self.log.append(("ping", bytes(frame.data)))
        elif opcode is Opcode.PONG:
            self.log.append(("pong", bytes(frame.data)))
        elif opcode is Opcode.CLOSE:
            close = Close.parse(frame.data)
            self.log.append(("close", (None if close.code == 1005 else close.code, close.reason)))


# -- the backend --------------------------------------------------------------------------------


class WireBackend:
    """A backend on a free loopback port whose every write a test controls.

    style "query": `first` frames go out in the same write as the 101. Style "message":
    the first data frame is the authenticate frame; `greeting` and `first` go out in one
    write right after it. Later data frames are echoed when `echo`. `sndbuf` sets a small
    kernel send buffer on each accepted socket (so its writes block early).
    """

    def __init__(
        self,
        style: str = "query",
        *,
        greeting: Data = CONNECTED,
        first: Iterable[Data] = (),
        echo: bool = True,
        sndbuf: int | None = None,
    ) -> None:
        self.style = style
        self.greeting = greeting
        self.first = list(first)
        self.echo = echo
        self.sndbuf = sndbuf
        self.port = 0
        self.sockets: list[BackendWire] = []
        self._opened: asyncio.Queue[BackendWire] = asyncio.Queue()
        self._server: asyncio.Server | None = None

    async def start(self) -> WireBackend:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: BackendWire(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def next_socket(self) -> BackendWire:
        """The next upstream socket, once its 101 is written."""
        return await self._opened.get()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for sock in self.sockets:
            if sock.transport is not None and not sock.lost:
                sock.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()


class BackendWire(asyncio.Protocol, _Peer):
    """One upstream socket as a `WireBackend` sees it."""

    def __init__(self, backend: WireBackend) -> None:
        _Peer.__init__(self, ServerProtocol(max_size=None))
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.auth_frame: Data | None = None
        self.ready = False
        self.paused = False  # its transport's buffer is over the high-water mark: the gateway is not reading
        self.held = False
        self.lost = False
        self.stream_sent = 0
        self._stream: tuple[int, Callable[[int], bytes]] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.backend.sndbuf is not None:
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.backend.sndbuf)

    def data_received(self, data: bytes) -> None:
        self.received_bytes += len(data)
        self.raw += data
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Request):
                assert isinstance(protocol, ServerProtocol)
                protocol.send_response(protocol.accept(event))
                self.backend.sockets.append(self)
                self.backend._opened.put_nowait(self)
                if self.backend.style == "query":
                    self.ready = True
                    self._queue(self.backend.first)
            elif isinstance(event, Frame):
                self._frame(event)
        self.flush()
        self._changed_now()

    def _frame(self, frame: Frame) -> None:
        before = len(self.log)
        self._record(frame)
        if len(self.log) == before or self.log[-1][0] not in ("text", "binary"):
            return
        data = self.log[-1][1]
        if not self.ready:  # the authenticate frame of a message-style backend
            self.log.pop()
            self.auth_frame = data
            self.ready = True
            self._queue([self.backend.greeting, *self.backend.first])
        elif self.backend.echo and self.protocol.state is State.OPEN:  # not once it sent a close
            self._queue([data])

    def eof_received(self) -> None:
        self.protocol.receive_eof()
        self.flush()
        self.eof = True
        self._changed_now()

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = self.lost = True
        self._changed_now()

    def pause_writing(self) -> None:
        self.paused = True
        self._changed_now()

    def resume_writing(self) -> None:
        self.paused = False
        self._changed_now()
        self._pump()

    # writing

    def _queue(self, frames: Iterable[Data]) -> None:
        for data in frames:
            if isinstance(data, str):
                self.protocol.send_text(data.encode("utf-8"))
            else:
                self.protocol.send_binary(data)

    def flush(self) -> None:
        """Write whatever the protocol has to send, in one write; its end of stream closes the socket.

        While `held`, nothing the protocol says goes out (its answers to pings and close
        frames included) until `release()`; `write()` still does.
        """
        assert self.transport is not None
        if self.held:
            return
        writes = self.protocol.data_to_send()
        data = b"".join(writes)
        if data and not self.transport.is_closing():
            self.transport.write(data)
        if b"" in writes:
            self.transport.close()

    def send(self, *frames: Data) -> None:
        """Data frames, in one write."""
        self._queue(frames)
        self.flush()

    def hold(self) -> None:
        self.held = True

    def release(self) -> None:
        self.held = False
        self.flush()

    def write(self, data: bytes) -> None:
        """Any bytes at all (half a frame, say): the protocol does not know about them."""
        assert self.transport is not None
        self.transport.write(data)

    def send_close(self, code: int | None, reason: str = "") -> None:
        self.protocol.send_close(code, reason)
        self.flush()

    def send_ping(self, payload: bytes) -> None:
        self.protocol.send_ping(payload)
        self.flush()

    def stream(self, count: int, payload: Callable[[int], bytes]) -> None:
        """Send binary frames payload(0) .. payload(count - 1) as fast as the gateway takes them:
        write while the transport is under its high-water mark, go on when it drains."""
        self._stream = (count, payload)
        self._pump()

    def stream_until(self, count: int) -> None:
        """Change how many frames the stream sends in all."""
        assert self._stream is not None
        self._stream = (count, self._stream[1])
        self._pump()

    def _pump(self) -> None:
        if self._stream is None or self.transport is None:
            return
        count, payload = self._stream
        while not self.paused and self.stream_sent < count and self.protocol.state is State.OPEN:
            self.protocol.send_binary(payload(self.stream_sent))
            self.stream_sent += 1
            self.flush()
        self._changed_now()


# -- the client ---------------------------------------------------------------------------------


class WireClient(_Peer):
    """A client socket whose writes a test controls; what the gateway sends is parsed and logged."""

    def __init__(self, protocol: ClientProtocol, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(protocol)
        self.reader = reader
        self.writer = writer
        self.response: Response | None = None
        self.held = False
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, *, then: bytes = b"") -> WireClient:
        """Connect and send the upgrade request followed by `then` in the same write; returns once the 101 is read."""
        uri = parse_uri(url)
        protocol = ClientProtocol(uri, max_size=None)
        protocol.send_request(protocol.connect())
        reader, writer = await asyncio.open_connection(uri.host, uri.port)
        client = cls(protocol, reader, writer)
        writer.write(b"".join(protocol.data_to_send()) + then)
        await client.until(lambda: client.response is not None or client.eof)
        assert client.response is not None and client.response.status_code == 101, client.response
        return client

    async def _read(self) -> None:
        protocol = self.protocol
        try:
            while data := await self.reader.read(65536):
                self.received_bytes += len(data)
                self.raw += data
                protocol.receive_data(data)
                for event in protocol.events_received():
                    if isinstance(event, Response):
                        self.response = event
                    elif isinstance(event, Frame):
                        self._record(event)
                self._flush()
                self._changed_now()
        except ConnectionError:
            pass
        finally:
            protocol.receive_eof()
            self.eof = True
            self._changed_now()

    def _flush(self) -> None:
        if self.held:
            return
        writes = self.protocol.data_to_send()
        data = b"".join(writes)
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def hold(self) -> None:
        """Send none of the protocol's own answers (pongs, the echo of a close) until `release()`."""
        self.held = True

    def release(self) -> None:
        self.held = False
        self._flush()

    def write(self, data: bytes) -> None:
        """Any bytes at all; frames must be masked (`frame_bytes(..., mask=True)`)."""
        self.writer.write(data)

    def send(self, *frames: Data) -> None:
        """Data frames, in one write."""
        self.write(b"".join(frame_bytes(data, mask=True) for data in frames))

    def send_close(self, code: int | None, reason: str = "") -> None:
        self.protocol.send_close(code, reason)
        self._flush()

    def reset(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), as a crashed or killed app does."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def aclose(self) -> None:
        if not self.writer.transport.is_closing():
            self.writer.transport.abort()
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


def authenticate_bytes(token: str) -> bytes:
    return frame_bytes(authenticate_frame(token), mask=True)
