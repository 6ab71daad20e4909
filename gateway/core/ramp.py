"""The automatic ramp (``rollout.ramp``): which step of the plan the new backend's share is on.

The plan is the config's; the progress (`Progress`) is shared by every replica through the
store, and `decide` is the whole of the ramp's judgement: the plan, the progress, the
current step's numbers over every replica (`Window`), the rollback guard and the time in,
the next progress out. No I/O and no clock: `service.rampsync` reads and writes the store
and acts on what changed.

A step is judged over its *window*, from the moment the step was entered (or last
judged): once the window holds ``min_sessions`` new-backend sessions every gate must hold,
and once it has also lasted ``hold_minutes`` the ramp moves to the next step. A gate that
fails, or a guard trip during the window, holds the step or steps back one (``on_failure``)
and starts a fresh window, so the ramp moves on again only after a whole clean hold. The
last step is ``done``. A gate without data (no replies yet) does not block.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .config import GatesConfig, RampConfig

STATES = ("advancing", "holding", "stepped_back", "paused", "done")
# reply_ratio is judged only when the new backend's average reply is at least this much
# slower than the old's: a chat user does not notice less, and on fast backends (the stubs
# answer within a millisecond) noise alone makes ratios of 2.
REPLY_RATIO_FLOOR_SECONDS = 0.1


@dataclass(frozen=True)
class Window:
    """One step's numbers: new-backend upstream attempts, those opened, those whose token the
    new backend refused, and the reply times (sum and count) on each backend."""

    attempted: int = 0
    opened: int = 0
    rejected: int = 0
    reply_new_sum: float = 0.0
    reply_new_count: int = 0
    reply_old_sum: float = 0.0
    reply_old_count: int = 0

    def __add__(self, other: Window) -> Window:
        return Window(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Window)))

    def __sub__(self, other: Window) -> Window:
        return Window(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(Window)))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> Window:
        """A replica's published numbers; anything unreadable counts as nothing."""
        if not isinstance(raw, dict):
            return cls()
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = raw.get(f.name, 0)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
            values[f.name] = (float(value) if f.type == "float" else int(value)) if ok else 0
        return cls(**values)


@dataclass(frozen=True)
class Gate:
    """One gate's verdict over a window: `value` None when the window has no data for it."""

    name: str
    value: float | None
    threshold: float
    bound: str  # "min" or "max"
    detail: str  # what the value was computed from
    judged: bool = True  # False: the value is shown but too small to matter (REPLY_RATIO_FLOOR_SECONDS)

    @property
    def ok(self) -> bool:
        if self.value is None or not self.judged:
            return True
        return self.value >= self.threshold if self.bound == "min" else self.value <= self.threshold

    def words(self) -> str:
        """The failure as an operator reads it: ``success_rate 0.62 < 0.95 (31 of 50 opened)``."""
        if self.value is None:
            return f"{self.name} no data ({self.detail})"
        if self.bound == "min":
            relation = "<" if self.value < self.threshold else ">="
        else:
            relation = ">" if self.value > self.threshold else "<="
        return f"{self.name} {self.value:.3g} {relation} {self.threshold:g} ({self.detail})"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def judge(gates: GatesConfig, window: Window) -> list[Gate]:
    """Every gate over `window`, in the config's order."""
    tried = window.attempted
    new_avg = window.reply_new_sum / window.reply_new_count if window.reply_new_count else None
    old_avg = window.reply_old_sum / window.reply_old_count if window.reply_old_count else None
    ratio = new_avg / old_avg if new_avg is not None and old_avg else None
    slower = new_avg - old_avg if new_avg is not None and old_avg is not None else 0.0
    ratio_detail = "new ÷ old average reply"
    if ratio is not None:
        ratio_detail += f", {new_avg:.3g} s ÷ {old_avg:.3g} s"
        if slower < REPLY_RATIO_FLOOR_SECONDS:
            ratio_detail += f"; not judged under {REPLY_RATIO_FLOOR_SECONDS * 1000:g} ms apart"
    return [
        Gate("success_rate", window.opened / tried if tried else None, gates.success_rate_min, "min", f"{window.opened} of {tried} opened"),
        Gate(
            "auth_failure_rate", window.rejected / tried if tried else None, gates.auth_failure_rate_max, "max",
            f"{window.rejected} of {tried} tokens refused by the new backend",
        ),
        Gate(
            "reply_seconds_avg", new_avg, gates.reply_seconds_avg_max, "max",
            f"over {window.reply_new_count} new-backend replies",
        ),
        Gate("reply_ratio", ratio, gates.reply_ratio_max, "max", ratio_detail, slower >= REPLY_RATIO_FLOOR_SECONDS),
    ]


@dataclass(frozen=True)
class GuardView:
    """What the ramp needs of the rollback guard, in wall time (replicas share it)."""

    healthy: bool = True
    tripped_at: float | None = None  # the trip in force (tripped or recovering)
    detail: str = ""
    healthy_since: float | None = None  # when it last recovered; None if it never tripped


