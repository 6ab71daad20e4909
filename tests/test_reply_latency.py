"""ws_gateway_reply_seconds: the chat's time to first reply, per backend, on both relays."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import WSMsgType, web

from gateway.service.server import start_site

from .helpers import Servers, make_token, metric, open_client

pytestmark = pytest.mark.relays("byte", "frame")
DELAY = 0.3


async def slow_backend(servers: Servers) -> int:
    """A query-style backend that answers each message with two frames, the first after DELAY."""

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await asyncio.sleep(DELAY)  # the AI thinking
                await ws.send_str("first token of " + msg.data)
                await ws.send_str("rest")
        return ws

    app = web.Application()
    app.router.add_get("/ws/chat", handler)
    runner, port = await start_site(app, "127.0.0.1", 0)
    servers._closers.append(runner.cleanup)
    return port


def observed(stack, backend: str) -> tuple[float, float]:
    """(count, sum) of the reply histogram for `backend`."""
    return (
        metric(stack, "ws_gateway_reply_seconds_count", backend=backend),
        metric(stack, "ws_gateway_reply_seconds_sum", backend=backend),
    )


async def test_each_reply_is_timed_from_the_question_to_the_first_frame_back(servers: Servers, caplog):
    stack = await servers.stack(old_port=await slow_backend(servers))
    ws = await open_client(stack, "legacy", make_token("alice"))
    for question in ("q1", "q2", "q3"):
        await ws.send(question)
        await ws.send(question + " (more)")  # a second frame before the reply starts no new clock
        assert await ws.recv() == "first token of " + question
        assert await ws.recv() == "rest"
        assert await ws.recv() == "first token of " + question + " (more)"
        assert await ws.recv() == "rest"
    await ws.close()
    await ws.wait_closed()
    count, total = observed(stack, "old")
    # q1, then the reply to "q1 (more)" arrives after "rest" — a client frame after a backend
    # frame starts the next clock only when the client sends again, so three replies.
    assert count == 3
    assert total >= 3 * DELAY
    assert observed(stack, "new") == (0, 0)


async def test_the_connection_line_carries_the_sessions_median_and_maximum_reply(servers: Servers, caplog):
    caplog.set_level("INFO", logger="gateway")
    stack = await servers.stack(old_port=await slow_backend(servers))
    ws = await open_client(stack, "legacy", make_token("alice"))
    await ws.send("q")
    assert await ws.recv() == "first token of q"
    assert await ws.recv() == "rest"
    await ws.close()

    async def line():
        while True:
            for record in caplog.records:
                if record.getMessage() == "connection closed":
                    return record
            await asyncio.sleep(0.01)

    record = await asyncio.wait_for(line(), 10)
    assert record.reply_p50_s >= DELAY and record.reply_max_s >= DELAY
    assert json.dumps(record.reply_p50_s)
