"""RFC 6455 framing without sockets: headers, the masking rule, reassembly, close payloads, and
the byte relay's forwarder fed the same streams cut at every possible place.

Frames are built here byte by byte (`wire_frame`), not with the module's own encoder, so a
mistake in one is not hidden by the same mistake in the other.
"""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from gateway.wire.deflate import Inflater
from gateway.wire.forwarder import Counts, Forwarder
from gateway.wire.frames import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    Close,
    Message,
    MessageReader,
    Ping,
    Pong,
    ProtocolError,
    apply_mask,
    encode,
    encode_close,
    parse_close,
    parse_header,
)

KEY = b"\x37\xfa\x21\x3d"


def wire_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    key: bytes | None = None,
    length: int | None = None,
) -> bytes:
    """A frame as RFC 6455 section 5.2 lays it out; `key` masks it; `length` overrides the length field."""
    size = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    mask_bit = 0x80 if key is not None else 0
    if size < 126:
        head = bytes([first, mask_bit | size])
    elif size < 1 << 16:
        head = bytes([first, mask_bit | 126]) + struct.pack("!H", size)
    else:
        head = bytes([first, mask_bit | 127]) + struct.pack("!Q", size)
    if key is None:
        return head + payload
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


def client_frame(opcode: int, payload: bytes = b"", **kwargs: object) -> bytes:
    return wire_frame(opcode, payload, key=KEY, **kwargs)  # type: ignore[arg-type]


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def error_of(reader: MessageReader, data: bytes) -> ProtocolError:
    reader.feed(data)
    assert reader.error is not None
    return reader.error


# -- masking and encoding ----------------------------------------------------------------------


def test_masking_twice_with_the_same_key_gives_the_payload_back() -> None:
    payload = bytes(range(256)) * 3 + b"tail"
    masked = apply_mask(payload, KEY)
    assert masked != payload
    assert masked == bytes(b ^ KEY[i % 4] for i, b in enumerate(payload))
    assert apply_mask(masked, KEY) == payload
    assert apply_mask(b"", KEY) == b""


@pytest.mark.parametrize(("size", "length_bytes"), [(0, 0), (125, 0), (126, 2), (65535, 2), (65536, 8)])
def test_encode_picks_the_7_16_or_64_bit_length(size: int, length_bytes: int) -> None:
    payload = b"p" * size
    assert encode(BINARY, payload, mask=False) == wire_frame(BINARY, payload)
    frame = encode(BINARY, payload, mask=False)
    assert len(frame) == 2 + length_bytes + size


def test_encode_masks_client_frames_with_a_fresh_key_and_sets_fin_and_rsv1() -> None:
    one, two = encode(TEXT, b"hello", mask=True), encode(TEXT, b"hello", mask=True)
    assert one[1] & 0x80 and len(one) == 2 + 4 + 5
    assert one[2:6] != two[2:6] or one[6:] != two[6:]  # keys differ (all but certainly)
    assert apply_mask(one[6:], one[2:6]) == b"hello"
    assert encode(TEXT, b"x", mask=False, fin=False, rsv1=True)[0] == 0x40 | TEXT


def test_encode_close_sends_only_legal_codes_and_reasons_of_at_most_123_bytes() -> None:
    assert encode_close(4001, "x", mask=False) == wire_frame(CLOSE, close_payload(4001, b"x"))
    assert encode_close(1006, "lost", mask=False) == wire_frame(CLOSE, close_payload(1011, b"lost"))
    frame = encode_close(1000, "\u00e9" * 100, mask=False)
    assert frame == wire_frame(CLOSE, close_payload(1000, "\u00e9".encode() * 61))  # 125 bytes: a legal control frame


# -- parse_header ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "header_size"), [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10), (2**32 + 7, 10)])
def test_header_reads_7_16_and_64_bit_lengths(size: int, header_size: int) -> None:
    head = wire_frame(BINARY, b"", length=size)
    header = parse_header(head, 0, masked=False)
    assert header is not None
    assert (header.length, header.size, header.opcode, header.fin, header.masked) == (size, header_size, BINARY, True, False)


def test_header_of_a_masked_frame_includes_its_key() -> None:
    header = parse_header(client_frame(TEXT, b"abc"), 0, masked=True)
    assert header is not None
    assert (header.size, header.key, header.masked, header.length) == (6, KEY, True, 3)


