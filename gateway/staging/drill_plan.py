"""The drill's plan and verdict: what a run of ``ws-gateway drill`` asks for, and whether it passed.

Pure, so the rules a rehearsal is judged by are unit-tested without starting anything;
`drill` runs the stubs, the gateway and the apps, and fills `StepStats` (or, with
``--ramp``, a `RampLeg` per change the ramp made) as it goes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.config import GatesConfig
from ..core.guard import GuardState
from ..core.ramp import Window, judge
from ..core.routing import bucket
from ..service.store import DayUsage
from .stub_backend import picked

MAX_FAILURE_RATIO = 0.1  # the drill's guard trips over 10 % failed new-backend handshakes
SALT = "drill"  # rollout.salt: with the apps' user ids it decides who a percentage routes new
SESSION_SECONDS = (2.0, 5.0)  # how long an app keeps a session open
PAUSE = (0.1, 0.5)  # seconds between an app's sessions
# --ramp: a hold per step, and three more: the fault (its detection, the guard's recovery, a
# second step back when the guard trips on the fault after the gate did, the steps climbed
# again), the ramp's once-a-second syncs, and half a hold of traffic at 100 %.
SPARE_HOLDS = 3
MIN_HOLD_SECONDS = 4.0  # under this a hold is mostly the ramp's once-a-second sync
# The ramp sees a trip at its next sync (up to a second) and the drill at its next look:
# a guard cooldown at least this long ends after the heal, so no recovery step meets the fault.
HEAL_SECONDS = 2.0
STOPPED = ("stepped_back", "holding")  # the ramp's states after a failure


@dataclass(frozen=True)
class Plan:
    """One run: what the command line chose."""

    duration: float = 90.0
    steps: tuple[float, ...] = (0, 1, 5, 25, 50, 100)
    legacy_share: float = 30.0  # percent of the apps that put the token in the URL
    fail_percent: float = 30.0  # percent of the new backend's handshakes failing during the fault
    apps: int = 100
    ramp: bool = False  # rollout.ramp moves the percentage; the drill only watches

    def __post_init__(self) -> None:
        if self.ramp:
            self._check_ramp()
            return
        if not 3 <= len(self.steps) <= 20:
            raise ValueError(
                f"--steps needs 3 to 20 percentages (a step before, during and after the fault), got {len(self.steps)}"
            )
        if self.step_seconds < 2:
            raise ValueError(
                f"--duration {self.duration:g} leaves {self.step_seconds:.1f} s per step; "
                f"give each of the {len(self.steps)} steps at least 2 s"
            )

    def _check_ramp(self) -> None:
        path = self.path
        if not 3 <= len(path) <= 20:
            raise ValueError(
                f"--ramp needs 3 to 20 steps above 0 in --steps (a step before, during and after the fault), got {len(path)}"
            )
        if any(later <= earlier for earlier, later in zip(path, path[1:])):
            raise ValueError(f"--ramp needs --steps strictly rising, got {','.join(f'{p:g}' for p in self.steps)}")
        if path[-1] != 100:
            raise ValueError(f"--ramp needs --steps to end at 100 (where the ramp is done), got {path[-1]:g}")
        if self.step_seconds < MIN_HOLD_SECONDS:
            raise ValueError(
                f"--duration {self.duration:g} leaves a {self.step_seconds:.1f} s hold per step "
                f"({len(path)} steps and {SPARE_HOLDS} spare holds); give each at least {MIN_HOLD_SECONDS:g} s"
            )

    @property
    def path(self) -> tuple[float, ...]:
        """The percentages walked: the steps, or the ramp's (in (0, 100]) with --ramp."""
        return tuple(step for step in self.steps if step > 0) if self.ramp else self.steps

    @property
    def step_seconds(self) -> float:
        """A step's time: the duration split evenly, or with --ramp the ramp's hold."""
        if self.ramp:
            return self.duration / (len(self.path) + SPARE_HOLDS)
        return self.duration / len(self.steps)

    @property
    def fault_step(self) -> int:
        """The middle step (0-based): the new backend fails during it and is healed at the next
        (with --ramp: when the ramp first reaches it, healed at the ramp's next change)."""
        return len(self.path) // 2

    def guard(self) -> dict[str, Any]:
        """``rollout.guard`` sized to the step: a trip during the fault is over, recovery steps
        and all, within half of the next step."""
        step = self.step_seconds
        cooldown = round(step / 5, 2)
        return {
            "enabled": True,
            "window_seconds": round(step, 2),
            "max_failure_ratio": MAX_FAILURE_RATIO,
            "min_samples": 10,
            "cooldown_seconds": max(cooldown, HEAL_SECONDS) if self.ramp else cooldown,
            "step_seconds": round(step / 10, 2),
            "recovery_steps": [25, 50, 100],
        }

    def expects_trip(self) -> bool:
        """Whether the fault should trip the guard: over its threshold, with users on the new backend."""
        return self.fail_percent > 100 * MAX_FAILURE_RATIO and self.path[self.fault_step] > 0

    def expects_stop(self) -> bool:
        """With --ramp: whether the fault should stop the ramp, being over the success_rate gate's tolerance."""
        return self.fail_percent > 100 * (1 - GatesConfig().success_rate_min)

    def user(self, app: int) -> str:
        return f"drill-{app + 1}"

    def routed_new(self, percent: float) -> int:
        """How many apps `percent` routes to the new backend."""
        return sum(bucket(SALT, self.user(app)) < percent for app in range(self.apps))

    def min_sessions(self) -> int:
        """``rollout.ramp.min_sessions``: half the new-backend sessions the quietest step sees in a
        hold, so every step can be judged within its hold (0 when that step routes no app)."""
        cycle = sum(SESSION_SECONDS) / 2 + sum(PAUSE) / 2  # an app's session and the pause after it
        return math.floor(self.routed_new(self.path[0]) * self.step_seconds / cycle / 2)

    def ramp_config(self) -> dict[str, Any]:
        """``rollout.ramp``: the path with the hold scaled to the run, the gates at the plan's defaults."""
        return {
            "enabled": True,
            "steps": list(self.path),
            "hold_minutes": round(self.step_seconds / 60, 4),
            "min_sessions": self.min_sessions(),
            "on_failure": "step_back",
        }

    def is_legacy(self, app: int) -> bool:
        return picked(app, self.legacy_share)


