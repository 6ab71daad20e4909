"""``ws-gateway drill``: break the new backend on purpose and check the gateway copes.

The rollout's safety nets (fallback to the old backend, the rollback guard, the close
codes clients rely on) only matter on a bad day, which is the wrong day to find out they
do not work. The drill starts a gateway, both stub backends and the admin app with the
status page on loopback, then walks through the failures the new backend can have, each
one switched on the new stub with ``POST /stub/faults`` exactly as QA would, and checks
what clients and metrics show:

1. healthy: every session is served by the backend its user is routed to;
2. slow replies: sessions still work, the new backend's replies take longer;
3. tokens rejected: clients on the new backend get 1008, nobody falls back, the guard
   does not count it;
4. down (upgrades refused with 503): clients do not notice (they fall back to the old
   backend) and the guard trips;
5. still down while the guard is open: nobody is even tried on the new backend;
6. healed: the guard recovers step by step and users return to the new backend;
7. sessions dropped mid-chat: those clients get 1014, never 1006, and old-backend
   sessions are untouched.

Each wave of sessions is bounded (`Plan.users` sessions, `Plan.concurrency` at once, every
wait bounded by `Plan.timeout`), and so is the whole run. `SHORT` runs in CI.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from .admin import create_admin_app
from .auth import mint_token
from .config import Config, parse_config
from .listener import Listener, listen
from .routing import choose_backend
from .runtime import Gateway
from .server import start_site
from .stub_backend import create_stub_app


@dataclass(frozen=True)
class Plan:
    """The size and timing of one run."""

    users: int  # sessions per wave: half routed new, half old; half legacy apps, half current
    concurrency: int  # sessions open at once
    reply_delay_seconds: float  # the slow new backend's delay per reply
    drop_after_seconds: float  # how long a session on the dropping new backend lives
    guard: Mapping[str, Any]  # rollout.guard, short enough for a drill
    timeout: float = 10.0  # the bound on any one wait

    def recovery_seconds(self) -> float:
        return float(self.guard["cooldown_seconds"]) + len(self.guard["recovery_steps"]) * float(self.guard["step_seconds"])


_GUARD = {"enabled": True, "window_seconds": 60, "max_failure_ratio": 0.2}
DEFAULT = Plan(
    users=60, concurrency=20, reply_delay_seconds=0.25, drop_after_seconds=0.5,
    guard={**_GUARD, "min_samples": 10, "cooldown_seconds": 8, "step_seconds": 2, "recovery_steps": [25, 50, 100]},
)
SHORT = Plan(
    users=24, concurrency=12, reply_delay_seconds=0.2, drop_after_seconds=0.5,
    guard={**_GUARD, "min_samples": 6, "cooldown_seconds": 6, "step_seconds": 1, "recovery_steps": [50, 100]},
)
NEW_PERCENT = 50.0


# -- what one session and one wave saw (pure) ---------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One client session of a wave."""

    user: str
    style: str  # legacy or message
    routed: str  # the backend the config routes the user to: old or new
    served_by: str | None = None  # the backend that answered stub.info, if one did
    close_code: int | None = None  # the close the gateway sent, if it closed the session
    reply_seconds: float | None = None  # stub.info sent -> its answer
    problem: str | None = None  # what went wrong on the client's side (HTTP error, timeout)


@dataclass(frozen=True)
class Check:
    text: str
    passed: bool


@dataclass
class StepResult:
    title: str
    injected: str
    summary: str = ""
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def check(self, text: str, passed: bool) -> None:
        self.checks.append(Check(text, passed))


