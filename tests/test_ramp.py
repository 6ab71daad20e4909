"""The ramp's decision (`core.ramp.decide`), without I/O: time is a number passed in."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.core.config import GatesConfig, RampConfig
from gateway.core.ramp import GuardView, Progress, Window, decide, judge

PLAN = RampConfig(enabled=True, steps=(1.0, 5.0, 25.0, 50.0, 100.0), hold_minutes=10, min_sessions=100)
HOLD = 600.0
HEALTHY = GuardView()
GREEN = Window(attempted=120, opened=120, reply_new_sum=12.0, reply_new_count=100, reply_old_sum=10.0, reply_old_count=100)


def at_step(index: int, *, since: float = 0.0, state: str = "advancing", plan: RampConfig = PLAN) -> Progress:
    return Progress(index, plan.steps[index], plan.steps, state, "test", since, 7, 3)


def test_the_first_decision_starts_at_the_first_step_with_a_fresh_window() -> None:
    progress = decide(PLAN, None, Window(), HEALTHY, 1000.0)
    assert (progress.step_index, progress.step_percent, progress.state) == (0, 1.0, "advancing")
    assert (progress.since, progress.version) == (1000.0, 1)
    assert progress.reason == "started at step 1 of 5 (1%)"


def test_green_gates_over_the_whole_hold_move_to_the_next_step() -> None:
    progress = at_step(1)
    assert decide(PLAN, progress, GREEN, HEALTHY, HOLD - 1) is progress  # the hold is not over
    moved = decide(PLAN, progress, GREEN, HEALTHY, HOLD)
    assert (moved.step_index, moved.step_percent, moved.state) == (2, 25.0, "advancing")
    assert (moved.since, moved.window, moved.version) == (HOLD, 8, 4)
    assert "5% -> 25%" in moved.reason and "120 new-backend sessions" in moved.reason


def test_a_step_is_not_judged_before_it_holds_min_sessions() -> None:
    few = replace(GREEN, attempted=99, opened=50)  # half failed, but too few to judge
    progress = at_step(1)
    assert decide(PLAN, progress, few, HEALTHY, 10 * HOLD) is progress


def test_min_sessions_zero_judges_an_empty_window_as_green() -> None:
    plan = replace(PLAN, min_sessions=0)
    moved = decide(plan, at_step(0, plan=plan), Window(), HEALTHY, HOLD)
    assert moved.step_percent == 5.0


def test_reaching_the_last_step_is_done_and_done_stays() -> None:
    moved = decide(PLAN, at_step(3), GREEN, HEALTHY, HOLD)
    assert (moved.step_percent, moved.state) == (100.0, "done")
    bad = Window(attempted=500, opened=0)
    assert decide(PLAN, moved, bad, HEALTHY, 10 * HOLD) is moved


@pytest.mark.parametrize(
    ("window", "words"),
    [
        (replace(GREEN, opened=100), "success_rate 0.833 < 0.95 (100 of 120 opened)"),
        (replace(GREEN, rejected=12), "auth_failure_rate 0.1 > 0.05 (12 of 120 tokens refused by the new backend)"),
        (replace(GREEN, reply_new_sum=250.0, reply_old_sum=200.0), "reply_seconds_avg 2.5 > 2 (over 100 new-backend replies)"),
        (replace(GREEN, reply_new_sum=80.0, reply_old_sum=50.0), "reply_ratio 1.6 > 1.5 (new ÷ old average reply, 0.8 s ÷ 0.5 s)"),
    ],
)
def test_a_failed_gate_steps_back_and_says_which_gate_and_by_how_much(window: Window, words: str) -> None:
    moved = decide(PLAN, at_step(2, since=0.0), window, HEALTHY, 30.0)  # judged at once, not at the hold's end
    assert (moved.step_index, moved.step_percent, moved.state) == (1, 5.0, "stepped_back")
    assert moved.reason == f"{words}, over 120 new-backend sessions: stepped back from 25% to 5%"
    assert (moved.since, moved.window) == (30.0, 8)


def test_on_failure_hold_keeps_the_step_and_restarts_its_hold() -> None:
    plan = replace(PLAN, on_failure="hold")
    moved = decide(plan, at_step(2), replace(GREEN, opened=0), HEALTHY, 30.0)
    assert (moved.step_index, moved.state, moved.since) == (2, "holding", 30.0)
    assert moved.reason.endswith(": holding at 25%")
    again = decide(plan, moved, GREEN, HEALTHY, 30.0 + HOLD)  # a whole clean hold later it moves on
    assert (again.step_percent, again.state) == (50.0, "advancing")


def test_a_failure_at_the_first_step_holds_there() -> None:
    moved = decide(PLAN, at_step(0), replace(GREEN, opened=0), HEALTHY, 5.0)
    assert (moved.step_index, moved.state) == (0, "holding")
    assert "nothing to step back to" in moved.reason


def test_after_stepping_back_a_clean_hold_moves_up_again() -> None:
    back = decide(PLAN, at_step(2), replace(GREEN, opened=0), HEALTHY, 30.0)
    assert decide(PLAN, back, GREEN, HEALTHY, 30.0 + HOLD - 1) is back
    up = decide(PLAN, back, GREEN, HEALTHY, 30.0 + HOLD)
    assert (up.step_percent, up.state) == (25.0, "advancing")


def test_a_guard_trip_in_the_window_steps_back_once() -> None:
    tripped = GuardView(healthy=False, tripped_at=50.0, detail="18/20 new-backend sessions failed within 60s")
    moved = decide(PLAN, at_step(2, since=10.0), Window(), tripped, 51.0)
    assert (moved.step_percent, moved.state) == (5.0, "stepped_back")
    assert moved.reason.startswith("the rollback guard tripped (18/20 new-backend sessions failed within 60s)")
    assert decide(PLAN, moved, Window(), tripped, 52.0) is moved  # the same trip does not step back again


def test_the_hold_counts_from_the_guards_recovery() -> None:
    recovered = GuardView(healthy=True, healthy_since=100.0)
    progress = at_step(1, since=0.0)
    assert decide(PLAN, progress, GREEN, recovered, HOLD) is progress
    assert decide(PLAN, progress, GREEN, recovered, 100.0 + HOLD).step_percent == 25.0


def test_while_the_guard_recovers_the_ramp_waits() -> None:
    recovering = GuardView(healthy=False, tripped_at=-5.0, detail="x")  # tripped before this window
    progress = at_step(1, since=0.0)
    assert decide(PLAN, progress, GREEN, recovering, 10 * HOLD) is progress


def test_paused_freezes_the_step_and_resuming_restarts_the_hold() -> None:
    paused = decide(replace(PLAN, paused=True), at_step(1), GREEN, HEALTHY, HOLD)
    assert (paused.step_percent, paused.state, paused.reason) == (5.0, "paused", "paused by rollout.ramp.paused")
    assert decide(replace(PLAN, paused=True), paused, GREEN, HEALTHY, 10 * HOLD) is paused
    resumed = decide(PLAN, paused, GREEN, HEALTHY, 2 * HOLD)
    assert (resumed.step_percent, resumed.state, resumed.since) == (5.0, "advancing", 2 * HOLD)


def test_an_edited_plan_keeps_the_highest_step_not_above_the_current_one() -> None:
    plan = replace(PLAN, steps=(10.0, 20.0, 40.0, 100.0))
    moved = decide(plan, at_step(2, since=0.0), Window(), HEALTHY, 5.0)  # at 25%
    assert (moved.step_index, moved.step_percent, moved.steps, moved.since) == (1, 20.0, plan.steps, 5.0)
    assert moved.reason == "the plan changed: now at step 2 of 4 (20%)"
    below_all = decide(plan, at_step(0), Window(), HEALTHY, 5.0)  # at 1%
    assert (below_all.step_index, below_all.step_percent) == (0, 10.0)


def test_an_edited_plan_that_keeps_the_percentage_keeps_the_window() -> None:
    plan = replace(PLAN, steps=(5.0, 25.0, 100.0))
    moved = decide(plan, at_step(1, since=3.0), Window(), HEALTHY, 5.0)
    assert (moved.step_index, moved.step_percent, moved.since, moved.window) == (0, 5.0, 3.0, 7)


def test_a_done_ramp_whose_plan_grows_goes_on() -> None:
    plan = replace(PLAN, steps=(1.0, 5.0, 25.0, 50.0, 100.0))
    done = at_step(3, state="done", plan=replace(PLAN, steps=(1.0, 5.0, 25.0, 50.0)))
    moved = decide(plan, done, Window(), HEALTHY, 5.0)
    assert (moved.step_percent, moved.state, moved.since) == (50.0, "advancing", 5.0)


def test_a_reply_ratio_of_replies_under_100_ms_apart_is_shown_but_not_judged() -> None:
    fast = replace(GREEN, reply_new_sum=0.4, reply_old_sum=0.1)  # 4 ms against 1 ms: a ratio of 4
    ratio = judge(GatesConfig(), fast)[3]
    assert (ratio.value, ratio.ok, ratio.judged) == (4.0, True, False)
    assert ratio.words() == "reply_ratio 4 > 1.5 (new ÷ old average reply, 0.004 s ÷ 0.001 s; not judged under 100 ms apart)"
    assert decide(PLAN, at_step(1), fast, HEALTHY, HOLD).step_percent == 25.0


def test_gates_without_data_do_not_block() -> None:
    verdicts = judge(GatesConfig(), Window(attempted=3, opened=3))
    assert [gate.ok for gate in verdicts] == [True, True, True, True]
    assert [gate.value for gate in verdicts][2:] == [None, None]


def test_the_record_round_trips_and_a_broken_one_is_none() -> None:
    progress = at_step(2)
    assert Progress.from_record(progress.as_record()) == progress
    assert Progress.from_record({**progress.as_record(), "state": "sideways"}) is None
    assert Progress.from_record({**progress.as_record(), "step_index": 9}) is None
    assert Progress.from_record("garbage") is None


def test_window_arithmetic_and_a_hostile_published_window() -> None:
    assert GREEN + GREEN - GREEN == GREEN
    assert Window.from_dict({"attempted": "many", "opened": -1, "reply_new_sum": 1.5}) == Window(reply_new_sum=1.5)
