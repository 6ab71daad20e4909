"""End to end over loopback: the four paths {legacy ?token=, authenticate frame} x {old, new}.

A `websockets` client talks to the real gateway, which talks to the stub backends (or a
recording backend where a test must see what reached the backend itself).
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import websockets

from .helpers import (
    MiB,
    TIMEOUT,
    Servers,
    Stack,
    authenticate_frame,
    closed,
    make_token,
    open_client,
    receive_until_closed,
)

# The contract holds on both relays (`Gateway(byte_relay=...)`): each test runs once per relay.
pytestmark = pytest.mark.relays("byte", "frame")

PATHS = [("legacy", "old"), ("legacy", "new"), ("message", "old"), ("message", "new")]


@pytest.fixture(params=PATHS, ids=[f"{style}-{backend}" for style, backend in PATHS])
def path(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param


async def open_path(stack: Stack, path: tuple[str, str], user: str = "alice", **kwargs):
    style, backend = path
    stack.route_to(backend)
    return await open_client(stack, style, make_token(user), **kwargs)


async def expect_ready(ws, stack: Stack, path: tuple[str, str], user: str = "alice") -> None:
    """A message client's first frame is `connected`: the new backend's own, or the gateway's."""
    style, backend = path
    if style != "message":
        return
    first = await ws.recv()
    if backend == "new":
        assert json.loads(first) == {"type": "connected", "message": "Connected to Wealth Coach AI", "user_id": user}
    else:
        assert first == stack.gateway.config.auth.connected_message


MIXED = (
    ["first", b"\x00\x01\x02\xff", "h\u00e9llo \u2713 \U0001f680", b"", "", bytes(range(256))]
    + [f"text-{i}" if i % 2 else f"binary-{i}".encode() for i in range(100)]
    + [b"\xc3\x28 not utf-8", json.dumps({"type": "chat", "text": "last"})]
)


async def test_frames_sent_before_the_upstream_is_ready_arrive_in_order_with_type_and_bytes_intact(stack, path):
    async with asyncio.timeout(TIMEOUT):
        ws = await open_path(stack, path, early=MIXED)
        await expect_ready(ws, stack, path)
        echoed = [await ws.recv() for _ in MIXED]
        assert echoed == MIXED  # str == str and bytes == bytes only: types are checked too
        await ws.close()


async def test_frame_of_exactly_max_message_bytes_passes_both_ways(stack, path):
    assert stack.gateway.config.limits.max_message_bytes == MiB
    big_binary = os.urandom(MiB)
    big_text = "0123456789abcdef" * (MiB // 16)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_path(stack, path, early=[big_binary], compression=None)
        await expect_ready(ws, stack, path)
        assert await ws.recv() == big_binary
        await ws.send(big_text)
        assert await ws.recv() == big_text
        await ws.close()
        assert ws.close_code == 1000


async def test_deflate_client_can_send_an_incompressible_frame_of_exactly_max_message_bytes(stack):
    big_binary = os.urandom(MiB)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, "legacy", make_token(), early=[big_binary], compression="deflate")
        assert await ws.recv() == big_binary
        await ws.close()


@pytest.mark.parametrize("backend", ["old", "new"])
async def test_message_client_first_frame_is_connected(servers: Servers, backend):
    configured = '{"type":"connected","message":"configured greeting"}'
    stack = await servers.stack(auth={"connected_message": configured})
    stack.route_to(backend)
    async with asyncio.timeout(TIMEOUT):
        async with websockets.connect(stack.url()) as ws:
            await ws.send(authenticate_frame(make_token("carol")))
            await ws.send("hello")
            first = await ws.recv()
            if backend == "new":  # the backend's own frame, untouched
                assert json.loads(first) == {"type": "connected", "message": "Connected to Wealth Coach AI", "user_id": "carol"}
            else:  # the gateway's configured frame
                assert first == configured
            assert await ws.recv() == "hello"


@pytest.mark.parametrize("backend", ["old", "new"])
async def test_legacy_client_never_sees_a_connected_frame(stack, backend):
    burst = json.dumps({"type": "stub.burst", "count": 3, "close": 1000, "reason": "done"})
    async with asyncio.timeout(TIMEOUT):
        ws = await open_path(stack, ("legacy", backend), early=["a", b"b", burst])
        frames = await receive_until_closed(ws)
        assert frames[:2] == ["a", b"b"]
        assert [json.loads(f)["n"] for f in frames[2:]] == [0, 1, 2]
        assert not any('"connected"' in f for f in frames if isinstance(f, str))
        assert await closed(ws) == (1000, "done")


async def test_client_close_code_and_reason_reach_the_backend(servers: Servers, path):
    old = await servers.recording("query")
    new = await servers.recording("message")
    stack = await servers.stack(old_port=old.port, new_port=new.port)
    token = make_token("dave")
    style, backend = path
    recorder = old if backend == "old" else new
    async with asyncio.timeout(TIMEOUT):
        ws = await open_path(stack, path, user="dave", query="room=1")
        if style == "message":
            assert json.loads(await ws.recv())["type"] == "connected"
        else:  # a legacy client cannot see readiness; a round trip proves it
            await ws.send("ping")
            assert await ws.recv() == "ping"
        await ws.close(4000, "x")
        assert (await closed(ws))[0] == 4000  # the gateway echoes the code
        sock = await recorder.next_socket()
        assert await sock.wait_closed() == (4000, "x")
        assert sock.frames == ([] if style == "message" else ["ping"])
        assert sock.frames_before_ready == 0
        # the upstream authenticated in the backend's own style
        if backend == "old":
            assert sock.query == {"room": "1", "token": token} and sock.auth_frame is None
        else:
            assert "token" not in sock.query_names
            assert json.loads(sock.auth_frame) == {"type": "authenticate", "token": token}


