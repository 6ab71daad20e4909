"""The migration usage report behind `ws-gateway report`: is it safe to deny legacy auth yet?

Pure functions over `store.DayUsage` rows, plus `collect_report` to read them from a store.

The verdict covers the last `VERDICT_DAYS` rows of the report (the most recent UTC days,
today included). It says "safe to deny legacy auth" only when *each* of those days has
recorded users and a legacy share of users under the threshold (or no legacy user at all,
so a threshold of 0 means "nobody left"). A day without data never counts as safe: no
data is not evidence that nobody uses the old method.

The verdict line also names both of the migration plan's criteria for removing the old
method, "after 90 days (or when usage < 1 %)": the days since ``auth.legacy_deprecated_at``
(of `PLAN_DAYS`) and the newest day's legacy share (of the threshold), and, with
``usage.app_version``, the app versions whose users hold that share up.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

from .store import DayUsage, Store, VersionUsage

VERDICT_DAYS = 7
PLAN_DAYS = 90  # the plan: remove the old method 90 days after its deprecation (or under the threshold)
HELD_UP_BY_SHOWN = 5

_COLUMNS = ("date", "sessions legacy", "sessions message", "users legacy", "users message", "legacy share")
_VERSION_COLUMNS = ("app version", "users", "legacy users", "legacy share", "last seen (UTC)")


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


async def collect_versions(store: Store, days: int, today: date | str | None = None) -> list[VersionUsage]:
    """Each app version over the last `days` UTC days (users counted once), most users first.
    Read like `collect_report`: never from one process's memory."""
    return await store.app_versions(days, today)


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


def held_up_by(versions: Sequence[VersionUsage]) -> list[VersionUsage]:
    """The versions with users on the old method, most of them first."""
    return sorted((v for v in versions if v.users_legacy > 0), key=lambda v: (-v.users_legacy, v.version))


def plan_criteria(
    days: list[DayUsage], versions: Sequence[VersionUsage], threshold_percent: float, deprecated_at: int | None
) -> dict[str, Any]:
    """Where the plan's two criteria stand on the report's newest day: the days since
    `deprecated_at` (of `PLAN_DAYS`), the newest recorded legacy share (of the threshold),
    and the versions holding that share up."""
    ordered = sorted(days, key=lambda d: d.day)
    recorded = [d for d in ordered if d.legacy_share_percent is not None]
    since = None
    if deprecated_at is not None and ordered:
        deprecated_day = datetime.fromtimestamp(deprecated_at, timezone.utc).date()
        since = (date.fromisoformat(ordered[-1].day) - deprecated_day).days
    return {
        "days_since_deprecated": since,
        "deprecated_days_required": PLAN_DAYS,
        "legacy_share_percent": recorded[-1].legacy_share_percent if recorded else None,
        "legacy_share_day": recorded[-1].day if recorded else None,
        "threshold_percent": threshold_percent,
        "held_up_by": [v.as_dict() for v in held_up_by(versions)],
    }


def _plan_text(criteria: dict[str, Any]) -> str:
    since = criteria["days_since_deprecated"]
    days = (
        "auth.legacy_deprecated_at not set"
        if since is None
        else f"{since} of {criteria['deprecated_days_required']} days since auth.legacy_deprecated_at"
    )
    threshold = _percent(criteria["threshold_percent"])
    share = (
        f"legacy share {_share(criteria['legacy_share_percent'])} of {threshold} on {criteria['legacy_share_day']}"
        if criteria["legacy_share_day"] is not None
        else f"legacy share unknown (no users recorded) of {threshold}"
    )
    text = f"the plan: {days}; {share}"
    held = criteria["held_up_by"]
    if held:
        listed = ", ".join(
            f"{v['version']} ({v['users_legacy']} of its {v['users']} users)" for v in held[:HELD_UP_BY_SHOWN]
        )
        more = f" and {len(held) - HELD_UP_BY_SHOWN} more" if len(held) > HELD_UP_BY_SHOWN else ""
        text += f", held up by {listed}{more}"
    return text


def _verdict_text(
    days: list[DayUsage], versions: Sequence[VersionUsage], threshold_percent: float, deprecated_at: int | None
) -> tuple[bool, str]:
    result = verdict(days, threshold_percent)
    return result.safe, f"{result.text}; {_plan_text(plan_criteria(days, versions, threshold_percent, deprecated_at))}"


def _table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    rows = [header, *body]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return lines


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(at))


def format_report(
    days: list[DayUsage],
    threshold_percent: float,
    versions: Sequence[VersionUsage] = (),
    deprecated_at: int | None = None,
) -> str:
    """A day-by-day table, oldest first; the table per app version when there is one; then
    one line with the verdict."""
    ordered = sorted(days, key=lambda d: d.day)
    lines = _table(_COLUMNS, [
        (
            d.day,
            str(d.sessions_legacy),
            str(d.sessions_message),
            str(d.users_legacy),
            str(d.users_message),
            _share(d.legacy_share_percent),
        )
        for d in ordered
    ])
    if versions:
        lines.append("")
        lines += _table(
            _VERSION_COLUMNS,
            [
                (v.version, str(v.users), str(v.users_legacy), _share(v.legacy_share_percent), _when(v.last_seen))
                for v in versions
            ],
        )
    lines.append("")
    lines.append(f"verdict: {_verdict_text(ordered, versions, threshold_percent, deprecated_at)[1]}")
    return "\n".join(lines) + "\n"


def report_data(
    days: list[DayUsage],
    threshold_percent: float,
    versions: Sequence[VersionUsage] = (),
    deprecated_at: int | None = None,
) -> dict[str, Any]:
    """The report as plain data: every counter per day and per app version, the threshold,
    the plan's criteria and the verdict."""
    ordered = sorted(days, key=lambda d: d.day)
    safe, text = _verdict_text(ordered, versions, threshold_percent, deprecated_at)
    return {
        "threshold_percent": threshold_percent,
        "verdict_days": VERDICT_DAYS,
        "safe_to_deny_legacy": safe,
        "verdict": text,
        "plan": plan_criteria(ordered, versions, threshold_percent, deprecated_at),
        "days": [d.as_dict() for d in ordered],
        "versions": [v.as_dict() for v in versions],
    }


def report_json(
    days: list[DayUsage],
    threshold_percent: float,
    versions: Sequence[VersionUsage] = (),
    deprecated_at: int | None = None,
) -> str:
    """`report_data` as JSON text, for ``ws-gateway report --json``."""
    return json.dumps(report_data(days, threshold_percent, versions, deprecated_at), indent=2, sort_keys=True) + "\n"