def parse_steps(text: str) -> tuple[float, ...]:
    """``--steps``: comma-separated percentages, e.g. ``0,1,5,25,50,100``."""
    steps = []
    for piece in text.split(","):
        try:
            value = float(piece)
        except ValueError:
            raise ValueError(f"{piece.strip()!r} is not a percentage") from None
        if not 0 <= value <= 100:
            raise ValueError(f"{piece.strip()} is out of range [0, 100]")
        steps.append(value)
    return tuple(steps)


@dataclass
class StepStats:
    """One step of the ramp, as the apps and the gateway saw it."""

    percent: float
    fault: float  # percent of the new backend's handshakes failing in this step
    attempted: int = 0  # sessions the apps started in this step
    succeeded: int = 0  # of those, the ones that went as an app expects
    failed: int = 0  # the others: no connected, a close, or a wait past APP_TIMEOUT
    fallbacks: int = 0
    trips: int = 0
    guard: str = GuardState.HEALTHY.value  # at the end of the step
    effective: tuple[float, float] | None = None  # the lowest and highest effective percentage seen
    replies: dict[str, list[float]] = field(default_factory=lambda: {"old": [], "new": []})  # seconds, by backend

    def saw_effective(self, percent: float) -> None:
        low, high = self.effective or (percent, percent)
        self.effective = (min(low, percent), max(high, percent))


@dataclass
class RampLeg(StepStats):
    """With --ramp: the run from one of the ramp's changes to the next (`percent`: its step)."""

    state: str = ""  # the ramp's, as /rollout shows it
    reason: str = ""  # the ramp's words for the change that began the leg
    at: float = 0.0  # seconds into the run when the drill saw the change
    healed: bool = False  # the drill healed the new backend as the leg began

    @property
    def backend_text(self) -> str:
        return "healed" if self.healed else _fault_text(self.fault)


