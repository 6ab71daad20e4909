"""Issue 10: deadlines only progress can move, request limits, strict claims, and a guard
that counts only what is the backend's fault."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator

import pytest
import websockets
from aiohttp import web

from gateway.core.auth import AuthError, Verifier
from gateway.core.guard import GuardState
from gateway.service.server import start_site

from .helpers import SECRET, TIMEOUT, Servers, closed, eventually, make_config, make_token, open_client

UPGRADE = (
    "GET /ws/chat{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
)


def signed(payload: str) -> str:
    """An HS256 token over exactly `payload` (JSON text PyJWT would not write itself)."""

    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    head = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(payload.encode())
    return (head + b"." + b64(hmac.new(SECRET.encode(), head, hashlib.sha256).digest())).decode()


async def closed_by_peer(reader: asyncio.StreamReader) -> bytes:
    """Everything the gateway sends until it closes the socket (a reset counts as closed)."""
    try:
        async with asyncio.timeout(TIMEOUT):
            return await reader.read()
    except ConnectionResetError:
        return b""


# -- strict claim types ------------------------------------------------------------------------

LATER = int(time.time()) + 3600


@pytest.mark.parametrize(
    "claims",
    [
        f'{{"user_id":"a","exp":"{LATER}"}}',
        '{"user_id":"a","nbf":"1"}',
        '{"user_id":"a","iat":"1"}',
        '{"user_id":"a","iat":true}',
        f'{{"user_id":"a","exp":{LATER},"nbf":null}}',
        f'{{"user_id":"a","exp":[{LATER}]}}',
    ],
)
def test_time_claims_of_the_wrong_type_are_malformed(claims):
    with pytest.raises(AuthError) as caught:
        Verifier(make_config().auth).verify(signed(claims))
    assert caught.value.reason == "malformed_token"


def test_numeric_time_claims_still_verify():
    identity = Verifier(make_config().auth).verify(signed(f'{{"user_id":"a","exp":{LATER}.5,"iat":1,"nbf":1}}'))
    assert (identity.user_id, identity.expires_at) == ("a", LATER + 0.5)


@pytest.mark.parametrize("style", ["legacy", "message"])
async def test_a_numeric_string_exp_closes_1008(servers: Servers, style):
    stack = await servers.stack()
    ws = await open_client(stack, style, signed(f'{{"user_id":"a","exp":"{LATER}"}}'))
    assert (await closed(ws))[0] == 1008


# -- the HTTP request phase ----------------------------------------------------------------------


@pytest.fixture
async def short_deadlines(servers: Servers):
    return await servers.stack(limits={"handshake_timeout_seconds": 0.5}, auth={"timeout_seconds": 1})


@pytest.fixture
async def raw(short_deadlines) -> AsyncIterator:
    """Open raw TCP connections to the gateway; all closed at teardown."""
    port = int(short_deadlines.gateway_url.split(":")[2].split("/")[0])
    writers = []

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        return reader, writer

    yield connect
    for writer in writers:
        writer.close()


async def test_a_connection_that_sends_nothing_is_closed(raw):
    reader, _ = await raw()
    assert await closed_by_peer(reader) == b""


async def test_a_request_dribbled_a_byte_at_a_time_is_cut_off(raw):
    reader, writer = await raw()
    request = UPGRADE.format(query="?token=x", extra="X-Padding: " + "p" * 400 + "\r\n").encode()
    cut_off = False
    for index in range(len(request)):  # ~0.5 s of deadline against ~10 s of dribbling
        try:
            writer.write(request[index : index + 1])
            await writer.drain()
        except ConnectionError:
            cut_off = True
            break
        if reader.at_eof():
            cut_off = True
            break
        await asyncio.sleep(0.02)  # the client's pace, not a synchronisation
    if not cut_off:
        assert await closed_by_peer(reader) == b"", "the whole request was dribbled in and answered"
    assert index < len(request) - 1


async def test_headers_over_the_limit_get_431(raw):
    reader, writer = await raw()
    headers = "".join(f"X-Big-{n}: {'v' * 8000}\r\n" for n in range(100))
    writer.write(UPGRADE.format(query="", extra=headers).encode())
    answer = await closed_by_peer(reader)
    assert answer.startswith(b"HTTP/1.1 431 ")


async def test_a_request_line_over_the_limit_gets_414(raw):
    reader, writer = await raw()
    writer.write(UPGRADE.format(query="?pad=" + "q" * 17000, extra="").encode())
    assert (await closed_by_peer(reader)).startswith(b"HTTP/1.1 414 ")


@pytest.mark.parametrize("method", ["HEAD", "POST"])
async def test_only_get_upgrades(raw, method):
    reader, writer = await raw()
    writer.write(UPGRADE.format(query="", extra="").replace("GET", method, 1).encode())
    answer = await closed_by_peer(reader)
    assert answer.startswith(b"HTTP/1.1 405 ")


@pytest.mark.parametrize("version", ["7", "8"])
async def test_only_version_13_upgrades(raw, version):
    reader, writer = await raw()
    writer.write(UPGRADE.format(query="", extra="").replace("Version: 13", f"Version: {version}").encode())
    answer = await closed_by_peer(reader)
    assert answer.startswith(b"HTTP/1.1 426 ")
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in answer


async def test_control_frames_do_not_extend_the_auth_deadline(short_deadlines):
    ws = await websockets.connect(short_deadlines.url(), ping_interval=None)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + TIMEOUT
    try:
        while loop.time() < give_up:  # a ping every 0.2 s against a 1 s deadline
            await ws.ping()
            await asyncio.sleep(0.2)
    except websockets.ConnectionClosed:
        pass
    code, _ = await closed(ws)
    assert code == 1008


async def test_pending_handshakes_are_capped(servers: Servers):
    stack = await servers.stack(limits={"max_pending_handshakes": 2, "max_pending_handshakes_per_ip": 2})
    port = int(stack.gateway_url.split(":")[2].split("/")[0])
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]

    async def counted() -> bool:
        return stack.gateway.pending == 2

    assert await eventually(counted)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = await closed_by_peer(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b"\r\nRetry-After: " in answer
    for _, idle_writer in idle:
        idle_writer.close()

    async def released() -> bool:
        return stack.gateway.pending == 0

    assert await eventually(released)
    ws = await open_client(stack, "legacy", make_token("after"), early=["hello"])
    assert await ws.recv() == "hello"
    await ws.close()

    async def all_released() -> bool:
        return stack.gateway.pending == 0

    assert await eventually(all_released)


# -- the guard counts only the backend's faults ---------------------------------------------------


async def answering(status: str) -> tuple[asyncio.Server, int]:
    """A backend that answers every upgrade with `status`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


