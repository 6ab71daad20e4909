"""The per-IP auth-failure limit on one gateway with the in-process store.

A client over the limit must get its 1008 at once. The refusal used to wait out the
gateway's `close_timeout` (the client's answer to the close was never read), so here both
the gateway's and the client's close timeouts are far longer than the test's bound: a
refusal that waits on either makes the test time out instead of passing slowly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import websockets

from gateway.core.auth import REASONS
from gateway.wire.frames import CLOSE, parse_close

from .helpers import TIMEOUT, Servers, Stack, authenticate_frame, closed, make_token, metric

RATE_LIMITED = REASONS["rate_limited"]
BAD_SIGNATURE = REASONS["bad_signature"]
FOREVER = 3600.0  # a closing handshake that waits this long fails the test by its TIMEOUT
UPGRADE = (
    "GET /ws/chat?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def refused(stack: Stack, token: str, style: str) -> tuple[int, str]:
    """The close a session got; fails the test if a frame makes the round trip."""
    async with asyncio.timeout(TIMEOUT):
        ws = await websockets.connect(stack.url(f"token={token}" if style == "legacy" else ""), close_timeout=FOREVER)
        try:
            if style == "message":
                await ws.send(authenticate_frame(token))
            await ws.send("ping")
            await ws.recv()
        except websockets.ConnectionClosed:
            return await closed(ws)
        await ws.close()
    raise AssertionError("the gateway admitted a session it should have refused")


def forget_forever(stack: Stack) -> Callable[[], Awaitable[None]]:
    async def restore() -> None:
        stack.gateway.close_timeout = 1.0

    return restore


async def test_a_client_over_the_limit_is_refused_at_once_whatever_its_token(servers: Servers):
    backend = await servers.recording("query")
    stack = await servers.stack(old_port=backend.port, limits={"auth_failures_per_ip_per_minute": 2})
    stack.gateway.close_timeout = FOREVER
    servers.closing(forget_forever(stack))  # should the test fail, teardown need not wait FOREVER
    bad = make_token("mallory", secret="not-the-gateway-secret-0123456789abcdef")

    assert await refused(stack, bad, "legacy") == (1008, BAD_SIGNATURE)
    assert await refused(stack, bad, "message") == (1008, BAD_SIGNATURE)
    for style in ("legacy", "message", "legacy"):
        assert await refused(stack, make_token("alice"), style) == (1008, RATE_LIMITED)

    assert backend.connections == 0
    assert metric(stack, "ws_gateway_auth_failures_total", reason="bad_signature") == 2


async def close_frame(reader: asyncio.StreamReader) -> tuple[int | None, str]:
    """Skip the 101, then read server frames up to the first close frame (short: no extended length)."""
    await reader.readuntil(b"\r\n\r\n")
    while True:
        head = await reader.readexactly(2)
        payload = await reader.readexactly(head[1] & 0x7F)
        if head[0] & 0x0F == CLOSE:
            return parse_close(payload)


async def test_a_failure_is_counted_before_its_close_is_sent(servers: Servers):
    """A client that never answers the close: its failure must count before it sees the 1008,
    not once the gateway gives up on the closing handshake (close_timeout)."""
    stack = await servers.stack(limits={"auth_failures_per_ip_per_minute": 1})
    stack.gateway.close_timeout = FOREVER
    servers.closing(forget_forever(stack))
    port = int(stack.gateway_url.split(":")[2].split("/")[0])
    bad = make_token("mallory", secret="not-the-gateway-secret-0123456789abcdef")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(UPGRADE.format(token=bad).encode())
        async with asyncio.timeout(TIMEOUT):
            assert await close_frame(reader) == (1008, BAD_SIGNATURE)
        assert await stack.gateway.store.auth_blocked("127.0.0.1", 1)
    finally:
        writer.close()
