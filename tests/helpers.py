"""Shared builders for tests: one valid config and token, changed one thing at a time."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any

import jwt
import websockets
from aiohttp import WSMsgType, web
from websockets.asyncio.client import ClientConnection

from gateway.core.closecodes import SENDABLE
from gateway.core.config import Config
from gateway.core.configparse import parse_config
from gateway.wire.listener import Listener
from gateway.service import status_assets
from gateway.service.runtime import Gateway
from gateway.service.server import RunningGateway, start_site
from gateway.staging.stub_backend import create_stub_app

SECRET = "test-secret-0123456789-abcdefghijklmnop"
TIMEOUT = 10.0  # the one time unit every test wait is bounded by
RELAYS = ("byte", "frame")  # what `Gateway(byte_relay=...)` selects: BytePump or FramePump after the switch


def raw_config(old_port: int = 1, new_port: int = 2, **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "path": "/ws/chat",
        "auth": {"algorithms": ["HS256"], "secret": SECRET, "timeout_seconds": 5},
        "backends": {
            "old": {"url": f"ws://127.0.0.1:{old_port}/ws/chat", "auth": "query"},
            "new": {"url": f"ws://127.0.0.1:{new_port}/ws/chat", "auth": "message"},
        },
        "rollout": {"new_percent": 0, "salt": "test-salt"},
        "limits": {"ping_interval_seconds": 0},
    }
    for key, value in sections.items():
        if isinstance(value, Mapping) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **copy.deepcopy(dict(value))}
        else:
            raw[key] = value
    return raw


def make_config(old_port: int = 1, new_port: int = 2, **sections: Any) -> Config:
    return parse_config(raw_config(old_port, new_port, **sections), env={})


def make_token(user_id: Any = "alice", *, secret: str = SECRET, algorithm: str = "HS256", ttl: float = 300, **claims: Any) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"user_id": user_id, "iat": now, "exp": now + ttl}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, secret, algorithm=algorithm)


@dataclass
class Stack:
    """A gateway and both stub backends, each on its own free loopback port."""

    gateway_url: str
    old_port: int
    new_port: int
    running: RunningGateway
    runners: list[web.AppRunner]  # the stubs

    @property
    def gateway(self) -> Gateway:
        return self.running.gateway

    @property
    def listener(self) -> Listener:
        assert self.running.public is not None
        return self.running.public

    def url(self, query: str = "") -> str:
        return self.gateway_url + (f"?{query}" if query else "")

    def route_to(self, backend: str) -> None:
        """Send every user to `backend` from now on."""
        config = self.gateway.config
        rollout = replace(config.rollout, new_percent=100.0 if backend == "new" else 0.0)
        self.gateway.apply(replace(config, rollout=rollout))

    async def close(self) -> None:
        await self.running.stop()
        for runner in reversed(self.runners):
            await runner.cleanup()


async def start_stack(
    *, old_port: int | None = None, new_port: int | None = None, relay: str = "byte", **sections: Any
) -> Stack:
    """Start stubs (unless ports are given, e.g. of a custom backend) and a gateway in front.

    `relay` is the relay sessions use once ready: "byte" (the default) or "frame"
    (`Gateway(byte_relay=False)`).
    """
    if relay not in RELAYS:
        raise ValueError(f"relay must be one of {RELAYS}, not {relay!r}")
    runners = []
    auth = make_config().auth
    if old_port is None:
        runner, old_port = await start_site(create_stub_app("old", auth), "127.0.0.1", 0)
        runners.append(runner)
    if new_port is None:
        runner, new_port = await start_site(create_stub_app("new", auth), "127.0.0.1", 0)
        runners.append(runner)
    config = make_config(old_port, new_port, **sections)
    running = await RunningGateway(config, byte_relay=relay == "byte").start()
    return Stack(f"ws://127.0.0.1:{running.port}{config.path}", old_port, new_port, running, runners)


# -- end-to-end helpers: a websockets client, recording backends, a closed port ----------------

MiB = 1024 * 1024
RESERVED_CODES = frozenset({1005, 1006, 1015})
Frame = str | bytes


def authenticate_frame(token: str) -> str:
    return json.dumps({"type": "authenticate", "token": token})


def with_query(*pieces: str) -> str:
    return "&".join(piece for piece in pieces if piece)


@asynccontextmanager
async def headless_chromium(
    binary: str, url: str, *flags: str, stdout: int = asyncio.subprocess.DEVNULL
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Headless Chromium on a throwaway profile. At exit its whole process group is killed
    before the profile is removed: a renderer outliving the main process kept writing into
    it and made the removal fail."""
    with tempfile.TemporaryDirectory() as profile:
        browser = await asyncio.create_subprocess_exec(
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", *flags, url,
            stdout=stdout, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        )
        try:
            yield browser
        finally:
            with suppress(ProcessLookupError):
                os.killpg(browser.pid, signal.SIGKILL)
            await browser.wait()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def dump_dom(url: str) -> str:
    """The page's DOM after its script ran, from headless Chromium."""
    assert CHROMIUM is not None
    async with headless_chromium(
        CHROMIUM, url, "--virtual-time-budget=3000", "--dump-dom", stdout=asyncio.subprocess.PIPE
    ) as browser, asyncio.timeout(3 * TIMEOUT):
        out, _ = await browser.communicate()
    return out.decode()


