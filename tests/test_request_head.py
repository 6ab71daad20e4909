"""Issue 17 over real sockets: the client's request head as a raw TCP client sends it (the
bytes a library would refuse to write), pending handshakes held by a flood from a few
addresses, and the scheme a trusted proxy reports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import websockets

from gateway.wire.listener import PendingShares

from .helpers import TIMEOUT, Servers, Stack, eventually, make_token, open_client
from .wire import frame_bytes

FIELDS = (
    "Host: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def port_of(stack: Stack) -> int:
    return int(stack.gateway_url.split(":")[2].split("/")[0])


def upgrade(target: str, host: str = "127.0.0.1") -> bytes:
    return f"GET {target} HTTP/1.1\r\n{FIELDS.format(host=host)}".encode("latin-1")


Connect = Callable[..., Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@pytest.fixture
async def stack(servers: Servers) -> Stack:
    # A request timeout far past TIMEOUT: an answer that only the timeout would bring never comes in time.
    return await servers.stack(limits={"handshake_timeout_seconds": 60})


@pytest.fixture
async def connect(stack: Stack) -> AsyncIterator[Connect]:
    """Raw TCP connections to the gateway, from 127.0.0.1 unless `source` says otherwise; closed at teardown."""
    writers: list[asyncio.StreamWriter] = []

    async def open_one(source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(stack), local_addr=(source, 0))
        writers.append(writer)
        return reader, writer

    yield open_one
    for writer in writers:
        writer.close()


async def answer_head(reader: asyncio.StreamReader) -> bytes:
    """The gateway's response head (status line and fields)."""
    async with asyncio.timeout(TIMEOUT):
        return await reader.readuntil(b"\r\n\r\n")


# -- the four request-head defects of issue 17 ------------------------------------------------------


@pytest.mark.parametrize("byte", [b"\x00", b"\x01", b"\x7f"], ids=["nul", "soh", "del"])
async def test_a_control_byte_in_the_target_is_answered_400_not_upgraded(connect: Connect, byte: bytes) -> None:
    reader, writer = await connect()
    writer.write(upgrade(f"/ws/chat?x=a{byte.decode('latin-1')}b&token={make_token('mallory')}"))
    head = await answer_head(reader)
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"mallory" not in head and make_token("mallory").encode() not in await reader.read()


async def test_the_absolute_form_upgrades_to_the_path_and_query_it_names(stack: Stack, connect: Connect) -> None:
    reader, writer = await connect()
    target = f"http://127.0.0.1:{port_of(stack)}/ws/chat?token={make_token('alice')}"
    writer.write(upgrade(target) + frame_bytes("hello", mask=True))
    head = await answer_head(reader)
    assert head.startswith(b"HTTP/1.1 101 ")
    async with asyncio.timeout(TIMEOUT):
        echo = await reader.readexactly(2 + len("hello"))
    assert echo == b"\x81\x05hello"  # the old backend's echo: authenticated by the query the URL carried


@pytest.mark.parametrize("host", ["127.0.0.1/evil", "user@127.0.0.1", "127.0.0.1 evil"], ids=["path", "userinfo", "space"])
async def test_a_host_value_that_is_not_a_host_is_answered_400(connect: Connect, host: str) -> None:
    reader, writer = await connect()
    writer.write(upgrade(f"/ws/chat?token={make_token('alice')}", host=host))
    assert (await answer_head(reader)).startswith(b"HTTP/1.1 400 ")


async def test_a_head_with_bare_lf_line_ends_is_answered_at_once(connect: Connect) -> None:
    reader, writer = await connect()
    writer.write(upgrade(f"/ws/chat?token={make_token('alice')}").replace(b"\r\n", b"\n"))
    assert (await answer_head(reader)).startswith(b"HTTP/1.1 400 ")


async def test_a_path_other_than_the_configured_one_is_404(connect: Connect) -> None:
    reader, writer = await connect()
    writer.write(upgrade(f"/ws/other?token={make_token('alice')}"))
    assert (await answer_head(reader)).startswith(b"HTTP/1.1 404 ")


