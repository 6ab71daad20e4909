"""The relay is as strict as an endpoint, on every relay: what a hostile client or a broken
backend sends is checked on its way through, and each leg gets frames the gateway itself vouches
for (RFC 6455 §5.2, §5.3, §7.1.7, §8.1). Raw-socket peers, since a library would refuse to send
the bad bytes."""

from __future__ import annotations

import asyncio
import struct

import pytest
from websockets.frames import Frame, Opcode

from gateway.wire.frames import parse_header

from .helpers import TIMEOUT, Servers, make_token
from .test_relay_switch import wire_stack
from .wire import BackendWire, WireClient, frame_bytes

pytestmark = pytest.mark.relays("byte", "frame")

BAD_UTF8 = b"ok \xc3\x28 bad"


def raw_frame(opcode: int, payload: bytes, *, key: bytes | None, length_form: int | None = None, first: int | None = None) -> bytes:
    """A frame as bytes, with a chosen masking key (None: unmasked) and length form (2, 4 or 10 header bytes)."""
    size = len(payload)
    form = length_form or (2 if size < 126 else 4 if size < 65536 else 10)
    byte0 = (0x80 | opcode) if first is None else first
    mask_bit = 0x80 if key is not None else 0
    if form == 2:
        head = struct.pack("!BB", byte0, mask_bit | size)
    elif form == 4:
        head = struct.pack("!BBH", byte0, mask_bit | 126, size)
    else:
        head = struct.pack("!BBQ", byte0, mask_bit | 127, size)
    if key is None:
        return head + payload
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def frames_after_head(raw: bytes, *, masked: bool) -> list[tuple[int, int, bytes]]:
    """(header size, payload length, masking key) of each frame that follows the HTTP head in `raw`."""
    data = raw[raw.index(b"\r\n\r\n") + 4 :]
    found = []
    position = 0
    while position < len(data):
        header = parse_header(data, position, masked=masked)
        assert header is not None and position + header.size + header.length <= len(data)
        found.append((header.size - (4 if masked else 0), header.length, header.key))
        position += header.size + header.length
    return found


async def legacy_session(servers: Servers, relay: str) -> tuple[WireClient, BackendWire]:
    """A legacy client on the old backend, relaying (a round trip made), both ends raw."""
    stack, wire = await wire_stack(servers, "old")
    stack.gateway.close_timeout = 3600.0  # a wait on the peer's echo would outlast the test
    client = await WireClient.open(stack.url(f"token={make_token()}"))
    client.send("hello")
    sock = await wire.next_socket()
    await client.until(lambda: client.messages == ["hello"])
    return client, sock


async def test_client_text_that_is_not_utf8_gets_1007_and_never_reaches_the_backend(servers: Servers, relay: str):
    async with asyncio.timeout(TIMEOUT):
        client, sock = await legacy_session(servers, relay)
        client.write(Frame(Opcode.TEXT, BAD_UTF8).serialize(mask=True) + frame_bytes("after", mask=True))
        await client.until(lambda: client.eof)
        assert client.close is not None and client.close[0] == 1007
        await sock.until(lambda: sock.close is not None)
        assert sock.close is not None and sock.close[0] == 1001
        assert sock.messages == ["hello"]
        assert b"bad" not in sock.raw and BAD_UTF8 not in sock.raw
        await client.aclose()


async def test_client_text_split_across_fragments_is_validated_as_one_message(servers: Servers, relay: str):
    euro = "\u20ac".encode()
    async with asyncio.timeout(TIMEOUT):
        client, sock = await legacy_session(servers, relay)
        # A character split between two fragments is valid ...
        client.write(
            Frame(Opcode.TEXT, b"a" + euro[:1], fin=False).serialize(mask=True)
            + Frame(Opcode.CONT, euro[1:] + b"b").serialize(mask=True)
        )
        await sock.until(lambda: len(sock.messages) == 2)
        assert sock.messages[1] == "a\u20acb"
        # ... a message that ends inside one is not.
        client.write(
            Frame(Opcode.TEXT, b"c", fin=False).serialize(mask=True) + Frame(Opcode.CONT, euro[:2]).serialize(mask=True)
        )
        await client.until(lambda: client.eof)
        assert client.close is not None and client.close[0] == 1007
        # (the byte relay forwarded the first fragment: websockets, as the backend, then calls the
        # gateway's close inside a fragmented message a protocol error of its own)
        await sock.until(lambda: sock.eof)
        assert sock.messages == ["hello", "a\u20acb"]
        await client.aclose()


async def test_backend_text_that_is_not_utf8_gets_the_client_1014_and_never_the_frame(servers: Servers, relay: str):
    async with asyncio.timeout(TIMEOUT):
        client, sock = await legacy_session(servers, relay)
        sock.write(Frame(Opcode.TEXT, BAD_UTF8).serialize(mask=False))
        await client.until(lambda: client.eof)
        assert client.close is not None and client.close[0] == 1014
        assert client.messages == ["hello"]
        assert b"bad" not in client.raw
        await sock.until(lambda: sock.eof)
        assert sock.close is not None and sock.close[0] == 1007
        await client.aclose()