async def status_page_dom(status: dict[str, Any]) -> str:
    """The status page's DOM with `status` as its status.json, served on a free loopback port."""
    app = web.Application()
    for path, body, content_type in (
        ("/", status_assets.PAGE, "text/html"), ("/status.js", status_assets.SCRIPT, "text/javascript"),
        ("/status.css", status_assets.STYLE, "text/css"), ("/status.json", json.dumps(status), "application/json"),
    ):
        app.router.add_get(path, _serving(body, content_type))
    runner, port = await start_site(app, "127.0.0.1", 0)
    try:
        return await dump_dom(f"http://127.0.0.1:{port}/")
    finally:
        await runner.cleanup()


def _serving(body: str, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type=content_type)

    return handler


def metric(stack: Stack, name: str, **labels: str) -> float:
    """One sample of the stack's gateway metrics (0 when the series does not exist yet)."""
    value = stack.gateway.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def open_client(
    stack: Stack,
    style: str,
    token: str,
    *,
    query: str = "",
    early: Iterable[Frame] = (),
    **kwargs: Any,
) -> ClientConnection:
    """Open a `websockets` client in `style` ("legacy": ?token=, "message": authenticate frame),
    then send `early` at once, without waiting for anything from the gateway."""
    kwargs.setdefault("max_size", 4 * MiB)
    if style == "legacy":
        ws = await websockets.connect(stack.url(with_query(query, f"token={token}")), **kwargs)
    else:
        ws = await websockets.connect(stack.url(query), **kwargs)
        await ws.send(authenticate_frame(token))
    try:
        for frame in early:
            await ws.send(frame)
    except websockets.ConnectionClosed:
        pass  # the gateway closed first (e.g. a rejected token); the caller checks how
    return ws


async def closed(ws: ClientConnection) -> tuple[int, str]:
    """Wait until the gateway has closed `ws`; the close it sent, never a reserved code."""
    await ws.wait_closed()
    code, reason = ws.close_code, ws.close_reason or ""
    assert code not in RESERVED_CODES, f"client got reserved close code {code} ({reason!r})"
    assert code in SENDABLE, f"client got illegal close code {code}"
    return code, reason


async def receive_until_closed(ws: ClientConnection) -> list[Frame]:
    """Every frame the gateway sends until it closes `ws`."""
    frames: list[Frame] = []
    try:
        while True:
            frames.append(await ws.recv())
    except websockets.ConnectionClosed:
        return frames


@asynccontextmanager
async def refused_port() -> AsyncIterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), never listening."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]
    finally:
        s.close()


CONNECTED = json.dumps({"type": "connected", "message": "recording backend"})


@dataclass(eq=False)
class BackendSocket:
    """One upstream socket as a recording backend saw it."""

    ws: web.WebSocketResponse
    query: dict[str, str]
    query_names: list[str]
    headers: dict[str, str]
    auth_frame: Frame | None = None
    frames: list[Frame] = field(default_factory=list)
    frames_before_ready: int = 0
    ready: bool = False
    close_code: int | None = None  # the code in the gateway's close frame; 1006 if none came
    close_reason: str = ""
    authenticated: asyncio.Event = field(default_factory=asyncio.Event)  # the auth frame arrived
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_closed(self) -> tuple[int | None, str]:
        await self.done.wait()
        return self.close_code, self.close_reason


class LoopbackBackend:
    """An aiohttp backend for tests on a free loopback port; `_serve` handles each request.

    Handlers still running at `close` are cancelled, so a test never waits on one.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> Any:
        app = web.Application()
        app.router.add_get("/ws/chat", self._handle)
        self.runner, self.port = await start_site(app, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            return await self._serve(request)
        finally:
            self._tasks.discard(task)
            self._handled()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    def _handled(self) -> None:
        """Called after each request's handler ends."""