# -- pending handshakes: a flood from a few addresses leaves room for everyone else -----------------


def test_an_address_takes_up_to_its_share_and_gets_each_one_given_back() -> None:
    shares = PendingShares()
    assert [shares.take("a", 2) for _ in range(3)] == [True, True, False]
    assert shares.take("b", 2)
    shares.give("a")
    assert shares.take("a", 2) and not shares.take("a", 2)
    for key in ("a", "a", "b"):
        shares.give(key)
    assert shares.held == {}  # an address with nothing pending is forgotten


async def test_a_real_client_upgrades_and_authenticates_while_a_few_addresses_hold_1000_idle_sockets(servers: Servers) -> None:
    stack = await servers.stack(limits={"max_pending_handshakes": 1000, "handshake_timeout_seconds": 60})
    share = stack.gateway.config.limits.max_pending_handshakes_per_ip
    flooders = [f"127.0.0.{n}" for n in range(2, 7)]
    assert share * len(flooders) < 1000  # the default share: five addresses cannot fill the bound
    flood: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for index in range(1000):
            source = flooders[index % len(flooders)]
            flood.append(await asyncio.open_connection("127.0.0.1", port_of(stack), local_addr=(source, 0)))

        async def shares_full() -> bool:
            return stack.gateway.pending == share * len(flooders)

        assert await eventually(shares_full)
        over_share = await answer_head(flood[-1][0])
        assert over_share.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: " in over_share

        ws = await open_client(stack, "legacy", make_token("alice"), early=["hello"])
        async with asyncio.timeout(TIMEOUT):
            assert await ws.recv() == "hello"
            await ws.close()
    finally:
        for _, writer in flood:
            writer.close()


async def test_an_address_under_its_share_still_connects_when_another_is_over_it(servers: Servers) -> None:
    stack = await servers.stack(limits={"max_pending_handshakes": 100, "max_pending_handshakes_per_ip": 3})
    held = [await asyncio.open_connection("127.0.0.1", port_of(stack), local_addr=("127.0.0.2", 0)) for _ in range(4)]
    try:
        assert (await answer_head(held[3][0])).startswith(b"HTTP/1.1 503 ")
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(stack), local_addr=("127.0.0.3", 0))
        held.append((reader, writer))
        writer.write(upgrade("/elsewhere"))
        assert (await answer_head(reader)).startswith(b"HTTP/1.1 404 ")  # read and answered, not refused unread
    finally:
        for _, writer in held:
            writer.close()


async def test_a_socket_leaving_its_request_phase_gives_its_address_share_back(servers: Servers) -> None:
    stack = await servers.stack(limits={"max_pending_handshakes": 100, "max_pending_handshakes_per_ip": 1})
    for _ in range(3):  # one at a time, each upgraded and ended: the one share is reused
        ws = await open_client(stack, "legacy", make_token("alice"), early=["hi"])
        async with asyncio.timeout(TIMEOUT):
            assert await ws.recv() == "hi"
            await ws.close()


# -- X-Forwarded-Proto: believed from a trusted proxy only -------------------------------------------


@pytest.mark.parametrize(
    ("trusted", "sent", "forwarded"),
    [(["127.0.0.1/32"], "https", "https"), (["127.0.0.1/32"], "gopher", "http"), ([], "https", "http")],
    ids=["trusted-https", "trusted-junk", "untrusted"],
)
async def test_x_forwarded_proto_is_passed_on_only_from_a_trusted_proxy(
    servers: Servers, trusted: list[str], sent: str, forwarded: str
) -> None:
    old = await servers.recording("query")
    stack = await servers.stack(old_port=old.port, trusted_proxies=trusted)
    async with asyncio.timeout(TIMEOUT):
        async with websockets.connect(
            stack.url(f"token={make_token('alice')}"), additional_headers={"X-Forwarded-Proto": sent}
        ):
            sock = await old.next_socket()
    assert sock.headers["X-Forwarded-Proto"] == forwarded