@pytest.mark.parametrize("size", [5, 300, 70000])
@pytest.mark.parametrize("masked", [False, True])
def test_header_is_none_until_every_byte_of_it_has_arrived(size: int, masked: bool) -> None:
    frame = wire_frame(BINARY, b"x" * size, key=KEY if masked else None)
    whole = parse_header(frame, 0, masked=masked)
    assert whole is not None
    for cut in range(whole.size):
        assert parse_header(frame[:cut], 0, masked=masked) is None
    assert parse_header(frame[: whole.size], 0, masked=masked) == whole


def test_header_is_read_at_the_offset_given() -> None:
    data = b"junk" + wire_frame(PING, b"hi")
    header = parse_header(data, 4, masked=False)
    assert header is not None and (header.opcode, header.length) == (PING, 2)


def test_length_with_the_most_significant_bit_set_is_refused() -> None:
    head = bytes([0x82, 127]) + struct.pack("!Q", 1 << 63)
    with pytest.raises(ProtocolError) as caught:
        parse_header(head, 0, masked=False)
    assert caught.value.code == 1002


def test_client_frames_must_be_masked_and_server_frames_must_not() -> None:
    with pytest.raises(ProtocolError, match="must be masked") as caught:
        parse_header(wire_frame(TEXT, b"x"), 0, masked=True)
    assert caught.value.code == 1002
    with pytest.raises(ProtocolError, match="must not be masked") as caught:
        parse_header(client_frame(TEXT, b"x"), 0, masked=False)
    assert caught.value.code == 1002


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_reserved_opcodes_are_refused(opcode: int) -> None:
    with pytest.raises(ProtocolError, match="unknown opcode") as caught:
        parse_header(wire_frame(opcode, b""), 0, masked=False)
    assert caught.value.code == 1002


@pytest.mark.parametrize("rsv", [0b010, 0b001, 0b011, 0b111])
def test_rsv2_and_rsv3_are_refused(rsv: int) -> None:
    with pytest.raises(ProtocolError, match="reserved bits") as caught:
        parse_header(wire_frame(TEXT, b"x", rsv=rsv), 0, masked=False)
    assert caught.value.code == 1002


def test_rsv1_is_left_to_the_caller_on_data_frames_and_refused_on_control_frames() -> None:
    header = parse_header(wire_frame(TEXT, b"x", rsv=0b100), 0, masked=False)
    assert header is not None and header.rsv1
    with pytest.raises(ProtocolError, match="control frame"):
        parse_header(wire_frame(PING, b"x", rsv=0b100), 0, masked=False)


@pytest.mark.parametrize("opcode", [CLOSE, PING, PONG])
def test_control_frames_over_125_bytes_or_fragmented_are_refused(opcode: int) -> None:
    assert parse_header(wire_frame(opcode, b"x" * 125), 0, masked=False) is not None
    with pytest.raises(ProtocolError) as caught:
        parse_header(wire_frame(opcode, b"x" * 126), 0, masked=False)
    assert caught.value.code == 1002
    with pytest.raises(ProtocolError) as caught:
        parse_header(wire_frame(opcode, b"x", fin=False), 0, masked=False)
    assert caught.value.code == 1002


# -- close payloads ----------------------------------------------------------------------------------


def test_close_payload_gives_code_and_reason_and_none_when_empty() -> None:
    assert parse_close(b"") == (None, "")
    assert parse_close(close_payload(1000)) == (1000, "")
    assert parse_close(close_payload(4999, "\u00e9t\u00e9".encode())) == (4999, "\u00e9t\u00e9")


def test_close_payload_of_one_byte_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_close(b"\x03")
    assert caught.value.code == 1002


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_close_payload_with_a_code_that_may_not_be_sent_is_a_protocol_error(code: int) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_close(close_payload(code))
    assert caught.value.code == 1002


def test_close_reason_that_is_not_utf8_is_invalid_payload() -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_close(close_payload(1000, b"\xc3\x28"))
    assert caught.value.code == 1007


# -- MessageReader -----------------------------------------------------------------------------------


def reader(*, masked: bool = True, max_message: int = 1000, inflater: Inflater | None = None) -> MessageReader:
    return MessageReader(masked=masked, max_message=max_message, inflater=inflater)


def test_reader_yields_text_as_str_and_binary_as_bytes_unmasked() -> None:
    events = reader().feed(client_frame(TEXT, "h\u00e9".encode()) + client_frame(BINARY, b"\x00\xff"))
    assert events == [Message("h\u00e9"), Message(b"\x00\xff")]


