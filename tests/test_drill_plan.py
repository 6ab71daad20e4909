"""The drill's plan, table and verdict (`gateway.drill_plan`): pure, no sockets."""

from __future__ import annotations

import re

import pytest

from gateway.core.config import GatesConfig
from gateway.core.configparse import parse_config
from gateway.core.ramp import Gate
from gateway.staging.drill_plan import (
    HEAL_SECONDS, MAX_FAILURE_RATIO, Plan, RampLeg, StepStats, Usage, failed_gates, parse_steps, percentile, ramp_table,
    ramp_verdict, table, verdict,
)
from gateway.service.store import DayUsage
from gateway.staging.drill import raw_config


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


# -- --ramp: the plan -----------------------------------------------------------------------------

RAMP = Plan(ramp=True)  # 90 s over 0,1,5,25,50,100


def test_the_ramp_walks_the_steps_above_zero_with_the_fault_in_the_middle() -> None:
    assert RAMP.path == (1, 5, 25, 50, 100)
    assert RAMP.path[RAMP.fault_step] == 25


def test_a_hold_per_step_and_three_spare_fit_the_duration() -> None:
    assert RAMP.step_seconds * (len(RAMP.path) + 3) == RAMP.duration
    assert RAMP.ramp_config()["hold_minutes"] == 0.1875  # 11.25 s


