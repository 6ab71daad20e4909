"""``ws-gateway probe URL``: a smoke test of a running gateway, from outside, as the apps use it.

QA's question after every deploy is "can both app versions still connect?". The probe
answers it with nothing but the WebSocket protocol, so it works against any host: a
gateway behind a load balancer, or the old backend directly. For each user
(a ``--token``, or one token minted per ``--user``) it connects in both auth styles and
checks what that style must see:

* message style (the current app): the first frame is ``{"type":"connected",…}`` within
  ``--timeout``;
* legacy style (token in the URL): no gateway-made frame (no ``connected``), and the
  socket stays open for ``--hold`` seconds;
* with ``--send TEXT``, in both styles: a reply within ``--reply-timeout``;

then that a token signed with a random secret is refused with 1008 in both styles. No
token is ever printed.

A PASS alone does not say which backend served the user: the rollback guard or a fallback
may have sent a user pinned new to the old one. With ``--admin URL`` each session carries
its own X-Request-ID (a header apps may send already), and while the probe holds it open it
asks the admin port ``/sessions/ID`` where the session is and why; ``--expect-backend``
fails a check that landed elsewhere. The public port answers nothing new.

The judges (pure) turn what one wait saw (`Seen`) into a verdict; `run_probe` does the I/O.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
from aiohttp import WSMsgType

from ..core.auth import mint_token
from ..core.config import AuthConfig

CLOSE_MEANINGS = {
    1000: "normal",
    1001: "going away",
    1008: "authentication refused",
    1009: "frame too large",
    1011: "backend error",
    1012: "gateway restarting",
    1013: "try again later",
    1014: "bad gateway: the backend is unreachable or failed its handshake",
}
BAD_TOKEN = "bad token"  # the `who` of the refusal checks
ADMIN_RETRY_SECONDS = 0.1  # between asks for a session whose upstream is still opening


@dataclass(frozen=True)
class Options:
    hold: float = 2.0  # seconds a legacy-style socket must stay open
    send: str | None = None  # a frame each session sends once its check passed, expecting a reply
    timeout: float = 10.0  # bound on the upgrade, on connected, and on a bad token's close
    reply_timeout: float = 5.0
    query_param: str = "token"  # the URL parameter legacy apps put the token in
    admin: str | None = None  # the gateway's admin URL: asked which backend served each session
    expect_backend: str | None = None  # old or new: a session that landed elsewhere fails its check


@dataclass(frozen=True)
class Seen:
    """What the probe saw during one wait, in order. `seconds`: from the start of the wait to
    its end (the awaited frame, a close, or the deadline when nothing came)."""

    seconds: float
    frames: tuple[str | bytes, ...] = ()
    close_code: int | None = None  # the peer's close frame, if one came
    close_reason: str = ""
    lost: bool = False  # the connection ended without a close frame
    upgrade_error: str | None = None  # why the HTTP upgrade failed, if it did

    @property
    def still_open(self) -> bool:
        return self.close_code is None and not self.lost and self.upgrade_error is None


Verdict = tuple[str, str]  # (PASS, FAIL or SKIP; what was seen)


@dataclass(frozen=True)
class Placed:
    """Where the admin port says a session is: `backend` and `why` (route, forced, fallback,
    guard), or `problem` saying why nobody could tell."""

    backend: str | None = None
    why: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class Check:
    who: str  # the user the token names, "given token", or BAD_TOKEN
    style: str  # legacy or message
    what: str  # connected, held open, reply, refused
    result: str
    ms: float | None
    detail: str
    backend: str | None = None  # old or new, when the admin port said (``--admin``)
    why: str | None = None  # route, forced, fallback or guard

    @property
    def name(self) -> str:
        return f"{self.who}, {self.style} style: {self.what}"


@dataclass
class ProbeReport:
    url: str
    checks: list[Check] = field(default_factory=list)
    located: bool = False  # the admin port was asked where each session went

    @property
    def passed(self) -> bool:
        return all(check.result != "FAIL" for check in self.checks)

    def counts(self) -> dict[str, int]:
        return {result: sum(1 for c in self.checks if c.result == result) for result in ("PASS", "FAIL", "SKIP")}

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "passed": self.passed,
            "counts": self.counts(),
            "checks": [{"name": check.name, **asdict(check)} for check in self.checks],
        }

    def text(self) -> str:
        width = max(len(check.name) for check in self.checks)
        where = {id(check): _where(check) for check in self.checks}
        column = max(len(text) for text in where.values())
        lines = [f"probe {self.url}", ""]
        for check in self.checks:
            took = "" if check.ms is None else f"{check.ms:.0f} ms"
            placed = f"{where[id(check)].ljust(column)}  " if self.located else ""
            lines.append(f"{check.result}  {check.name.ljust(width)}  {took:>8}  {placed}{check.detail}")
        counts = self.counts()
        lines += ["", f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"]
        return "\n".join(lines) + "\n"


def _where(check: Check) -> str:
    if check.backend is not None:
        return f"backend {check.backend} ({check.why})"
    return "backend ?" if check.who != BAD_TOKEN else ""


# -- the judges (pure) -------------------------------------------------------------------------


def judge_connected(seen: Seen) -> Verdict:
    """Message style: the first frame is ``{"type":"connected"}``."""
    if seen.upgrade_error is not None:
        return "FAIL", f"upgrade failed: {seen.upgrade_error}"
    if not seen.frames:
        return "FAIL", f"{_ending(seen)} before connected"
    if _type_of(seen.frames[0]) == "connected":
        return "PASS", 'first frame {"type":"connected"}'
    return "FAIL", f"first frame is {_described(seen.frames[0])}, not connected"


def judge_held(seen: Seen, hold: float) -> Verdict:
    """Legacy style: no gateway-made frame, and still open after `hold` seconds."""
    if seen.upgrade_error is not None:
        return "FAIL", f"upgrade failed: {seen.upgrade_error}"
    if any(_type_of(frame) == "connected" for frame in seen.frames):
        return "FAIL", 'received {"type":"connected"}, which a legacy app never got before the migration'
    if seen.close_code is not None or seen.lost:
        return "FAIL", f"{_ending(seen)} after {seen.seconds:.1f} s, before {hold:g} s"
    others = f"; {len(seen.frames)} frame(s) from the backend" if seen.frames else ""
    return "PASS", f"open for {hold:g} s, no gateway-made frame{others}"


def judge_reply(seen: Seen | None) -> Verdict:
    """``--send``: a frame came back. None: the session was over before there was anything to send on."""
    if seen is None:
        return "SKIP", "no open session to send on"
    if seen.frames:
        return "PASS", f"{_described(seen.frames[0])} came back"
    return "FAIL", f"{_ending(seen)} before a reply"


def judge_refused(seen: Seen, token: str) -> Verdict:
    """A token the gateway cannot verify: the socket is accepted, then closed with 1008, and
    the reason never echoes the token."""
    if seen.upgrade_error is not None:
        return "FAIL", f"upgrade failed: {seen.upgrade_error} (expected the socket accepted, then closed with 1008)"
    if seen.close_code != 1008 or seen.frames:
        return "FAIL", f"expected a close with 1008 and no frame; got {len(seen.frames)} frame(s), then {_ending(seen)}"
    if token in seen.close_reason:
        return "FAIL", "the close reason contains the token"
    return "PASS", _described_close(seen.close_code, seen.close_reason)


def judge_backend(verdict: Verdict, placed: Placed | None, expected: str | None) -> Verdict:
    """``--expect-backend``: a check that passed fails when its session landed on the other
    backend, or when nobody could say where it landed."""
    if expected is None or verdict[0] != "PASS":
        return verdict
    if placed is None or placed.backend is None:
        problem = placed.problem if placed is not None else "the session was over before the admin port was asked"
        return "FAIL", f"expected backend {expected}, but where it landed is unknown: {problem}"
    if placed.backend != expected:
        return "FAIL", f"landed on backend {placed.backend} ({placed.why}), expected {expected}"
    return verdict


def _ending(seen: Seen) -> str:
    if seen.close_code is not None:
        return _described_close(seen.close_code, seen.close_reason)
    if seen.lost:
        return "connection lost without a close frame"
    return f"nothing within {seen.seconds:.1f} s"


def _described_close(code: int, reason: str) -> str:
    meaning = CLOSE_MEANINGS.get(code)
    return f"closed {code}" + (f" {reason!r}" if reason else "") + (f" ({meaning})" if meaning else "")


def _json_object(frame: str | bytes) -> dict[str, Any] | None:
    if not isinstance(frame, str):
        return None
    try:
        value = json.loads(frame)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _type_of(frame: str | bytes) -> Any:
    value = _json_object(frame)
    return None if value is None else value.get("type")


def _described(frame: str | bytes) -> str:
    """A frame by its kind only: its text may hold a token (an echo server echoes authenticate)."""
    kind = _type_of(frame)
    if isinstance(kind, str):
        return f"a {{\"type\":{json.dumps(kind[:40])}}} frame"
    return f"a text frame of {len(frame)} characters" if isinstance(frame, str) else f"a binary frame of {len(frame)} bytes"


# -- the I/O -------------------------------------------------------------------------------------


async def run_probe(url: str, tokens: Mapping[str, str], bad_token: str, options: Options) -> ProbeReport:
    """Every check against `url`: each of `tokens` (by who it names) in both styles, then
    `bad_token` in both styles; the sessions run at once, the checks are listed in order."""
    report = ProbeReport(urlunsplit(urlsplit(url)._replace(query="")), located=options.admin is not None)
    async with aiohttp.ClientSession() as http:
        sessions = []
        for who, token in tokens.items():
            sessions += [_message_session(http, url, who, token, options), _legacy_session(http, url, who, token, options)]
        sessions += [_refused(http, url, style, bad_token, options) for style in ("legacy", "message")]
        for checks in await asyncio.gather(*sessions):
            report.checks += checks
    return report


async def _message_session(http: aiohttp.ClientSession, url: str, who: str, token: str, options: Options) -> list[Check]:
    started = time.monotonic()
    request_id = _request_id()
    ws, error = await _connect(http, url, options.timeout, request_id)
    if ws is None:
        seen = Seen(time.monotonic() - started, upgrade_error=error)
        return _checks(who, "message", ("connected", seen, judge_connected(seen)), options, None, None)
    try:
        if await _sent(ws, json.dumps({"type": "authenticate", "token": token})):
            seen = await _wait(ws, started, options.timeout, until_frame=True)
        else:
            seen = Seen(time.monotonic() - started, lost=True)
        placed = await _placement(http, options, request_id) if seen.still_open else None
        reply = await _exchange(ws, options.send, options.reply_timeout) if options.send is not None and seen.still_open else None
        return _checks(who, "message", ("connected", seen, judge_connected(seen)), options, reply, placed)
    finally:
        await ws.close()


async def _legacy_session(http: aiohttp.ClientSession, url: str, who: str, token: str, options: Options) -> list[Check]:
    started = time.monotonic()
    request_id = _request_id()
    ws, error = await _connect(http, _with_token(url, options.query_param, token), options.timeout, request_id)
    if ws is None:
        seen = Seen(time.monotonic() - started, upgrade_error=error)
        return _checks(who, "legacy", ("held open", seen, judge_held(seen, options.hold)), options, None, None)
    try:
        seen = await _wait(ws, time.monotonic(), options.hold, until_frame=False)
        placed = await _placement(http, options, request_id) if seen.still_open else None
        reply = await _exchange(ws, options.send, options.reply_timeout) if options.send is not None and seen.still_open else None
        return _checks(who, "legacy", ("held open", seen, judge_held(seen, options.hold)), options, reply, placed)
    finally:
        await ws.close()


def _request_id() -> str:
    """The X-Request-ID of one probe session: the admin port finds the session by it."""
    return f"probe-{secrets.token_hex(8)}"


async def _placement(http: aiohttp.ClientSession, options: Options, request_id: str) -> Placed | None:
    """Ask the admin port where the session with `request_id` is, while the probe holds it open.

    A legacy session can still be opening its upstream after a short ``--hold`` (and may yet
    fall back to the old backend): the admin port is asked again until it relays, for at most
    ``--timeout`` seconds.
    """
    if options.admin is None:
        return None
    url = f"{options.admin.rstrip('/')}/sessions/{request_id}"
    deadline = time.monotonic() + options.timeout
    while True:
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())), http.get(url) as response:
                if response.status == 404 and response.content_type == "application/json":
                    return Placed(problem="the admin port knows no open session with its X-Request-ID (another replica's?)")
                if response.status == 404:
                    return Placed(problem="the admin port does not answer /sessions (a gateway older than the probe?)")
                if response.status != 200:
                    return Placed(problem=f"the admin port answered HTTP {response.status}")
                body = await response.json()
        except aiohttp.ClientConnectorError as exc:
            return Placed(problem=f"admin port: {unreachable(exc.host, exc.port, exc.os_error)}")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return Placed(problem=f"admin port: {type(exc).__name__}")
        except TimeoutError:
            return Placed(problem=f"the admin port did not answer within {options.timeout:g} s")
        if not isinstance(body, dict):
            return Placed(problem="the admin port's answer is not a JSON object")
        if body.get("relaying"):
            return Placed(backend=body.get("backend"), why=body.get("why"))
        if time.monotonic() >= deadline:
            return Placed(problem=f"the gateway had not opened the session's upstream within {options.timeout:g} s")
        await asyncio.sleep(ADMIN_RETRY_SECONDS)


async def _refused(http: aiohttp.ClientSession, url: str, style: str, token: str, options: Options) -> list[Check]:
    started = time.monotonic()
    target = _with_token(url, options.query_param, token) if style == "legacy" else url
    ws, error = await _connect(http, target, options.timeout)
    if ws is None:
        seen = Seen(time.monotonic() - started, upgrade_error=error)
    else:
        try:
            if style == "legacy" or await _sent(ws, json.dumps({"type": "authenticate", "token": token})):
                seen = await _wait(ws, started, options.timeout, until_frame=False)
            else:
                seen = Seen(time.monotonic() - started, lost=True)
        finally:
            await ws.close()
    return [_check(BAD_TOKEN, style, "refused", seen, judge_refused(seen, token))]


def _checks(
    who: str, style: str, first: tuple[str, Seen, Verdict], options: Options, reply: Seen | None, placed: Placed | None
) -> list[Check]:
    """The session's checks; each names the backend the admin port placed the session on."""
    what, seen, verdict = first
    backend, why = (placed.backend, placed.why) if placed is not None else (None, None)
    checks = [replace(_check(who, style, what, seen, judge_backend(verdict, placed, options.expect_backend)), backend=backend, why=why)]
    if options.send is not None:
        checks.append(replace(_check(who, style, "reply", reply, judge_reply(reply)), backend=backend, why=why))
    return checks