def test_reader_of_server_frames_reads_them_unmasked() -> None:
    assert reader(masked=False).feed(wire_frame(TEXT, b"hi")) == [Message("hi")]


def test_fragments_are_reassembled_into_one_message_even_when_a_character_spans_two() -> None:
    text = "\u20ac uro".encode()  # the euro sign is three bytes: cut after the first
    r = reader()
    assert r.feed(client_frame(TEXT, text[:1], fin=False)) == []
    assert r.in_message
    assert r.feed(client_frame(CONTINUATION, text[1:4], fin=False)) == []
    assert r.feed(client_frame(CONTINUATION, text[4:])) == [Message("\u20ac uro")]
    assert not r.in_message


def test_control_frames_between_fragments_come_out_first_in_arrival_order() -> None:
    data = (
        client_frame(BINARY, b"ab", fin=False)
        + client_frame(PING, b"p")
        + client_frame(CONTINUATION, b"cd", fin=False)
        + client_frame(PONG, b"q")
        + client_frame(CONTINUATION, b"ef")
    )
    assert reader().feed(data) == [Ping(b"p"), Pong(b"q"), Message(b"abcdef")]


def test_a_stream_fed_one_byte_at_a_time_gives_the_same_events() -> None:
    data = (
        client_frame(TEXT, b"one")
        + client_frame(BINARY, b"x" * 300, fin=False)
        + client_frame(PING, b"")
        + client_frame(CONTINUATION, b"y" * 70000)
        + client_frame(CLOSE, close_payload(4000, b"bye"))
    )
    expected = [Message("one"), Ping(b""), Message(b"x" * 300 + b"y" * 70000), Close(4000, "bye")]
    assert reader(max_message=100_000).feed(data) == expected
    r = reader(max_message=100_000)
    events = []
    for i in range(len(data)):
        events += r.feed(data[i : i + 1])
    assert events == expected


def test_continuation_without_a_message_is_a_protocol_error() -> None:
    assert error_of(reader(), client_frame(CONTINUATION, b"x")).code == 1002


def test_new_message_before_the_last_one_finished_is_a_protocol_error() -> None:
    error = error_of(reader(), client_frame(TEXT, b"a", fin=False) + client_frame(TEXT, b"b"))
    assert error.code == 1002


def test_text_that_is_not_utf8_is_invalid_payload() -> None:
    assert error_of(reader(), client_frame(TEXT, b"\xc3\x28")).code == 1007
    fragmented = client_frame(TEXT, b"ok \xe2\x82", fin=False) + client_frame(CONTINUATION, b"")  # cut character, never finished
    assert error_of(reader(), fragmented).code == 1007


def test_binary_need_not_be_utf8() -> None:
    assert reader().feed(client_frame(BINARY, b"\xc3\x28")) == [Message(b"\xc3\x28")]


def test_close_frames_come_out_with_code_and_reason_and_end_the_batch() -> None:
    r = reader()
    events = r.feed(client_frame(CLOSE, close_payload(4001, b"x")) + client_frame(TEXT, b"after"))
    assert events == [Close(4001, "x")]
    assert reader().feed(client_frame(CLOSE)) == [Close(None, "")]


@pytest.mark.parametrize(
    ("payload", "code"),
    [(b"\x03", 1002), (close_payload(1005), 1002), (close_payload(999), 1002), (close_payload(1000, b"\xff"), 1007)],
    ids=["one-byte", "1005", "999", "reason-not-utf8"],
)
def test_malformed_close_frames_are_refused_with_the_code_that_says_why(payload: bytes, code: int) -> None:
    assert error_of(reader(), client_frame(CLOSE, payload)).code == code


def test_message_of_exactly_max_bytes_passes_and_one_more_is_too_big() -> None:
    assert reader().feed(client_frame(BINARY, b"x" * 1000)) == [Message(b"x" * 1000)]
    assert error_of(reader(), client_frame(BINARY, b"x" * 1001)).code == 1009


def test_fragments_that_add_up_to_more_than_max_bytes_are_too_big() -> None:
    data = client_frame(BINARY, b"x" * 600, fin=False) + client_frame(CONTINUATION, b"y" * 401)
    assert error_of(reader(), data).code == 1009


def test_oversized_message_is_refused_from_its_header_before_its_payload_arrives() -> None:
    header = client_frame(BINARY, b"x" * 5000)[:8]
    assert error_of(reader(), header).code == 1009