async def test_client_empty_close_frame_reaches_backend_as_1000(servers: Servers):
    old = await servers.recording("query")
    stack = await servers.stack(old_port=old.port)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, "legacy", make_token())
        await ws.send("ping")
        assert await ws.recv() == "ping"
        async with ws.send_context():  # websockets' public close() always sends a code
            ws.protocol.send_close()
        await ws.wait_closed()
        sock = await old.next_socket()
        assert await sock.wait_closed() == (1000, "")


async def test_backend_close_code_and_reason_reach_the_client(stack, path):
    async with asyncio.timeout(TIMEOUT):
        ws = await open_path(stack, path, early=["before", json.dumps({"type": "stub.close", "code": 1000, "reason": "bye"})])
        await expect_ready(ws, stack, path)
        assert await receive_until_closed(ws) == ["before"]
        assert await closed(ws) == (1000, "bye")


async def test_frames_the_backend_sends_just_before_closing_reach_the_client_first(stack, path):
    count = 300
    burst = json.dumps({"type": "stub.burst", "count": count, "close": 4002, "reason": "burst done"})
    async with asyncio.timeout(TIMEOUT):
        ws = await open_path(stack, path, early=[burst])
        await expect_ready(ws, stack, path)
        frames = await receive_until_closed(ws)
        assert [json.loads(f) for f in frames] == [{"type": "stub.burst", "n": n} for n in range(count)]
        assert await closed(ws) == (4002, "burst done")


async def test_other_query_parameters_and_forwarding_headers_reach_the_backend(stack, path):
    style, backend = path
    stack.route_to(backend)
    token = make_token("erin")
    query = f"room=lobby&token={token}&lang=en&sp=a%20b" if style == "legacy" else "room=lobby&lang=en&sp=a%20b"
    headers = {"X-Request-ID": "req-42", "X-Forwarded-For": "203.0.113.9"}
    async with asyncio.timeout(TIMEOUT):
        async with websockets.connect(stack.url(query), additional_headers=headers, user_agent_header="e2e-client/1.0") as ws:
            if style == "message":
                await ws.send(authenticate_frame(token))
            await ws.send(json.dumps({"type": "stub.info"}))
            await expect_ready(ws, stack, path, user="erin")
            info = json.loads(await ws.recv())
    assert info["style"] == backend and info["user_id"] == "erin"
    assert info["query"] == {"room": "lobby", "lang": "en", "sp": "a b"}
    names = info["query_names"]
    assert [n for n in names if n != "token"] == ["room", "lang", "sp"]
    assert names.count("token") == (1 if backend == "old" else 0)  # stripped for the new backend
    assert info["headers"] == {
        "X-Forwarded-For": "203.0.113.9, 127.0.0.1",
        "X-Forwarded-Proto": "http",
        "X-Request-ID": "req-42",
        "User-Agent": "e2e-client/1.0",
    }


@pytest.mark.parametrize("backend", ["old", "new"])
async def test_request_id_is_generated_when_absent_and_sent_both_ways(stack, backend):
    stack.route_to(backend)
    async with asyncio.timeout(TIMEOUT):
        async with websockets.connect(stack.url(f"token={make_token()}")) as ws:
            await ws.send(json.dumps({"type": "stub.info"}))
            info = json.loads(await ws.recv())
            generated = ws.response.headers["X-Request-ID"]
    assert generated and info["headers"]["X-Request-ID"] == generated
    assert info["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert info["headers"]["User-Agent"].startswith("Python/")  # websockets' default, forwarded


async def test_message_client_authenticate_frame_reaches_new_backend_unchanged(servers: Servers):
    new = await servers.recording("message")
    stack = await servers.stack(new_port=new.port)
    stack.route_to("new")
    frame = json.dumps({"type": "authenticate", "token": make_token("frank"), "client": {"version": "9.1"}})
    async with asyncio.timeout(TIMEOUT):
        async with websockets.connect(stack.url()) as ws:
            await ws.send(frame)
            await ws.send(b"\x01")
            assert json.loads(await ws.recv())["type"] == "connected"
            assert await ws.recv() == b"\x01"
        sock = await new.next_socket()
        assert sock.auth_frame == frame
        assert sock.frames == [b"\x01"] and sock.frames_before_ready == 0


async def test_frames_and_close_sent_before_the_upstream_is_ready_still_reach_the_backend(servers: Servers):
    old = await servers.recording("query", hold_upgrade=True)
    stack = await servers.stack(old_port=old.port)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, "legacy", make_token(), early=["one", b"two"])
        await old.requested.wait()  # the gateway is mid-upgrade: the frames are held
        await ws.close(4000, "x")
        await ws.wait_closed()
        old.release.set()
        await old.next_finished()
        assert [(s.frames, s.close_code, s.close_reason) for s in old.sockets] == [(["one", b"two"], 4000, "x")]
