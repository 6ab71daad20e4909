"""The migration usage report behind `ws-gateway report`: is it safe to deny legacy auth yet?

Pure functions over `store.DayUsage` rows, plus `collect_report` to read them from a store.

The verdict covers the last `VERDICT_DAYS` rows of the report (the most recent UTC days,
today included). It says "safe to deny legacy auth" only when *each* of those days has
recorded users and a legacy share of users under the threshold (or no legacy user at all,
so a threshold of 0 means "nobody left"). A day without data never counts as safe: no
data is not evidence that nobody uses the old method.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from typing import Any

from .store import DayUsage, Store

VERDICT_DAYS = 7

_COLUMNS = ("date", "sessions legacy", "sessions message", "users legacy", "users message", "legacy share")


@dataclass(frozen=True)
class Verdict:
    safe: bool
    text: str


async def collect_report(store: Store, days: int, today: date | str | None = None) -> list[DayUsage]:
    """The last `days` UTC days (today included) from `store`, oldest first.

    A RedisStore raises `store.StoreUnavailable` when Redis cannot answer, a SqliteStore
    when its file cannot be read: the report is never built from one process's memory.
    """
    return await store.usage_days(days, today)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _percent(threshold: float) -> str:
    return f"{threshold:g}%"


def verdict(days: list[DayUsage], threshold_percent: float) -> Verdict:
    """Whether legacy usage stayed under `threshold_percent` of users on each of the last 7 days."""
    ordered = sorted(days, key=lambda d: d.day)
    recent = ordered[-VERDICT_DAYS:]
    threshold = _percent(threshold_percent)
    if len(recent) < VERDICT_DAYS:
        return Verdict(
            False,
            f"not yet: the report covers {len(recent)} day(s); the verdict needs the last {VERDICT_DAYS} (use --days {VERDICT_DAYS} or more)",
        )
    empty = [d.day for d in recent if d.legacy_share_percent is None]
    over = [
        d
        for d in recent
        if d.legacy_share_percent is not None and d.users_legacy > 0 and d.legacy_share_percent >= threshold_percent
    ]
    if empty or over:
        reasons = []
        if over:
            listed = ", ".join(
                f"{d.day} ({_share(d.legacy_share_percent)}: {d.users_legacy} of {d.users} users)" for d in over
            )
            reasons.append(f"legacy share at or above {threshold} on {listed}")
        if empty:
            reasons.append(f"no usage recorded on {', '.join(empty)}")
        return Verdict(False, "not yet: " + "; ".join(reasons))
    peak = max(recent, key=lambda d: (d.legacy_share_percent or 0.0, d.day))
    return Verdict(
        True,
        f"safe to deny legacy auth: legacy users stayed under {threshold} on each of the last {VERDICT_DAYS} days "
        f"({recent[0].day} to {recent[-1].day}; highest {_share(peak.legacy_share_percent)} on {peak.day})",
    )


def format_report(days: list[DayUsage], threshold_percent: float) -> str:
    """A day-by-day table, oldest first, then one line with the verdict."""
    ordered = sorted(days, key=lambda d: d.day)
    rows = [_COLUMNS] + [
        (
            d.day,
            str(d.sessions_legacy),
            str(d.sessions_message),
            str(d.users_legacy),
            str(d.users_message),
            _share(d.legacy_share_percent),
        )
        for d in ordered
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    lines.append(f"verdict: {verdict(ordered, threshold_percent).text}")
    return "\n".join(lines) + "\n"


def report_data(days: list[DayUsage], threshold_percent: float) -> dict[str, Any]:
    """The report as plain data: every counter per day, the threshold and the verdict."""
    ordered = sorted(days, key=lambda d: d.day)
    result = verdict(ordered, threshold_percent)
    return {
        "threshold_percent": threshold_percent,
        "verdict_days": VERDICT_DAYS,
        "safe_to_deny_legacy": result.safe,
        "verdict": result.text,
        "days": [d.as_dict() for d in ordered],
    }


def report_json(days: list[DayUsage], threshold_percent: float) -> str:
    """`report_data` as JSON text, for ``ws-gateway report --json``."""
    return json.dumps(report_data(days, threshold_percent), indent=2, sort_keys=True) + "\n"
