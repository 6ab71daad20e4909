"""The production backend's stack behind the gateway: a FastAPI app on uvicorn, with each of
uvicorn's WebSocket implementations, reached in every client style × backend style."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest
import uvicorn
from fastapi import FastAPI, Query, WebSocket, WebSocketDisconnect

from .helpers import Servers, closed, make_token, open_client

pytestmark = pytest.mark.relays("byte", "frame")


def chat_app() -> FastAPI:
    """Old style when the token is in the URL, new style (authenticate → connected) without it."""
    app = FastAPI()

    @app.websocket("/ws/chat")
    async def chat(ws: WebSocket, token: str | None = Query(default=None)) -> None:
        await ws.accept()
        try:
            if token is None:
                first = json.loads(await ws.receive_text())
                if first.get("type") != "authenticate" or not first.get("token"):
                    await ws.close(code=1008)
                    return
                await ws.send_text(json.dumps({"type": "connected", "message": "Connected", "user_id": "alice"}))
            while True:
                text = await ws.receive_text()
                if text == "bye":
                    await ws.close(code=4000, reason="backend says bye")
                    return
                await ws.send_text("echo:" + text)
        except WebSocketDisconnect:
            pass

    return app


@pytest.fixture(params=["websockets-sansio", "wsproto"])
async def uvicorn_port(request: pytest.FixtureRequest) -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(chat_app(), ws=request.param, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # uvicorn offers no event to await; bounded by the test timeout
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.mark.parametrize("backend", ["old", "new"])
@pytest.mark.parametrize("style", ["legacy", "message"])
async def test_every_path_through_the_gateway_to_uvicorn(servers: Servers, uvicorn_port: int, backend, style):
    stack = await servers.stack(old_port=uvicorn_port, new_port=uvicorn_port)
    stack.route_to(backend)
    ws = await open_client(stack, style, make_token("alice"))
    if style == "message":
        assert json.loads(await ws.recv())["type"] == "connected"
    for text in ("hi", "é" * 1000, "x" * 70000):
        await ws.send(text)
        assert await ws.recv() == "echo:" + text
    await ws.send("bye")
    assert await closed(ws) == (4000, "backend says bye")


async def test_a_client_close_reaches_uvicorn_and_is_answered(servers: Servers, uvicorn_port: int):
    stack = await servers.stack(old_port=uvicorn_port, new_port=uvicorn_port)
    ws = await open_client(stack, "legacy", make_token("alice"))
    await ws.send("hi")
    assert await ws.recv() == "echo:hi"
    await ws.close(code=1000)
    assert ws.close_code == 1000