def test_events_before_an_error_are_returned_and_nothing_after_it_is_parsed() -> None:
    r = reader()
    events = r.feed(client_frame(TEXT, b"good") + wire_frame(TEXT, b"unmasked") + client_frame(TEXT, b"later"))
    assert events == [Message("good")]
    assert r.error is not None and r.error.code == 1002
    assert r.feed(client_frame(TEXT, b"more")) == []


def test_take_buffer_hands_over_what_was_not_parsed_from_a_frame_boundary() -> None:
    r = reader()
    second = client_frame(TEXT, b"second")
    assert r.feed(client_frame(TEXT, b"first") + second[:5]) == [Message("first")]
    assert r.take_buffer() == second[:5]
    assert r.take_buffer() == b""


def test_rsv1_without_a_negotiated_extension_is_a_protocol_error() -> None:
    assert error_of(reader(), client_frame(TEXT, b"x", rsv=0b100)).code == 1002


def deflated(data: bytes) -> bytes:
    """What a permessage-deflate sender puts in a frame: raw deflate, sync flush, tail removed."""
    compressor = zlib.compressobj(wbits=-15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def test_compressed_messages_are_inflated_whole_or_fragmented() -> None:
    r = reader(max_message=100_000, inflater=Inflater())
    text = ("compress me " * 500).encode()
    packed = deflated(text)
    assert r.feed(client_frame(TEXT, packed, rsv=0b100)) == [Message(text.decode())]
    fragmented = client_frame(BINARY, packed[:10], rsv=0b100, fin=False) + client_frame(CONTINUATION, packed[10:])
    assert r.feed(fragmented) == [Message(text)]


def test_rsv1_on_a_continuation_frame_is_a_protocol_error() -> None:
    r = reader(inflater=Inflater())
    data = client_frame(TEXT, deflated(b"abc")[:2], rsv=0b100, fin=False) + client_frame(CONTINUATION, b"x", rsv=0b100)
    assert error_of(r, data).code == 1002


def test_a_compressed_message_that_inflates_past_max_bytes_is_too_big() -> None:
    bomb = deflated(b"\x00" * 1_000_000)
    assert len(bomb) < 1000 + 1000 // 64 + 1024  # small on the wire: within the compressed headroom
    assert error_of(reader(inflater=Inflater()), client_frame(BINARY, bomb, rsv=0b100)).code == 1009


def test_compressed_payload_far_beyond_any_inflation_headroom_is_refused_from_its_header() -> None:
    r = reader(max_message=1000, inflater=Inflater())
    assert error_of(r, client_frame(BINARY, b"x" * 5000, rsv=0b100)[:8]).code == 1009


def test_data_that_is_not_deflate_is_invalid_payload() -> None:
    assert error_of(reader(inflater=Inflater()), client_frame(BINARY, b"\xff\xff\xff\xff", rsv=0b100)).code == 1007


# -- Forwarder ------------------------------------------------------------------------------------------


def forwarder(*, masked: bool = True, max_message: int = 100_000, rsv1_allowed: bool = False, store_bound: int = 65536) -> Forwarder:
    return Forwarder(Counts(), masked=masked, max_message=max_message, rsv1_allowed=rsv1_allowed, store_bound=store_bound)


def run(f: Forwarder, chunks: list[bytes]) -> tuple[bytes, list[tuple[int, bytes]], list[int]]:
    """Feed `chunks`; returns (the bytes written on, the control frames taken out, written length after each chunk)."""
    written = bytearray()
    controls: list[tuple[int, bytes]] = []
    marks: list[int] = []
    for chunk in chunks:
        for piece in f.feed(chunk):
            if isinstance(piece, tuple):
                controls.append(piece)
            else:
                written += piece
        marks.append(len(written))
    return bytes(written), controls, marks


def messages(stream: bytes, *, masked: bool) -> list[Message]:
    reader = MessageReader(masked=masked, max_message=1 << 30)
    events = reader.feed(stream)
    assert reader.error is None
    return [event for event in events if isinstance(event, Message)]


DATA = [
    (TEXT, b"hello", True),
    (BINARY, b"\x00" * 200, False),
    (CONTINUATION, b"\x01" * 70000, True),
    (BINARY, b"", True),
    (TEXT, "\u00e9".encode() * 40, True),
]
CONTROLS = [(PING, b"p1"), (PONG, b""), (PING, b"x" * 125)]


def stream_of(*, masked: bool) -> bytes:
    """The data frames with controls after the 1st, 2nd (between fragments) and 4th."""
    frame = client_frame if masked else wire_frame
    data = [frame(opcode, payload, fin=fin) for opcode, payload, fin in DATA]
    controls = [frame(opcode, payload) for opcode, payload in CONTROLS]
    return data[0] + controls[0] + data[1] + controls[1] + data[2] + data[3] + controls[2] + data[4]


def check_forward(chunks: list[bytes], *, masked: bool, store_bound: int = 65536) -> Forwarder:
    f = forwarder(masked=masked, store_bound=store_bound)
    written, controls, marks = run(f, chunks)
    assert f.error is None
    assert controls == CONTROLS  # whole, unmasked, in order
    assert [m.data for m in messages(written, masked=masked)] == [
        "hello", b"\x00" * 200 + b"\x01" * 70000, b"", "\u00e9" * 40
    ]
    assert (f.counts.frames, f.counts.bytes) == (4, 5 + 200 + 70000 + 0 + 80)  # messages, payload bytes
    if not masked:
        assert written == b"".join(wire_frame(o, p, fin=fin) for o, p, fin in DATA)  # a backend's frames as they came
    return f


@pytest.mark.parametrize("masked", [True, False])
def test_forwarder_passes_data_frames_and_takes_out_control_frames_in_one_read(masked: bool) -> None:
    check_forward([stream_of(masked=masked)], masked=masked)


@pytest.mark.parametrize("masked", [True, False])
def test_forwarder_gives_the_same_result_for_a_stream_cut_at_every_byte(masked: bool) -> None:
    stream = stream_of(masked=masked)
    check_forward([stream[i : i + 1] for i in range(len(stream))], masked=masked)


@pytest.mark.parametrize("store_bound", [0, 100, 65536])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("seed", range(8))
def test_forwarder_gives_the_same_result_for_a_stream_cut_anywhere(seed: int, masked: bool, store_bound: int) -> None:
    stream = stream_of(masked=masked)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 40)))
    check_forward([stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])], masked=masked, store_bound=store_bound)


