"""Live rollout operations end to end: metrics, fallback, the rollback guard, legacy sunset,
the connection log.

Everything runs in-process over loopback: an in-process gateway with its admin app, stub or
recording backends, and `websockets` as the client. Metrics are read the way Prometheus reads
them, by scraping `/metrics` over HTTP. A test never sleeps to synchronise: it waits for the
gateway's own "connection closed" log line, which the gateway writes after it has folded
the session into the metrics, so one line per session means "the gateway is done with it".
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType, web
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection

from gateway.service.admin import create_admin_app
from gateway.core.config import DEFAULT_CONNECTED_MESSAGE
from gateway.service.logs import JsonFormatter
from gateway.core.routing import bucket
from gateway.service.runtime import Gateway
from gateway.service.server import start_site

from .helpers import (
    SECRET,
    Clock,
    LoopbackBackend,
    TIMEOUT,
    Frame,
    RecordingBackend,
    Servers,
    Stack,
    closed,
    make_config,
    make_token,
    open_client,
    refused_port,
)

# Counting and logging happen in different places on each relay: every test runs on both.
pytestmark = pytest.mark.relays("byte", "frame")

SALT = make_config().rollout.salt
OTHER_SECRET = "the-new-backends-own-secret-0123456789-abcdef"


def bounded(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Fail a test whose waits add up to more than TIMEOUT instead of letting it hang."""

    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> None:
        async with asyncio.timeout(TIMEOUT):
            await test(*args, **kwargs)

    return run


# -- harness: a stack plus its admin listener, and a wait for finished sessions ------------------


class SessionLines(logging.Handler):
    """Collects the gateway's "connection closed" records: one per finished session.

    The gateway writes that line after `Gateway.session_ended`, so once a session's line is
    here its metrics are final and it has left `gateway.connections`.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "gateway" and record.getMessage() == "connection closed":
            self.records.append(record)
            self._changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while len(self.records) < count:
                self._changed.clear()
                await self._changed.wait()


class RawRecords(logging.Handler):
    """Every record under the "gateway" logger, unformatted: what any handler could print."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage() + "\n" + repr(vars(record)))


