"""``ws-gateway drill``: the migration rehearsal, on loopback, bounded in time.

The runbook raises ``rollout.new_percent`` step by step and trusts fallback and the
rollback guard to hide a bad new backend from the apps. The drill rehearses exactly that
against a crowd of simulated apps, so the promise, "no app notices", is checked before a
bad day tests it. It starts:

* both stub backends;
* a gateway with fallback to old and the guard on, whose config is a real file in a
  temporary directory: each step edits it on disk and the gateway's hot reload picks the
  edit up, as it would an operator's;
* `Plan.apps` simulated apps, ``--legacy-share`` percent of them legacy (token in the URL)
  and the rest message clients, each connecting, asking the stub who serves it, chatting
  at a modest rate, closing, and reconnecting.

It ramps ``new_percent`` through ``--steps``, ``--duration`` split evenly between them;
during the middle step the new backend fails ``--fail-percent`` of its handshakes
(``POST /stub/faults``, as QA would), and it is healed at the next. Then a table per step
and a verdict: zero app-visible failures, the guard tripped and recovered, and the
gateway's own usage counts show the legacy share given.

With ``--ramp`` the file holds ``rollout.ramp`` from the start (hold scaled to the run) and
the drill edits nothing: it watches the ramp in ``/rollout``'s numbers, breaks the new
backend when the ramp first reaches the middle step and heals it at the ramp's next change
(its step back). The verdict: zero app-visible failures, the ramp stopped at the failed
gate, it reached 100 % after the heal within ``--duration``, and the usage counts.

The plan, the table and the verdict are pure, in `drill_plan`; `Drill` does the I/O.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import tempfile
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import yaml
from aiohttp import WSMsgType, web

from ..core.auth import mint_token
from ..core.config import AuthConfig
from ..service.configfile import load_config
from .drill_plan import (
    MAX_FAILURE_RATIO, PAUSE, SALT, SESSION_SECONDS, Plan, RampLeg, StepStats, Usage, ramp_table, ramp_verdict, share_text,
    table, verdict,
)
from ..service.reload import fingerprint
from ..service.runtime import Gateway
from ..service.server import RunningGateway, start_site
from ..service.store import utc_day
from .stub_backend import create_stub_app

APP_TIMEOUT = 5.0  # an app's bound on any one wait: the upgrade, connected, a reply
CHAT_EVERY = (0.5, 1.5)  # seconds between an app's messages
RELOAD_WITHIN = 5.0  # the gateway checks its file every second
SAMPLE_SECONDS = 0.25  # how often the guard is looked at (it moves on the gateway's clock: no event to await)
NEW_HANDSHAKE_SECONDS = 1.0  # the new backend's handshake timeout: how long a failing handshake holds an app up
FAILURES_SHOWN = 5


# -- the I/O -------------------------------------------------------------------------------------


def raw_config(secret: str, plan: Plan, old_port: int, new_port: int) -> dict[str, Any]:
    """The drill gateway's config file: fallback on, a guard sized to the plan, a new backend
    whose failing handshake holds an app up for NEW_HANDSHAKE_SECONDS before the fallback,
    and the admin app (the status page) on a free port."""
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "auth": {"algorithms": ["HS256"], "secret": secret},
        "backends": {
            "old": {"url": f"ws://127.0.0.1:{old_port}/ws/chat", "auth": "query"},
            "new": {
                "url": f"ws://127.0.0.1:{new_port}/ws/chat", "auth": "message",
                "connect_timeout_seconds": 2, "handshake_timeout_seconds": NEW_HANDSHAKE_SECONDS,
            },
        },
        "rollout": {
            "new_percent": 0 if plan.ramp else plan.steps[0], "salt": SALT, "fallback_to_old": True, "guard": plan.guard(),
            **({"ramp": plan.ramp_config()} if plan.ramp else {}),
        },
        "limits": {"ping_interval_seconds": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
    }


class Drill:
    """Both stubs, a gateway hot-reloading a config file, its admin app, and the apps."""

    def __init__(self, plan: Plan, report: Callable[[str], None], stop: asyncio.Event, scratch: str) -> None:
        self.plan = plan
        self.report = report
        self.stop = stop  # Ctrl-C
        self.apps_done = asyncio.Event()
        self.config_path = os.path.join(scratch, "gateway.yaml")
        self.secret = secrets.token_urlsafe(32)
        self.raw: dict[str, Any] = {}  # the config file's content, once the stubs have ports
        self.runners: list[web.AppRunner] = []  # the stubs
        self.running: RunningGateway | None = None
        self.stats = [] if plan.ramp else [
            StepStats(p, plan.fail_percent if i == plan.fault_step else 0.0) for i, p in enumerate(plan.steps)
        ]
        self.legs: list[RampLeg] = []  # with --ramp: one per change of the ramp, added as the drill sees it
        self.step = 0  # the index of the step (or leg) in progress
        self.ramp_seen: tuple[Any, ...] = ()  # the ramp's step, state and window when last looked at
        self.leg_counters = (0.0, 0.0)  # fallbacks and guard trips as the leg in progress began
        self.faulted = self.healed = False
        self.failures: list[str] = []
        self.problems: list[str] = []
        self.started = 0.0
        self.url = ""
        self.new_port = 0
        self.admin_port = 0

    @property
    def current(self) -> StepStats:
        """The step (with --ramp, the leg) whose numbers a session counts in."""
        return self.legs[self.step] if self.plan.ramp else self.stats[self.step]

    @property
    def gateway(self) -> Gateway:
        assert self.running is not None
        return self.running.gateway

    @property
    def applied(self) -> asyncio.Event:
        """Set whenever the gateway applies a reloaded file."""
        assert self.running is not None and self.running.reloader is not None
        return self.running.reloader.applied

    def write_config(self) -> None:
        """Write-then-rename, as editors and ConfigMap updates do: the gateway never reads half a file."""
        partial = self.config_path + ".partial"
        with open(partial, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.raw, f)
        os.replace(partial, self.config_path)

    async def start(self) -> None:
        auth = AuthConfig(algorithms=("HS256",), secret=self.secret)  # the config file's auth section
        old_runner, old_port = await start_site(create_stub_app("old", auth), "127.0.0.1", 0)
        self.runners.append(old_runner)
        new_runner, self.new_port = await start_site(create_stub_app("new", auth), "127.0.0.1", 0)
        self.runners.append(new_runner)
        self.raw = raw_config(self.secret, self.plan, old_port, self.new_port)
        self.write_config()
        seen = fingerprint(self.config_path)
        config = load_config(self.config_path)
        self.running = await RunningGateway(config, config_path=self.config_path, seen=seen).start()
        assert self.running.admin_port is not None
        self.admin_port = self.running.admin_port
        self.url = f"ws://127.0.0.1:{self.running.port}{config.path}"

    async def close(self) -> None:
        if self.running is not None:
            await self.running.stop()
        for runner in reversed(self.runners):
            await runner.cleanup()

    # -- what the drill changes ----------------------------------------------------------------

    async def set_percent(self, percent: float) -> float | None:
        """Edit ``new_percent`` in the file; seconds until the gateway applied it (None: not within RELOAD_WITHIN)."""
        if self.gateway.config.rollout.new_percent == percent:
            return 0.0
        started = time.monotonic()
        self.applied.clear()
        self.raw["rollout"]["new_percent"] = percent
        self.write_config()
        try:
            async with asyncio.timeout(RELOAD_WITHIN):
                while self.gateway.config.rollout.new_percent != percent:
                    await self.applied.wait()
                    self.applied.clear()
        except TimeoutError:
            return None
        return time.monotonic() - started

    async def set_faults(self, faults: dict[str, Any]) -> None:
        """The new stub's faults, through its control endpoint, as QA would set them."""
        url = f"http://127.0.0.1:{self.new_port}/stub/faults"
        async with aiohttp.ClientSession() as http, http.post(url, json=faults) as response:
            if response.status != 200:
                raise RuntimeError(f"the stub refused the faults: {await response.text()}")

    def counters(self) -> tuple[float, float]:
        """Fallbacks and guard trips so far."""
        registry = self.gateway.metrics.registry
        fallbacks = registry.get_sample_value("ws_gateway_fallbacks_total") or 0.0
        trips = registry.get_sample_value("ws_gateway_guard_trips_total") or 0.0
        return fallbacks, trips

    # -- the apps --------------------------------------------------------------------------------

    async def app(self, http: aiohttp.ClientSession, index: int) -> None:
        """One app: sessions one after another until the drill ends."""
        user = self.plan.user(index)
        style = "legacy" if self.plan.is_legacy(index) else "message"
        token = mint_token(self.gateway.config.auth, user, self.plan.duration + 600)
        rng = random.Random(index)
        while not self.apps_done.is_set():
            stats, where = self.current, f"{'leg' if self.plan.ramp else 'step'} {self.step + 1}"
            stats.attempted += 1
            try:
                problem = await self.session(http, user, style, token, rng)
            except (aiohttp.ClientError, OSError) as exc:
                problem = f"connection failed ({type(exc).__name__})"
            if problem is None:
                stats.succeeded += 1
            else:
                stats.failed += 1
                self.failures.append(f"{where}: {user} ({style} app): {problem}")
            if await _waited_out(self.apps_done, rng.uniform(*PAUSE)):
                return

    async def session(self, http: aiohttp.ClientSession, user: str, style: str, token: str, rng: random.Random) -> str | None:
        """Connect, authenticate, ask the stub who serves it, chat, close 1000: what went
        wrong as the app saw it, or None."""
        target = f"{self.url}?token={token}" if style == "legacy" else self.url
        try:
            async with asyncio.timeout(APP_TIMEOUT):
                ws = await http.ws_connect(target, autoclose=False, autoping=True)
        except aiohttp.WSServerHandshakeError as exc:
            return f"upgrade answered HTTP {exc.status}"
        except TimeoutError:
            return f"no upgrade within {APP_TIMEOUT:g} s"
        try:
            if style == "message":
                await ws.send_str(json.dumps({"type": "authenticate", "token": token}))
                first, problem = await _receive(ws, "connected")
                if first is None or _object(first).get("type") != "connected":
                    return problem or "the first frame was not connected"
            await ws.send_str('{"type":"stub.info"}')
            answer, problem = await _receive(ws, "the stub's answer")
            if answer is None:
                return problem
            info = _object(answer)
            backend = info.get("style")
            if info.get("type") != "stub.info" or info.get("user_id") != user or backend not in ("old", "new"):
                return f"a {info.get('type')!r} frame instead of the stub's answer"
            ends = time.monotonic() + rng.uniform(*SESSION_SECONDS)
            for count in range(1, 100):
                wait = rng.uniform(*CHAT_EVERY)
                if time.monotonic() + wait > ends or await _waited_out(self.apps_done, wait):
                    break
                text, sent = f"chat {user} #{count}", time.monotonic()
                await ws.send_str(text)
                echo, problem = await _receive(ws, "a reply")
                if echo != text:
                    return problem or "the reply was not the message's echo"
                self.current.replies[backend].append(time.monotonic() - sent)
            await ws.close(code=1000, message=b"bye")
            return None
        finally:
            if not ws.closed:
                await ws.close()

    # -- the run ---------------------------------------------------------------------------------

    def elapsed(self) -> str:
        return f"[{time.monotonic() - self.started:5.1f} s]"

    async def ramp(self) -> bool:
        """Every step in turn; False when stopped (Ctrl-C) before the end."""
        plan = self.plan
        last_guard = ""
        for index, stats in enumerate(self.stats):
            step_ends, at = time.monotonic() + plan.step_seconds, self.elapsed()
            self.step, percent = index, stats.percent
            before = self.counters()
            events = []
            if stats.fault:
                await self.set_faults({"fail_handshake": stats.fault})
                events.append(f"the new backend fails {stats.fault:g}% of handshakes")
            elif index == plan.fault_step + 1 and plan.fail_percent:
                await self.set_faults({})
                events.append("the new backend is healed")
            took = await self.set_percent(percent)
            if took is None:
                self.problems.append(f"the gateway did not apply new_percent {percent:g} within {RELOAD_WITHIN:g} s")
            if index == 0:
                applied = "in the file from the start"
            else:
                applied = "NOT APPLIED" if took is None else f"file edited, applied after {took:.1f} s"
            self.report(f"{at} step {index + 1}: {'; '.join([*events, f'new_percent {percent:g} ({applied})'])}")
            while True:
                status = self.gateway.rollout_status()
                guard, effective = status["guard"]["state"], status["effective_percent"]
                stats.saw_effective(effective)
                if guard != last_guard and last_guard:
                    self.report(f"{self.elapsed()}   guard {guard}, effective {effective:g}%")
                last_guard = guard
                left = step_ends - time.monotonic()
                if left <= 0:
                    break
                if await _waited_out(self.stop, min(SAMPLE_SECONDS, left)):
                    return False
            after = self.counters()
            stats.fallbacks, stats.trips = int(after[0] - before[0]), int(after[1] - before[1])
            stats.guard = last_guard
        return True

    async def ramp_started(self) -> bool:
        """Whether the ramp shows its first step within RELOAD_WITHIN (it does at its first sync)."""
        ends = time.monotonic() + RELOAD_WITHIN
        while (ramp := self.gateway.rollout_status()["ramp"])["state"] is None:
            if time.monotonic() >= ends:
                self.problems.append(f"the ramp showed no step within {RELOAD_WITHIN:g} s: /rollout ramp {json.dumps(ramp)}")
                return False
            await asyncio.sleep(SAMPLE_SECONDS)  # the ramp moves on the gateway's loop: no event to await
        await self.saw_ramp(ramp)
        return True

    async def follow_ramp(self) -> bool:
        """With --ramp: watch the ramp until it has been done for half a hold, or --duration is over;
        False when stopped (Ctrl-C) before the end."""
        ends = self.started + self.plan.duration
        last_guard = ""
        while True:
            status = self.gateway.rollout_status()
            await self.saw_ramp(status["ramp"])
            leg = self.legs[-1]
            guard, effective = status["guard"]["state"], status["effective_percent"]
            leg.saw_effective(effective)
            if guard != last_guard and last_guard:
                self.report(f"{self.elapsed()}   guard {guard}, effective {effective:g}%")
            last_guard = leg.guard = guard
            now = time.monotonic()
            if leg.state == "done" and now - self.started - leg.at >= self.plan.step_seconds / 2:
                break
            if now >= ends:
                break
            if await _waited_out(self.stop, min(SAMPLE_SECONDS, ends - now)):
                return False
        self.end_leg()
        return True

    async def saw_ramp(self, ramp: dict[str, Any]) -> None:
        """A new leg when the ramp changed since the last look: the fault when it first reaches
        the fault's step, the heal at its next change."""
        seen = (ramp["step_index"], ramp["state"], ramp["since"])
        if seen == self.ramp_seen:
            return
        self.ramp_seen = seen
        if self.legs:
            self.end_leg()
        plan, at = self.plan, self.elapsed()
        leg = RampLeg(ramp["step_percent"], 0.0, state=ramp["state"], reason=ramp["reason"], at=time.monotonic() - self.started)
        events = [f"ramp {leg.percent:g}%, {leg.state}: {leg.reason}"]
        if self.faulted and not self.healed:
            await self.set_faults({})
            self.healed = leg.healed = True
            events.append("the new backend is healed")
        elif not self.faulted and ramp["step_index"] == plan.fault_step and plan.fail_percent:
            await self.set_faults({"fail_handshake": plan.fail_percent})
            self.faulted, leg.fault = True, plan.fail_percent
            events.append(f"the new backend fails {plan.fail_percent:g}% of handshakes")
        self.legs.append(leg)
        self.step = len(self.legs) - 1
        self.leg_counters = self.counters()
        self.report(f"{at} leg {self.step + 1}: {'; '.join(events)}")

    def end_leg(self) -> None:
        after, before = self.counters(), self.leg_counters
        leg = self.legs[-1]
        leg.fallbacks, leg.trips = int(after[0] - before[0]), int(after[1] - before[1])


