"""The switch from the handshake to the relay, and what each relay does after it.

Until a session is ready, the connection parses both legs frame by frame; at the switch
each direction gets a pump: `BytePump` (frames pass as they arrived) or, with
`Gateway(byte_relay=False)` or where bytes cannot pass unchanged, `FramePump` (frames
parsed and written anew). Every test here runs on both relays (the `relay` fixture).

The edges are reached on purpose rather than by luck: `wire.WireClient` and
`wire.WireBackend` decide what goes into each TCP write, so frames can ride in the same
write as the upgrade request, the authenticate frame or the backend's `connected`, and a
frame can be cut in two with its second half sent only once the other side saw the first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
import websockets
import yaml
from websockets.frames import Opcode

from gateway.wire.connection import Connection
from gateway.wire.relay import BytePump, FramePump
from gateway.service.server import start_site
from gateway.staging.stub_backend import create_stub_app

from .helpers import (
    TIMEOUT,
    MiB,
    Servers,
    Stack,
    authenticate_frame,
    closed,
    eventually,
    make_config,
    make_token,
    open_client,
    raw_config,
    receive_until_closed,
    start_stack,
)
from .wire import BackendWire, WireBackend, WireClient, authenticate_bytes, control_bytes, frame_bytes

pytestmark = pytest.mark.relays("byte", "frame")

PATHS = [("legacy", "old"), ("legacy", "new"), ("message", "old"), ("message", "new")]
PATH_IDS = [f"{style}-{backend}" for style, backend in PATHS]
PUMPS = {"byte": BytePump, "frame": FramePump}


def frames(count: int, tag: str = "f") -> list[str | bytes]:
    """`count` distinct frames, text and binary alternating, each saying where it belongs."""
    return [f"{tag}-{n}" if n % 2 else f"{tag}-{n}".encode() * (n % 7 + 1) for n in range(count)]


def only_connection(stack: Stack) -> Connection:
    connections = list(stack.gateway.connections)
    assert len(connections) == 1, connections
    connection = connections[0]
    assert isinstance(connection, Connection)
    return connection


async def wire_stack(servers: Servers, backend: str, *, wire: WireBackend | None = None, **sections: Any) -> tuple[Stack, WireBackend]:
    """A stack whose `backend` is a `WireBackend` of that backend's style (the other a stub)."""
    if wire is None:
        wire = WireBackend("query" if backend == "old" else "message")
    await wire.start()
    ports = {"old_port": wire.port} if backend == "old" else {"new_port": wire.port}
    stack = await servers.stack(**ports, **sections)
    stack.route_to(backend)
    servers.closing(wire.close)
    return stack, wire


async def ready(ws: Any, style: str) -> None:
    """A message client's first frame is `connected`; a legacy client proves readiness by a round trip."""
    if style == "message":
        assert json.loads(await ws.recv())["type"] == "connected"
    else:
        await ws.send("ready?")
        assert await ws.recv() == "ready?"


# -- which pump runs ------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_a_ready_session_relays_with_the_pumps_its_gateway_was_built_for(stack: Stack, relay: str, compression):
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, "legacy", make_token(), early=["one"], compression=compression)
        assert await ws.recv() == "one"
        connection = only_connection(stack)
        assert connection.upstream is not None
        to_backend, to_client = connection.upstream.feeder, connection.client.feeder
        # A deflate client's messages are inflated for the backend: always the frame relay.
        assert type(to_backend) is (FramePump if compression else PUMPS[relay])
        assert type(to_client) is PUMPS[relay]
        await ws.send("two")
        assert await ws.recv() == "two"
        await ws.close()


