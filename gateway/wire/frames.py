"""RFC 6455 framing, with no I/O: frame headers, masking, message reassembly, close frames.

`MessageReader` parses every frame of one direction: it unmasks, reassembles fragments,
inflates permessage-deflate messages (`Inflater`), validates UTF-8, and yields whole
messages and control frames. It serves the handshake phase and the frame relay. The byte
relay's reader, `forwarder.Forwarder`, shares the header rules (`parse_header`) but not the
reassembly.

Both raise `ProtocolError` with the close code the offending leg gets (1002, 1007, 1009).
Which side must mask is a parameter: clients mask, servers do not (RFC 6455 §5.1).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import NamedTuple, Union

# aiohttp's compiled XOR (Cython, in place on a bytearray): 20 to 40 times faster than
# Python big-int arithmetic from 64 B to 64 KiB, and what aiohttp's own writer masks with.
from aiohttp._websocket.helpers import websocket_mask

from ..core import closecodes
from ..core.closecodes import ProtocolError as ProtocolError
from ..core.closecodes import parse_close as parse_close
from .deflate import Inflater, InflateError

CONTINUATION = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA
DATA_OPCODES = frozenset({TEXT, BINARY})
CONTROL_OPCODES = frozenset({CLOSE, PING, PONG})
MAX_CONTROL_PAYLOAD = 125
MAX_HEADER = 14

FIN_BIT = 0x80
RSV1_BIT = 0x40
_RSV23 = 0x30
MASK_BIT = 0x80


def apply_mask(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """XOR `data` with the 4-byte `key` (masking and unmasking are the same operation)."""
    buffer = bytearray(data)
    websocket_mask(key, buffer)
    return bytes(buffer)


class _Keys:
    """Masking keys from the OS's CSPRNG, read 1,024 at a time.

    RFC 6455 §5.3 (and §10.3 on why) wants a fresh, unpredictable key for every frame a
    client sends; one `os.urandom` call per frame cost more than masking the frame.
    """

    __slots__ = ("_pool", "_at")

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def take(self) -> bytes:
        at = self._at
        if at >= len(self._pool):
            self._pool = os.urandom(4096)
            at = 0
        self._at = at + 4
        return self._pool[at : at + 4]


masking_keys = _Keys()


def head(first: int, size: int, mask_bit: int) -> bytes:
    """A frame header in its minimal form (RFC 6455 §5.2), without the masking key."""
    if size < 126:
        return struct.pack("!BB", first, mask_bit | size)
    if size < 1 << 16:
        return struct.pack("!BBH", first, mask_bit | 126, size)
    return struct.pack("!BBQ", first, mask_bit | 127, size)


def encode(opcode: int, payload: bytes, *, mask: bool, fin: bool = True, rsv1: bool = False) -> bytes:
    """One frame; masked with a fresh random key when `mask` (frames a client sends)."""
    first = (FIN_BIT if fin else 0) | (RSV1_BIT if rsv1 else 0) | opcode
    if not mask:
        return head(first, len(payload), 0) + payload
    key = masking_keys.take()
    buffer = bytearray(payload)
    websocket_mask(key, buffer)
    return b"".join((head(first, len(payload), MASK_BIT), key, buffer))


def encode_close(code: int, reason: str, *, mask: bool) -> bytes:
    code, reason = closecodes.sendable(code, reason)
    return encode(CLOSE, struct.pack("!H", code) + reason.encode("utf-8"), mask=mask)


class Header(NamedTuple):
    """One frame's header. A tuple: the byte relay builds one per frame, and a frozen
    dataclass's __init__ cost a fifth of its CPU under load (py-spy)."""

    fin: bool
    rsv1: bool
    opcode: int
    masked: bool
    length: int
    size: int
    """Header bytes, mask key included."""
    key: bytes


def parse_header(data: bytes | bytearray | memoryview, start: int, *, masked: bool) -> Header | None:
    """The frame header at `data[start:]`, or None when it is not complete yet.

    Checks what a header alone can break: reserved bits (RSV1 is the deflate extension's,
    checked by the caller), unknown opcodes, control frames that are fragmented or too
    long, lengths over 2**63, and the masking rule for this direction.
    """
    available = len(data) - start
    if available < 2:
        return None
    first = data[start]
    second = data[start + 1]
    length = second & 0x7F
    size = 2
    if length == 126:
        size = 4
        if available < size:
            return None
        length = (data[start + 2] << 8) | data[start + 3]
    elif length == 127:
        size = 10
        if available < size:
            return None
        (length,) = struct.unpack_from("!Q", data, start + 2)
        if length >> 63:
            raise ProtocolError(closecodes.PROTOCOL_ERROR, "frame length over 2**63")
    is_masked = (second & MASK_BIT) != 0
    key = b""
    if is_masked:
        if available < size + 4:
            return None
        key = bytes(data[start + size : start + size + 4])
        size += 4
    if is_masked is not masked:
        raise ProtocolError(
            closecodes.PROTOCOL_ERROR, "client frames must be masked" if masked else "server frames must not be masked"
        )
    if first & _RSV23:
        raise ProtocolError(closecodes.PROTOCOL_ERROR, "reserved bits set")
    opcode = first & 0x0F
    fin = (first & FIN_BIT) != 0
    if opcode >= CLOSE:
        if opcode not in CONTROL_OPCODES:
            raise ProtocolError(closecodes.PROTOCOL_ERROR, "unknown opcode")
        if not fin or length > MAX_CONTROL_PAYLOAD:
            raise ProtocolError(closecodes.PROTOCOL_ERROR, "control frame fragmented or over 125 bytes")
        if first & RSV1_BIT:
            raise ProtocolError(closecodes.PROTOCOL_ERROR, "reserved bit set on a control frame")
    elif opcode > BINARY:
        raise ProtocolError(closecodes.PROTOCOL_ERROR, "unknown opcode")
    return Header(fin, (first & RSV1_BIT) != 0, opcode, is_masked, length, size, key)


