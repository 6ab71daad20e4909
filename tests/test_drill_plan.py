"""The drill's plan, table and verdict (`gateway.drill_plan`): pure, no sockets."""

from __future__ import annotations

import re

import pytest

from gateway.staging.drill_plan import MAX_FAILURE_RATIO, Plan, StepStats, Usage, parse_steps, percentile, table, verdict
from gateway.service.store import DayUsage


# -- the plan -------------------------------------------------------------------------------------


def test_steps_are_comma_separated_percentages() -> None:
    assert parse_steps("0,1,5, 25,50,100") == (0, 1, 5, 25, 50, 100)


@pytest.mark.parametrize(("text", "error"), [("0,x,100", "'x' is not a percentage"), ("0,150", "150 is out of range [0, 100]")])
def test_a_bad_step_is_named(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        parse_steps(text)


def test_a_plan_needs_a_step_before_during_and_after_the_fault() -> None:
    with pytest.raises(ValueError, match="--steps needs 3 to 20 percentages"):
        Plan(steps=(0, 100))


def test_a_plan_gives_each_step_at_least_two_seconds() -> None:
    with pytest.raises(ValueError, match="leaves 1.5 s per step"):
        Plan(duration=9, steps=(0, 10, 20, 30, 40, 50))


def test_the_fault_is_in_the_middle_step() -> None:
    assert Plan().steps[Plan().fault_step] == 25
    assert Plan(steps=(0, 50, 100)).fault_step == 1


def test_the_guard_recovers_within_half_a_step_after_the_heal() -> None:
    plan = Plan()
    guard = plan.guard()
    recovery = guard["cooldown_seconds"] + len(guard["recovery_steps"]) * guard["step_seconds"]
    assert recovery <= plan.step_seconds / 2
    assert guard["max_failure_ratio"] * 100 < plan.fail_percent


def test_a_trip_is_expected_only_from_a_fault_over_the_threshold_that_reaches_users() -> None:
    assert Plan().expects_trip()
    assert not Plan(fail_percent=100 * MAX_FAILURE_RATIO).expects_trip()
    assert not Plan(steps=(0, 0, 100)).expects_trip()


def test_the_legacy_share_picks_that_many_apps() -> None:
    plan = Plan(legacy_share=30, apps=100)
    assert sum(plan.is_legacy(n) for n in range(plan.apps)) == 30


# -- what a step saw ------------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.95) is None
    assert percentile([0.3, 0.1, 0.2], 0.5) == 0.2
    assert percentile([float(n) for n in range(1, 101)], 0.95) == 95.0


def test_effective_percentage_keeps_the_lowest_and_highest_seen() -> None:
    stats = StepStats(25, 30)
    for seen in (25, 0, 6.25):
        stats.saw_effective(seen)
    assert stats.effective == (0, 25)


def test_usage_adds_up_the_days_of_the_run() -> None:
    days = [
        DayUsage("2026-01-01", sessions_legacy=3, sessions_message=7, users_legacy=3, users_message=7, users=10),
        DayUsage("2026-01-02", sessions_legacy=1, sessions_message=1, users_legacy=1, users_message=1, users=2),
    ]
    assert Usage.of(days) == Usage(users_legacy=4, users=12, sessions_legacy=4, sessions=12)


def test_table_has_a_row_per_step_with_every_column() -> None:
    healthy = StepStats(0, 0, attempted=300, succeeded=300, effective=(0, 0))
    healthy.replies["old"] += [0.001, 0.002]
    faulty = StepStats(25, 30, attempted=290, succeeded=290, fallbacks=12, trips=2, guard="recovering", effective=(0, 25))
    assert table([healthy, faulty]) == [
        "step  new %  new backend  attempted  succeeded  failed  fallbacks  trips  guard       effective %  old p50/p95 ms  new p50/p95 ms",
        "   1      0  healthy            300        300       0          0      0  healthy               0         1.0/2.0               -",
        "   2     25  30% fail           290        290       0         12      2  recovering         0-25               -               -",
    ]


# -- the verdict ----------------------------------------------------------------------------------

GOOD_USAGE = Usage(users_legacy=30, users=100, sessions_legacy=300, sessions=1000)


def good_steps() -> list[StepStats]:
    return [
        StepStats(0, 0, attempted=100, succeeded=100),
        StepStats(25, 30, attempted=100, succeeded=100, trips=2, guard="recovering"),
        StepStats(50, 0, attempted=100, succeeded=100),
    ]


def test_verdict_passes_with_no_failure_a_recovered_guard_and_the_share_given() -> None:
    passed, line = verdict(Plan(), good_steps(), "healthy", GOOD_USAGE, [])
    assert passed
    assert line == (
        "verdict: PASS: 0 app-visible failures in 300 sessions; the guard tripped 2 times and recovered; "
        "usage shows 30.0% legacy users (--legacy-share 30%)"
    )


def test_one_app_visible_failure_fails_the_drill() -> None:
    steps = good_steps()
    steps[1].failed, steps[1].succeeded = 1, 99
    passed, line = verdict(Plan(), steps, "healthy", GOOD_USAGE, [])
    assert not passed and "1 app-visible failures in 300 sessions" in line


def test_a_guard_that_never_tripped_fails_the_drill() -> None:
    steps = good_steps()
    steps[1].trips = 0
    passed, line = verdict(Plan(), steps, "healthy", GOOD_USAGE, [])
    assert not passed and "the guard never tripped, though 30% of handshakes failed" in line


def test_a_guard_not_recovered_by_the_end_fails_the_drill() -> None:
    passed, line = verdict(Plan(), good_steps(), "recovering", GOOD_USAGE, [])
    assert not passed and "had not recovered by the end (recovering)" in line


def test_a_trip_without_a_fault_that_should_cause_one_fails_the_drill() -> None:
    passed, line = verdict(Plan(fail_percent=0), good_steps(), "healthy", GOOD_USAGE, [])
    assert not passed and "the guard tripped 2 times; expected none" in line


def test_usage_off_the_given_legacy_share_fails_the_drill() -> None:
    passed, line = verdict(Plan(), good_steps(), "healthy", Usage(25, 100, 250, 1000), [])
    assert not passed and "usage shows 25.0% legacy users (--legacy-share 30%)" in line


def test_a_single_trip_reads_once() -> None:
    steps = good_steps()
    steps[1].trips = 1
    passed, line = verdict(Plan(), steps, "healthy", GOOD_USAGE, [])
    assert passed and "the guard tripped once and recovered" in line
    passed, line = verdict(Plan(fail_percent=0), steps, "healthy", GOOD_USAGE, [])
    assert not passed and "the guard tripped once; expected none" in line


def test_an_edit_the_gateway_did_not_apply_fails_the_drill() -> None:
    passed, line = verdict(Plan(), good_steps(), "healthy", GOOD_USAGE, ["the gateway did not apply new_percent 50 within 5 s"])
    assert not passed and line.endswith("; the gateway did not apply new_percent 50 within 5 s")