class RecordingBackend(LoopbackBackend):
    """A backend that records every upgrade, frame and close the gateway sends it.

    style "query" is ready as soon as the socket opens; style "message" reads the
    authenticate frame and answers `greeting` (a str or bytes; the `connected` frame by
    default). It echoes data frames. Knobs for the edges:
      reject_status: answer the upgrade with this HTTP status instead;
      hold_upgrade:  do not answer the upgrade until `release` is set;
      hold_greeting: do not send the greeting until `release` is set (frames keep being read);
      abort_after_upgrade: drop the TCP connection right after the upgrade.
    """

    def __init__(
        self,
        style: str = "query",
        *,
        greeting: Frame | None = CONNECTED,
        reject_status: int | None = None,
        hold_upgrade: bool = False,
        hold_greeting: bool = False,
        abort_after_upgrade: bool = False,
        echo: bool = True,
        max_message_bytes: int = MiB,
    ) -> None:
        self.style = style
        self.greeting = greeting
        self.reject_status = reject_status
        self.hold_upgrade = hold_upgrade
        self.hold_greeting = hold_greeting
        self.abort_after_upgrade = abort_after_upgrade
        self.echo = echo
        self.max_message_bytes = max_message_bytes
        self.upgrades = 0  # requests that reached the handler, answered or not
        self.connections = 0  # TCP connections accepted, whether or not a request followed
        self.sockets: list[BackendSocket] = []
        self.release = asyncio.Event()
        self.requested = asyncio.Event()  # set at the first request
        self._opened: asyncio.Queue[BackendSocket] = asyncio.Queue()
        self._finished: asyncio.Queue[None] = asyncio.Queue()
        super().__init__()

    async def start(self) -> RecordingBackend:
        await super().start()
        assert self.runner is not None
        # Count TCP connections too: a connect the gateway gives up on before sending its
        # request never reaches the handler, but it is still an upstream socket.
        server = self.runner.server
        assert server is not None
        accept = server.connection_made

        def counting(handler: Any, transport: Any) -> None:
            self.connections += 1
            accept(handler, transport)

        server.connection_made = counting  # type: ignore[method-assign]
        return self

    async def next_socket(self) -> BackendSocket:
        """The next upstream socket the gateway opened (in order of upgrade)."""
        return await self._opened.get()

    async def next_finished(self) -> None:
        """Until the handler of the next request ends, whether or not it upgraded."""
        await self._finished.get()

    def _handled(self) -> None:
        self._finished.put_nowait(None)

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.upgrades += 1
        self.requested.set()
        if self.reject_status is not None:
            return web.Response(status=self.reject_status, text="no\n")
        if self.hold_upgrade:
            await self.release.wait()
        ws = web.WebSocketResponse(autoclose=False, max_msg_size=self.max_message_bytes + 1)
        try:
            await ws.prepare(request)
        except ConnectionError:  # the gateway gave up while the upgrade was held
            return web.Response(status=499)
        sock = BackendSocket(
            ws,
            query={k: v for k, v in request.query.items()},
            query_names=list(request.query.keys()),
            headers=dict(request.headers),
        )
        self.sockets.append(sock)
        self._opened.put_nowait(sock)
        if self.abort_after_upgrade:
            assert request.transport is not None
            request.transport.abort()
            sock.close_code = 1006
            sock.done.set()
            return ws
        greeter: asyncio.Task[None] | None = None
        try:
            if self.style == "message":
                msg = await ws.receive()
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    await self._ended(sock, msg)
                    return ws
                sock.auth_frame = msg.data
                sock.authenticated.set()
                greeter = asyncio.create_task(self._greet(sock))
            else:
                sock.ready = True
            while True:
                msg = await ws.receive()
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    sock.frames.append(msg.data)
                    if not sock.ready:
                        sock.frames_before_ready += 1
                    elif self.echo:
                        await (ws.send_str(msg.data) if msg.type is WSMsgType.TEXT else ws.send_bytes(msg.data))
                else:
                    await self._ended(sock, msg)
                    return ws
        finally:
            if greeter is not None:
                greeter.cancel()
            sock.done.set()

    async def _greet(self, sock: BackendSocket) -> None:
        if self.hold_greeting:
            await self.release.wait()
        if self.greeting is None or sock.ws.closed:
            return
        if isinstance(self.greeting, bytes):
            await sock.ws.send_bytes(self.greeting)
        else:
            await sock.ws.send_str(self.greeting)
        sock.ready = True

    async def _ended(self, sock: BackendSocket, msg: Any) -> None:
        if msg.type is WSMsgType.CLOSE:
            sock.close_code, sock.close_reason = msg.data, msg.extra or ""
            await sock.ws.close(code=msg.data if msg.data in SENDABLE else 1000)
        else:
            sock.close_code = sock.ws.close_code or 1006
        sock.done.set()


class Servers:
    """Every server a test starts, stopped in reverse order at teardown.

    Stacks use `relay` unless a call says otherwise.
    """

    def __init__(self, relay: str = "byte") -> None:
        self.relay = relay
        self._closers: list[Any] = []

    async def stack(self, **kwargs: Any) -> Stack:
        kwargs.setdefault("relay", self.relay)
        stack = await start_stack(**kwargs)
        self._closers.append(stack.close)
        return stack

    def closing(self, closer: Callable[[], Awaitable[Any]]) -> None:
        """Stop something else the test started along with the rest."""
        self._closers.append(closer)

    async def recording(self, style: str = "query", **kwargs: Any) -> RecordingBackend:
        backend = await RecordingBackend(style, **kwargs).start()
        self._closers.append(backend.close)
        return backend

    async def stub(self, style: str, *, secret: str = SECRET) -> int:
        """A stub backend of `style` that verifies tokens with `secret`; returns its port."""
        auth = make_config(auth={"secret": secret}).auth
        runner, port = await start_site(create_stub_app(style, auth), "127.0.0.1", 0)
        self._closers.append(runner.cleanup)
        return port

    async def close(self) -> None:
        for closer in reversed(self._closers):
            await closer()


class Clock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def eventually(condition: Callable[[], Awaitable[bool]], within: float = TIMEOUT) -> bool:
    """Poll `condition` until it holds or `within` seconds pass (for states with no event to await)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
