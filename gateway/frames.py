"""RFC 6455 framing, with no I/O: frame headers, masking, message reassembly, close frames.

Two readers share the header rules:

* `MessageReader` parses every frame of one direction: it unmasks, reassembles fragments,
  inflates permessage-deflate messages (`Inflater`), validates UTF-8, and yields whole
  messages and control frames. It serves the handshake phase and the frame relay.
* `Forwarder` carries one direction of the byte relay: it checks every frame as
  `MessageReader` would (masking, reserved bits, fragments, size, UTF-8 of text across
  fragments) without reassembling messages, takes out the control frames the relay
  handles itself, and writes data frames anew only where it must: towards a backend each
  frame is re-masked with a fresh key; a header that is not in its minimal form is
  rewritten; anything else passes as the bytes that arrived.

Both raise `ProtocolError` with the close code the offending leg gets (1002, 1007, 1009).
Which side must mask is a parameter: clients mask, servers do not (RFC 6455 §5.1).
"""

from __future__ import annotations

import codecs
import os
import struct
from dataclasses import dataclass
from typing import NamedTuple, Union

# aiohttp's compiled XOR (Cython, in place on a bytearray): 20 to 40 times faster than
# Python big-int arithmetic from 64 B to 64 KiB, and what aiohttp's own writer masks with.
from aiohttp._websocket.helpers import websocket_mask

from . import closecodes
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

_FIN = 0x80
_RSV1 = 0x40
_RSV23 = 0x30
_MASK = 0x80