async def test_backend_gets_every_client_frame_masked_with_a_fresh_key_of_its_own(servers: Servers, relay: str):
    zero = b"\x00\x00\x00\x00"
    async with asyncio.timeout(TIMEOUT):
        client, sock = await legacy_session(servers, relay)
        client.write(b"".join(raw_frame(0x1, f"m{n}".encode(), key=zero) for n in range(20)))
        await sock.until(lambda: len(sock.messages) == 21)
        assert sock.messages == ["hello", *(f"m{n}" for n in range(20))]
        keys = [key for _, _, key in frames_after_head(bytes(sock.raw), masked=True)]
        assert len(keys) == 21 and zero not in keys
        assert len(set(keys)) == len(keys)  # one key per frame (2**-32 odds of a repeat per pair)
        await client.aclose()


@pytest.mark.parametrize(("size", "form"), [(13, 4), (13, 10), (300, 10), (125, 4)])
async def test_non_minimal_length_encodings_are_forwarded_in_minimal_form_both_ways(servers: Servers, relay: str, size, form):
    payload = bytes(range(256)) * 2
    async with asyncio.timeout(TIMEOUT):
        client, sock = await legacy_session(servers, relay)
        client.write(raw_frame(0x2, payload[:size], key=b"\x01\x02\x03\x04", length_form=form))
        await sock.until(lambda: len(sock.messages) == 2)
        assert sock.messages[1] == payload[:size]
        assert [head for head, _, _ in frames_after_head(bytes(sock.raw), masked=True)] == [2, 4 if size > 125 else 2]
        sock.write(raw_frame(0x2, payload[:size], key=None, length_form=form))
        # the backend also echoes the client's frame: wait for both
        await client.until(lambda: len(client.messages) == 3)
        assert client.messages[1:] == [payload[:size], payload[:size]]
        assert {head for head, _, _ in frames_after_head(bytes(client.raw), masked=False)} <= {2, 4 if size > 125 else 2}
        await client.aclose()


async def test_backend_that_vanishes_in_the_middle_of_a_small_frame_gives_the_client_1014(servers: Servers, relay: str):
    whole = frame_bytes(b"\x0b" * 1000, mask=False)
    async with asyncio.timeout(TIMEOUT):
        client, sock = await legacy_session(servers, relay)
        sock.write(whole[:13])
        assert sock.transport is not None
        sock.transport.abort()
        await client.until(lambda: client.eof)
        assert client.close == (1014, "upstream connection lost")
        assert client.messages == ["hello"]
        await client.aclose()


async def test_client_that_vanishes_in_the_middle_of_a_small_frame_gives_the_backend_1001(servers: Servers, relay: str):
    whole = frame_bytes(b"\x0c" * 1000, mask=True)
    async with asyncio.timeout(TIMEOUT):
        client, sock = await legacy_session(servers, relay)
        await sock.until(lambda: sock.messages == ["hello"])
        client.write(whole[:13])
        await client.writer.drain()
        client.reset()
        await sock.until(lambda: sock.eof)
        assert sock.close == (1001, "client connection lost")
        assert sock.messages == ["hello"]
        await client.aclose()


@pytest.mark.parametrize(
    "bad",
    [
        raw_frame(0x3, b"", key=b"abcd"),  # reserved opcode
        raw_frame(0x1, b"x", key=b"abcd", first=0x80 | 0x40 | 0x1),  # RSV1 without an extension
        raw_frame(0x9, b"p" * 126, key=b"abcd"),  # oversize control frame
        raw_frame(0x8, struct.pack("!H", 1005), key=b"abcd"),  # a close code that may not be sent
        raw_frame(0x1, BAD_UTF8, key=b"abcd"),
    ],
    ids=["opcode-3", "rsv1", "long-ping", "close-1005", "utf8"],
)
async def test_after_a_client_protocol_error_the_gateway_closes_tcp_without_waiting_for_an_echo(
    servers: Servers, relay: str, bad: bytes
):
    async with asyncio.timeout(TIMEOUT):
        client, sock = await legacy_session(servers, relay)
        client.hold()  # the client never answers the gateway's close
        client.write(bad)
        await client.until(lambda: client.eof)  # close_timeout is an hour: only a prompt close ends this
        assert client.close is not None and client.close[0] in (1002, 1007)
        await sock.until(lambda: sock.close is not None)
        assert sock.close is not None and sock.close[0] == 1001
        await client.aclose()


async def test_after_a_backend_protocol_error_the_gateway_closes_the_upstream_without_waiting(servers: Servers, relay: str):
    async with asyncio.timeout(TIMEOUT):
        client, sock = await legacy_session(servers, relay)
        sock.hold()
        sock.write(raw_frame(0x3, b"", key=None))
        await sock.until(lambda: sock.eof)
        assert sock.close is not None and sock.close[0] == 1002
        await client.until(lambda: client.close is not None)
        assert client.close is not None and client.close[0] == 1014
        await client.aclose()
