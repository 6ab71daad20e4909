"""The byte relay's view of one direction's frames: checked, never reassembled.

A module apart from `frames` because it is the hot path: every byte a relaying session
carries goes through `Forwarder.feed`, which must check every frame as `frames.MessageReader`
would (masking, reserved bits, fragments, size, UTF-8 of text across fragments) without
reassembling messages. It takes out the control frames the relay handles itself and writes
data frames anew only where it must: towards a backend each frame is re-masked with a fresh
key; a header that is not in its minimal form is rewritten; anything else passes as the
bytes that arrived.
"""

from __future__ import annotations

import codecs
from typing import Union

# aiohttp's compiled XOR: see `frames`.
from aiohttp._websocket.helpers import websocket_mask

from ..core import closecodes
from .frames import (
    BINARY,
    CLOSE,
    CONTINUATION,
    FIN_BIT,
    MASK_BIT,
    RSV1_BIT,
    TEXT,
    Header,
    ProtocolError,
    apply_mask,
    head,
    masking_keys,
    parse_header,
)


class Counts:
    """Frames and payload bytes one direction carried; read by the metrics at scrape time."""

    __slots__ = ("frames", "bytes")

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0


_WHOLE_TEXT = FIN_BIT | TEXT  # the first header byte of a message in one frame, no reserved bits
_WHOLE_BINARY = FIN_BIT | BINARY

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
        "_key_in", "_key_out", "_offset", "_fin", "_in_message", "_message_size", "_text", "_decoder", "_small",
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
        self._small = min(125, store_bound, max_message)  # the largest frame `feed` checks inline

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
            masked = self.masked
            mask_bit = MASK_BIT if masked else 0
            small = self._small
            counts = self.counts
            while position < size:
                # The common chat frame, checked inline as parse_header and _begin would check it
                # (a call and a tuple per frame were most of the relay's CPU): a whole text or
                # binary message in one frame of at most 125 bytes, no reserved bits, masked as
                # this direction must be.
                if size - position >= 2 and not self._in_message:
                    first = data[position]
                    second = data[position + 1]
                    length = second & 0x7F
                    if (first == _WHOLE_TEXT or first == _WHOLE_BINARY) and length <= small and second & MASK_BIT == mask_bit:
                        start = position + (6 if masked else 2)
                        end = start + length
                        if end <= size:
                            if masked:
                                buffer = bytearray(data[start:end])
                                websocket_mask(data[position + 2 : start], buffer)
                                if first == _WHOLE_TEXT:
                                    _whole_text(buffer)
                                key = masking_keys.take()
                                websocket_mask(key, buffer)
                                out.append(b"".join((bytes((first, MASK_BIT | length)), key, buffer)))
                            else:
                                if first == _WHOLE_TEXT:
                                    _whole_text(data[start:end])
                                if run < 0:
                                    run = position
                            counts.frames += 1
                            counts.bytes += length
                            position = end
                            continue
                header = parse_header(data, position, masked=masked)
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
        if self._decoder is None:
            _whole_text(text)
            return
        try:
            self._decoder.decode(text, final)
        except UnicodeDecodeError:
            raise ProtocolError(closecodes.INVALID_PAYLOAD, "text frame is not UTF-8") from None

    def _rewrite(self, header: Header, payload: bytes) -> bytes:
        """A whole stored frame, checked, under a minimal header (re-masked when from a client)."""
        first = (FIN_BIT if header.fin else 0) | (RSV1_BIT if header.rsv1 else 0) | header.opcode
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
        return b"".join((head(first, header.length, MASK_BIT), key, buffer))

    def _cut_through(self, header: Header) -> bytes:
        """The header of a frame too big to store, written before its payload has arrived."""
        first = (FIN_BIT if header.fin else 0) | (RSV1_BIT if header.rsv1 else 0) | header.opcode
        self._skip = header.length
        self._offset = 0
        self._fin = header.fin
        if not self.masked:
            return head(first, header.length, 0)
        self._key_in = header.key
        self._key_out = masking_keys.take()
        return head(first, header.length, MASK_BIT) + self._key_out

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


def _whole_text(text: bytes | bytearray | memoryview) -> None:
    """Check a text message that is all here as UTF-8 (the C decoder; the str it makes is dropped)."""
    try:
        _utf8_decode(text, "strict", True)
    except UnicodeDecodeError:
        raise ProtocolError(closecodes.INVALID_PAYLOAD, "text frame is not UTF-8") from None


def _minimal_size(length: int) -> int:
    """The size of an unmasked header in its minimal form for a payload of `length` bytes."""
    return 2 if length < 126 else 4 if length < 1 << 16 else 10