# -- frames sent during the switch ----------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
async def test_frames_written_together_with_the_upgrade_request_reach_the_backend_in_order(servers: Servers, path):
    style, backend = path
    old = await servers.recording("query")
    new = await servers.recording("message")
    stack = await servers.stack(old_port=old.port, new_port=new.port)
    stack.route_to(backend)
    token = make_token()
    sent = frames(50)
    # The request, (the authenticate frame,) and fifty frames in one write: the gateway has
    # them all before it has even answered the upgrade.
    then = (authenticate_bytes(token) if style == "message" else b"") + b"".join(frame_bytes(f, mask=True) for f in sent)
    url = stack.url(f"token={token}" if style == "legacy" else "")
    async with asyncio.timeout(TIMEOUT):
        client = await WireClient.open(url, then=then)
        await client.until(lambda: len(client.messages) >= (style == "message") + len(sent))
        got = client.messages
        if style == "message":
            assert json.loads(got.pop(0))["type"] == "connected"
        assert got == sent  # the backend's echoes
        sock = await (old if backend == "old" else new).next_socket()
        assert sock.frames == sent and sock.frames_before_ready == 0
        await client.aclose()


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
async def test_frames_a_client_streams_across_the_switch_arrive_in_order_both_ways(servers: Servers, path):
    style, backend = path
    old = await servers.recording("query")
    new = await servers.recording("message")
    stack = await servers.stack(old_port=old.port, new_port=new.port)
    stack.route_to(backend)
    received: list[str | bytes] = []
    echoed = asyncio.Event()
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, style, make_token())  # authenticate sent, nothing awaited

        async def read() -> None:
            if style == "message":
                assert json.loads(await ws.recv())["type"] == "connected"
            while True:
                received.append(await ws.recv())
                echoed.set()

        reader = asyncio.create_task(read())
        # Send until the first echo is back, so the stream started before the session was
        # ready and went on through the switch; then twenty more.
        sent: list[str | bytes] = []
        after = 0
        while after < 20 and len(sent) < 5000:
            frame = f"s-{len(sent)}" if len(sent) % 3 else f"s-{len(sent)}".encode()
            await ws.send(frame)
            sent.append(frame)
            after += echoed.is_set()
            await asyncio.sleep(0)  # let the reader run: a yield, not a wait for time
        assert after == 20, "no echo came back while 5000 frames were sent"
        reader.cancel()  # cancelling websockets' recv() loses nothing
        with pytest.raises(asyncio.CancelledError):
            await reader
        while len(received) < len(sent):
            received.append(await ws.recv())
        assert received == sent
        await ws.close()
        sock = await (old if backend == "old" else new).next_socket()
        await sock.wait_closed()
        assert sock.frames == sent and sock.frames_before_ready == 0


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
async def test_backend_frames_written_together_with_its_greeting_reach_the_client_in_order(servers: Servers, path):
    style, backend = path
    first = frames(50, "b")
    cut = b"\x07" * 70_000  # a frame whose second half the backend sends later
    wire = WireBackend("query" if backend == "old" else "message", first=first, echo=True)
    stack, wire = await wire_stack(servers, backend, wire=wire)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, style, make_token())
        sock = await wire.next_socket()
        await sock.until(lambda: sock.ready)
        # The 101 (old) or `connected` (new) and fifty frames went out in one write, and
        # they are followed by the first half of one more frame.
        whole = frame_bytes(cut, mask=False)
        sock.write(whole[: len(whole) // 2])
        got = [await ws.recv() for _ in range(len(first) + (style == "message"))]
        if style == "message":
            assert json.loads(got.pop(0))["type"] == "connected"
        assert got == first
        sock.write(whole[len(whole) // 2 :])
        assert await ws.recv() == cut
        await ws.send("after")
        assert await ws.recv() == "after"
        await ws.close(4001, "x")
        assert (await closed(ws)) == (4001, "")
        await sock.until(lambda: sock.close is not None)
        assert sock.close == (4001, "x")
        assert sock.messages == ["after"]


# -- back-pressure ---------------------------------------------------------------------------------

CHUNK = 64 * 1024


def numbered(n: int) -> bytes:
    """Frame n of a stream: its number, repeated; any loss, reordering or corruption shows."""
    return struct.pack("!Q", n) * (CHUNK // 8)


async def test_a_client_that_stops_reading_holds_back_the_backend_and_then_gets_everything_in_order(servers: Servers):
    wire = WireBackend("query", sndbuf=64 * 1024)
    stack, wire = await wire_stack(servers, "old", wire=wire)
    limit = 4096  # frames (256 MiB): far more than every buffer on the way can hold
    async with asyncio.timeout(3 * TIMEOUT):
        # A client that stops reading: websockets stops reading its socket once `max_queue`
        # messages wait for recv().
        ws = await open_client(stack, "legacy", make_token(), max_queue=2, max_size=None)
        await ready(ws, "legacy")
        sock = await wire.next_socket()
        connection = only_connection(stack)
        upstream, client = connection.upstream, connection.client
        assert upstream is not None and upstream.transport is not None and client.transport is not None
        sock.stream(limit, numbered)
        # The gateway stops reading the backend, and the backend's own writes block behind it.
        # (Polled: the gateway's pause is no event a test can await.)
        async def held_back() -> bool:
            return sock.paused and not upstream.transport.is_reading()

        assert await eventually(held_back)
        held_at = sock.stream_sent
        assert held_at < limit
        # What the gateway holds for the client is bounded by its transport's high-water
        # mark plus one read, not by what the backend wanted to send.
        assert client.transport.get_write_buffer_size() <= MiB
        # The client reads again: the rest flows, complete and in order.
        total = held_at + 64
        sock.stream_until(total)
        for n in range(total):
            frame = await ws.recv()
            assert frame == numbered(n), f"frame {n} is wrong"
        await ws.close()
        await sock.until(lambda: sock.close is not None)
        assert sock.close == (1000, "")


# -- close frames after the switch -------------------------------------------------------------------

CLOSES = [(1000, ""), (1001, "bye"), (1011, "server trouble"), (3000, "registered"), (4001, "x"), (4999, "\u00e9" * 61 + "x")]


@pytest.mark.parametrize(("code", "reason"), CLOSES)
@pytest.mark.parametrize("backend", ["old", "new"])
async def test_client_close_after_the_switch_reaches_the_backend_and_is_echoed(servers: Servers, backend, code, reason):
    stack, wire = await wire_stack(servers, backend)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, "message", make_token())
        await ready(ws, "message")
        await ws.send("hello")
        assert await ws.recv() == "hello"
        sock = await wire.next_socket()
        await ws.close(code, reason)
        assert (await closed(ws))[0] == code  # the gateway's echo
        await sock.until(lambda: sock.eof)
        assert sock.close == (code, reason)  # legal codes and their reasons pass unchanged
        assert sock.messages == ["hello"]


@pytest.mark.parametrize(("code", "reason"), [*CLOSES, (None, "")])
@pytest.mark.parametrize("backend", ["old", "new"])
async def test_backend_close_after_the_switch_reaches_the_client_and_is_echoed(servers: Servers, backend, code, reason):
    stack, wire = await wire_stack(servers, backend)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, "legacy", make_token())
        await ready(ws, "legacy")
        sock = await wire.next_socket()
        sock.send("last words")
        sock.send_close(code, reason)
        assert await receive_until_closed(ws) == ["last words"]
        # A close frame without a code reaches the client as a plain 1000.
        assert await closed(ws) == ((code, reason) if code is not None else (1000, ""))
        await sock.until(lambda: sock.close is not None)
        assert sock.close == (code if code is not None else 1000, "")  # the gateway's echo


@pytest.mark.parametrize(
    "payload",
    [struct.pack("!H", 1005), struct.pack("!H", 999), struct.pack("!H", 2999), b"\x03", struct.pack("!H", 4000) + b"\xff"],
    ids=["1005", "999", "2999", "one-byte", "reason-not-utf8"],
)
async def test_a_malformed_client_close_after_the_switch_fails_the_client_and_closes_the_backend_going_away(servers: Servers, payload):
    stack, wire = await wire_stack(servers, "old")
    async with asyncio.timeout(TIMEOUT):
        client = await WireClient.open(stack.url(f"token={make_token()}"))
        client.send("hello")
        await client.until(lambda: client.messages == ["hello"])
        sock = await wire.next_socket()
        client.write(control_bytes(Opcode.CLOSE, payload, mask=True))
        await client.until(lambda: client.close is not None)
        assert client.close[0] == (1007 if payload.endswith(b"\xff") else 1002)
        await sock.until(lambda: sock.eof)
        assert sock.close == (1001, "client connection lost")
        await client.aclose()


async def test_client_close_while_a_backend_frame_is_half_relayed_completes_both_closing_handshakes(servers: Servers, relay):
    stack, wire = await wire_stack(servers, "old")
    big = b"\x05" * 300_000
    whole = frame_bytes(big, mask=False)
    async with asyncio.timeout(TIMEOUT):
        client = await WireClient.open(stack.url(f"token={make_token()}"))
        client.send("hello")
        await client.until(lambda: client.messages == ["hello"])
        sock = await wire.next_socket()
        base = client.received_bytes
        sock.write(whole[:100_000])
        if relay == "byte":  # frames pass cut-through: the first part reaches the client at once
            await client.until(lambda: client.received_bytes >= base + 100_000)
        sock.hold()  # the backend answers the close only once its frame is out, as it must
        client.send_close(4001, "x")  # arrives while the backend's frame is half-way to the client
        await sock.until(lambda: sock.close is not None)
        assert sock.close == (4001, "x")
        sock.write(whole[100_000:])
        sock.release()  # its echo of the close
        await client.until(lambda: client.eof)  # the gateway ends the TCP connection once both closes crossed
        # The byte relay had begun the frame, so it finishes it before its echo of the close;
        # the frame relay had sent none of it, and sends nothing after its close.
        assert client.messages == (["hello", big] if relay == "byte" else ["hello"])
        assert client.close == (4001, "")
        await sock.until(lambda: sock.eof)


async def test_backend_close_while_a_client_frame_is_half_relayed_completes_both_closing_handshakes(servers: Servers, relay):
    stack, wire = await wire_stack(servers, "old")
    big = b"\x06" * 300_000
    whole = frame_bytes(big, mask=True)
    async with asyncio.timeout(TIMEOUT):
        client = await WireClient.open(stack.url(f"token={make_token()}"))
        client.send("hello")
        await client.until(lambda: client.messages == ["hello"])
        sock = await wire.next_socket()
        base = sock.received_bytes
        client.write(whole[:100_000])
        if relay == "byte":
            await sock.until(lambda: sock.received_bytes >= base + 100_000)
        client.hold()  # the client answers the close only once its frame is out, as it must
        sock.send_close(4002, "bye")
        await client.until(lambda: client.close is not None)
        assert client.close == (4002, "bye")
        client.write(whole[100_000:])
        client.release()  # its echo of the close
        await sock.until(lambda: sock.eof)
        assert sock.messages == (["hello", big] if relay == "byte" else ["hello"])
        assert sock.close == (4002, "")  # the gateway's echo, after the frame it had begun
        await client.until(lambda: client.eof)


# -- a message over the size limit after the switch -------------------------------------------------

LIMIT = 1000
SMALL_LIMIT = {"limits": {"max_message_bytes": LIMIT}}
OVERSIZE = {
    "binary": frame_bytes(b"b" * (LIMIT + 1), mask=True),
    "text": frame_bytes("t" * (LIMIT + 1), mask=True),
    "two-byte-text": frame_bytes("\u00e9" * (LIMIT // 2 + 1), mask=True),
    "fragments": frame_bytes(b"a" * 600, mask=True, fin=False) + frame_bytes(b"b" * 600, mask=True, continuation=True),
    # a header that announces 1 MiB, with no payload behind it: refused from the header alone
    "header-only": frame_bytes(b"h" * MiB, mask=True)[:14],
}


@pytest.mark.parametrize("oversize", OVERSIZE.values(), ids=OVERSIZE.keys())
async def test_client_message_over_the_limit_after_the_switch_closes_it_1009_and_the_backend_going_away(servers: Servers, oversize):
    # aiohttp as the backend: on the byte relay the backend may have the first fragment of the
    # refused message already, and aiohttp takes a close frame between fragments, as RFC 6455
    # allows (websockets' own parser refuses it).
    old = await servers.recording("query")
    stack = await servers.stack(old_port=old.port, **SMALL_LIMIT)
    async with asyncio.timeout(TIMEOUT):
        client = await WireClient.open(stack.url(f"token={make_token()}"))
        client.send("x" * LIMIT)  # exactly the limit passes
        await client.until(lambda: len(client.messages) == 1)
        client.write(oversize)
        await client.until(lambda: client.close is not None)
        assert client.close[0] == 1009
        sock = await old.next_socket()
        assert await sock.wait_closed() == (1001, "client sent a message over the size limit")
        assert sock.frames == ["x" * LIMIT]
        await client.aclose()


@pytest.mark.parametrize("with_greeting", [False, True], ids=["after", "in-the-greetings-write"])
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
async def test_backend_message_over_the_limit_after_the_switch_closes_it_1009_and_the_client_1014(servers: Servers, path, with_greeting):
    style, backend = path
    wire = WireBackend("query" if backend == "old" else "message", first=[b"y" * (LIMIT + 1)] if with_greeting else [])
    stack, wire = await wire_stack(servers, backend, wire=wire, **SMALL_LIMIT)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, style, make_token())
        sock = await wire.next_socket()
        expected: list[str | bytes] = []
        if not with_greeting:
            await ready(ws, style)
            sock.send("z" * LIMIT, b"y" * (LIMIT + 1))  # exactly the limit passes, one byte more does not
            expected = ["z" * LIMIT]
        frames = await receive_until_closed(ws)
        if style == "message" and with_greeting:
            assert json.loads(frames.pop(0))["type"] == "connected"
        assert frames == expected
        assert await closed(ws) == (1014, "backend sent a message over the size limit")
        await sock.until(lambda: sock.eof)
        assert sock.close is not None and sock.close[0] == 1009


# -- pings after the switch ----------------------------------------------------------------------


@pytest.mark.parametrize("path", [("legacy", "old"), ("message", "new")], ids=["legacy-old", "message-new"])
async def test_client_ping_after_the_switch_gets_its_pong_from_the_gateway(stack: Stack, path):
    style, backend = path
    stack.route_to(backend)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, style, make_token())
        await ready(ws, style)
        for payload in (b"", b"are you there", bytes(range(125))):
            waiter = await ws.ping(payload)  # websockets matches the pong's payload to its ping
            await waiter
        await ws.send("still relaying")
        assert await ws.recv() == "still relaying"
        await ws.close()


async def test_pongs_to_a_client_never_land_inside_the_big_frames_relayed_to_it(stack: Stack):
    big = [bytes([n]) * (512 * 1024 + n) for n in range(8)]
    async with asyncio.timeout(3 * TIMEOUT):
        ws = await open_client(stack, "legacy", make_token(), compression=None)
        await ready(ws, "legacy")
        waiters = []
        for frame in big:  # each echo comes back over several reads while the next ping is answered
            await ws.send(frame)
            waiters.append(await ws.ping(frame[:4]))
        for frame in big:
            assert await ws.recv() == frame
        await asyncio.gather(*waiters)
        await ws.close()
        assert ws.close_code == 1000


async def test_a_ping_between_the_fragments_of_a_client_message_is_answered_and_the_message_arrives_whole(servers: Servers):
    stack, wire = await wire_stack(servers, "old")
    async with asyncio.timeout(TIMEOUT):
        client = await WireClient.open(stack.url(f"token={make_token()}"))
        client.send("hello")
        await client.until(lambda: client.messages == ["hello"])
        client.write(
            frame_bytes("frag", mask=True, fin=False)
            + control_bytes(Opcode.PING, b"between", mask=True)
            + frame_bytes("men", mask=True, fin=False, continuation=True)
            + frame_bytes("ted", mask=True, continuation=True)
        )
        await client.until(lambda: ("pong", b"between") in client.log and len(client.messages) == 2)
        assert client.messages == ["hello", "fragmented"]  # the backend's echo
        sock = await wire.next_socket()
        assert sock.messages == ["hello", "fragmented"]
        await client.aclose()


async def test_gateway_pong_to_a_backend_waits_until_the_client_frame_it_is_relaying_is_whole(servers: Servers, relay):
    stack, wire = await wire_stack(servers, "old")
    big = b"\x09" * 300_000
    whole = frame_bytes(big, mask=True)
    async with asyncio.timeout(TIMEOUT):
        client = await WireClient.open(stack.url(f"token={make_token()}"))
        client.send("hello")
        await client.until(lambda: client.messages == ["hello"])
        sock = await wire.next_socket()
        base = sock.received_bytes
        client.write(whole[:100_000])
        if relay == "byte":  # cut-through: the backend has the first part of the frame
            await sock.until(lambda: sock.received_bytes >= base + 100_000)
        sock.send_ping(b"p1")
        sock.send("marker")
        await client.until(lambda: "marker" in client.messages)  # so the gateway has read the ping
        if relay == "byte":
            assert ("pong", b"p1") not in sock.log  # a pong now would land inside the frame
        client.write(whole[100_000:])
        await sock.until(lambda: ("pong", b"p1") in sock.log and len(sock.messages) == 2)
        tail = [(kind, data if kind == "pong" else len(data)) for kind, data in sock.log[1:]]
        if relay == "byte":
            assert tail == [("binary", len(big)), ("pong", b"p1")]
        else:  # the frame relay writes whole frames only: the pong went out at once
            assert tail == [("pong", b"p1"), ("binary", len(big))]
        assert sock.messages == ["hello", big]
        await client.aclose()


async def test_gateway_pong_to_a_client_waits_until_the_backend_frame_it_is_relaying_is_whole(servers: Servers, relay):
    stack, wire = await wire_stack(servers, "old", wire=WireBackend("query", echo=False))
    big = b"\x0a" * 300_000
    whole = frame_bytes(big, mask=False)
    async with asyncio.timeout(TIMEOUT):
        client = await WireClient.open(stack.url(f"token={make_token()}"))
        sock = await wire.next_socket()
        sock.send("hello")
        await client.until(lambda: client.messages == ["hello"])
        base = client.received_bytes
        sock.write(whole[:100_000])
        if relay == "byte":  # cut-through: the client has the first part of the frame
            await client.until(lambda: client.received_bytes >= base + 100_000)
        client.write(control_bytes(Opcode.PING, b"p2", mask=True))
        client.send("marker")
        await sock.until(lambda: "marker" in sock.messages)  # so the gateway has read the ping
        if relay == "byte":
            assert ("pong", b"p2") not in client.log  # a pong now would land inside the frame
        sock.write(whole[100_000:])
        await client.until(lambda: ("pong", b"p2") in client.log and len(client.messages) == 2)
        tail = [(kind, data if kind == "pong" else len(data)) for kind, data in client.log[1:]]
        if relay == "byte":
            assert tail == [("binary", len(big)), ("pong", b"p2")]
        else:
            assert tail == [("pong", b"p2"), ("binary", len(big))]
        await client.aclose()


KEEPALIVE = {"limits": {"ping_interval_seconds": 1.0}}  # a peer has half of it to answer: ample on a busy machine


async def test_keepalive_pings_reach_both_legs_after_the_switch_and_answered_ones_keep_the_session(servers: Servers):
    stack, wire = await wire_stack(servers, "old", **KEEPALIVE)
    async with asyncio.timeout(3 * TIMEOUT), aiohttp.ClientSession() as http:
        async with http.ws_connect(stack.url(f"token={make_token()}"), autoping=False, heartbeat=None) as ws:
            await ws.send_str("hello")
            assert (await ws.receive()).data == "hello"
            sock = await wire.next_socket()
            for _ in range(2):  # the second ping shows the answered first one kept the session
                msg = await ws.receive()
                assert msg.type is aiohttp.WSMsgType.PING, msg
                await ws.pong(msg.data)
            await sock.until(lambda: ("ping", b"") in sock.log)  # the backend's leg is pinged too (and answers)
            await ws.send_str("still here")
            assert (await ws.receive()).data == "still here"
            await ws.close()
        assert ws.close_code == 1000


@pytest.mark.relays("byte")  # the keepalive does not depend on the relay
async def test_a_client_that_does_not_answer_keepalive_pings_is_dropped_and_the_backend_gets_1001(servers: Servers):
    old = await servers.recording("query")
    stack = await servers.stack(old_port=old.port, **KEEPALIVE)
    async with asyncio.timeout(3 * TIMEOUT):
        client = await WireClient.open(stack.url(f"token={make_token()}"))
        client.send("hello")
        await client.until(lambda: client.messages == ["hello"])
        client.hold()  # alive as a socket, silent as an app: no pong
        await client.until(lambda: client.eof)
        assert ("ping", b"") in client.log and client.close is None  # pinged, then dropped without ceremony
        sock = await old.next_socket()
        assert await sock.wait_closed() == (1001, "client connection lost")
        await client.aclose()


# -- a leg that goes away ----------------------------------------------------------------------------

MID_FRAME_XFAIL = pytest.mark.xfail(
    strict=True,
    reason="byte relay: the other leg has part of the vanished leg's frame, so the gateway's close "
    "frame cannot follow it; the leg is aborted at once instead (no close code, no corrupted message)",
)


async def test_backend_that_vanishes_half_way_through_a_frame_gives_the_client_1014(servers: Servers, relay, request):
    if relay == "byte":
        request.applymarker(MID_FRAME_XFAIL)
    stack, wire = await wire_stack(servers, "old", wire=WireBackend("query", echo=False))
    stack.gateway.close_timeout = 1.0  # how long the byte relay takes to give up (see the xfail)
    whole = frame_bytes(b"\x0b" * 300_000, mask=False)
    async with asyncio.timeout(TIMEOUT):
        client = await WireClient.open(stack.url(f"token={make_token()}"))
        sock = await wire.next_socket()
        sock.send("hello")
        await client.until(lambda: client.messages == ["hello"])
        base = client.received_bytes
        sock.write(whole[:100_000])
        if relay == "byte":
            await client.until(lambda: client.received_bytes >= base + 100_000)
        assert sock.transport is not None
        sock.transport.abort()
        await client.until(lambda: client.eof)
        assert client.close == (1014, "upstream connection lost")
        assert client.messages == ["hello"]


async def test_client_that_vanishes_half_way_through_a_frame_gives_the_backend_1001(servers: Servers, relay, request):
    if relay == "byte":
        request.applymarker(MID_FRAME_XFAIL)
    stack, wire = await wire_stack(servers, "old", wire=WireBackend("query", echo=False))
    stack.gateway.close_timeout = 1.0
    whole = frame_bytes(b"\x0c" * 300_000, mask=True)
    async with asyncio.timeout(TIMEOUT):
        client = await WireClient.open(stack.url(f"token={make_token()}"))
        client.send("hello")
        sock = await wire.next_socket()
        await sock.until(lambda: sock.messages == ["hello"])
        base = sock.received_bytes
        client.write(whole[:100_000])
        if relay == "byte":
            await sock.until(lambda: sock.received_bytes >= base + 100_000)
        client.reset()
        await sock.until(lambda: sock.eof)
        assert sock.close == (1001, "client connection lost")
        assert sock.messages == ["hello"]
        await client.aclose()


def _frames_in_flight_to_a_vanished_leg(relay: str, vanishing: str) -> tuple[int | None, str] | None:
    """On uvloop: one leg vanishes; the other, not knowing yet, sends one more frame, then answers
    the gateway's close. Returns the close the surviving side got."""

    async def scenario() -> tuple[int | None, str] | None:
        wire = await WireBackend("query", echo=False).start()
        stack = await start_stack(old_port=wire.port, relay=relay)
        try:
            async with asyncio.timeout(TIMEOUT):
                client = await WireClient.open(stack.url(f"token={make_token()}"))
                sock = await wire.next_socket()
                sock.send("hello")
                await client.until(lambda: client.messages == ["hello"])
                survivor: WireClient | BackendWire = sock if vanishing == "client" else client
                survivor.hold()  # it answers the gateway's close only after its frame in flight
                if vanishing == "client":
                    client.reset()
                else:
                    assert sock.transport is not None
                    sock.transport.abort()
                await survivor.until(lambda: survivor.close is not None)  # the gateway's close
                survivor.write(frame_bytes("in flight", mask=vanishing == "backend"))
                survivor.release()
                await survivor.until(lambda: survivor.eof)
                await client.aclose()
                return survivor.close
        finally:
            await stack.close()
            await wire.close()

    return uvloop.run(scenario())


@pytest.mark.parametrize("vanishing", ["client", "backend"])
def test_on_uvloop_a_frame_in_flight_to_a_leg_that_vanished_is_dropped_quietly(relay: str, vanishing: str, caplog):
    # uvloop, unlike asyncio, raises on a write to a closed transport: a relay that writes to
    # the vanished leg fails the surviving leg's transport ("Fatal error on transport").
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        close = _frames_in_flight_to_a_vanished_leg(relay, vanishing)
    assert close == ((1001, "client connection lost") if vanishing == "client" else (1014, "upstream connection lost"))
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


async def test_a_client_that_vanishes_while_holding_back_the_backend_lets_the_backend_close_cleanly(servers: Servers):
    wire = WireBackend("query", sndbuf=64 * 1024)
    stack, wire = await wire_stack(servers, "old", wire=wire)
    async with asyncio.timeout(3 * TIMEOUT):
        client = await WireClient.open(stack.url(f"token={make_token()}"))
        client.send("hello")
        await client.until(lambda: client.messages == ["hello"])
        sock = await wire.next_socket()
        connection = only_connection(stack)
        upstream = connection.upstream
        assert upstream is not None and upstream.transport is not None
        client.writer.transport.pause_reading()  # the app stops reading
        sock.stream(4096, numbered)

        async def held_back() -> bool:
            return sock.paused and not upstream.transport.is_reading()

        assert await eventually(held_back)
        client.reset()
        # The gateway closes the backend "client connection lost" and reads on past the frames
        # it no longer has anyone to give to, up to the backend's echo of that close.
        await sock.until(lambda: sock.close is not None)
        assert sock.close == (1001, "client connection lost")

        async def upstream_gone() -> bool:
            return upstream.done

        assert await eventually(upstream_gone)
        assert upstream.close_received  # the echo was read, not given up on after close_timeout
        await client.aclose()


# -- churn on the production loop ---------------------------------------------------------------------


class GatewayProcess:
    """`python -m gateway serve` (on uvloop, as in production), its JSON log lines collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.records: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._eof = False
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, config_path: Path) -> GatewayProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("JWT_SECRET", "GATEWAY_CONFIG")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config_path),
            cwd=config_path.parent, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                self.records.append(record)
            self._changed.set()
        self._eof = True
        self._changed.set()

    async def wait_log(self, msg: str) -> dict[str, Any]:
        while True:
            for record in self.records:
                if record.get("msg") == msg:
                    return record
            assert not self._eof, f"the gateway exited before logging {msg!r}:\n" + "\n".join(self.lines[-30:])
            self._changed.clear()
            await self._changed.wait()

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(TIMEOUT):
                return await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError("the gateway did not exit on SIGTERM:\n" + "\n".join(self.lines[-30:])) from None
        finally:
            await asyncio.wait_for(self._reader, TIMEOUT)


async def rollout_of(admin: str) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http:
        async with http.get(admin + "/rollout") as response:
            assert response.status == 200
            return await response.json()


# Every way a client session can end, each one bounded and checked for what the client sees.


async def _clean(url: str) -> None:
    async with websockets.connect(f"{url}?token={make_token('churn-a')}") as ws:
        await ws.send("hi")
        assert await ws.recv() == "hi"
    assert ws.close_code == 1000


async def _message_close_with_a_code(url: str) -> None:
    ws = await websockets.connect(url)
    await ws.send(authenticate_frame(make_token("churn-b")))
    await ws.send(b"\x00\x01")
    assert json.loads(await ws.recv())["type"] == "connected"
    assert await ws.recv() == b"\x00\x01"
    await ws.close(4001, "x")
    assert ws.close_code == 4001


async def _close_during_the_switch(url: str) -> None:
    ws = await websockets.connect(url)
    await ws.send(authenticate_frame(make_token("churn-c")))
    await ws.close(1000)  # before `connected`: the session is still being set up
    assert ws.close_code is not None


async def _reset_after_a_frame(url: str) -> None:
    client = await WireClient.open(f"{url}?token={make_token('churn-d')}")
    client.send("hi")
    await client.until(lambda: client.messages == ["hi"])
    client.reset()
    await client.aclose()


async def _reset_mid_frame(url: str) -> None:
    client = await WireClient.open(f"{url}?token={make_token('churn-e')}")
    client.send("hi")
    await client.until(lambda: client.messages == ["hi"])
    client.write(frame_bytes(b"\x0d" * 100_000, mask=True)[:50_000])
    client.reset()
    await client.aclose()


async def _reset_during_the_switch(url: str) -> None:
    client = await WireClient.open(url, then=authenticate_bytes(make_token("churn-f")) + frame_bytes("early", mask=True))
    client.reset()
    await client.aclose()


async def _reset_while_the_backend_streams(url: str) -> None:
    client = await WireClient.open(f"{url}?token={make_token('churn-k')}")
    client.send("hi")
    await client.until(lambda: client.messages == ["hi"])
    client.send(json.dumps({"type": "stub.burst", "count": 2000}))
    client.reset()  # the backend's burst then meets a client that is gone
    await client.aclose()


async def _half_close_after_a_frame(url: str) -> None:
    client = await WireClient.open(f"{url}?token={make_token('churn-g')}")
    client.send("hi")
    await client.until(lambda: client.messages == ["hi"])
    client.writer.write_eof()  # shutdown(SHUT_WR): the client says no more, and reads on
    await client.until(lambda: client.eof)
    await client.aclose()


async def _half_close_right_after_the_upgrade(url: str) -> None:
    client = await WireClient.open(url, then=authenticate_bytes(make_token("churn-h")))
    client.writer.write_eof()
    await client.until(lambda: client.eof)
    await client.aclose()


async def _backend_drops(url: str) -> None:
    async with websockets.connect(f"{url}?token={make_token('churn-i')}") as ws:
        await ws.send("hi")
        assert await ws.recv() == "hi"
        await ws.send(json.dumps({"type": "stub.drop"}))
        await ws.wait_closed()
    assert ws.close_code == 1014


async def _backend_closes(url: str) -> None:
    async with websockets.connect(f"{url}?token={make_token('churn-j')}") as ws:
        await ws.send(json.dumps({"type": "stub.close", "code": 4002, "reason": "bye"}))
        await ws.wait_closed()
    assert (ws.close_code, ws.close_reason) == (4002, "bye")


CHURN = [
    _clean, _message_close_with_a_code, _close_during_the_switch, _reset_after_a_frame, _reset_mid_frame,
    _reset_during_the_switch, _reset_while_the_backend_streams, _half_close_after_a_frame, _half_close_right_after_the_upgrade, _backend_drops,
    _backend_closes,
]


@pytest.mark.timeout(120)
async def test_gateway_process_on_uvloop_survives_churn_of_sessions_ending_every_way(tmp_path: Path):
    auth = make_config().auth
    old_runner, old_port = await start_site(create_stub_app("old", auth), "127.0.0.1", 0)
    new_runner, new_port = await start_site(create_stub_app("new", auth), "127.0.0.1", 0)
    raw = raw_config(old_port, new_port, admin={"host": "127.0.0.1", "port": 0}, drain={"grace_seconds": 0, "window_seconds": 0})
    raw["rollout"]["force_new"] = ["churn-b", "churn-c", "churn-f", "churn-h"]
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    gateway = await GatewayProcess.start(config_path)
    try:
        async with asyncio.timeout(2 * TIMEOUT):
            listening = await gateway.wait_log("listening")
            admin = f"http://127.0.0.1:{(await gateway.wait_log('admin listening'))['port']}"
        maps = Path(f"/proc/{gateway.proc.pid}/maps")
        if maps.exists():
            assert "uvloop" in maps.read_text(), "the gateway process does not run on uvloop"
        url = f"ws://127.0.0.1:{listening['port']}{listening['path']}"

        # 300 sessions, 8 at a time, each ending one of the ways above; bounded by a deadline
        # so a slow machine runs fewer rather than failing on time.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3 * TIMEOUT
        failures: list[str] = []
        done: dict[str, int] = {}
        slots = asyncio.Semaphore(8)

        async def one(n: int) -> None:
            async with slots:
                if loop.time() > deadline:
                    return
                way = CHURN[n % len(CHURN)]
                try:
                    async with asyncio.timeout(TIMEOUT):
                        await way(url)
                except Exception as exc:
                    failures.append(f"{way.__name__} #{n}: {exc!r}")
                else:
                    done[way.__name__] = done.get(way.__name__, 0) + 1

        await asyncio.gather(*(one(n) for n in range(300)))
        assert failures == []
        assert set(done) == {way.__name__ for way in CHURN}  # every way ran at least once

        # Still alive, still serving, and nothing left behind.
        assert gateway.proc.returncode is None, "\n".join(gateway.lines[-30:])
        async with asyncio.timeout(TIMEOUT):
            await _clean(url)
            await _message_close_with_a_code(url)
        async with asyncio.timeout(2 * TIMEOUT):
            while (await rollout_of(admin))["active_connections"]:  # a bounded poll: no event to await
                await asyncio.sleep(0.1)
    finally:
        code = await gateway.stop()
        await old_runner.cleanup()
        await new_runner.cleanup()
    assert code == 0, "\n".join(gateway.lines[-30:])
    assert not [line for line in gateway.lines if "Traceback" in line or "double free" in line or "corruption" in line]
    assert [r for r in gateway.records if r.get("level") in ("error", "critical")] == []
