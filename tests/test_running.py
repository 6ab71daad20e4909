"""The composition root, `server.RunningGateway`: what it starts, and its one teardown."""

from __future__ import annotations

import asyncio
import signal
import socket

import aiohttp
import pytest

from gateway.service.server import RunningGateway, Signals

from .helpers import Servers, closed, make_config, make_token, open_client


async def test_start_serves_the_admin_app_and_stop_closes_sessions_at_once(servers: Servers) -> None:
    old = await servers.stub("old")
    config = make_config(old, admin={"host": "127.0.0.1", "port": 0})
    async with RunningGateway(config) as running:
        assert running.admin_port is not None
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{running.admin_port}/readyz") as answer:
            assert answer.status == 200
        ws = await open_client(stack_of(running), "legacy", make_token())
        await ws.send("hi")
        assert await ws.recv() == "hi"  # the session relays
    assert await closed(ws) == (1012, "server restarting")
    assert not running.gateway.connections


async def test_a_start_that_fails_stops_what_it_had_started() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = make_config(admin={"host": "127.0.0.1", "port": taken.getsockname()[1]})
        running = RunningGateway(config)
        with pytest.raises(OSError, match="cannot listen on 127.0.0.1"):
            await running.start()
    assert running.public is not None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", running.public.port)).close()


async def test_stop_drains_when_asked_and_releases_the_signals(servers: Servers) -> None:
    old = await servers.stub("old")
    config = make_config(old, drain={"grace_seconds": 0, "window_seconds": 0})
    with Signals() as signals:
        running = await RunningGateway(config, signals=signals, drain=True).start()
        ws = await open_client(stack_of(running), "legacy", make_token())
        await ws.send("hi")
        assert await ws.recv() == "hi"
        await running.stop()
        assert running.gateway.draining and not running.gateway.accepting
        assert await closed(ws) == (1012, "server restarting")
        assert not asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)  # already released


class stack_of:
    """Enough of a `helpers.Stack` for `open_client`: the running gateway's URL."""

    def __init__(self, running: RunningGateway) -> None:
        self.base = f"ws://127.0.0.1:{running.port}{running.gateway.config.path}"

    def url(self, query: str = "") -> str:
        return self.base + (f"?{query}" if query else "")
