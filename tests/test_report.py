import json
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone

from gateway.service.report import (
    PLAN_DAYS,
    VERDICT_DAYS,
    collect_report,
    collect_versions,
    format_report,
    plan_criteria,
    report_data,
    report_json,
    verdict,
)
from gateway.service.store import DayUsage, MemoryStore, VersionUsage

END = date(2025, 11, 26)


def day(offset: int, legacy_users: int = 1, users: int = 1000, **more: int) -> DayUsage:
    """A day `offset` days before END with `legacy_users` of `users` on the old auth style."""
    fields = {
        "sessions_legacy": legacy_users * 2,
        "sessions_message": (users - legacy_users) * 2,
        "users_legacy": legacy_users,
        "users_message": users - legacy_users,
        "users": users,
    }
    fields.update(more)
    return DayUsage(day=(END - timedelta(days=offset)).isoformat(), **fields)


def week(**overrides: DayUsage) -> list[DayUsage]:
    """Seven days, all at 0.1 % legacy users, oldest first; override by offset key ``d0``..``d6``."""
    days = [day(offset) for offset in range(VERDICT_DAYS - 1, -1, -1)]
    for key, value in overrides.items():
        index = VERDICT_DAYS - 1 - int(key[1:])
        days[index] = value
    return days


def test_week_under_the_threshold_is_safe():
    result = verdict(week(), 1.0)
    assert result.safe
    assert result.text.startswith("safe to deny legacy auth")
    assert "2025-11-20 to 2025-11-26" in result.text


def test_one_day_at_the_threshold_is_not_safe():
    result = verdict(week(d3=day(3, legacy_users=10)), 1.0)
    assert not result.safe
    assert result.text.startswith("not yet:")
    assert "2025-11-23 (1.00%: 10 of 1000 users)" in result.text


def test_day_with_no_data_never_counts_as_safe():
    result = verdict(week(d2=DayUsage("2025-11-24")), 1.0)
    assert not result.safe
    assert "no usage recorded on 2025-11-24" in result.text


def test_day_with_sessions_but_no_recorded_users_is_not_safe():
    no_users = DayUsage("2025-11-24", sessions_message=50)
    assert not verdict(week(d2=no_users), 1.0).safe


def test_both_reasons_are_given():
    result = verdict(week(d0=day(0, legacy_users=50), d6=DayUsage("2025-11-20")), 1.0)
    assert "2025-11-26 (5.00%: 50 of 1000 users)" in result.text
    assert "no usage recorded on 2025-11-20" in result.text


def test_fewer_than_seven_days_is_not_safe():
    result = verdict(week()[1:], 1.0)
    assert not result.safe
    assert "covers 6 day(s)" in result.text


def test_only_the_last_seven_days_count():
    old_bad = day(10, legacy_users=900)
    assert verdict([old_bad, *week()], 1.0).safe


def test_rows_in_any_order_are_judged_by_date():
    shuffled = list(reversed([DayUsage("2025-11-10"), *week()]))
    assert verdict(shuffled, 1.0).safe


def test_zero_threshold_is_safe_only_without_legacy_users():
    assert not verdict(week(), 0.0).safe
    none_left = [replace(d, users_legacy=0, sessions_legacy=0) for d in week()]
    assert verdict(none_left, 0.0).safe


def test_no_legacy_users_is_under_any_threshold():
    none_left = [replace(d, users_legacy=0) for d in week()]
    assert verdict(none_left, 1.0).safe


def test_table_has_a_row_per_day_oldest_first_and_the_verdict_last():
    text = format_report(list(reversed(week(d1=day(1, legacy_users=25, users=500)))), 1.0)
    lines = text.splitlines()
    assert lines[0].split() == ["date", "sessions", "legacy", "sessions", "message", "users", "legacy", "users", "message", "legacy", "share"]
    assert [line.split()[0] for line in lines[1:8]] == [f"2025-11-{n}" for n in range(20, 27)]
    assert lines[6].split() == ["2025-11-25", "50", "950", "25", "475", "5.00%"]
    assert lines[-1].startswith("verdict: not yet: legacy share at or above 1% on 2025-11-25")


def test_table_shows_a_dash_for_days_without_users():
    text = format_report([DayUsage("2025-11-26")], 1.0)
    assert text.splitlines()[1].split() == ["2025-11-26", "0", "0", "0", "0", "-"]


def test_table_columns_line_up():
    text = format_report(week(d0=day(0, legacy_users=12345, users=999999)), 1.0)
    rows = text.splitlines()[: VERDICT_DAYS + 1]
    assert len({len(row) for row in rows}) == 1


def test_json_report_carries_every_counter_and_the_verdict():
    data = json.loads(report_json(week(), 1.5))
    assert data["safe_to_deny_legacy"] is True
    assert data["threshold_percent"] == 1.5
    assert data["verdict_days"] == VERDICT_DAYS
    first = data["days"][0]
    assert first["day"] == "2025-11-20"
    assert first["users_legacy"] == 1 and first["users"] == 1000 and first["sessions"] == 2000
    assert first["legacy_share_percent"] == 0.1
    assert report_data(week(), 1.5) == data