def _check(who: str, style: str, what: str, seen: Seen | None, verdict: Verdict) -> Check:
    ms = None if seen is None else round(seen.seconds * 1000, 1)
    return Check(who, style, what, verdict[0], ms, verdict[1])


async def _connect(
    http: aiohttp.ClientSession, url: str, timeout: float, request_id: str | None = None
) -> tuple[aiohttp.ClientWebSocketResponse | None, str]:
    """The open socket, or None and why the upgrade failed (never the URL: it may hold the token)."""
    headers = {"X-Request-ID": request_id} if request_id is not None else None
    try:
        async with asyncio.timeout(timeout):
            return await http.ws_connect(url, autoclose=False, autoping=True, headers=headers), ""
    except aiohttp.WSServerHandshakeError as exc:
        return None, f"HTTP {exc.status}"
    except aiohttp.ClientConnectorError as exc:
        return None, unreachable(exc.host, exc.port, exc.os_error)
    except (aiohttp.ClientError, OSError) as exc:
        return None, type(exc).__name__
    except TimeoutError:
        return None, f"no answer within {timeout:g} s"


def unreachable(host: str, port: int | None, error: OSError) -> str:
    """What to fix when no TCP connection came about: the address, and the OS's own words."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(error, socket.gaierror):
        return f"unknown host {host} ({error.strerror or error})"
    if isinstance(error, ConnectionRefusedError):
        return f"connection refused to {where}"
    reason = os.strerror(error.errno) if error.errno else (error.strerror or type(error).__name__)
    return f"cannot connect to {where}: {reason}"


async def _wait(ws: aiohttp.ClientWebSocketResponse, started: float, limit: float, *, until_frame: bool) -> Seen:
    """Read until `limit` seconds after `started`, a close, or (`until_frame`) the first data frame."""
    seen = Seen(0.0)
    deadline = started + limit
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return replace(seen, seconds=time.monotonic() - started)
        try:
            msg = await ws.receive(timeout=remaining)
        except TimeoutError:
            return replace(seen, seconds=time.monotonic() - started)
        if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            seen = replace(seen, frames=(*seen.frames, msg.data))
            if until_frame:
                return replace(seen, seconds=time.monotonic() - started)
            continue
        ended = time.monotonic() - started
        if msg.type is WSMsgType.CLOSE:
            return replace(seen, seconds=ended, close_code=int(msg.data), close_reason=msg.extra or "")
        return replace(seen, seconds=ended, lost=True)


async def _exchange(ws: aiohttp.ClientWebSocketResponse, text: str, timeout: float) -> Seen:
    """Send ``--send``'s text and wait for the next data frame."""
    started = time.monotonic()
    if not await _sent(ws, text):
        return Seen(time.monotonic() - started, lost=True)
    return await _wait(ws, started, timeout, until_frame=True)


async def _sent(ws: aiohttp.ClientWebSocketResponse, text: str) -> bool:
    """False when the connection was already gone: a finding of the check, not a crash of the probe."""
    try:
        await ws.send_str(text)
    except (aiohttp.ClientError, OSError):
        return False
    return True


def _with_token(url: str, param: str, token: str) -> str:
    parts = urlsplit(url)
    query = "&".join(filter(None, [parts.query, f"{quote(param)}={quote(token)}"]))
    return urlunsplit(parts._replace(query=query))


def forged_token(auth: AuthConfig) -> str:
    """A well-formed token with `auth`'s claims, signed with a random secret: refused for its signature."""
    return mint_token(replace(auth, secret=secrets.token_urlsafe(32)), "probe-bad-token", 300)
