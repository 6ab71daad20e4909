"""Reference chat backends, one per auth style, for the demo, staging and the tests.

``old`` reads the JWT from ``?token=``; ``new`` expects ``{"type":"authenticate","token":…}``
as the first frame and answers ``{"type":"connected",…}``. Both verify the token with the
gateway's own rules, close 1008 on a bad one, and then echo every frame unchanged (text
as text, binary as binary). A few text commands let tests and QA drive the edges:

* ``{"type":"stub.info"}`` answers with what the backend saw at the upgrade: style, user,
  query parameter names, and the forwarding headers (never the token).
* ``{"type":"stub.burst","count":N,"close":CODE,"reason":R}`` sends N numbered frames,
  then closes with CODE (omit ``close`` to stay open).
* ``{"type":"stub.close","code":CODE,"reason":R}`` closes with that code.
* ``{"type":"stub.drop"}`` drops the TCP connection without a close frame.

Faults for drills and QA (`Faults`) are set at start (``ws-gateway stub-backend
--fail-handshake PERCENT --reply-delay SECONDS --drop-after SECONDS``) and switched while it
runs over HTTP on the stub's own port, so a test, the drill or a person with curl can break
a healthy backend midway and heal it again: ``POST /stub/faults`` with a JSON object (keys
named like the flags; ``{}`` heals) applies to connections upgraded from then on, and
``reply_delay`` and ``drop_after`` also to the sessions already open; ``GET /stub/faults``
shows what is set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from aiohttp import WSMsgType, web

from ..core.auth import AuthError, Identity, Verifier, parse_authenticate_frame
from ..core.config import AuthConfig

log = logging.getLogger("gateway.stub")
STYLES = ("old", "new")
FORWARDED_HEADERS = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Request-ID", "User-Agent", "Origin")


@dataclass(frozen=True)
class Faults:
    """What the stub does wrong; the defaults are a healthy backend. Times in seconds."""

    fail_handshake: float = 0.0  # percent of upgrades, spread evenly: old refuses them (503), new never answers connected
    reply_delay: float = 0.0  # wait this long before every reply
    drop_after: float | None = None  # vanish without a close frame this long after the upgrade
    refuse_status: int | None = None  # answer every upgrade with this HTTP status instead
    upgrade_delay: float = 0.0  # hold every upgrade answer this long
    reject_token: bool = False  # close every session with 1008 right after the upgrade, as if the token were bad


class FaultsError(ValueError):
    """A faults request that cannot be applied; one problem per key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


# key -> (low, high) for numbers, None for the one boolean; `refuse_status` is an integer.
FAULT_RANGES: dict[str, tuple[float, float] | None] = {
    "fail_handshake": (0.0, 100.0),
    "reply_delay": (0.0, 300.0),
    "drop_after": (0.0, 3600.0),
    "refuse_status": (400, 599),
    "upgrade_delay": (0.0, 300.0),
    "reject_token": None,
}


def parse_faults(raw: Any) -> Faults:
    """`Faults` from a decoded JSON body, or `FaultsError` naming every bad key and value."""
    if not isinstance(raw, dict):
        raise FaultsError([f"expected a JSON object, got {type(raw).__name__}"])
    problems = [f"{key}: unknown key (allowed: {', '.join(FAULT_RANGES)})" for key in raw if key not in FAULT_RANGES]
    values: dict[str, Any] = {}
    for f in fields(Faults):
        if raw.get(f.name) is None:
            continue
        value, bounds = raw[f.name], FAULT_RANGES[f.name]
        if bounds is None:
            if isinstance(value, bool):
                values[f.name] = value
            else:
                problems.append(f"{f.name}: expected true or false, got {value!r}")
            continue
        integer = f.name == "refuse_status"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or math.isnan(value):
            problems.append(f"{f.name}: expected {'an integer' if integer else 'a number'}, got {value!r}")
        elif not bounds[0] <= value <= bounds[1]:
            problems.append(f"{f.name}: {value!r} is out of range [{bounds[0]:g}, {bounds[1]:g}]")
        else:
            values[f.name] = value if integer else float(value)
    if problems:
        raise FaultsError(problems)
    return Faults(**values)


