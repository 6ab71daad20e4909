"""The rollback guard as a pure state machine, driven with an explicit clock."""

from dataclasses import replace

from gateway.core.config import GuardConfig
from gateway.core.guard import Guard, GuardState

CONFIG = GuardConfig(
    window_seconds=60, max_failure_ratio=0.2, min_samples=10, cooldown_seconds=30, step_seconds=10,
    recovery_steps=(10.0, 50.0, 100.0),
)


def feed(guard: Guard, failures: int, successes: int, at: float = 0.0) -> None:
    for _ in range(successes):
        guard.record(False, at)
    for _ in range(failures):
        guard.record(True, at)


def test_guard_stays_closed_below_min_samples_even_if_all_fail():
    guard = Guard(CONFIG)
    feed(guard, failures=9, successes=0)
    assert guard.state is GuardState.HEALTHY and guard.share() == 1.0


def test_guard_trips_when_failure_ratio_exceeds_threshold_with_enough_samples():
    guard = Guard(CONFIG)
    feed(guard, failures=3, successes=7)
    assert guard.state is GuardState.TRIPPED
    assert guard.share() == 0.0 and guard.trips == 1


def test_guard_does_not_trip_at_exactly_the_threshold():
    guard = Guard(CONFIG)
    feed(guard, failures=2, successes=8)
    assert guard.state is GuardState.HEALTHY


def test_failures_older_than_the_window_do_not_count():
    guard = Guard(CONFIG)
    feed(guard, failures=2, successes=0, at=0.0)
    feed(guard, failures=1, successes=9, at=61.0)
    assert guard.state is GuardState.HEALTHY


def test_open_guard_blocks_forced_users_unless_spared():
    guard = Guard(CONFIG)
    feed(guard, failures=10, successes=0)
    assert guard.blocks_forced()
    spared = Guard(replace(CONFIG, spare_forced=True))
    feed(spared, failures=10, successes=0)
    assert spared.state is GuardState.TRIPPED and not spared.blocks_forced()


def test_guard_recovers_step_by_step_after_cooldown_then_closes():
    guard = Guard(CONFIG)
    feed(guard, failures=10, successes=0, at=100.0)
    assert guard.tick(129.9) == [] and guard.state is GuardState.TRIPPED
    [first] = guard.tick(130.0)
    assert first.state is GuardState.RECOVERING and guard.share() == 0.1
    guard.tick(140.0)
    assert guard.share() == 0.5
    guard.tick(150.0)
    assert guard.state is GuardState.RECOVERING and guard.share() == 1.0
    transitions = guard.tick(160.0)
    assert guard.state is GuardState.HEALTHY and guard.share() == 1.0
    assert "recovered" in transitions[-1].detail


def test_a_long_pause_walks_through_every_step_at_once():
    guard = Guard(CONFIG)
    feed(guard, failures=10, successes=0, at=0.0)
    transitions = guard.tick(10_000.0)
    assert [t.state for t in transitions] == [GuardState.RECOVERING] * 3 + [GuardState.HEALTHY]


def test_failures_while_recovering_trip_the_guard_again():
    guard = Guard(CONFIG)
    feed(guard, failures=10, successes=0, at=0.0)
    guard.tick(30.0)
    assert guard.state is GuardState.RECOVERING
    feed(guard, failures=5, successes=5, at=31.0)
    assert guard.state is GuardState.TRIPPED and guard.trips == 2


def test_outcomes_are_ignored_while_open():
    guard = Guard(CONFIG)
    feed(guard, failures=10, successes=0, at=0.0)
    feed(guard, failures=50, successes=0, at=1.0)
    assert guard.trips == 1


def test_disabled_guard_never_trips_and_disabling_closes_an_open_one():
    off = Guard(replace(CONFIG, enabled=False))
    feed(off, failures=20, successes=0)
    assert off.state is GuardState.HEALTHY and off.share() == 1.0
    guard = Guard(CONFIG)
    feed(guard, failures=20, successes=0)
    guard.configure(replace(CONFIG, enabled=False))
    assert guard.state is GuardState.HEALTHY and guard.share() == 1.0


def test_share_only_ever_rises_during_recovery():
    guard = Guard(CONFIG)
    feed(guard, failures=10, successes=0)
    shares = []
    for t in range(0, 80):
        guard.tick(float(t))
        shares.append(guard.share())
    assert shares == sorted(shares) and shares[-1] == 1.0