# -- events a MessageReader yields ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """A whole data message: `str` for text, `bytes` for binary."""

    data: str | bytes


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    code: int | None
    reason: str


Event = Union[Message, Ping, Pong, Close]


class MessageReader:
    """Parses one direction's bytes into whole messages and control frames.

    `masked`: frames from this peer must be masked (it is a client). `max_message`:
    the largest message in bytes, after inflating (1009 past it). `inflater`: set when
    permessage-deflate was negotiated on this leg; RSV1 frames are then compressed.
    """

    def __init__(self, *, masked: bool, max_message: int, inflater: Inflater | None = None) -> None:
        self.masked = masked
        self.max_message = max_message
        self.inflater = inflater
        self.error: ProtocolError | None = None
        self._buffer = bytearray()
        self._parts: list[bytes] = []
        self._size = 0
        self._opcode: int | None = None  # of the message being reassembled
        self._compressed = False

    @property
    def in_message(self) -> bool:
        """A fragmented message has started and not finished."""
        return self._opcode is not None

    def take_buffer(self) -> bytes:
        """The bytes received but not parsed yet (they start at a frame boundary)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def feed(self, data: bytes) -> list[Event]:
        """The events in what has arrived so far. After a `ProtocolError` the events before
        it are still returned, `error` holds it, and nothing more is parsed."""
        if self.error is not None:
            return []
        buffer = self._buffer
        buffer += data
        events: list[Event] = []
        position = 0
        try:
            while True:
                header = parse_header(buffer, position, masked=self.masked)
                if header is None:
                    break
                if header.opcode < CLOSE:
                    self._check_size(header)
                if len(buffer) - position < header.size + header.length:
                    break
                start = position + header.size
                payload = bytes(buffer[start : start + header.length])
                position = start + header.length
                if header.masked:
                    payload = apply_mask(payload, header.key)
                event = self._frame(header, payload)
                if event is not None:
                    events.append(event)
                    if isinstance(event, Close):
                        break
        except ProtocolError as exc:
            self.error = exc
        del buffer[:position]
        return events

    def _check_size(self, header: Header) -> None:
        """Refuse an oversized message from its header, before buffering its payload.

        Compressed payloads get deflate's worst-case expansion as headroom; their exact
        limit is applied to what they inflate to.
        """
        compressed = header.rsv1 if header.opcode != CONTINUATION else self._compressed
        limit = self.max_message + (self.max_message // 64 + 1024 if compressed else 0)
        so_far = self._size if header.opcode == CONTINUATION else 0
        if so_far + header.length > limit:
            raise ProtocolError(closecodes.MESSAGE_TOO_BIG, "message too big")

    def _frame(self, header: Header, payload: bytes) -> Event | None:
        opcode = header.opcode
        if opcode == PING:
            return Ping(payload)
        if opcode == PONG:
            return Pong(payload)
        if opcode == CLOSE:
            code, reason = parse_close(payload)
            return Close(code, reason)
        if opcode == CONTINUATION:
            if self._opcode is None:
                raise ProtocolError(closecodes.PROTOCOL_ERROR, "continuation frame without a message")
            if header.rsv1:
                raise ProtocolError(closecodes.PROTOCOL_ERROR, "RSV1 set on a continuation frame")
        else:
            if self._opcode is not None:
                raise ProtocolError(closecodes.PROTOCOL_ERROR, "new message before the last one finished")
            if header.rsv1 and self.inflater is None:
                raise ProtocolError(closecodes.PROTOCOL_ERROR, "RSV1 set without a negotiated extension")
            self._opcode = opcode
            self._compressed = header.rsv1
        self._size += len(payload)
        if not self._compressed and self._size > self.max_message:
            raise ProtocolError(closecodes.MESSAGE_TOO_BIG, "message too big")
        self._parts.append(payload)
        if not header.fin:
            return None
        data = b"".join(self._parts) if len(self._parts) > 1 else self._parts[0]
        opcode, compressed = self._opcode, self._compressed
        self._parts = []
        self._size = 0
        self._opcode = None
        if compressed:
            assert self.inflater is not None
            try:
                data = self.inflater.inflate(data, self.max_message)
            except InflateError as exc:
                raise ProtocolError(exc.code, exc.reason) from None
        if opcode == TEXT:
            try:
                return Message(data.decode("utf-8"))
            except UnicodeDecodeError:
                raise ProtocolError(closecodes.INVALID_PAYLOAD, "text frame is not UTF-8") from None
        return Message(data)