def test_forwarder_remasks_every_client_frame_with_a_fresh_key() -> None:
    zero = b"\x00\x00\x00\x00"
    f = forwarder()
    written, _, _ = run(f, [b"".join(wire_frame(TEXT, b"m%d" % n, key=zero) for n in range(50))])
    keys = []
    position = 0
    while position < len(written):
        header = parse_header(written, position, masked=True)
        assert header is not None
        keys.append(header.key)
        position += header.size + header.length
    assert len(keys) == 50 and zero not in keys and len(set(keys)) == 50
    assert [m.data for m in messages(written, masked=True)] == [f"m{n}" for n in range(50)]


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize(("size", "length_field"), [(13, 126), (13, 127), (300, 127), (125, 126)])
def test_forwarder_writes_non_minimal_lengths_in_minimal_form(masked: bool, size: int, length_field: int) -> None:
    payload = bytes(range(256)) * 2
    key = KEY if masked else None
    first = bytes([0x82, (0x80 if masked else 0) | length_field])
    length = struct.pack("!H", size) if length_field == 126 else struct.pack("!Q", size)
    frame = first + length + wire_frame(BINARY, payload[:size], key=key)[-size - (4 if masked else 0) :]
    written, _, _ = run(forwarder(masked=masked), [frame])
    header = parse_header(written, 0, masked=masked)
    assert header is not None and header.size == (2 if size < 126 else 4) + (4 if masked else 0)
    assert [m.data for m in messages(written, masked=masked)] == [payload[:size]]


def test_forwarder_stores_small_frames_until_whole_and_cuts_larger_ones_through() -> None:
    f = forwarder(masked=False, store_bound=1000)
    small = wire_frame(BINARY, b"s" * 1000)
    for end in range(1, len(small)):
        assert f.feed(small[end - 1 : end]) == []  # nothing written until the frame is whole
        assert not f.mid_frame
    assert f.feed(small[-1:]) == [small]
    big = wire_frame(BINARY, b"z" * 1001)
    header = parse_header(big, 0, masked=False)
    assert header is not None
    written = b""
    for end in range(1, len(big) + 1):
        written += b"".join(bytes(p) for p in f.feed(big[end - 1 : end]))  # type: ignore[arg-type]
        inside = header.size <= end < len(big)  # from the moment its header went out
        assert f.mid_frame is inside, end
        assert f.owed == (len(big) - end if inside else 0)
    assert written == big