class ProtocolError(Exception):
    """The peer broke RFC 6455 (or a limit): close its leg with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


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
    first = (_FIN if fin else 0) | (_RSV1 if rsv1 else 0) | opcode
    if not mask:
        return head(first, len(payload), 0) + payload
    key = masking_keys.take()
    buffer = bytearray(payload)
    websocket_mask(key, buffer)
    return b"".join((head(first, len(payload), _MASK), key, buffer))


def encode_close(code: int, reason: str, *, mask: bool) -> bytes:
    code, reason = closecodes.sendable(code, reason)
    return encode(CLOSE, struct.pack("!H", code) + reason.encode("utf-8"), mask=mask)


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """(code, reason) of a close frame's payload; None for an empty one.

    A one-byte payload, a reason that is not UTF-8, or a code that may not appear on the
    wire (RFC 6455 §7.4) is a protocol error.
    """
    if not payload:
        return None, ""
    if len(payload) < 2:
        raise ProtocolError(closecodes.PROTOCOL_ERROR, "close frame with a one-byte payload")
    (code,) = struct.unpack("!H", payload[:2])
    if code not in closecodes.SENDABLE:
        raise ProtocolError(closecodes.PROTOCOL_ERROR, "invalid close code")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(closecodes.INVALID_PAYLOAD, "close reason is not UTF-8") from None
    return code, reason


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
    is_masked = (second & _MASK) != 0
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
    fin = (first & _FIN) != 0
    if opcode >= CLOSE:
        if opcode not in CONTROL_OPCODES:
            raise ProtocolError(closecodes.PROTOCOL_ERROR, "unknown opcode")
        if not fin or length > MAX_CONTROL_PAYLOAD:
            raise ProtocolError(closecodes.PROTOCOL_ERROR, "control frame fragmented or over 125 bytes")
        if first & _RSV1:
            raise ProtocolError(closecodes.PROTOCOL_ERROR, "reserved bit set on a control frame")
    elif opcode > BINARY:
        raise ProtocolError(closecodes.PROTOCOL_ERROR, "unknown opcode")
    return Header(fin, (first & _RSV1) != 0, opcode, is_masked, length, size, key)


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


# -- the byte relay's view -----------------------------------------------------------------------


class Counts:
    """Frames and payload bytes one direction carried; read by the metrics at scrape time."""

    __slots__ = ("frames", "bytes")

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0


Piece = Union[bytes, bytearray, memoryview, tuple[int, bytes]]
"""What `Forwarder.feed` found, in stream order: bytes to write to the other leg as they
are, or a control frame, (opcode, unmasked payload), for the relay to handle."""

_utf8_decode = codecs.utf_8_decode
_Utf8 = codecs.getincrementaldecoder("utf-8")


class Forwarder:
    """One direction of the byte relay: every frame checked, written anew only where it must be.

    * Control frames are taken out of the stream (held until whole) for the relay.
    * A data frame of up to `store_bound` payload bytes is forwarded once it has arrived
      whole (store and forward), so a peer that vanishes mid-frame leaves the other leg
      between two frames, where a close frame can still follow. A larger frame is cut
      through: its header goes out at once, its payload as it arrives (`mid_frame`).
    * Text is validated as UTF-8 across fragments and reads, by CPython's C decoder, and
      a frame that fails is never forwarded (a cut-through one is stopped where it fails).
      Compressed (RSV1) messages pass unvalidated: only the receiver's inflater sees their text.
    * `masked` (the source is a client): every payload is unmasked, checked, and re-masked
      with a fresh key under a minimal header, since on the backend leg the gateway is the
      sender (RFC 6455 §5.2, §5.3). Otherwise (a backend's frames to a client) a run of
      frames whose headers are minimal passes as the bytes that arrived.

    After a `ProtocolError` the feed stops at the offending frame: `error` holds it, and
    what came before is still returned, so nothing the peer sent correctly is lost.
    """

    __slots__ = (
        "masked", "max_message", "rsv1_allowed", "store_bound", "counts", "error", "_carry", "_skip",
        "_key_in", "_key_out", "_offset", "_fin", "_in_message", "_message_size", "_text", "_decoder",
    )

    def __init__(
        self, counts: Counts, *, masked: bool, max_message: int, rsv1_allowed: bool, store_bound: int
    ) -> None:
        self.counts = counts
        self.masked = masked
        self.max_message = max_message
        self.rsv1_allowed = rsv1_allowed
        self.store_bound = store_bound
        self.error: ProtocolError | None = None
        self._carry = b""  # an incomplete header, control frame or stored frame from the last read
        self._skip = 0  # payload bytes of the cut-through frame still to come
        self._key_in = b""  # of the cut-through frame
        self._key_out = b""
        self._offset = 0  # how much of its payload has gone through
        self._fin = False
        self._in_message = False
        self._message_size = 0
        self._text = False  # the current message is uncompressed text: validate it
        self._decoder: codecs.IncrementalDecoder | None = None  # for text that spans frames or reads

    @property
    def mid_frame(self) -> bool:
        """A cut-through frame's header went out and its payload has not all followed: nothing may go in between."""
        return self._skip > 0

    @property
    def owed(self) -> int:
        """Payload bytes of the cut-through frame still to come (0 between frames)."""
        return self._skip

    def feed(self, data: bytes) -> list[Piece]:
        """What to write and what to handle, in order, for the bytes of one read."""
        if self.error is not None:
            return []
        out: list[Piece] = []
        size = len(data)
        position = 0
        try:
            if self._skip:
                taken = min(self._skip, size)
                out.append(self._through(data if taken == size else data[:taken]))
                if taken == size:
                    return out
                position = taken
            if self._carry:
                data = self._carry + data[position:]
                self._carry = b""
                size = len(data)
                position = 0
            run = -1  # where a run of frames that pass as they arrived began
            while position < size:
                header = parse_header(data, position, masked=self.masked)
                if header is None:
                    break
                start = position + header.size
                end = start + header.length
                if header.opcode >= CLOSE:
                    if end > size:
                        break
                    if run >= 0:
                        out.append(data[run:position])
                        run = -1
                    payload = data[start:end]
                    if header.masked:
                        payload = apply_mask(payload, header.key)
                    out.append((header.opcode, payload))
                    position = end
                    continue
                if header.length <= self.store_bound:
                    if end > size:
                        self._check(header)
                        break
                    self._begin(header)
                    if not self.masked and header.size == _minimal_size(header.length):
                        if self._text:
                            self._validate(data[start:end], header.fin)
                        if run < 0:
                            run = position
                    else:
                        if run >= 0:
                            out.append(data[run:position])
                            run = -1
                        out.append(self._rewrite(header, data[start:end]))
                    self._end(header)
                    position = end
                    continue
                self._begin(header)
                if run >= 0:
                    out.append(data[run:position])
                    run = -1
                out.append(self._cut_through(header))
                taken = min(header.length, size - start)
                position = start + taken
                if taken:
                    out.append(self._through(data[start:position]))
                if self._skip:
                    break
        except ProtocolError as exc:
            self.error = exc
            if run >= 0:
                out.append(data[run:position])
            return out
        if run >= 0:
            out.append(data if run == 0 and position == size else data[run:position])
        if position < size:
            self._carry = data[position:]
        return out

    def _check(self, header: Header) -> int:
        """The fragmentation, extension and size rules of a data frame, from its header alone:
        the size of its message so far. Changes nothing, so a stored frame can be checked
        on every read until it is whole."""
        if header.opcode == CONTINUATION:
            if not self._in_message:
                raise ProtocolError(closecodes.PROTOCOL_ERROR, "continuation frame without a message")
            if header.rsv1:
                raise ProtocolError(closecodes.PROTOCOL_ERROR, "RSV1 set on a continuation frame")
            size = self._message_size + header.length
        else:
            if self._in_message:
                raise ProtocolError(closecodes.PROTOCOL_ERROR, "new message before the last one finished")
            if header.rsv1 and not self.rsv1_allowed:
                raise ProtocolError(closecodes.PROTOCOL_ERROR, "RSV1 set without a negotiated extension")
            size = header.length
        if size > self.max_message:
            raise ProtocolError(closecodes.MESSAGE_TOO_BIG, "message too big")
        return size

    def _begin(self, header: Header) -> None:
        """A data frame is being forwarded: count it, and start its message's text check."""
        self._message_size = self._check(header)
        if header.opcode != CONTINUATION:
            self._text = header.opcode == TEXT and not header.rsv1
            if self._text and not (header.fin and header.length <= self.store_bound):
                self._decoder = _Utf8()
            self.counts.frames += 1
        self._in_message = True
        self.counts.bytes += header.length

    def _end(self, header: Header) -> None:
        if header.fin:
            self._in_message = False
            self._decoder = None

    def _validate(self, text: bytes | bytearray | memoryview, final: bool) -> None:
        try:
            if self._decoder is None:
                _utf8_decode(text, "strict", True)
            else:
                self._decoder.decode(text, final)
        except UnicodeDecodeError:
            raise ProtocolError(closecodes.INVALID_PAYLOAD, "text frame is not UTF-8") from None

    def _rewrite(self, header: Header, payload: bytes) -> bytes:
        """A whole stored frame, checked, under a minimal header (re-masked when from a client)."""
        first = (_FIN if header.fin else 0) | (_RSV1 if header.rsv1 else 0) | header.opcode
        if not self.masked:
            if self._text:
                self._validate(payload, header.fin)
            return head(first, header.length, 0) + payload
        buffer = bytearray(payload)
        websocket_mask(header.key, buffer)
        if self._text:
            self._validate(buffer, header.fin)
        key = masking_keys.take()
        websocket_mask(key, buffer)
        return b"".join((head(first, header.length, _MASK), key, buffer))

    def _cut_through(self, header: Header) -> bytes:
        """The header of a frame too big to store, written before its payload has arrived."""
        first = (_FIN if header.fin else 0) | (_RSV1 if header.rsv1 else 0) | header.opcode
        self._skip = header.length
        self._offset = 0
        self._fin = header.fin
        if not self.masked:
            return head(first, header.length, 0)
        self._key_in = header.key
        self._key_out = masking_keys.take()
        return head(first, header.length, _MASK) + self._key_out

    def _through(self, chunk: bytes) -> bytes | bytearray:
        """The next piece of the cut-through frame's payload, checked (and re-masked)."""
        self._skip -= len(chunk)
        last = not self._skip
        final = last and self._fin
        if self.masked:
            turn = self._offset & 3
            buffer = bytearray(chunk)
            websocket_mask(self._key_in[turn:] + self._key_in[:turn], buffer)
            if self._text:
                self._validate(buffer, final)
            websocket_mask(self._key_out[turn:] + self._key_out[:turn], buffer)
            out: bytes | bytearray = buffer
        else:
            if self._text:
                self._validate(chunk, final)
            out = chunk
        self._offset += len(chunk)
        if last and self._fin:
            self._in_message = False
            self._decoder = None
        return out


def _minimal_size(length: int) -> int:
    """The size of an unmasked header in its minimal form for a payload of `length` bytes."""
    return 2 if length < 126 else 4 if length < 1 << 16 else 10