@dataclass(frozen=True)
class Usage:
    """The gateway's usage counts for the run."""

    users_legacy: int
    users: int
    sessions_legacy: int
    sessions: int

    @classmethod
    def of(cls, days: Iterable[DayUsage]) -> Usage:
        """Added up over the UTC days of the run (one, unless it crossed midnight)."""
        days = list(days)
        return cls(
            sum(d.users_legacy for d in days),
            sum(d.users for d in days),
            sum(d.sessions_legacy for d in days),
            sum(d.sessions for d in days),
        )


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile (`q` in [0, 1]) of `values`, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def share_text(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _latency(values: list[float]) -> str:
    p50, p95 = percentile(values, 0.5), percentile(values, 0.95)
    return "-" if p50 is None or p95 is None else f"{p50 * 1000:.1f}/{p95 * 1000:.1f}"


def _fault_text(fault: float) -> str:
    return f"{fault:g}% fail" if fault else "healthy"


TABLE_HEADER = (
    "step", "new %", "new backend", "attempted", "succeeded", "failed", "fallbacks", "trips", "guard", "effective %",
    "old p50/p95 ms", "new p50/p95 ms",
)
RAMP_TABLE_HEADER = (
    "leg", "at s", "ramp %", "state", *TABLE_HEADER[2:], "the ramp's reason (a failure's)",
)


def _cells(s: StepStats, backend: str) -> tuple[str, ...]:
    """A row's cells from the new backend's column on."""
    low, high = s.effective or (s.percent, s.percent)
    return (
        backend, str(s.attempted), str(s.succeeded), str(s.failed), str(s.fallbacks), str(s.trips), s.guard,
        f"{low:g}" if low == high else f"{low:g}-{high:g}", _latency(s.replies["old"]), _latency(s.replies["new"]),
    )


def _aligned(rows: list[tuple[str, ...]], left: set[int]) -> list[str]:
    """Columns aligned: those in `left` (text) to the left, numbers to the right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(widths[i]) if i in left else cell.rjust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in rows
    ]


def table(stats: list[StepStats]) -> list[str]:
    """The per-step table, columns aligned (text left, numbers right)."""
    rows: list[tuple[str, ...]] = [TABLE_HEADER]
    for number, s in enumerate(stats, 1):
        rows.append((str(number), f"{s.percent:g}", *_cells(s, _fault_text(s.fault))))
    return _aligned(rows, {2, 8})  # new backend, guard


def ramp_table(legs: list[RampLeg]) -> list[str]:
    """With --ramp: a row per leg, with what the ramp did and, after a failure, why."""
    rows: list[tuple[str, ...]] = [RAMP_TABLE_HEADER]
    for number, leg in enumerate(legs, 1):
        reason = leg.reason if leg.state in STOPPED else ""
        rows.append((str(number), f"{leg.at:.1f}", f"{leg.percent:g}", leg.state, *_cells(leg, leg.backend_text), reason))
    return _aligned(rows, {3, 4, 10, 14})  # state, new backend, guard, reason


def _times(count: int) -> str:
    return "once" if count == 1 else f"{count} times"


def verdict(plan: Plan, stats: list[StepStats], guard_at_end: str, usage: Usage, problems: list[str]) -> tuple[bool, str]:
    """The run's one-line verdict; `problems`: what else went wrong (an edit the gateway did not apply)."""
    parts = [_failures_part(stats)]
    trips = sum(s.trips for s in stats)
    threshold = f"{100 * MAX_FAILURE_RATIO:g}%"
    if not plan.expects_trip():
        expected = f"expected none (no fault over its {threshold} threshold reached the new backend)"
        parts.append((trips == 0, f"the guard tripped {_times(trips)}; {expected}"))
    elif trips == 0:
        parts.append((False, f"the guard never tripped, though {plan.fail_percent:g}% of handshakes failed (threshold {threshold})"))
    elif guard_at_end != GuardState.HEALTHY.value:
        parts.append((False, f"the guard tripped {_times(trips)} but had not recovered by the end ({guard_at_end})"))
    else:
        parts.append((True, f"the guard tripped {_times(trips)} and recovered"))
    return _verdict_line([*parts, _usage_part(plan, usage), *((False, problem) for problem in problems)])


def _failures_part(stats: Sequence[StepStats]) -> tuple[bool, str]:
    failed = sum(s.failed for s in stats)
    return failed == 0, f"{failed} app-visible failures in {sum(s.attempted for s in stats)} sessions"


def _usage_part(plan: Plan, usage: Usage) -> tuple[bool, str]:
    given, share = plan.legacy_share, 100 * usage.users_legacy / usage.users if usage.users else None
    tolerance = 100 / plan.apps  # the share moves in steps of one app
    return (
        share is not None and abs(share - given) <= tolerance,
        f"usage shows {share_text(usage.users_legacy, usage.users)} legacy users (--legacy-share {given:g}%)",
    )


def _verdict_line(parts: list[tuple[bool, str]]) -> tuple[bool, str]:
    passed = all(ok for ok, _ in parts)
    return passed, f"verdict: {'PASS' if passed else 'FAIL'}: " + "; ".join(text for _, text in parts)


GATES = tuple(gate.name for gate in judge(GatesConfig(), Window()))
_FAILED_GATE = re.compile(rf"\b({'|'.join(GATES)}) \S+ [<>] ")
GUARD_TRIPPED = "the rollback guard tripped"


def failed_gates(reason: str) -> list[str]:
    """What stopped the ramp, from its reason: the rollback guard, or the gates it names as failed."""
    return ["the rollback guard"] if reason.startswith(GUARD_TRIPPED) else _FAILED_GATE.findall(reason)


def _stop_part(plan: Plan, legs: list[RampLeg]) -> tuple[bool, str]:
    """Whether the ramp stopped at the fault, and not before it. A stop after the heal is named
    but passes: when the gate stepped back first, the guard may still trip on the fault's last
    handshakes (they end at their timeout), a trip in the next step's window, and what it
    costs shows in whether the ramp reached 100 % in time."""
    stops = [i for i, leg in enumerate(legs) if leg.state in STOPPED]
    fault = next((i for i, leg in enumerate(legs) if leg.fault), None)
    percent = plan.path[plan.fault_step]
    if not plan.expects_stop():
        tolerance = f"{100 * (1 - GatesConfig().success_rate_min):g}%"
        if not stops:
            return True, f"the ramp never stopped; expected no stop (no fault over the success_rate gate's {tolerance})"
        return False, f"the ramp stopped {_times(len(stops))} with no fault over its {tolerance} (first: {legs[stops[0]].reason})"
    if fault is None:
        return False, f"the ramp never reached the fault's step ({percent:g}%)"
    if fault + 1 == len(legs):
        return False, f"the run ended while the ramp was still judging the fault's step ({percent:g}%)"
    after = legs[fault + 1]
    if after.state not in STOPPED:
        return False, f"the ramp went on through the fault: {percent:g}% -> {after.percent:g}% ({after.state})"
    gates = failed_gates(after.reason)
    if not gates:
        return False, f"the ramp stopped at the fault naming no gate: {after.reason}"
    before = [legs[i] for i in stops if i < fault]
    if before:
        return False, (
            f"the ramp stopped {_times(len(before))} before the fault, with the new backend healthy "
            f"(first at {before[0].percent:g}%: {before[0].reason})"
        )
    action = f"stepped back from {percent:g}% to {after.percent:g}%" if after.state == "stepped_back" else f"held at {percent:g}%"
    failed = gates[0] + " tripped" if gates[0] == "the rollback guard" else " and ".join(gates) + " failed"
    later = [legs[i] for i in stops if i > fault + 1]
    also = f" (after the heal it stopped {_times(len(later))} more, first at {later[0].percent:g}%: {later[0].reason})" if later else ""
    return True, f"the ramp stopped at the failed gate: {failed}, {action}{also}"


def _done_part(plan: Plan, legs: list[RampLeg]) -> tuple[bool, str]:
    """Whether the ramp reached its last step, and when, from the heal."""
    top = f"{plan.path[-1]:g}%"
    last = legs[-1] if legs else None
    if last is None or last.state != "done":
        where = f" (at {last.percent:g}%, {last.state})" if last is not None else ""
        return False, f"the ramp had not reached {top} by the end of the {plan.duration:g} s{where}"
    healed = next((leg for leg in legs if leg.healed), None)
    after = f", {last.at - healed.at:.1f} s after the heal" if healed is not None else ""
    return True, f"the ramp reached {top} (done) at {last.at:.1f} s{after}"


def ramp_verdict(plan: Plan, legs: list[RampLeg], usage: Usage, problems: list[str]) -> tuple[bool, str]:
    """With --ramp, the one-line verdict: zero app-visible failures, the ramp stopped at the
    fault's failed gate (and nowhere else), it reached 100 % after the heal, usage as given."""
    parts = [_failures_part(legs), _stop_part(plan, legs), _done_part(plan, legs), _usage_part(plan, usage)]
    return _verdict_line([*parts, *((False, problem) for problem in problems)])