async def test_collect_report_reads_the_store():
    store = MemoryStore()
    await store.count_session("2025-11-26", "legacy", "old", "u1")
    await store.count_session("2025-11-26", "message", "new", "u2")
    days = await collect_report(store, 2, today="2025-11-26")
    assert [d.day for d in days] == ["2025-11-25", "2025-11-26"]
    assert days[1].users == 2 and days[1].legacy_share_percent == 50.0
    assert not days[0].has_data


# -- per app version, and the plan's two criteria ----------------------------------------------------

LAST_SEEN = datetime(2025, 11, 26, 14, 3, tzinfo=timezone.utc).timestamp()
VERSIONS = [
    VersionUsage("2.3.1", users=900, users_legacy=0, last_seen=LAST_SEEN),
    VersionUsage("2.2.0", users=80, users_legacy=30, last_seen=LAST_SEEN - 3600),
    VersionUsage("unknown", users=15, users_legacy=5, last_seen=LAST_SEEN - 7200),
    VersionUsage("other", users=5, users_legacy=1, last_seen=LAST_SEEN - 60),
]
DEPRECATED_AT = int(datetime(2025, 10, 1, 9, 30, tzinfo=timezone.utc).timestamp())  # 56 days before END


def test_report_shows_a_row_per_app_version_between_the_days_and_the_verdict():
    lines = format_report(week(), 1.0, VERSIONS, DEPRECATED_AT).splitlines()
    assert lines[8] == ""
    assert lines[9].split() == ["app", "version", "users", "legacy", "users", "legacy", "share", "last", "seen", "(UTC)"]
    assert lines[10].split() == ["2.3.1", "900", "0", "0.00%", "2025-11-26", "14:03"]
    assert lines[11].split() == ["2.2.0", "80", "30", "37.50%", "2025-11-26", "13:03"]
    assert [line.split()[0] for line in lines[12:14]] == ["unknown", "other"]
    assert len({len(line) for line in lines[9:14]}) == 1  # columns line up
    assert lines[-1].startswith("verdict: safe to deny legacy auth")


def test_the_verdict_names_both_criteria_of_the_plan_and_the_versions_holding_the_share_up():
    text = format_report(week(d0=day(0, legacy_users=36)), 1.0, VERSIONS, DEPRECATED_AT).splitlines()[-1]
    assert text.startswith("verdict: not yet: legacy share at or above 1% on 2025-11-26")
    assert f"the plan: 56 of {PLAN_DAYS} days since auth.legacy_deprecated_at; legacy share 3.60% of 1% on 2025-11-26" in text
    assert text.endswith("held up by 2.2.0 (30 of its 80 users), unknown (5 of its 15 users), other (1 of its 5 users)")


def test_without_a_deprecation_date_or_versions_the_plan_says_so():
    text = format_report(week(), 1.0).splitlines()[-1]
    assert text.endswith("the plan: auth.legacy_deprecated_at not set; legacy share 0.10% of 1% on 2025-11-26")
    assert len(format_report(week(), 1.0).splitlines()) == VERDICT_DAYS + 3  # no version table


def test_the_plan_names_the_newest_day_with_users_and_at_most_five_versions():
    many = [VersionUsage(f"1.{n}", users=10, users_legacy=n + 1, last_seen=LAST_SEEN) for n in range(7)]
    criteria = plan_criteria(week(d0=DayUsage("2025-11-26")), many, 1.0, DEPRECATED_AT)
    assert criteria["legacy_share_day"] == "2025-11-25" and criteria["days_since_deprecated"] == 56
    assert [v["version"] for v in criteria["held_up_by"]] == [f"1.{n}" for n in range(6, -1, -1)]
    text = format_report(week(d0=DayUsage("2025-11-26")), 1.0, many, DEPRECATED_AT).splitlines()[-1]
    assert text.endswith("held up by 1.6 (7 of its 10 users), 1.5 (6 of its 10 users), 1.4 (5 of its 10 users), "
                         "1.3 (4 of its 10 users), 1.2 (3 of its 10 users) and 2 more")


def test_json_report_carries_each_version_and_the_plan():
    data = json.loads(report_json(week(), 1.0, VERSIONS, DEPRECATED_AT))
    assert [v["version"] for v in data["versions"]] == ["2.3.1", "2.2.0", "unknown", "other"]
    assert data["versions"][1] == {
        "version": "2.2.0", "users": 80, "users_legacy": 30, "legacy_share_percent": 37.5, "last_seen": LAST_SEEN - 3600
    }
    plan = data["plan"]
    assert (plan["days_since_deprecated"], plan["deprecated_days_required"]) == (56, PLAN_DAYS)
    assert (plan["legacy_share_percent"], plan["legacy_share_day"], plan["threshold_percent"]) == (0.1, "2025-11-26", 1.0)
    assert [v["version"] for v in plan["held_up_by"]] == ["2.2.0", "unknown", "other"]
    assert data["verdict"] == format_report(week(), 1.0, VERSIONS, DEPRECATED_AT).splitlines()[-1].removeprefix("verdict: ")


async def test_collect_versions_reads_the_store():
    store = MemoryStore()
    await store.count_app_version(LAST_SEEN, "2.2.0", "legacy", "u1", 50)
    await store.count_app_version(LAST_SEEN, "2.3.1", "message", "u2", 50)
    versions = await collect_versions(store, 2, today="2025-11-26")
    assert [(v.version, v.users, v.users_legacy) for v in versions] == [("2.2.0", 1, 1), ("2.3.1", 1, 0)]