def pick_users(config: Config, count: int) -> list[tuple[str, str]]:
    """`count` (user, backend) pairs, half of them routed to each backend by the config."""
    wanted = {"new": count // 2, "old": count - count // 2}
    picked: list[tuple[str, str]] = []
    for n in range(1, 100 * count + 1):
        user = f"drill-{n}"
        backend = choose_backend(user, config.rollout).backend
        if wanted[backend]:
            wanted[backend] -= 1
            picked.append((user, backend))
        if len(picked) == count:
            return picked
    raise ValueError(f"could not find {count} users split between the backends at {config.rollout.new_percent}%")


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile (`q` in [0, 1]) of `values`, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def describe(outcomes: list[Outcome]) -> str:
    """One line: how a wave went."""
    served = [o for o in outcomes if o.served_by is not None]
    by_backend = {b: sum(1 for o in served if o.served_by == b) for b in ("old", "new")}
    closes: dict[int, int] = {}
    for o in outcomes:
        if o.close_code is not None:
            closes[o.close_code] = closes.get(o.close_code, 0) + 1
    parts = [f"{len(outcomes)} sessions: {len(served)} served (old {by_backend['old']}, new {by_backend['new']})"]
    if closes:
        parts.append("closed by the gateway: " + ", ".join(f"{n}\u00d7{code}" for code, n in sorted(closes.items())))
    problems = [o.problem for o in outcomes if o.problem]
    if problems:
        parts.append(f"{len(problems)} client problems (first: {problems[0]})")
    for backend in ("old", "new"):
        p95 = percentile([o.reply_seconds for o in served if o.served_by == backend and o.reply_seconds is not None], 0.95)
        if p95 is not None:
            parts.append(f"reply p95 {backend} {p95 * 1000:.0f} ms")
    return "; ".join(parts)


# -- one client session --------------------------------------------------------------------------


async def run_session(
    http: aiohttp.ClientSession, url: str, token: str, user: str, style: str, routed: str, *, hold: float, timeout: float
) -> Outcome:
    """Connect in `style`, ask the backend who it is (stub.info), stay `hold` seconds (the
    gateway may close meanwhile), then close with 1000."""
    outcome = Outcome(user, style, routed)
    try:
        async with asyncio.timeout(timeout + hold):
            target = f"{url}?token={token}" if style == "legacy" else url
            async with http.ws_connect(target, autoclose=False, autoping=True) as ws:
                if style == "message":
                    await ws.send_str(json.dumps({"type": "authenticate", "token": token}))
                    first = await ws.receive()
                    if first.type is not WSMsgType.TEXT:
                        return replace(outcome, close_code=_close_code(ws, first))
                    if json.loads(first.data).get("type") != "connected":
                        return replace(outcome, problem="first frame was not connected")
                sent = time.monotonic()
                await ws.send_str(json.dumps({"type": "stub.info"}))
                answer = await ws.receive()
                if answer.type is not WSMsgType.TEXT:
                    return replace(outcome, close_code=_close_code(ws, answer))
                info = json.loads(answer.data)
                if info.get("type") == "connected" or info.get("user_id") != user:
                    return replace(outcome, problem=f"unexpected answer {answer.data[:60]!r}")
                outcome = replace(outcome, served_by=info["style"], reply_seconds=time.monotonic() - sent)
                try:
                    closing = await ws.receive(timeout=hold) if hold else None
                except asyncio.TimeoutError:
                    closing = None
                if closing is not None:
                    return replace(outcome, close_code=_close_code(ws, closing))
                await ws.close(code=1000, message=b"drill done")
                return outcome
    except aiohttp.WSServerHandshakeError as exc:
        return replace(outcome, problem=f"upgrade answered {exc.status}")
    except (aiohttp.ClientError, OSError) as exc:
        return replace(outcome, problem=type(exc).__name__)
    except TimeoutError:
        return replace(outcome, problem="timed out")


def _close_code(ws: aiohttp.ClientWebSocketResponse, msg: aiohttp.WSMessage) -> int:
    if msg.type is WSMsgType.CLOSE:
        return int(msg.data)
    return ws.close_code or 1006  # CLOSED / ERROR without a close frame: what a client would call 1006


# -- the drill -------------------------------------------------------------------------------------


class Drill:
    """A gateway, both stubs and an admin app on loopback, and the waves of sessions against them."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.secret = secrets.token_urlsafe(32)
        self.runners: list[web.AppRunner] = []
        self.public: Listener | None = None
        self.gateway: Gateway | None = None
        self.new_port = 0
        self.admin_port = 0
        self.url = ""
        self.users: list[tuple[str, str]] = []

    def config(self, old_port: int, new_port: int) -> Config:
        return parse_config(
            {
                "listen": {"host": "127.0.0.1", "port": 0},
                "auth": {"algorithms": ["HS256"], "secret": self.secret},
                "backends": {
                    "old": {"url": f"ws://127.0.0.1:{old_port}/ws/chat", "auth": "query"},
                    "new": {
                        "url": f"ws://127.0.0.1:{new_port}/ws/chat", "auth": "message",
                        "connect_timeout_seconds": 2, "handshake_timeout_seconds": 2,
                    },
                },
                "rollout": {"new_percent": NEW_PERCENT, "salt": "drill", "fallback_to_old": True, "guard": dict(self.plan.guard)},
                "limits": {"ping_interval_seconds": 0},
            },
            env={},
        )

    async def start(self) -> None:
        auth = self.config(1, 1).auth
        old_runner, old_port = await start_site(create_stub_app("old", auth), "127.0.0.1", 0)
        self.runners.append(old_runner)
        new_runner, self.new_port = await start_site(create_stub_app("new", auth), "127.0.0.1", 0)
        self.runners.append(new_runner)
        config = self.config(old_port, self.new_port)
        self.gateway = Gateway(config)
        self.public = await listen(self.gateway, "127.0.0.1", 0)
        admin_runner, self.admin_port = await start_site(create_admin_app(self.gateway), "127.0.0.1", 0)
        self.runners.append(admin_runner)
        self.url = f"ws://127.0.0.1:{self.public.port}{config.path}"
        self.users = pick_users(config, self.plan.users)

    async def close(self) -> None:
        if self.public is not None:
            await self.public.close()
        for runner in reversed(self.runners):
            await runner.cleanup()

    async def inject(self, faults: Mapping[str, Any]) -> None:
        """Set the new stub's faults through its control endpoint, as QA would."""
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{self.new_port}/stub/faults", json=dict(faults)) as response:
                if response.status != 200:
                    raise RuntimeError(f"the stub refused the faults: {await response.text()}")

    async def wave(self, *, hold: float = 0.0) -> list[Outcome]:
        """Every drill user opens one session (alternately legacy and current app)."""
        gateway = self.gateway
        assert gateway is not None
        limit = asyncio.Semaphore(self.plan.concurrency)
        auth = gateway.config.auth

        async def one(index: int, user: str, routed: str) -> Outcome:
            async with limit:
                style = "legacy" if index % 2 else "message"
                token = mint_token(auth, user, 600)
                return await run_session(http, self.url, token, user, style, routed, hold=hold, timeout=self.plan.timeout)

        async with aiohttp.ClientSession() as http:
            return list(await asyncio.gather(*(one(i, user, routed) for i, (user, routed) in enumerate(self.users))))

    def counters(self) -> dict[str, float]:
        """The metrics the checks compare before and after a step."""
        gateway = self.gateway
        assert gateway is not None
        registry = gateway.metrics.registry

        def value(name: str, **labels: str) -> float:
            return registry.get_sample_value(name, labels) or 0.0

        counts = {
            "fallbacks": value("ws_gateway_fallbacks_total"),
            "trips": value("ws_gateway_guard_trips_total"),
        }
        for reason in ("connect", "handshake", "rejected", "dropped"):
            counts[f"new_{reason}"] = value("ws_gateway_upstream_failures_total", backend="new", reason=reason)
            counts[f"old_{reason}"] = value("ws_gateway_upstream_failures_total", backend="old", reason=reason)
        return counts

    def guard_state(self) -> str:
        assert self.gateway is not None
        state: str = self.gateway.rollout_status()["guard"]["state"]
        return state

    async def wait_for_guard(self, state: str, within: float) -> bool:
        """Until the guard is in `state` (it moves on the gateway's clock; nothing to await)."""
        deadline = time.monotonic() + within
        while self.guard_state() != state:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    # -- the steps ---------------------------------------------------------------------------------

    def steps(self) -> Iterator[tuple[str, str, Callable[[StepResult], Any]]]:
        plan = self.plan
        yield "healthy backends", "nothing", self.healthy
        yield "slow replies", f"new backend waits {plan.reply_delay_seconds:g} s before each reply", self.slow
        yield "tokens rejected", "new backend closes every session with 1008", self.rejecting
        yield "new backend down", "new backend answers every upgrade with HTTP 503", self.down
        yield "still down, guard open", "(unchanged)", self.still_down
        yield "new backend healed", "nothing: faults cleared", self.healed
        yield "sessions dropped", f"new backend vanishes {plan.drop_after_seconds:g} s into each session", self.dropping

    def _served_as_routed(self, result: StepResult, outcomes: list[Outcome], backend: str | None = None) -> None:
        wrong = [o for o in outcomes if o.served_by != (backend or o.routed)]
        where = f"the {backend} backend" if backend else "the backend its user is routed to"
        result.check(f"every session is served by {where}" + (f" ({len(wrong)} were not)" if wrong else ""), not wrong)

    async def healthy(self, result: StepResult) -> None:
        await self.inject({})
        outcomes = await self.wave()
        result.summary = describe(outcomes)
        self._served_as_routed(result, outcomes)
        result.check("the guard stays closed", self.guard_state() == "closed")

    async def slow(self, result: StepResult) -> None:
        delay = self.plan.reply_delay_seconds
        await self.inject({"reply_delay_seconds": delay})
        outcomes = await self.wave()
        result.summary = describe(outcomes)
        self._served_as_routed(result, outcomes)
        new = percentile([o.reply_seconds for o in outcomes if o.served_by == "new" and o.reply_seconds is not None], 0.95)
        result.check(f"the new backend's reply p95 shows the delay (at least {delay * 1000:.0f} ms)", new is not None and new >= delay)
        result.check("slow is not failed: the guard stays closed", self.guard_state() == "closed")

    async def rejecting(self, result: StepResult) -> None:
        await self.inject({"reject_token": True})
        before = self.counters()
        outcomes = await self.wave()
        after = self.counters()
        result.summary = describe(outcomes)
        on_new = [o for o in outcomes if o.routed == "new"]
        result.check("clients routed new are closed with 1008", all(o.close_code == 1008 for o in on_new))
        result.check("clients routed old are served by old", all(o.served_by == "old" for o in outcomes if o.routed == "old"))
        result.check("nobody falls back (a rejected token is not an outage)", after["fallbacks"] == before["fallbacks"])
        result.check(
            f"ws_gateway_upstream_failures_total{{backend=\"new\",reason=\"rejected\"}} +{after['new_rejected'] - before['new_rejected']:g}",
            after["new_rejected"] - before["new_rejected"] == len(on_new),
        )
        result.check("the guard stays closed", self.guard_state() == "closed")

    async def down(self, result: StepResult) -> None:
        await self.inject({"refuse_status": 503})
        before = self.counters()
        outcomes = await self.wave()
        after = self.counters()
        result.summary = describe(outcomes)
        self._served_as_routed(result, outcomes, "old")
        fallbacks = after["fallbacks"] - before["fallbacks"]
        result.check(f"clients routed new fell back to old ({fallbacks:g} fallbacks)", fallbacks > 0)
        result.check(f"the guard tripped once (trips +{after['trips'] - before['trips']:g})", after["trips"] - before["trips"] == 1)
        assert self.gateway is not None
        status = self.gateway.rollout_status()
        result.check(
            f"guard {status['guard']['state']}, effective percentage {status['effective_percent']:g}%",
            status["guard"]["state"] == "open" and status["effective_percent"] == 0,
        )

    async def still_down(self, result: StepResult) -> None:
        before = self.counters()
        outcomes = await self.wave()
        after = self.counters()
        result.summary = describe(outcomes)
        self._served_as_routed(result, outcomes, "old")
        tried = after["new_connect"] - before["new_connect"]
        result.check(f"nobody is tried on the new backend ({tried:g} attempts)", tried == 0 and after["fallbacks"] == before["fallbacks"])
        result.check("the guard is still open", self.guard_state() == "open")

    async def healed(self, result: StepResult) -> None:
        await self.inject({})
        within = self.plan.recovery_seconds() + self.plan.timeout
        started = time.monotonic()
        closed = await self.wait_for_guard("closed", within)
        result.check(
            f"the guard recovers step by step and closes ({time.monotonic() - started:.0f} s; "
            f"cooldown {self.plan.guard['cooldown_seconds']} s, steps {self.plan.guard['recovery_steps']})",
            closed,
        )
        outcomes = await self.wave()
        result.summary = describe(outcomes)
        self._served_as_routed(result, outcomes)

    async def dropping(self, result: StepResult) -> None:
        drop = self.plan.drop_after_seconds
        await self.inject({"drop_after_seconds": drop})
        before = self.counters()
        outcomes = await self.wave(hold=3 * drop)
        after = self.counters()
        await self.inject({})
        result.summary = describe(outcomes)
        # Once enough sessions have dropped the guard may trip and send the rest to old:
        # judge each session by the backend that served it.
        on_new = [o for o in outcomes if o.served_by == "new"]
        on_old = [o for o in outcomes if o.served_by == "old"]
        result.check(
            f"all {len(on_new)} sessions the new backend served were closed with 1014 (never 1006)",
            bool(on_new) and all(o.close_code == 1014 for o in on_new),
        )
        result.check("sessions on the old backend are untouched", all(o.close_code is None for o in on_old))
        result.check("every session was served", len(on_new) + len(on_old) == len(outcomes))
        dropped = after["new_dropped"] - before["new_dropped"]
        result.check(f"ws_gateway_upstream_failures_total{{backend=\"new\",reason=\"dropped\"}} +{dropped:g}", dropped == len(on_new))
        result.summary += f"; guard now {self.guard_state()}"


async def run_drill(
    plan: Plan, report: Callable[[str], None], *, stop: asyncio.Event | None = None, hold: bool = False
) -> list[StepResult] | None:
    """Run the steps, reporting as it goes; None when `stop` was set before they were all run.

    `stop` (Ctrl-C) is looked at between steps, each of which is bounded; with `hold` the
    gateway and its status page stay up after the last step until `stop` is set.
    """
    stop = stop or asyncio.Event()
    drill = Drill(plan)
    results = []
    try:
        await drill.start()
        report(
            f"ws-gateway drill: gateway {drill.url}, {plan.users} sessions per wave (half routed to the new "
            f"backend at {NEW_PERCENT:g}%, half legacy apps), fallback on, guard trips over "
            f"{plan.guard['max_failure_ratio']:.0%} failures"
        )
        report(f"status page: http://127.0.0.1:{drill.admin_port}/")
        steps = list(drill.steps())
        for number, (title, injected, step) in enumerate(steps, 1):
            if stop.is_set():
                report("stopped before the drill was over")
                return None
            result = StepResult(title, injected)
            await step(result)
            results.append(result)
            report("")
            report(f"[{number}/{len(steps)}] {title}: {'PASS' if result.passed else 'FAIL'}")
            report(f"      injected: {injected}")
            if result.summary:
                report(f"      {result.summary}")
            for check in result.checks:
                report(f"  {'ok  ' if check.passed else 'FAIL'} {check.text}")
        failed = [r.title for r in results if not r.passed]
        report("")
        report(f"drill {'FAILED: ' + ', '.join(failed) if failed else 'passed'}: {len(results)} steps, "
               f"{sum(len(r.checks) for r in results)} checks")
        if hold:
            report(f"holding: the status page stays at http://127.0.0.1:{drill.admin_port}/ until Ctrl-C")
            await stop.wait()
    finally:
        await drill.close()
    return results