GUARD = {"min_samples": 3, "max_failure_ratio": 0.05, "window_seconds": 600}


async def test_a_backend_refusing_the_clients_long_url_does_not_trip_the_guard(servers: Servers):
    server, port = await answering("414 URI Too Long")
    try:
        stack = await servers.stack(new_port=port, rollout={"new_percent": 100, "guard": GUARD})
        for n in range(6):
            ws = await open_client(stack, "legacy", make_token(f"user-{n}"), query="pad=" + "x" * 2000)
            assert (await closed(ws))[0] == 1014
        assert stack.gateway.guard.state is GuardState.HEALTHY
        assert stack.gateway.effective_percent() == 100
    finally:
        server.close()


async def test_a_backend_answering_5xx_does_trip_the_guard(servers: Servers):
    server, port = await answering("502 Bad Gateway")
    try:
        stack = await servers.stack(new_port=port, rollout={"new_percent": 100, "guard": GUARD})
        for n in range(3):  # each falls back to the old backend, which echoes
            ws = await open_client(stack, "legacy", make_token(f"user-{n}"), early=["hi"])
            assert await ws.recv() == "hi"
            await ws.close()
        assert stack.gateway.guard.state is GuardState.TRIPPED
    finally:
        server.close()


async def test_a_new_backend_that_pings_but_never_says_connected_is_timed_out(servers: Servers):
    """The upstream handshake deadline is not moved by the backend's pings."""

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=0.2)  # a ping every 0.2 s, never `connected`
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/ws/chat", handler)
    runner, port = await start_site(app, "127.0.0.1", 0)
    try:
        stack = await servers.stack(
            new_port=port,
            rollout={"new_percent": 100, "fallback_to_old": False},
            backends={
                "old": {"url": "ws://127.0.0.1:1/ws/chat", "auth": "query"},
                "new": {"url": f"ws://127.0.0.1:{port}/ws/chat", "auth": "message", "handshake_timeout_seconds": 1},
            },
        )
        ws = await open_client(stack, "message", make_token("alice"))
        assert (await closed(ws))[0] == 1014
    finally:
        await runner.cleanup()
