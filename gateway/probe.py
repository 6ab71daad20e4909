"""``ws-gateway probe URL``: check a running gateway the way the two app versions use it.

QA's question after every deploy to staging is "do the legacy and the current app both
still work, on both backends?". The probe answers it from outside, like a client: for a
user routed to each backend (the QA accounts in ``rollout.force_old`` / ``force_new``
when there are any) it opens a session as the legacy app (token in the URL) and as the
current app (``authenticate`` frame), sends one chat frame, waits for the backend's reply
and closes; then it checks that a bad token is refused with 1008 in both styles. Tokens
are minted with the config's HMAC secret and never printed.

The probe frame is ``{"type":"stub.info"}``: a stub backend answers it with its style and
the user it saw, so against stubs the probe also proves which backend served the user; a
real backend treats it as a chat message, and any data frame back counts as the reply.

`judge` (pure) turns what one session saw (`Transcript`) into a `Check`; `run_probe` does
the I/O, every wait bounded by ``--timeout``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import WSMsgType

from .auth import mint_token
from .config import AuthConfig, Config
from .routing import choose_backend

PROBE_FRAME = json.dumps({"type": "stub.info"})
APPS = {"legacy": "legacy app (token in URL)", "message": "current app (authenticate)"}
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
CANDIDATES = 10_000  # synthetic user ids tried when no forced user routes to a backend


@dataclass(frozen=True)
class Transcript:
    """What one client session saw, in order. Times in seconds."""

    upgrade_error: str | None = None  # why the HTTP upgrade failed, if it did
    upgrade_seconds: float | None = None
    frames: tuple[str | bytes, ...] = ()  # data frames received, in order
    reply_seconds: float | None = None  # probe frame sent -> the next data frame
    close_code: int | None = None  # the gateway's close frame (None: it never closed)
    close_reason: str = ""
    closed_first: bool = False  # the gateway closed before the probe said goodbye
    timed_out: str | None = None  # the wait that ran out


@dataclass(frozen=True)
class Check:
    name: str
    result: str  # PASS, FAIL or SKIP
    detail: str
    app: str | None = None
    backend: str | None = None
    upgrade_ms: float | None = None
    reply_ms: float | None = None


@dataclass(frozen=True)
class ProbeUser:
    backend: str
    user_id: str | None
    why: str


@dataclass
class ProbeReport:
    url: str
    users: list[ProbeUser]
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.result != "FAIL" for check in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "passed": self.passed,
            "users": [asdict(user) for user in self.users],
            "checks": [asdict(check) for check in self.checks],
        }

    def text(self) -> str:
        lines = [f"probe {self.url}"]
        lines += [f"  {u.backend} backend: " + (f"user {u.user_id} ({u.why})" if u.user_id else u.why) for u in self.users]
        lines.append("")
        width = max(len(check.name) for check in self.checks)
        lines += [f"{check.result}  {check.name.ljust(width)}  {check.detail}" for check in self.checks]
        counts = {result: sum(1 for c in self.checks if c.result == result) for result in ("PASS", "FAIL", "SKIP")}
        lines += ["", f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"]
        return "\n".join(lines) + "\n"


def pick_user(config: Config, backend: str) -> ProbeUser:
    """A user the config routes to `backend`: a forced one (the QA accounts) if any, else a
    synthetic ``probe-N`` whose bucket lands there."""
    rollout = config.rollout
    forced = sorted(rollout.force_new if backend == "new" else rollout.force_old)
    if forced:
        return ProbeUser(backend, forced[0], choose_backend(forced[0], rollout).explain())
    for n in range(1, CANDIDATES + 1):
        route = choose_backend(f"probe-{n}", rollout)
        if route.backend == backend:
            return ProbeUser(backend, f"probe-{n}", route.explain())
    return ProbeUser(backend, None, f"no user routes here (new_percent {rollout.new_percent:g}, no force_{backend})")


def _describe_close(code: int | None, reason: str) -> str:
    meaning = CLOSE_MEANINGS.get(code or 0)
    return f"closed {code}" + (f" {reason!r}" if reason else "") + (f" ({meaning})" if meaning else "")


def _ms(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds * 1000:.0f} ms"


def judge(app: str, backend: str, user_id: str, t: Transcript, *, legacy_denied: bool = False) -> Check:
    """Whether one session through the gateway behaved as its app needs (see the README's contract)."""
    name = f"{APPS[app]} -> {backend}"

    def outcome(result: str, detail: str) -> Check:
        return Check(
            name, result, detail, app, backend,
            None if t.upgrade_seconds is None else round(t.upgrade_seconds * 1000, 1),
            None if t.reply_seconds is None else round(t.reply_seconds * 1000, 1),
        )

    if t.upgrade_error is not None:
        return outcome("FAIL", f"upgrade failed: {t.upgrade_error}")
    if app == "legacy" and legacy_denied:
        if t.close_code == 1008 and not t.frames:
            return outcome("PASS", f"refused as configured (auth.legacy: deny): {_describe_close(t.close_code, t.close_reason)}")
        return outcome("FAIL", "auth.legacy is deny, but the legacy app was not refused with 1008")
    frames = list(t.frames)
    if app == "message":
        if not frames:
            return outcome("FAIL", _no_frame(t, "the connected frame"))
        if _type_of(frames[0]) != "connected":
            return outcome("FAIL", f"first frame is not {{\"type\":\"connected\"}}: {_shown(frames[0])}")
        frames = frames[1:]
    elif frames and _type_of(frames[0]) == "connected":
        return outcome("FAIL", "the legacy app received a connected frame, which it never had before the migration")
    if not frames:
        return outcome("FAIL", _no_frame(t, "a reply"))
    detail = f"upgrade {_ms(t.upgrade_seconds)}, reply {_ms(t.reply_seconds)}"
    info = _json_object(frames[0])
    if info is not None and info.get("type") == "stub.info":
        served = {"old": "old", "new": "new"}.get(str(info.get("style")))
        if served != backend:
            return outcome(
                "FAIL",
                f"served by the {served} backend, expected {backend}: the gateway fell back or the guard holds users back "
                "(GET /rollout on the admin port)",
            )
        if info.get("user_id") != user_id:
            return outcome("FAIL", f"the backend saw user {info.get('user_id')!r}, expected {user_id!r}")
        detail += f", stub {backend} backend saw {user_id}"
    else:
        detail += " (not a stub: the backend is not identified)"
    if t.closed_first or t.close_code != 1000:
        return outcome("FAIL", detail + "; then " + (_describe_close(t.close_code, t.close_reason) if t.close_code else "no close answer"))
    return outcome("PASS", detail + ", closed 1000")


def judge_bad_token(app: str, token: str, t: Transcript) -> Check:
    """A token the gateway cannot verify must be refused with 1008, and never echoed."""
    name = f"bad token, {APPS[app]}"
    if t.upgrade_error is not None:
        return Check(name, "FAIL", f"upgrade failed: {t.upgrade_error} (expected an accepted socket closed with 1008)", app)
    if t.close_code != 1008 or t.frames:
        seen = _describe_close(t.close_code, t.close_reason) if t.close_code else _no_frame(t, "a close")
        return Check(name, "FAIL", f"expected a close with 1008 and no frame; got {len(t.frames)} frame(s), {seen}", app)
    if token in t.close_reason:
        return Check(name, "FAIL", "the close reason contains the token", app)
    return Check(name, "PASS", _describe_close(t.close_code, t.close_reason), app)


def _no_frame(t: Transcript, wanted: str) -> str:
    if t.close_code is not None:
        return f"{_describe_close(t.close_code, t.close_reason)} before {wanted}"
    if t.timed_out:
        return f"no answer within the timeout ({t.timed_out})"
    return f"the connection ended without a close frame before {wanted}"


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


def _shown(frame: str | bytes) -> str:
    return repr(frame[:80]) + ("…" if len(frame) > 80 else "")


# -- the I/O -------------------------------------------------------------------------------------


def _with_token(url: str, param: str, token: str) -> str:
    parts = urlsplit(url)
    query = "&".join(filter(None, [parts.query, f"{param}={token}"]))
    return urlunsplit(parts._replace(query=query))


async def session(
    http: aiohttp.ClientSession, url: str, app: str, token: str, query_param: str, *, expect_connected: bool, timeout: float
) -> Transcript:
    """One session as `app`: upgrade, authenticate (current app), probe frame, reply, close 1000."""
    t = Transcript()
    started = time.monotonic()
    target = _with_token(url, query_param, token) if app == "legacy" else url
    try:
        async with asyncio.timeout(timeout):
            ws = await http.ws_connect(target, autoclose=False, autoping=True)
    except aiohttp.WSServerHandshakeError as exc:
        return replace(t, upgrade_error=f"HTTP {exc.status}")
    except (aiohttp.ClientError, OSError) as exc:
        return replace(t, upgrade_error=type(exc).__name__)
    except TimeoutError:
        return replace(t, upgrade_error=f"no answer within {timeout:g} s")
    t = replace(t, upgrade_seconds=time.monotonic() - started)
    try:
        if app == "message":
            await ws.send_str(json.dumps({"type": "authenticate", "token": token}))
            if expect_connected:
                t, ended = await _receive(ws, t, timeout, "waiting for connected")
                if ended:
                    return t
        sent = time.monotonic()
        await ws.send_str(PROBE_FRAME)
        t, ended = await _receive(ws, t, timeout, "waiting for a reply")
        if ended:
            return t
        t = replace(t, reply_seconds=time.monotonic() - sent)
        await ws.close(code=1000, message=b"probe done")
        return replace(t, close_code=ws.close_code)
    finally:
        if not ws.closed:
            await ws.close()


async def _receive(ws: aiohttp.ClientWebSocketResponse, t: Transcript, timeout: float, waiting: str) -> tuple[Transcript, bool]:
    """The next data frame into `t`; True when the session ended instead (closed or timed out)."""
    try:
        msg = await ws.receive(timeout=timeout)
    except TimeoutError:
        return replace(t, timed_out=waiting), True
    if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
        return replace(t, frames=(*t.frames, msg.data)), False
    if msg.type is WSMsgType.CLOSE:
        return replace(t, close_code=int(msg.data), close_reason=msg.extra or "", closed_first=True), True
    return replace(t, closed_first=True), True


async def run_probe(
    config: Config, url: str, *, users: Mapping[str, str | None] | None = None, timeout: float = 10.0
) -> ProbeReport:
    """Every check against the gateway at `url`; `users` overrides the user per backend."""
    auth = config.auth
    picked = []
    for backend in ("old", "new"):
        given = (users or {}).get(backend)
        if given:
            picked.append(ProbeUser(backend, given, "given on the command line; " + choose_backend(given, config.rollout).explain()))
        else:
            picked.append(pick_user(config, backend))
    shown = urlunsplit(urlsplit(url)._replace(query=""))
    report = ProbeReport(shown, picked)
    async with aiohttp.ClientSession() as http:
        for user in picked:
            for app in APPS:
                if user.user_id is None:
                    report.checks.append(Check(f"{APPS[app]} -> {user.backend}", "SKIP", user.why, app, user.backend))
                    continue
                token = mint_token(auth, user.user_id, 300)
                denied = app == "legacy" and auth.legacy == "deny"
                t = await session(http, url, app, token, auth.query_param, expect_connected=not denied, timeout=timeout)
                report.checks.append(judge(app, user.backend, user.user_id, t, legacy_denied=denied))
        bad = _bad_token(auth)
        for app in APPS:
            t = await session(http, url, app, bad, auth.query_param, expect_connected=False, timeout=timeout)
            report.checks.append(judge_bad_token(app, bad, t))
    return report


def _bad_token(auth: AuthConfig) -> str:
    """A well-formed token signed with a random secret: refused for its signature."""
    forged = replace(auth, secret=secrets.token_urlsafe(32))
    return mint_token(forged, "probe-bad-token", 300)