def test_forwarder_passes_a_read_of_whole_backend_frames_as_it_is() -> None:
    f = forwarder(masked=False)
    data = wire_frame(TEXT, b"a") + wire_frame(BINARY, b"b")
    assert f.feed(data) == [data]


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("store_bound", [0, 65536])
def test_forwarder_validates_text_across_fragments_and_reads(masked: bool, store_bound: int) -> None:
    key = KEY if masked else None
    euro = "\u20ac".encode()
    good = wire_frame(TEXT, b"a" + euro[:1], fin=False, key=key) + wire_frame(CONTINUATION, euro[1:], key=key)
    f = forwarder(masked=masked, store_bound=store_bound)
    written, _, _ = run(f, [good[i : i + 1] for i in range(len(good))])
    assert f.error is None and [m.data for m in messages(written, masked=masked)] == ["a\u20ac"]
    cut = wire_frame(TEXT, b"b", fin=False, key=key) + wire_frame(CONTINUATION, euro[:2], key=key)
    run(f, [cut])
    assert f.error is not None and f.error.code == 1007


@pytest.mark.parametrize("masked", [True, False])
def test_forwarder_never_writes_a_stored_text_frame_that_is_not_utf8(masked: bool) -> None:
    key = KEY if masked else None
    f = forwarder(masked=masked)
    written, _, _ = run(f, [wire_frame(TEXT, b"fine", key=key) + wire_frame(TEXT, b"ok \xc3\x28 bad", key=key)])
    assert f.error is not None and f.error.code == 1007
    assert [m.data for m in messages(written, masked=masked)] == ["fine"]


def test_forwarder_passes_compressed_text_unvalidated() -> None:
    f = forwarder(masked=False, rsv1_allowed=True)
    frame = wire_frame(TEXT, b"\xff\xfe not deflate nor utf-8", rsv=0b100)
    assert f.feed(frame) == [frame] and f.error is None


@pytest.mark.parametrize(
    ("stream", "code"),
    [
        (client_frame(BINARY, b"x" * 1001), 1009),
        (client_frame(BINARY, b"x" * 600, fin=False) + client_frame(CONTINUATION, b"x" * 401), 1009),
        (client_frame(CONTINUATION, b"x"), 1002),
        (client_frame(TEXT, b"x", fin=False) + client_frame(TEXT, b"y"), 1002),
        (client_frame(TEXT, b"x", rsv=0b100), 1002),
        (wire_frame(TEXT, b"unmasked"), 1002),
        (client_frame(PING, b"x" * 126), 1002),
        (client_frame(0x3, b""), 1002),
        (client_frame(TEXT, b"\xc3\x28"), 1007),
    ],
    ids=["too-big", "fragments-too-big", "lone-continuation", "interleaved-messages", "rsv1", "unmasked", "long-ping", "opcode-3", "utf8"],
)
def test_forwarder_stops_at_the_offending_frame_and_returns_what_came_before(stream: bytes, code: int) -> None:
    f = forwarder(max_message=1000)
    before = client_frame(TEXT, b"fine") + client_frame(PING, b"p")
    written, controls, _ = run(f, [before + stream + client_frame(TEXT, b"never")])
    assert f.error is not None and f.error.code == code
    assert [m.data for m in messages(written, masked=True)] == ["fine"]
    assert controls == [(PING, b"p")]


def test_forwarder_refuses_an_oversized_frame_from_its_header_alone() -> None:
    for bound in (0, 65536):
        f = forwarder(max_message=1000, store_bound=bound)
        f.feed(client_frame(BINARY, b"x" * 5000)[:8])
        assert f.error is not None and f.error.code == 1009


def test_forwarder_allows_rsv1_when_the_leg_negotiated_deflate() -> None:
    f = forwarder(masked=False, rsv1_allowed=True)
    frame = wire_frame(TEXT, deflated(b"abc"), rsv=0b100)
    assert f.feed(frame) == [frame] and f.error is None


def test_forwarder_refuses_rsv1_on_a_continuation_frame_even_with_deflate() -> None:
    f = forwarder(masked=False, rsv1_allowed=True)
    f.feed(wire_frame(TEXT, b"ab", rsv=0b100, fin=False) + wire_frame(CONTINUATION, b"cd", rsv=0b100))
    assert f.error is not None and f.error.code == 1002
