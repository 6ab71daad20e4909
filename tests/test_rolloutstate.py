"""`RolloutState`: the config in force, reload's restart-only keys, and the guard's hold on routing."""

from __future__ import annotations

from dataclasses import replace

from gateway.core.guard import GuardState
from gateway.service.rolloutstate import RolloutState

from .helpers import make_config

GUARD = {"min_samples": 1, "max_failure_ratio": 0.5, "cooldown_seconds": 60, "step_seconds": 30, "recovery_steps": [50, 100]}


def test_apply_swaps_the_config_and_verifier_and_stamps_the_time() -> None:
    state = RolloutState(make_config(), None, config_path="/etc/gw.yaml")
    before = state.verifier
    config = make_config(rollout={"new_percent": 40})
    assert state.apply(config, 1_700_000_000.0) == []
    assert (state.config, state.loaded_at) == (config, 1_700_000_000.0)
    assert state.verifier is not before
    assert state.status(0.0, str)["config_file"] == "/etc/gw.yaml"


def test_reloaded_keeps_restart_keys_and_names_them() -> None:
    state = RolloutState(make_config(), None)
    changed = make_config(rollout={"new_percent": 30}, listen={"port": 9999})
    config, stuck = state.reloaded(changed)
    assert stuck == ["listen"]
    assert config.listen == state.config.listen and config.rollout.new_percent == 30
    assert state.reloaded(make_config(rollout={"new_percent": 30})) == (make_config(rollout={"new_percent": 30}), [])


def test_a_tripped_guard_holds_routing_and_the_effective_percent_back() -> None:
    state = RolloutState(make_config(rollout={"new_percent": 100, "guard": GUARD}), None)
    assert state.route("alice").backend == "new"
    [trip] = state.guard.record(True, 10.0)
    assert trip.state is GuardState.TRIPPED
    assert state.route("alice").backend == "old"
    assert state.effective_percent() == 0.0
    guard = state.status(40.0, lambda at: f"t{at:g}")["guard"]
    assert (guard["state"], guard["since"], guard["retries_at"], guard["retries_in_seconds"]) == ("tripped", "t10", "t70", 30.0)


def test_rebalancing_ignores_the_guard_unless_on_guard_trip() -> None:
    config = make_config(rollout={"new_percent": 100, "guard": GUARD, "rebalance": {"enabled": True, "on_guard_trip": False}})
    state = RolloutState(config, None)
    state.guard.record(True, 0.0)
    assert state.held_back_by_guard() == (1.0, False)
    rebalance = replace(config.rollout.rebalance, on_guard_trip=True)
    state.apply(replace(config, rollout=replace(config.rollout, rebalance=rebalance)), 0.0)
    assert state.held_back_by_guard() == (0.0, True)


def test_the_ramps_step_replaces_the_files_percentage_while_the_ramp_is_on() -> None:
    ramp = {"new_percent": 0, "ramp": {"enabled": True, "steps": [25, 100]}}
    state = RolloutState(make_config(rollout=ramp), None)
    assert state.effective_percent() == 0.0  # no step known yet: the file's percentage
    assert state.follow_ramp(25.0)
    assert not state.follow_ramp(25.0)
    assert (state.routing.new_percent, state.effective_percent()) == (25.0, 25.0)
    assert state.route("alice").new_percent == 25.0

    state.apply(make_config(rollout={**ramp, "ramp": {"enabled": False}}), 0.0)
    assert state.effective_percent() == 0.0  # off: back to rollout.new_percent
    state.apply(make_config(rollout=ramp), 0.0)
    assert state.effective_percent() == 25.0  # on again: the step it knew