def picked(n: int, percent: float) -> bool:
    """Whether item `n` (0, 1, …) is among `percent` % of a sequence, spread evenly.

    Deterministic, so a drill knows what to expect: exactly ``floor(count * percent / 100)``
    of the first `count` items are picked (30 %: the 4th, 7th and 10th of every ten).
    """
    return math.floor((n + 1) * percent / 100) > math.floor(n * percent / 100)


class FaultSwitch:
    """The faults in force, and whether the next connection's handshake is one that fails.

    `reply_delay` and `drop_after` are read live by every open session, so a POST heals (or
    breaks) sessions already open, not only those opened afterwards: `changed` wakes a reply
    waiting out a delay that was just lowered, and each open session's drop is re-timed from
    its own upgrade. The other faults are about the upgrade itself and apply from the next one.
    """

    def __init__(self, faults: Faults = Faults()) -> None:
        self.changed = asyncio.Event()
        self.sessions: dict[asyncio.Transport, LiveSession] = {}
        self.set(faults)

    def set(self, faults: Faults) -> None:
        self.faults = faults
        self.upgrades = 0  # connections seen since `faults` were set: the `fail_handshake` count starts again
        self.changed.set()
        self.changed = asyncio.Event()
        for session in self.sessions.values():
            session.time_drop(faults.drop_after)

    def next(self) -> tuple[Faults, bool]:
        """The faults for the next connection, and whether its handshake fails."""
        n, self.upgrades = self.upgrades, self.upgrades + 1
        return self.faults, picked(n, self.faults.fail_handshake)

    async def reply_delay(self, received: float) -> None:
        """Wait until `reply_delay` (as it is now, or as it is changed to meanwhile) after `received`."""
        loop = asyncio.get_running_loop()
        while (remaining := received + self.faults.reply_delay - loop.time()) > 0:
            changed = self.changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return

    def as_dict(self) -> dict[str, Any]:
        return {"faults": asdict(self.faults), "upgrades": self.upgrades, "open_sessions": len(self.sessions)}