@dataclass
class Scrape:
    """One scrape of /metrics, parsed with prometheus-client's own parser."""

    body: str
    samples: list[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.samples = [s for family in text_string_to_metric_families(self.body) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) == 1, f"expected exactly one sample {name}{labels}, found {found}"
        return found[0]

    def label_values(self) -> set[str]:
        return {value for s in self.samples for value in s.labels.values()}


@dataclass
class Ops:
    """A running stack, its admin listener and the gateway's finished-session lines."""

    stack: Stack
    admin_url: str
    lines: SessionLines
    started: int = 0
    held_open: int = 0  # sessions a test deliberately keeps open while others come and go

    @property
    def gateway(self) -> Gateway:
        return self.stack.gateway

    async def connect(self, style: str, token: str, **kwargs: Any) -> ClientConnection:
        """`helpers.open_client`, counted so that `all_finished` knows how many lines to expect."""
        self.started += 1
        return await open_client(self.stack, style, token, **kwargs)

    async def chat(self, user: str, style: str = "message") -> None:
        """One complete, healthy session: ready, one echo, a normal close, fully finished."""
        ws = await self.connect(style, make_token(user))
        if style == "message":
            assert json.loads(await ws.recv())["type"] == "connected"
        await ws.send(f"hello from {user}")
        assert await ws.recv() == f"hello from {user}"
        await ws.close()
        await self.all_finished()

    async def all_finished(self) -> None:
        """Until the gateway has finished every session this test started (but `held_open`)."""
        await self.lines.wait_for(self.started - self.held_open)
        assert len(self.gateway.connections) == self.held_open

    async def scrape(self) -> Scrape:
        async with aiohttp.ClientSession() as http, http.get(f"{self.admin_url}/metrics") as response:
            assert response.status == 200
            return Scrape(await response.text())

    async def rollout(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(f"{self.admin_url}/rollout") as response:
            assert response.status == 200
            return await response.json()


class Lab:
    def __init__(self, servers: Servers) -> None:
        self.servers = servers
        self.lines = SessionLines()
        self.runners: list[web.AppRunner] = []

    async def start(self, **kwargs: Any) -> Ops:
        stack = await self.servers.stack(**kwargs)
        runner, port = await start_site(create_admin_app(stack.gateway), "127.0.0.1", 0)
        self.runners.append(runner)
        return Ops(stack, f"http://127.0.0.1:{port}", self.lines)


@pytest.fixture
async def lab(servers: Servers) -> AsyncIterator[Lab]:
    logger = logging.getLogger("gateway")
    level = logger.level
    lab = Lab(servers)
    logger.setLevel(logging.INFO)
    logger.addHandler(lab.lines)
    try:
        yield lab
    finally:
        logger.removeHandler(lab.lines)
        logger.setLevel(level)
        for runner in lab.runners:
            await runner.cleanup()


def users_between(low: float, high: float, count: int, prefix: str) -> list[str]:
    """`count` user ids whose rollout bucket lies in [low, high)."""
    found: list[str] = []
    n = 0
    while len(found) < count:
        user = f"{prefix}-{n}"
        n += 1
        if low <= bucket(SALT, user) < high:
            found.append(user)
    return found


def user_of(token: str) -> str:
    return jwt.decode(token, SECRET, algorithms=["HS256"])["user_id"]


def users_seen_by(backend: RecordingBackend) -> list[str]:
    """The users a query-style recording backend got, in order (from the token it was given)."""
    return [user_of(sock.query["token"]) for sock in backend.sockets]


def pieces(token: str) -> list[str]:
    """The token and its payload and signature (the JWT header is the same for every token)."""
    return [token] + [part for part in token.split(".")[1:] if len(part) >= 8]


def size(frames: Iterable[Frame]) -> int:
    """What the gateway counts as bytes: characters for text frames, bytes for binary."""
    return sum(len(frame) for frame in frames)


# -- 1. metrics after a scripted set of sessions -----------------------------------------------

FRAMES: list[Frame] = ["hello", b"\x00\x01\x02\x03", "how are you?"]
PATHS = [("legacy", "old"), ("legacy", "new"), ("message", "old"), ("message", "new")]


@bounded
async def test_metrics_count_each_path_auth_failure_and_upstream_failure(lab: Lab) -> None:
    users = {path: f"{path[0]}-{path[1]}-user" for path in PATHS}
    ops = await lab.start(rollout={"force_new": [users[p] for p in PATHS if p[1] == "new"]})
    tokens = {path: make_token(user) for path, user in users.items()}

    # Four sessions, one per {legacy, message} x {old, new}, all open at once.
    clients = {}
    for (style, backend), token in tokens.items():
        ws = await ops.connect(style, token)
        if style == "message":
            assert json.loads(await ws.recv())["type"] == "connected"
        for frame in FRAMES:
            await ws.send(frame)
        for frame in FRAMES:  # the echo proves the session is relaying
            assert await ws.recv() == frame
        clients[style, backend] = ws

    live = await ops.scrape()
    for style, backend in PATHS:
        assert live.value("ws_gateway_connections_active", auth_style=style, backend=backend) == 1

    for ws in clients.values():
        await ws.close()
    await ops.all_finished()

    # One auth failure (a legacy client with a bad signature) ...
    forged = make_token("mallory", secret="not-the-gateways-secret-0123456789-abcdef")
    ws = await ops.connect("legacy", forged)
    assert (await closed(ws))[0] == 1008
    # ... and one upstream failure (a message client whose new backend is down; no fallback).
    async with refused_port() as port:
        down = make_config(ops.stack.old_port, port, rollout={"force_new": ["uma"], "fallback_to_old": False})
        ops.gateway.apply(down)
        uma = make_token("uma")
        ws = await ops.connect("message", uma)
        assert (await closed(ws))[0] == 1014
        await ops.all_finished()

    m = await ops.scrape()
    assert m.value("ws_gateway_connection_attempts_total", auth_style="legacy") == 3
    assert m.value("ws_gateway_connection_attempts_total", auth_style="message") == 3
    for style, backend in PATHS:
        labels = {"auth_style": style, "backend": backend}
        assert m.value("ws_gateway_connections_opened_total", **labels) == 1
        assert m.value("ws_gateway_connections_active", **labels) == 0
        assert m.value("ws_gateway_session_ready_seconds_count", **labels) == 1
    assert m.value("ws_gateway_auth_failures_total", reason="bad_signature") == 1
    assert sum(s.value for s in m.samples if s.name == "ws_gateway_auth_failures_total") == 1
    assert m.value("ws_gateway_upstream_failures_total", backend="new", reason="connect") == 1
    assert sum(s.value for s in m.samples if s.name == "ws_gateway_upstream_failures_total") == 1
    assert m.value("ws_gateway_fallbacks_total") == 0
    # A failed connect is an upstream failure, not a connect time.
    assert m.value("ws_gateway_upstream_connect_seconds_count", backend="old") == 2
    assert m.value("ws_gateway_upstream_connect_seconds_count", backend="new") == 2
    # Data frames only: authenticate and connected are the handshake, not relayed data.
    for direction in ("client_to_backend", "backend_to_client"):
        assert m.value("ws_gateway_messages_total", direction=direction) == 4 * len(FRAMES)
        assert m.value("ws_gateway_bytes_total", direction=direction) == 4 * size(FRAMES)

    # Labels are closed sets: no token, no secret, no user id.
    secrets = [SECRET, *users.values(), "mallory", "uma"]
    secrets += [piece for token in [*tokens.values(), forged, uma] for piece in pieces(token)]
    for value in m.label_values():
        for secret in secrets:
            assert secret not in value
    for secret in secrets:
        assert secret not in m.body


@pytest.mark.parametrize("style", ["legacy", "message"])
@bounded
async def test_every_client_frame_is_counted_including_held_ones_and_the_first_after_ready(
    lab: Lab, json_log: tuple[io.StringIO, RawRecords], style: str
) -> None:
    # Held frames go upstream from the handshake code, and so may the first frame after
    # ready (read by the handler before its pump starts): both must be counted too.
    ops = await lab.start()
    early: list[Frame] = ["early-1", b"early-2"]
    later: list[Frame] = ["later-1", b"later-2", "later-3"]
    ws = await ops.connect(style, make_token("counted"), early=early)
    if style == "message":
        assert json.loads(await ws.recv())["type"] == "connected"
    for frame in early:
        assert await ws.recv() == frame
    for frame in later:
        await ws.send(frame)
        assert await ws.recv() == frame
    await ws.close()
    await ops.all_finished()

    sent = early + later
    line = next(json.loads(text) for text in json_log[0].getvalue().splitlines() if '"connection closed"' in text)
    m = await ops.scrape()
    assert (m.value("ws_gateway_messages_total", direction="backend_to_client"), line["backend_frames"]) == (5, 5)
    assert (m.value("ws_gateway_messages_total", direction="client_to_backend"), line["client_frames"]) == (5, 5)
    assert (m.value("ws_gateway_bytes_total", direction="client_to_backend"), line["client_bytes"]) == (size(sent),) * 2


@bounded
async def test_message_totals_include_sessions_that_are_still_open(lab: Lab) -> None:
    ops = await lab.start()
    ws = await ops.connect("legacy", make_token("chatty"))
    for frame in FRAMES:
        await ws.send(frame)
        assert await ws.recv() == frame
    try:
        m = await ops.scrape()
        assert m.value("ws_gateway_messages_total", direction="backend_to_client") == len(FRAMES)
        assert m.value("ws_gateway_bytes_total", direction="backend_to_client") == size(FRAMES)
    finally:
        await ws.close()
        await ops.all_finished()


# -- 2. fallback to the old backend --------------------------------------------------------------

EARLY: list[Frame] = ["early one", b"\x00early two", "early three"]


@pytest.mark.parametrize("style", ["message", "legacy"])
@bounded
async def test_new_backend_down_falls_back_to_old_within_the_same_client_connection(
    lab: Lab, servers: Servers, style: str
) -> None:
    old = await servers.recording("query")
    async with refused_port() as port:
        ops = await lab.start(old_port=old.port, new_port=port, rollout={"new_percent": 100})
        assert ops.gateway.config.rollout.fallback_to_old  # the default
        ws = await ops.connect(style, make_token("fiona"), early=EARLY)
        if style == "message":
            assert await ws.recv() == DEFAULT_CONNECTED_MESSAGE  # the gateway's own, first
        for frame in EARLY:
            assert await ws.recv() == frame
        sock = await old.next_socket()
        assert sock.frames == EARLY  # held while the new backend failed, delivered in order
        assert user_of(sock.query["token"]) == "fiona"
        await ws.send("after the fallback")
        assert await ws.recv() == "after the fallback"
        await ws.close()
        assert (await closed(ws))[0] == 1000
        await ops.all_finished()

    m = await ops.scrape()
    assert m.value("ws_gateway_fallbacks_total") == 1
    assert m.value("ws_gateway_upstream_failures_total", backend="new", reason="connect") == 1
    assert m.value("ws_gateway_connections_opened_total", auth_style=style, backend="old") == 1
    assert m.value("ws_gateway_connections_opened_total", auth_style=style, backend="new") == 0


@bounded
async def test_new_backend_failing_its_handshake_falls_back_to_old(lab: Lab, servers: Servers) -> None:
    old = await servers.recording("query")
    new = await servers.recording("message", greeting='{"type":"error"}')
    ops = await lab.start(old_port=old.port, new_port=new.port, rollout={"new_percent": 100})
    ws = await ops.connect("message", make_token("gina"), early=EARLY)
    assert await ws.recv() == DEFAULT_CONNECTED_MESSAGE
    for frame in EARLY:
        assert await ws.recv() == frame
    assert (await old.next_socket()).frames == EARLY
    failed = await new.next_socket()
    await failed.wait_closed()  # the gateway does not leave the failed upstream half-open
    await ws.close()
    await ops.all_finished()

    m = await ops.scrape()
    assert m.value("ws_gateway_fallbacks_total") == 1
    assert m.value("ws_gateway_upstream_failures_total", backend="new", reason="handshake") == 1
    assert m.value("ws_gateway_connections_opened_total", auth_style="message", backend="old") == 1


@bounded
async def test_new_backend_rejecting_the_token_gives_1008_and_no_fallback(lab: Lab, servers: Servers) -> None:
    old = await servers.recording("query")
    strict_new = await servers.stub("new", secret=OTHER_SECRET)  # closes 1008 on our tokens
    ops = await lab.start(old_port=old.port, new_port=strict_new, rollout={"new_percent": 100})
    ws = await ops.connect("message", make_token("rita"), early=["never delivered"])
    assert (await closed(ws))[0] == 1008
    await ops.all_finished()

    assert (old.connections, old.upgrades) == (0, 0)
    m = await ops.scrape()
    assert m.value("ws_gateway_fallbacks_total") == 0
    assert m.value("ws_gateway_upstream_failures_total", backend="new", reason="rejected") == 1


# -- 3. the automatic rollback guard ----------------------------------------------------------


class FlakyBackend(LoopbackBackend):
    """A message-style new backend that closes 1011 instead of answering `connected` on every
    `fail_every`-th authenticate (None: never); otherwise it greets and echoes."""

    def __init__(self, fail_every: int | None) -> None:
        super().__init__()
        self.fail_every = fail_every
        self.authenticates = 0
        self.accepted: list[str] = []
        self.refused: list[str] = []
        self.open: dict[str, web.WebSocketResponse] = {}

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        msg = await ws.receive()
        if msg.type is not WSMsgType.TEXT:
            return ws
        user = user_of(json.loads(msg.data)["token"])
        self.authenticates += 1
        if self.fail_every and self.authenticates % self.fail_every == 0:
            self.refused.append(user)
            await ws.close(code=1011, message=b"overloaded")
            return ws
        self.accepted.append(user)
        await ws.send_str(json.dumps({"type": "connected", "message": "flaky backend"}))
        self.open[user] = ws
        try:
            while True:
                msg = await ws.receive()
                if msg.type is not WSMsgType.TEXT:
                    return ws
                await ws.send_str(msg.data)
        finally:
            del self.open[user]


@pytest.fixture
async def flaky() -> AsyncIterator[FlakyBackend]:
    backend = await FlakyBackend(fail_every=3).start()
    try:
        yield backend
    finally:
        await backend.close()


GUARD = {
    "min_samples": 10,
    "max_failure_ratio": 0.2,
    "window_seconds": 600,
    "cooldown_seconds": 60,
    "step_seconds": 30,
    "recovery_steps": [25, 50, 100],
}


def guard_messages(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "gateway" and "rollback guard" in r.getMessage()]


@bounded
async def test_guard_trips_on_failing_handshakes_spares_open_sessions_then_recovers_step_by_step(
    lab: Lab, servers: Servers, flaky: FlakyBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    old = await servers.recording("query")
    ops = await lab.start(
        old_port=old.port,
        new_port=flaky.port,
        rollout={"new_percent": 80, "force_new": ["qa-forced"], "guard": GUARD},
    )
    clock = Clock(1000.0)
    ops.gateway.clock = clock
    in_new = users_between(0, 20, 13, "n")  # new at every step of the recovery
    # 1. A healthy session on the new backend, kept open throughout.
    established = await ops.connect("message", make_token(in_new[0]))
    assert json.loads(await established.recv()) == {"type": "connected", "message": "flaky backend"}
    ops.held_open = 1

    # 2. Nine more new-bucket sessions; every third handshake fails and falls back to old.
    for n, user in enumerate(in_new[1:10], start=2):
        await ops.chat(user)  # the client always gets a session
        assert (await ops.rollout())["guard"]["state"] == ("tripped" if n == 10 else "healthy"), n
    assert flaky.refused == [in_new[2], in_new[5], in_new[8]]  # authenticates 3, 6 and 9
    assert users_seen_by(old) == flaky.refused
    tripped = [m for level, m in guard_messages(caplog) if level == "ERROR" and "tripped" in m]
    assert len(tripped) == 1 and "3/10" in tripped[0]

    status = await ops.rollout()
    assert (status["guard"]["state"], status["effective_percent"], status["configured_percent"]) == ("tripped", 0, 80)
    m = await ops.scrape()
    assert m.value("ws_gateway_guard_state") == 2
    assert m.value("ws_gateway_guard_trips_total") == 1
    assert m.value("ws_gateway_rollout_effective_percent") == 0
    assert m.value("ws_gateway_fallbacks_total") == 3

    # 3. The established session is not cut.
    await established.send("still here")
    assert await established.recv() == "still here"
    assert in_new[0] in flaky.open

    # 4. While open, new-bucket and forced-new users go to the old backend.
    flaky.fail_every = None  # the new backend is healthy again; the guard does not know yet
    for user in (in_new[10], "qa-forced"):
        await ops.chat(user)
        assert users_seen_by(old)[-1] == user
    assert flaky.authenticates == 10
    clock.advance(59.9)
    await ops.chat(in_new[11])
    assert users_seen_by(old)[-1] == in_new[11]

    # 5. Recovery: after the cooldown, one step per step_seconds, 25 % -> 50 % -> 100 % of 80.
    low, mid, high = users_between(20, 40, 2, "b"), users_between(40, 80, 2, "c"), users_between(80, 100, 1, "d")
    steps = [
        (0.1, 1, 20, [in_new[12]], [low[0]]),
        (30, 2, 40, [low[1]], [mid[0]]),
        (30, 3, 80, [mid[1]], [high[0]]),
    ]
    for advance, step, percent, go_new, go_old in steps:
        clock.advance(advance)
        status = await ops.rollout()
        assert (status["guard"]["state"], status["guard"]["step"], status["effective_percent"]) == ("recovering", step, percent)
        assert (await ops.scrape()).value("ws_gateway_guard_state") == 1
        for user in go_new:
            await ops.chat(user)
            assert flaky.accepted[-1] == user, (step, user)
        for user in go_old:
            await ops.chat(user)
            assert users_seen_by(old)[-1] == user, (step, user)
    clock.advance(30)
    status = await ops.rollout()
    assert (status["guard"]["state"], status["effective_percent"]) == ("healthy", 80)
    assert (await ops.scrape()).value("ws_gateway_guard_state") == 0
    await ops.chat("qa-forced")
    assert flaky.accepted[-1] == "qa-forced"

    logged = [m for _, m in guard_messages(caplog)]
    assert [m.split(",")[0] for m in logged if "recovering" in m] == [f"rollback guard recovering: step {n}/3" for n in (1, 2, 3)]
    assert logged[-1] == "rollback guard recovered: back to the configured percentage"

    # 6. The session opened before the trip lived through all of it.
    await established.send("goodbye")
    assert await established.recv() == "goodbye"
    await established.close()
    assert (await closed(established))[0] == 1000
    ops.held_open = 0
    await ops.all_finished()


@pytest.mark.parametrize("spare_forced", [False, True])
@bounded
async def test_open_guard_sends_forced_new_users_old_unless_spare_forced(
    lab: Lab, servers: Servers, flaky: FlakyBackend, spare_forced: bool
) -> None:
    old = await servers.recording("query")
    guard = {**GUARD, "min_samples": 3, "spare_forced": spare_forced}
    ops = await lab.start(old_port=old.port, new_port=flaky.port, rollout={"new_percent": 50, "force_new": ["qa"], "guard": guard})
    ops.gateway.clock = Clock(1000.0)
    flaky.fail_every = 1
    for user in users_between(0, 50, 3, "f"):
        await ops.chat(user)
    assert (await ops.rollout())["guard"]["state"] == "tripped"
    flaky.fail_every = None

    await ops.chat("qa")
    if spare_forced:
        assert flaky.accepted == ["qa"]
    else:
        assert flaky.accepted == [] and users_seen_by(old)[-1] == "qa"
    [bucketed] = users_between(0, 50, 1, "g")
    await ops.chat(bucketed)
    assert users_seen_by(old)[-1] == bucketed


# -- 4. legacy sunset: deprecate, deny, and changing it live ---------------------------------

DEPRECATE = {"legacy": "deprecate", "legacy_deprecated_at": "2026-01-01", "legacy_sunset": "2027-03-01T00:00:00Z"}


@bounded
async def test_deprecate_marks_url_token_upgrades_with_deprecation_and_sunset_headers(lab: Lab) -> None:
    ops = await lab.start(auth=DEPRECATE)
    legacy = await ops.connect("legacy", make_token("lena"))
    headers = legacy.response.headers
    assert headers["Deprecation"] == "@1767225600"  # RFC 9745: 2026-01-01T00:00:00Z
    assert headers["Sunset"] == "Mon, 01 Mar 2027 00:00:00 GMT"  # RFC 8594: an HTTP-date
    await legacy.send("still works")
    assert await legacy.recv() == "still works"  # invisible to the app

    message = await ops.connect("message", make_token("mo"))
    assert json.loads(await message.recv())["type"] == "connected"
    assert "Deprecation" not in message.response.headers
    assert "Sunset" not in message.response.headers
    for ws in (legacy, message):
        await ws.close()
    await ops.all_finished()


@bounded
async def test_deny_closes_url_token_clients_1008_asking_to_update_without_any_upstream(lab: Lab, servers: Servers) -> None:
    old = await servers.recording("query")
    new = await servers.recording("message")
    ops = await lab.start(old_port=old.port, new_port=new.port, auth={"legacy": "deny"})
    token = make_token("lena")
    ws = await ops.connect("legacy", token, early=["hello?"])
    code, reason = await closed(ws)
    assert code == 1008 and "update the app" in reason and token not in reason
    await ops.all_finished()
    assert (old.connections, new.connections) == (0, 0)

    message = await ops.connect("message", make_token("mo"))
    assert await message.recv() == DEFAULT_CONNECTED_MESSAGE
    await message.send("fine")
    assert await message.recv() == "fine"
    await message.close()
    await ops.all_finished()
    assert users_seen_by(old) == ["mo"]
    m = await ops.scrape()
    assert m.value("ws_gateway_auth_failures_total", reason="legacy_denied") == 1


@bounded
async def test_changing_legacy_auth_by_reload_applies_to_new_connections_only(lab: Lab) -> None:
    ops = await lab.start()
    stack = ops.stack
    before = await ops.connect("legacy", make_token("early-bird"))
    assert "Deprecation" not in before.response.headers

    ops.gateway.reload(make_config(stack.old_port, stack.new_port, auth={"legacy": "deny"}))
    denied = await ops.connect("legacy", make_token("late-comer"))
    assert (await closed(denied))[0] == 1008
    await before.send("still connected")  # the established legacy session keeps working
    assert await before.recv() == "still connected"

    ops.gateway.reload(make_config(stack.old_port, stack.new_port, auth=DEPRECATE))
    after = await ops.connect("legacy", make_token("late-comer"))
    assert after.response.headers["Deprecation"] == "@1767225600"
    await after.send("welcome back")
    assert await after.recv() == "welcome back"
    await before.send("and still")
    assert await before.recv() == "and still"
    for ws in (before, after):
        await ws.close()
    await ops.all_finished()


# -- 5. the connection log ----------------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[tuple[io.StringIO, RawRecords]]:
    """The gateway logger's output as JSON lines (its own formatter) and as raw records."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    raw = RawRecords()
    logger = logging.getLogger("gateway")
    logger.addHandler(handler)
    logger.addHandler(raw)
    try:
        yield stream, raw
    finally:
        logger.removeHandler(handler)
        logger.removeHandler(raw)


@bounded
async def test_connection_log_is_one_json_line_per_session_with_its_story_and_no_token(
    lab: Lab, json_log: tuple[io.StringIO, RawRecords]
) -> None:
    stream, raw = json_log
    ops = await lab.start(rollout={"force_new": ["nina", "fred"]})
    tokens = {
        "leo": make_token("leo"),
        "nina": make_token("nina"),
        "fred": make_token("fred"),
        "eve": make_token("eve", secret="not-the-gateways-secret-0123456789-abcdef"),
    }
    echoed: list[Frame] = ["one", b"\x00\x01two", "three"]

    # legacy -> old; the client ends it with 4000
    ws = await ops.connect("legacy", tokens["leo"], additional_headers={"X-Request-ID": "req-leo"})
    for frame in echoed:
        await ws.send(frame)
        assert await ws.recv() == frame
    await ws.close(4000, "client done")
    # message -> new; the backend ends it with 1000 "bye"
    ws = await ops.connect("message", tokens["nina"], additional_headers={"X-Request-ID": "req-nina"})
    assert json.loads(await ws.recv())["type"] == "connected"
    for frame in echoed:
        await ws.send(frame)
        assert await ws.recv() == frame
    stub_close = json.dumps({"type": "stub.close", "code": 1000, "reason": "bye"})
    await ws.send(stub_close)
    assert await closed(ws) == (1000, "bye")
    await ops.all_finished()
    # message -> new, which is down: falls back to old
    async with refused_port() as port:
        ops.gateway.apply(make_config(ops.stack.old_port, port, rollout={"force_new": ["fred"]}))
        ws = await ops.connect("message", tokens["fred"], additional_headers={"X-Request-ID": "req-fred"})
        assert json.loads(await ws.recv())["type"] == "connected"
        await ws.close()
        await ops.all_finished()
    # a forged token
    ws = await ops.connect("legacy", tokens["eve"], additional_headers={"X-Request-ID": "req-eve"})
    assert (await closed(ws))[0] == 1008
    await ops.all_finished()

    lines = [json.loads(text) for text in stream.getvalue().splitlines()]
    sessions = {line["request_id"]: line for line in lines if line["msg"] == "connection closed"}
    assert sorted(sessions) == ["req-eve", "req-fred", "req-leo", "req-nina"]  # one line each
    assert len([line for line in lines if line["msg"] == "connection closed"]) == 4

    leo, nina, fred, eve = (sessions[f"req-{name}"] for name in ("leo", "nina", "fred", "eve"))
    wanted = {
        "user_id", "auth_style", "backend", "fell_back", "ready_s", "duration_s",
        "client_frames", "client_bytes", "backend_frames", "backend_bytes",
        "client_close_code", "client_close_reason", "backend_close_code", "backend_close_reason",
    }
    for line in (leo, nina, fred, eve):
        assert wanted <= set(line), wanted - set(line)
    assert (leo["user_id"], leo["auth_style"], leo["backend"], leo["fell_back"]) == ("leo", "legacy", "old", False)
    assert (nina["user_id"], nina["auth_style"], nina["backend"], nina["fell_back"]) == ("nina", "message", "new", False)
    assert (fred["user_id"], fred["auth_style"], fred["backend"], fred["fell_back"]) == ("fred", "message", "old", True)
    assert (eve["user_id"], eve["backend"], eve["ready_s"], eve["failure"]) == (None, None, None, "bad_signature")
    for line in (leo, nina, fred):
        assert line["ready_s"] > 0 and line["duration_s"] >= line["ready_s"]
    for line in (leo, nina):
        assert (line["backend_frames"], line["backend_bytes"]) == (len(echoed), size(echoed))  # the echoes
    assert (leo["client_frames"], leo["client_bytes"]) == (len(echoed), size(echoed))
    assert (nina["client_frames"], nina["client_bytes"]) == (len(echoed) + 1, size(echoed) + len(stub_close))
    assert (leo["client_close_code"], leo["client_close_reason"]) == (4000, "client done")
    assert (nina["backend_close_code"], nina["backend_close_reason"]) == (1000, "bye")
    # what the gateway sent each side: the forwarded close, and an echo to whoever closed first
    assert (leo["backend_got"], leo["client_got"]) == ([4000, "client done"], [4000, ""])
    assert (nina["client_got"], nina["backend_got"]) == ([1000, "bye"], [1000, ""])
    assert eve["client_got"] == [1008, "invalid token signature"] and eve["backend_got"] is None
    assert (fred["route"], eve["route"]) == ("force_new", None)

    for name, token in tokens.items():
        for piece in pieces(token):
            assert piece not in stream.getvalue(), f"{name}'s token is in the JSON log"
            for text in raw.texts:
                assert piece not in text, f"{name}'s token is in a log record"