@dataclass(frozen=True)
class Progress:
    """The ramp's shared record. `since` (unix time) starts the step's window, numbered
    `window`; `steps` is the plan it was made under; `version` orders the writes."""

    step_index: int
    step_percent: float
    steps: tuple[float, ...]
    state: str
    reason: str
    since: float
    window: int
    version: int = 0

    def as_record(self) -> dict[str, Any]:
        return {**asdict(self), "steps": list(self.steps)}

    @classmethod
    def from_record(cls, raw: Any) -> Progress | None:
        """The record as the store holds it; None when there is none or it is unreadable."""
        if not isinstance(raw, dict):
            return None
        try:
            steps = tuple(float(s) for s in raw["steps"])
            progress = cls(
                int(raw["step_index"]), float(raw["step_percent"]), steps, str(raw["state"]), str(raw["reason"]),
                float(raw["since"]), int(raw["window"]), int(raw["version"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        if progress.state not in STATES or not 0 <= progress.step_index < len(steps):
            return None
        return progress


def hold_ends(plan: RampConfig, progress: Progress, guard: GuardView) -> float:
    """When the step's hold is over (unix time): `hold_minutes` after its window started, or
    after the guard last recovered if that is later."""
    start = max(progress.since, guard.healthy_since or 0.0)
    return start + plan.hold_minutes * 60.0


def decide(plan: RampConfig, progress: Progress | None, window: Window, guard: GuardView, now: float) -> Progress:
    """The ramp's next progress. Equal to `progress` when nothing changes; otherwise one
    `version` higher, for the caller to write if no other replica wrote first."""
    if progress is None:
        return _start(plan, now)
    moved = _follow_plan(plan, progress, now)
    if plan.paused:
        if moved.state != "paused":
            moved = replace(moved, state="paused", reason="paused by rollout.ramp.paused")
        return _versioned(progress, moved)
    if moved.state == "paused":
        moved = _next_window(moved, _settled(plan, moved.step_index), "resumed: rollout.ramp.paused is off", now)
    if moved.state == "done":
        return _versioned(progress, moved)
    if not guard.healthy:
        if guard.tripped_at is not None and guard.tripped_at >= moved.since:
            moved = _failed(plan, moved, f"the rollback guard tripped ({guard.detail})", now)
        return _versioned(progress, moved)
    if window.attempted >= plan.min_sessions:
        failed = [gate for gate in judge(plan.gates, window) if not gate.ok]
        if failed:
            words = "; ".join(gate.words() for gate in failed)
            moved = _failed(plan, moved, f"{words}, over {window.attempted} new-backend sessions", now)
        elif now >= hold_ends(plan, moved, guard):
            moved = _advance(plan, moved, window, now)
    return _versioned(progress, moved)


def _start(plan: RampConfig, now: float) -> Progress:
    first = plan.steps[0]
    state = _settled(plan, 0)
    reason = f"started at step 1 of {len(plan.steps)} ({first:g}%)"
    if plan.paused:
        state, reason = "paused", reason + "; paused by rollout.ramp.paused"
    return Progress(0, first, plan.steps, state, reason, now, 1, 1)


def _settled(plan: RampConfig, index: int) -> str:
    """A step's state when nothing has gone wrong on it."""
    return "done" if index == len(plan.steps) - 1 else "advancing"


def _versioned(before: Progress, after: Progress) -> Progress:
    return before if after == before else replace(after, version=before.version + 1)


def _next_window(progress: Progress, state: str, reason: str, now: float) -> Progress:
    return replace(progress, state=state, reason=reason, since=now, window=progress.window + 1)


def _follow_plan(plan: RampConfig, progress: Progress, now: float) -> Progress:
    """`progress` under an edited plan: the highest of its steps not above the current one
    (the first step when all are above); a step that moved starts a fresh window."""
    if progress.steps == plan.steps:
        return progress
    below = [i for i, step in enumerate(plan.steps) if step <= progress.step_percent]
    index = below[-1] if below else 0
    percent = plan.steps[index]
    state = "paused" if progress.state == "paused" else _settled(plan, index)
    moved = replace(progress, steps=plan.steps, step_index=index, step_percent=percent)
    if percent == progress.step_percent and state == progress.state:
        return moved
    reason = f"the plan changed: now at step {index + 1} of {len(plan.steps)} ({percent:g}%)"
    return _next_window(moved, state, reason, now)


def _advance(plan: RampConfig, progress: Progress, window: Window, now: float) -> Progress:
    index = progress.step_index + 1
    percent = plan.steps[index]
    reason = (
        f"every gate held for {plan.hold_minutes:g} min over {window.attempted} new-backend sessions:"
        f" {progress.step_percent:g}% -> {percent:g}% (step {index + 1} of {len(plan.steps)})"
    )
    return _next_window(replace(progress, step_index=index, step_percent=percent), _settled(plan, index), reason, now)


def _failed(plan: RampConfig, progress: Progress, why: str, now: float) -> Progress:
    """A failed gate or a guard trip: step back one (``on_failure: step_back``) or hold, in a fresh window."""
    if plan.on_failure == "step_back" and progress.step_index > 0:
        index = progress.step_index - 1
        percent = plan.steps[index]
        reason = f"{why}: stepped back from {progress.step_percent:g}% to {percent:g}%"
        return _next_window(replace(progress, step_index=index, step_percent=percent), "stepped_back", reason, now)
    where = " (the first step: nothing to step back to)" if plan.on_failure == "step_back" else ""
    return _next_window(progress, "holding", f"{why}: holding at {progress.step_percent:g}%{where}", now)