class LiveSession:
    """One open echo session's `drop_after` timer, counted from its upgrade."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.upgraded = asyncio.get_running_loop().time()
        self.drop: asyncio.TimerHandle | None = None

    def time_drop(self, after: float | None) -> None:
        if self.drop is not None:
            self.drop.cancel()
            self.drop = None
        if after is not None:
            loop = asyncio.get_running_loop()
            self.drop = loop.call_at(self.upgraded + after, self.transport.abort)

    def end(self) -> None:
        if self.drop is not None:
            self.drop.cancel()


def create_stub_app(
    style: str,
    auth: AuthConfig,
    *,
    path: str = "/ws/chat",
    greeting: str | None = None,
    max_message_bytes: int = 1024 * 1024,
    faults: Faults = Faults(),
) -> web.Application:
    """The backend for `style`, with `faults` in force until ``POST /stub/faults`` changes them."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}")
    verifier = Verifier(auth)
    switch = FaultSwitch(faults)

    async def handler(request: web.Request) -> web.StreamResponse:
        faults, fail_handshake = switch.next()
        if faults.upgrade_delay:
            await asyncio.sleep(faults.upgrade_delay)
        if faults.refuse_status is not None:
            return web.Response(status=faults.refuse_status, text="refused by a stub fault\n")
        if fail_handshake and style == "old":
            return web.Response(status=503, text="handshake failed (stub fault)\n")
        ws = web.WebSocketResponse(max_msg_size=max_message_bytes + 1, heartbeat=20)
        await ws.prepare(request)
        if faults.reject_token:
            await ws.close(code=1008, message=b"token rejected (stub fault)")
            return ws
        if fail_handshake:  # the new style's handshake is the connected frame: never send it
            async for _ in ws:
                pass
            return ws
        identity = await (_query_auth(ws, request, verifier, auth) if style == "old" else _message_auth(ws, verifier, greeting))
        if identity is None:
            return ws
        info = {
            "type": "stub.info",
            "style": style,
            "user_id": identity.user_id,
            "path": request.path,
            "query": {k: v for k, v in request.query.items() if k != auth.query_param},
            "query_names": list(request.query.keys()),
            "headers": {h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers},
        }
        if request.transport is None:
            return ws
        live = switch.sessions[request.transport] = LiveSession(request.transport)
        live.time_drop(faults.drop_after)
        try:
            await _echo(ws, request, info, switch)
        finally:
            live.end()
            del switch.sessions[request.transport]
        return ws

    async def get_faults(request: web.Request) -> web.Response:
        return web.json_response(switch.as_dict())

    async def post_faults(request: web.Request) -> web.Response:
        try:
            faults = parse_faults(await request.json())
        except ValueError as exc:  # FaultsError, or a body that is not JSON
            problems = exc.problems if isinstance(exc, FaultsError) else ["the body is not JSON"]
            return web.json_response({"errors": problems}, status=400)
        switch.set(faults)
        log.info("stub faults set", extra={"style": style, **asdict(faults)})
        return web.json_response(switch.as_dict())

    app = web.Application()
    app.router.add_get(path, handler)
    app.router.add_get("/stub/faults", get_faults)
    app.router.add_post("/stub/faults", post_faults)
    return app


async def _query_auth(ws: web.WebSocketResponse, request: web.Request, verifier: Verifier, auth: AuthConfig) -> Identity | None:
    try:
        return verifier.verify(request.query.get(auth.query_param))
    except AuthError as exc:
        await ws.close(code=1008, message=exc.close_reason.encode())
        return None


async def _message_auth(ws: web.WebSocketResponse, verifier: Verifier, greeting: str | None) -> Identity | None:
    try:
        msg = await ws.receive(timeout=10)
    except asyncio.TimeoutError:
        await ws.close(code=1008, message=b"authentication timed out")
        return None
    if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
        return None
    try:
        token, _ = parse_authenticate_frame(msg.data)
        identity = verifier.verify(token)
    except AuthError as exc:
        await ws.close(code=1008, message=exc.close_reason.encode())
        return None
    connected: dict[str, Any] = {"type": "connected", "message": "Connected to Wealth Coach AI", "user_id": identity.user_id}
    await ws.send_str(greeting or json.dumps(connected))
    return identity


async def _echo(ws: web.WebSocketResponse, request: web.Request, info: dict[str, Any], switch: FaultSwitch) -> None:
    loop = asyncio.get_running_loop()
    async for msg in ws:
        if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            await switch.reply_delay(loop.time())  # the fault itself: a slow backend
        if msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
            continue
        if msg.type is not WSMsgType.TEXT:
            continue
        command = _command(msg.data) or {}
        kind = command.get("type")
        if kind == "stub.info":
            await ws.send_str(json.dumps(info))
        elif kind == "stub.burst":
            for n in range(int(command.get("count", 0))):
                await ws.send_str(json.dumps({"type": "stub.burst", "n": n}))
            if "close" in command:
                await ws.close(code=int(command["close"]), message=str(command.get("reason", "")).encode())
                return
        elif kind == "stub.close":
            await ws.close(code=int(command.get("code", 1000)), message=str(command.get("reason", "")).encode())
            return
        elif kind == "stub.drop":
            assert request.transport is not None
            request.transport.abort()
            return
        else:
            await ws.send_str(msg.data)


def _command(text: str) -> dict[str, Any] | None:
    if not text.startswith('{"type":"stub.') and not text.startswith('{"type": "stub.'):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
