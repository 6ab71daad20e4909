"""The drill's plan and verdict: what a run of ``ws-gateway drill`` asks for, and whether it passed.

Pure, so the rules a rehearsal is judged by are unit-tested without starting anything;
`drill` runs the stubs, the gateway and the apps, and fills `StepStats` as it goes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..core.guard import GuardState
from ..service.store import DayUsage
from .stub_backend import picked

MAX_FAILURE_RATIO = 0.1  # the drill's guard trips over 10 % failed new-backend handshakes


@dataclass(frozen=True)
class Plan:
    """One run: what the command line chose."""

    duration: float = 90.0
    steps: tuple[float, ...] = (0, 1, 5, 25, 50, 100)
    legacy_share: float = 30.0  # percent of the apps that put the token in the URL
    fail_percent: float = 30.0  # percent of the new backend's handshakes failing during the fault
    apps: int = 100

    def __post_init__(self) -> None:
        if not 3 <= len(self.steps) <= 20:
            raise ValueError(
                f"--steps needs 3 to 20 percentages (a step before, during and after the fault), got {len(self.steps)}"
            )
        if self.step_seconds < 2:
            raise ValueError(
                f"--duration {self.duration:g} leaves {self.step_seconds:.1f} s per step; "
                f"give each of the {len(self.steps)} steps at least 2 s"
            )

    @property
    def step_seconds(self) -> float:
        return self.duration / len(self.steps)

    @property
    def fault_step(self) -> int:
        """The middle step (0-based): the new backend fails during it and is healed at the next."""
        return len(self.steps) // 2

    def guard(self) -> dict[str, Any]:
        """``rollout.guard`` sized to the step: a trip during the fault is over, recovery steps
        and all, within half of the next step."""
        step = self.step_seconds
        return {
            "enabled": True,
            "window_seconds": step,
            "max_failure_ratio": MAX_FAILURE_RATIO,
            "min_samples": 10,
            "cooldown_seconds": round(step / 5, 2),
            "step_seconds": round(step / 10, 2),
            "recovery_steps": [25, 50, 100],
        }

    def expects_trip(self) -> bool:
        """Whether the fault should trip the guard: over its threshold, with users on the new backend."""
        return self.fail_percent > 100 * MAX_FAILURE_RATIO and self.steps[self.fault_step] > 0

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


TABLE_HEADER = (
    "step", "new %", "new backend", "attempted", "succeeded", "failed", "fallbacks", "trips", "guard", "effective %",
    "old p50/p95 ms", "new p50/p95 ms",
)


def table(stats: list[StepStats]) -> list[str]:
    """The per-step table, columns aligned (text left, numbers right)."""
    rows = [TABLE_HEADER]
    for number, s in enumerate(stats, 1):
        low, high = s.effective or (s.percent, s.percent)
        rows.append((
            str(number), f"{s.percent:g}", f"{s.fault:g}% fail" if s.fault else "healthy",
            str(s.attempted), str(s.succeeded), str(s.failed), str(s.fallbacks), str(s.trips), s.guard,
            f"{low:g}" if low == high else f"{low:g}-{high:g}", _latency(s.replies["old"]), _latency(s.replies["new"]),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    left = {2, 8}  # new backend, guard
    return [
        "  ".join(cell.ljust(widths[i]) if i in left else cell.rjust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in rows
    ]


def _times(count: int) -> str:
    return "once" if count == 1 else f"{count} times"


def verdict(plan: Plan, stats: list[StepStats], guard_at_end: str, usage: Usage, problems: list[str]) -> tuple[bool, str]:
    """The run's one-line verdict; `problems`: what else went wrong (an edit the gateway did not apply)."""
    failed = sum(s.failed for s in stats)
    sessions = sum(s.attempted for s in stats)
    parts = [(failed == 0, f"{failed} app-visible failures in {sessions} sessions")]
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
    given, share = plan.legacy_share, 100 * usage.users_legacy / usage.users if usage.users else None
    tolerance = 100 / plan.apps  # the share moves in steps of one app
    parts.append((
        share is not None and abs(share - given) <= tolerance,
        f"usage shows {share_text(usage.users_legacy, usage.users)} legacy users (--legacy-share {given:g}%)",
    ))
    parts += [(False, problem) for problem in problems]
    passed = all(ok for ok, _ in parts)
    return passed, f"verdict: {'PASS' if passed else 'FAIL'}: " + "; ".join(text for _, text in parts)