@pytest.mark.parametrize(
    ("steps", "duration", "error"),
    [
        ((0, 50, 100), 90, "--ramp needs 3 to 20 steps above 0 in --steps (a step before, during and after the fault), got 2"),
        ((0, 50, 25, 100), 90, "--ramp needs --steps strictly rising, got 0,50,25,100"),
        ((5, 25, 50), 90, "--ramp needs --steps to end at 100 (where the ramp is done), got 50"),
        ((1, 5, 25, 50, 100), 31, "--duration 31 leaves a 3.9 s hold per step (5 steps and 3 spare holds); give each at least 4 s"),
    ],
)
def test_a_ramp_plan_it_cannot_run_is_refused(steps: tuple[float, ...], duration: float, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        Plan(duration=duration, steps=steps, ramp=True)


def test_min_sessions_is_half_what_the_quietest_step_sees_in_a_hold() -> None:
    plan = Plan(duration=36, steps=(10, 50, 100), ramp=True)  # a 6 s hold; 10 % routes 11 of the 100 apps
    assert plan.routed_new(10) == 11
    assert plan.min_sessions() == 8  # 11 apps * 6 s / 3.8 s per session and pause / 2
    assert RAMP.routed_new(1) == 0 and RAMP.min_sessions() == 0  # nobody at 1 %: judged on what there is


def test_the_drills_ramp_config_is_one_the_gateway_accepts() -> None:
    ramp = parse_config(raw_config("s" * 32, RAMP, 1, 2)).rollout.ramp
    assert ramp.enabled and ramp.steps == RAMP.path and ramp.on_failure == "step_back"
    assert ramp.gates.success_rate_min == 0.95 and ramp.gates == GatesConfig()


def test_the_guard_cools_down_until_the_heal_has_landed() -> None:
    short = Plan(duration=30, steps=(10, 50, 100), ramp=True)
    assert short.guard()["cooldown_seconds"] == HEAL_SECONDS > short.step_seconds / 5
    assert Plan(duration=30, steps=(0, 50, 100)).guard()["cooldown_seconds"] == 2.0  # without --ramp: a fifth of the step


def test_a_stop_is_expected_from_a_fault_over_the_success_rate_gate() -> None:
    assert RAMP.expects_stop()
    assert not Plan(fail_percent=5, ramp=True).expects_stop()


# -- --ramp: the table and the verdict -----------------------------------------------------------

GUARD_REASON = "the rollback guard tripped (3/12 new-backend sessions failed within 12.9s): stepped back from 25% to 5%"
GATE_REASON = (
    "success_rate 0.7 < 0.95 (7 of 10 opened); reply_ratio 2 > 1.5 (new ÷ old average reply, 0.002 s ÷ 0.001 s),"
    " over 10 new-backend sessions: stepped back from 25% to 5%"
)


def good_legs(reason: str = GUARD_REASON) -> list[RampLeg]:
    def leg(percent: float, state: str, at: float, fault: float = 0.0) -> RampLeg:
        return RampLeg(percent, fault, attempted=100, succeeded=100, state=state, reason=f"{state} {percent:g}%", at=at)

    return [
        leg(1, "advancing", 0.0),
        leg(5, "advancing", 13.1),
        leg(25, "advancing", 26.2, fault=30.0),
        RampLeg(5, 0.0, attempted=100, succeeded=100, state="stepped_back", reason=reason, at=27.4, healed=True),
        leg(25, "advancing", 47.0),
        leg(50, "advancing", 60.1),
        leg(100, "done", 73.2),
    ]


def test_the_ramp_table_shows_the_ramps_path_the_fault_the_heal_and_a_failures_reason() -> None:
    lines = ramp_table(good_legs()[1:4])
    assert lines[0].startswith("leg  at s  ramp %  state         new backend  attempted")
    assert lines[0].endswith("the ramp's reason (a failure's)")
    assert [line.split()[:5] for line in lines[1:]] == [
        ["1", "13.1", "5", "advancing", "healthy"],
        ["2", "26.2", "25", "advancing", "30%"],
        ["3", "27.4", "5", "stepped_back", "healed"],
    ]
    assert lines[3].endswith(GUARD_REASON) and not lines[2].endswith("%")


def test_failed_gates_are_named_from_the_reason() -> None:
    assert failed_gates(GUARD_REASON) == ["the rollback guard"]
    assert failed_gates(GATE_REASON) == ["success_rate", "reply_ratio"]
    assert failed_gates(Gate("auth_failure_rate", 0.2, 0.05, "max", "2 of 10 tokens refused").words()) == ["auth_failure_rate"]
    assert failed_gates(Gate("success_rate", 0.97, 0.95, "min", "97 of 100 opened").words()) == []  # a gate that held


def test_ramp_verdict_passes_when_it_stops_at_the_fault_and_is_done_after_the_heal() -> None:
    passed, line = ramp_verdict(RAMP, good_legs(), GOOD_USAGE, [])
    assert passed
    assert line == (
        "verdict: PASS: 0 app-visible failures in 700 sessions; the ramp stopped at the failed gate: the rollback guard "
        "tripped, stepped back from 25% to 5%; the ramp reached 100% (done) at 73.2 s, 45.8 s after the heal; "
        "usage shows 30.0% legacy users (--legacy-share 30%)"
    )


def test_ramp_verdict_names_the_failed_gates() -> None:
    passed, line = ramp_verdict(RAMP, good_legs(GATE_REASON), GOOD_USAGE, [])
    assert passed and "the ramp stopped at the failed gate: success_rate and reply_ratio failed, stepped back" in line


def test_a_ramp_that_went_on_through_the_fault_fails_the_drill() -> None:
    legs = good_legs()
    del legs[3:5]
    legs[3].healed = True
    passed, line = ramp_verdict(RAMP, legs, GOOD_USAGE, [])
    assert not passed and "the ramp went on through the fault: 25% -> 50% (advancing)" in line


def test_a_ramp_stop_before_the_fault_fails_the_drill() -> None:
    legs = good_legs()
    legs[1] = RampLeg(1, 0.0, state="holding", reason="reply_ratio 1.7 > 1.5 (...): holding at 1%", at=13.1)
    passed, line = ramp_verdict(RAMP, legs, GOOD_USAGE, [])
    assert not passed
    assert "the ramp stopped once before the fault, with the new backend healthy (first at 1%: reply_ratio 1.7 > 1.5" in line


def test_a_ramp_stop_after_the_heal_is_named_but_passes() -> None:
    legs = good_legs()
    tail = "success_rate 0.692 < 0.95 (9 of 13 opened), over 13 new-backend sessions: holding at 5%"
    legs.insert(4, RampLeg(5, 0.0, state="holding", reason=tail, at=33.0))
    passed, line = ramp_verdict(RAMP, legs, GOOD_USAGE, [])
    assert passed
    assert f"stepped back from 25% to 5% (after the heal it stopped once more, first at 5%: {tail});" in line


def test_a_ramp_not_done_by_the_end_fails_the_drill() -> None:
    passed, line = ramp_verdict(RAMP, good_legs()[:-1], GOOD_USAGE, [])
    assert not passed and "the ramp had not reached 100% by the end of the 90 s (at 50%, advancing)" in line


def test_a_ramp_that_never_reached_the_fault_fails_the_drill() -> None:
    passed, line = ramp_verdict(RAMP, good_legs()[:2], GOOD_USAGE, [])
    assert not passed and "the ramp never reached the fault's step (25%)" in line
    passed, line = ramp_verdict(RAMP, good_legs()[:3], GOOD_USAGE, [])
    assert not passed and "the run ended while the ramp was still judging the fault's step (25%)" in line


def test_without_a_fault_over_the_gate_the_ramp_must_not_stop() -> None:
    no_fault = Plan(fail_percent=0, ramp=True)
    legs = [leg for leg in good_legs() if leg.state != "stepped_back"]
    passed, line = ramp_verdict(no_fault, legs, GOOD_USAGE, [])
    assert passed and "the ramp never stopped; expected no stop (no fault over the success_rate gate's 5%)" in line
    passed, line = ramp_verdict(no_fault, good_legs(), GOOD_USAGE, [])
    assert not passed and "the ramp stopped once with no fault over its 5%" in line