async def _waited_out(event: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds`, or less if `event` is set: True when it was set."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def _receive(ws: aiohttp.ClientWebSocketResponse, what: str) -> tuple[str | None, str]:
    """The next text frame, or None and why there was none."""
    try:
        msg = await ws.receive(timeout=APP_TIMEOUT)
    except TimeoutError:
        return None, f"no {what} within {APP_TIMEOUT:g} s"
    if msg.type is WSMsgType.TEXT:
        return msg.data, ""
    if msg.type is WSMsgType.CLOSE:
        return None, f"closed {msg.data}" + (f" {msg.extra!r}" if msg.extra else "") + f" before {what}"
    if msg.type is WSMsgType.BINARY:
        return None, f"a binary frame instead of {what}"
    return None, f"connection lost before {what}"


def _object(text: str) -> dict[str, Any]:
    """A frame's JSON object; empty when it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def run_drill(plan: Plan, report: Callable[[str], None], stop: asyncio.Event | None = None) -> bool | None:
    """The drill, reported line by line: True when the verdict passed, None when `stop` (Ctrl-C) ended it early."""
    stop = stop or asyncio.Event()
    if stop.is_set():
        report("stopped before the drill was over")
        return None
    with tempfile.TemporaryDirectory(prefix="ws-gateway-drill-") as scratch:
        drill = Drill(plan, report, stop, scratch)
        try:
            await drill.start()
            _report_start(drill, report)
            drill.started = time.monotonic()
            started_day = utc_day()
            if plan.ramp and not await drill.ramp_started():  # the first leg, before an app counts a session in it
                report(f"verdict: FAIL: {drill.problems[0]}")
                return False
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                apps = [asyncio.create_task(drill.app(http, index)) for index in range(plan.apps)]
                finished = await (drill.follow_ramp() if plan.ramp else drill.ramp())
                drill.apps_done.set()
                report(f"{drill.elapsed()} {'done' if finished else 'stopped'}: the apps close their sessions")
                done, stuck = await asyncio.wait(apps, timeout=4 * APP_TIMEOUT)
                for task in stuck:
                    task.cancel()
                await asyncio.gather(*stuck, return_exceptions=True)
            crashed = [type(exc).__name__ for task in done if (exc := task.exception()) is not None]
            if crashed:
                drill.problems.append(f"{len(crashed)} apps crashed (first: {crashed[0]})")
            if stuck:
                drill.problems.append(f"{len(stuck)} apps were still in a session {4 * APP_TIMEOUT:g} s after the end")
            guard_at_end = drill.gateway.rollout_status()["guard"]["state"]
        finally:
            await drill.close()
        if not finished:
            report("stopped before the drill was over")
            return None
        # After close: the gateway has finished writing its usage counts.
        days = {started_day, utc_day()}
        usage = Usage.of(day for day in await drill.gateway.store.usage_days(2) if day.day in days)
    report("")
    for line in ramp_table(drill.legs) if plan.ramp else table(drill.stats):
        report(line)
    report("")
    if plan.ramp:
        report("leg: the run from one change of the ramp to the next, as the drill saw it (at s: when); ramp %, state,")
        report("  reason: /rollout's ramp then. new backend: the fault (and the heal) the drill set as the leg began.")
    step = "leg" if plan.ramp else "step"
    report(f"attempted, succeeded, failed: sessions the apps started in the {step}, as the apps saw them (failed: no")
    report(f"  connected, a close, or no answer within {APP_TIMEOUT:g} s). trips, guard: guard trips in the {step}, its state at")
    report("  the end. effective %: the new backend's share after the guard, lowest-highest. p50/p95: a chat")
    report("  message to its echo, by the backend that served the app.")
    if drill.failures:
        report(f"first app-visible failures ({len(drill.failures)} in all):")
        for failure in drill.failures[:FAILURES_SHOWN]:
            report(f"  {failure}")
    report(
        f"usage (the gateway's own counts): {usage.users_legacy} of {usage.users} users legacy "
        f"({share_text(usage.users_legacy, usage.users)}), {usage.sessions_legacy} of {usage.sessions} sessions "
        f"({share_text(usage.sessions_legacy, usage.sessions)}); --legacy-share {plan.legacy_share:g}%"
    )
    if plan.ramp:
        passed, line = ramp_verdict(plan, drill.legs, usage, drill.problems)
    else:
        passed, line = verdict(plan, drill.stats, guard_at_end, usage, drill.problems)
    report(line)
    return passed


def _report_start(drill: Drill, report: Callable[[str], None]) -> None:
    plan, guard = drill.plan, drill.plan.guard()
    steps = " -> ".join(f"{p:g}" for p in plan.path)
    legacy = sum(plan.is_legacy(i) for i in range(plan.apps))
    if plan.ramp:
        ramp = plan.ramp_config()
        report(f"ws-gateway drill --ramp: {plan.apps} apps ({legacy} legacy, URL token) for at most {plan.duration:g} s; "
               f"rollout.ramp {steps}")
        report(f"  ramp:        hold {ramp['hold_minutes']:g} min ({plan.step_seconds:.1f} s), min_sessions {ramp['min_sessions']} "
               f"(at {plan.path[0]:g}% {plan.routed_new(plan.path[0])} apps go new), on_failure step_back")
        report("  gates:       the plan's defaults (success >= 95%, auth failures <= 5%, reply <= 2 s avg and <= 1.5x old)")
    else:
        report(f"ws-gateway drill: {plan.apps} apps ({legacy} legacy, URL token) for {plan.duration:g} s; "
               f"new_percent {steps}, {plan.step_seconds:g} s per step")
    report(f"  gateway:     {drill.url}, fallback to old on")
    report(f"  guard:       trips over {100 * MAX_FAILURE_RATIO:g}% failures among at least {guard['min_samples']} "
           f"new-backend sessions in {guard['window_seconds']:g} s; {guard['cooldown_seconds']:g} s cooldown, "
           f"then {', '.join(f'{p}%' for p in guard['recovery_steps'])} every {guard['step_seconds']:g} s")
    if plan.ramp:
        report(f"  config file: {drill.config_path} (rollout.ramp from the start; the drill only watches /rollout)")
    else:
        report(f"  config file: {drill.config_path} (edited live; the gateway's hot reload applies it)")
    report(f"  status page: http://127.0.0.1:{drill.admin_port}/")
    if plan.fail_percent and plan.ramp:
        report(f"  fault:       the new backend fails {plan.fail_percent:g}% of handshakes once the ramp reaches "
               f"{plan.path[plan.fault_step]:g}% (step {plan.fault_step + 1}), healed at the ramp's next change")
    elif plan.fail_percent:
        report(f"  fault:       the new backend fails {plan.fail_percent:g}% of handshakes in step {plan.fault_step + 1} "
               f"(new_percent {plan.steps[plan.fault_step]:g}), healed at step {plan.fault_step + 2}")
    report("")
