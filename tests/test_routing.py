"""Routing: a user's backend is a pure, stable, monotonic and uniform function of (rollout, user id)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.core import routing
from gateway.core.config import ConfigError, RolloutConfig
from gateway.core.routing import Route, bucket, choose_backend

from .helpers import make_config

SALT = "chat-auth-migration"
ROOT = Path(__file__).resolve().parent.parent


def rollout(**changes: object) -> RolloutConfig:
    """The one valid rollout (10 % new, no overrides), changed one field at a time."""
    return replace(RolloutConfig(new_percent=10.0, salt=SALT), **changes)


def reference_bucket(salt: str, user_id: str) -> float:
    """The documented formula, written out independently of the module under test."""
    digest = hashlib.sha1((salt + "." + user_id).encode("utf-8")).digest()
    first_15_hex_digits = int.from_bytes(digest[:8], "big") >> 4
    return first_15_hex_digits / (16**15 - 1) * 100


def ids(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"user-{rng.getrandbits(64):016x}" for _ in range(count)]


# -- the formula -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("salt", "user_id", "expected"),
    [
        ("chat-auth-migration", "alice", 4.9544548189945115),
        ("chat-auth-migration", "bob", 53.1480711592368),
        ("chat-auth-migration", "12345", 69.57844436679687),
        ("chat-auth-migration", "josé", 24.596621923489003),
        ("test-salt", "alice", 25.6000455168392),
    ],
)
def test_bucket_golden_values_are_pinned(salt: str, user_id: str, expected: float) -> None:
    assert bucket(salt, user_id) == expected


@pytest.mark.parametrize("user_id", ["alice", "bob", "42", "", "josé", "用户-7", "a.b.c", "x" * 300])
@pytest.mark.parametrize("salt", ["chat-auth-migration", "s", "salt.with.dots"])
def test_bucket_is_first_15_hex_digits_of_sha1_of_salt_dot_user_over_0xfff_fffff(salt: str, user_id: str) -> None:
    assert bucket(salt, user_id) == reference_bucket(salt, user_id)


def test_bucket_depends_on_the_salt() -> None:
    assert bucket("salt-a", "alice") != bucket("salt-b", "alice")


def test_bucket_lies_in_0_to_100() -> None:
    assert all(0.0 <= bucket(SALT, user) < 100.0 for user in ids(2000, seed=1))


def test_documented_one_liner_reproduces_the_bucket() -> None:
    doc_lines = [line.strip() for line in (routing.__doc__ or "").splitlines()]
    (command,) = [line for line in doc_lines if line.startswith("python3 -c")]
    argv = shlex.split(command)
    assert argv[-2:] == ["SALT", "USER"]
    result = subprocess.run(
        [sys.executable, *argv[1:-2], SALT, "alice"], capture_output=True, text=True, check=True, timeout=30
    )
    assert float(result.stdout) == pytest.approx(bucket(SALT, "alice"), abs=1e-12)


def test_bucket_is_identical_across_processes_with_different_hash_seeds() -> None:
    users = ids(200, seed=2) + ["alice", "josé", ""]
    script = "import json,sys; from gateway.core.routing import bucket; print(json.dumps([bucket(sys.argv[1], u) for u in json.loads(sys.stdin.read())]))"
    seen = []
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", script, SALT],
            input=json.dumps(users),
            capture_output=True,
            text=True,
            check=True,
            env=env,
            cwd=ROOT,
            timeout=30,
        )
        seen.append(json.loads(result.stdout))
    assert seen[0] == seen[1] == [bucket(SALT, u) for u in users]


# -- choose_backend ----------------------------------------------------------------------------


def test_user_below_the_percentage_goes_new_with_bucket_reason() -> None:
    route = choose_backend("alice", rollout(new_percent=10.0))  # alice's bucket is ~4.95
    assert route == Route("new", "bucket", bucket(SALT, "alice"), 10.0)


def test_user_at_or_above_the_percentage_goes_old_with_bucket_reason() -> None:
    route = choose_backend("bob", rollout(new_percent=10.0))  # bob's bucket is ~53.1
    assert route == Route("old", "bucket", bucket(SALT, "bob"), 10.0)


def test_user_whose_bucket_equals_the_percentage_stays_old() -> None:
    position = bucket(SALT, "bob")
    assert choose_backend("bob", rollout(new_percent=position)).backend == "old"
    assert choose_backend("bob", rollout(new_percent=math.nextafter(position, 100.0))).backend == "new"


def test_fractional_percentages_are_honoured() -> None:
    assert 4.95 < bucket(SALT, "alice") < 4.96
    assert choose_backend("alice", rollout(new_percent=4.95)).backend == "old"
    assert choose_backend("alice", rollout(new_percent=4.96)).backend == "new"


def test_force_new_wins_over_a_zero_percentage() -> None:
    route = choose_backend("bob", rollout(new_percent=0.0, force_new=frozenset({"bob"})))
    assert route == Route("new", "force_new")


def test_force_old_wins_over_a_hundred_percentage() -> None:
    route = choose_backend("alice", rollout(new_percent=100.0, force_old=frozenset({"alice"})))
    assert route == Route("old", "force_old")


def test_force_lists_only_affect_the_users_they_name() -> None:
    config = rollout(force_new=frozenset({"bob"}), force_old=frozenset({"alice"}))
    assert choose_backend("carol", config) == choose_backend("carol", rollout())


def test_force_lists_match_the_exact_user_id() -> None:
    config = rollout(new_percent=0.0, force_new=frozenset({"bob"}))
    assert choose_backend("Bob", config).backend == "old"
    assert choose_backend("bob ", config).backend == "old"


def test_user_in_both_force_lists_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="rollout.force_new"):
        make_config(rollout={"force_new": ["alice"], "force_old": ["alice"]})


def test_zero_percent_routes_nobody_new() -> None:
    config = rollout(new_percent=0.0)
    assert {choose_backend(u, config).backend for u in ids(2000, seed=3)} == {"old"}


def test_hundred_percent_routes_everybody_new() -> None:
    config = rollout(new_percent=100.0)
    assert {choose_backend(u, config).backend for u in ids(2000, seed=3)} == {"new"}


def test_raising_the_percentage_never_moves_anyone_from_new_to_old() -> None:
    users = ids(2000, seed=4)
    steps = [0.0, 0.5, 1.0, 5.0, 10.0, 10.01, 25.0, 37.5, 50.0, 75.0, 99.0, 99.99, 100.0]
    previous: set[str] = set()
    sizes = []
    for percent in steps:
        config = rollout(new_percent=percent)
        routed_new = {u for u in users if choose_backend(u, config).backend == "new"}
        assert previous <= routed_new, f"users moved new -> old when raising to {percent}"
        previous = routed_new
        sizes.append(len(routed_new))
    assert sizes[0] == 0 and sizes[-1] == len(users) and len(set(sizes)) > 5


@pytest.mark.parametrize("percent", [10.0, 37.5, 90.0])
def test_share_routed_new_is_within_one_point_of_the_percentage(percent: float) -> None:
    users = ids(100_000, seed=5)
    config = rollout(new_percent=percent)
    routed_new = sum(choose_backend(u, config).backend == "new" for u in users)
    assert abs(routed_new / len(users) * 100 - percent) <= 1.0


def test_explain_names_the_override() -> None:
    assert choose_backend("bob", rollout(force_new=frozenset({"bob"}))).explain() == "forced by rollout.force_new"
    assert choose_backend("bob", rollout(force_old=frozenset({"bob"}))).explain() == "forced by rollout.force_old"


def test_explain_compares_bucket_with_percentage() -> None:
    assert choose_backend("alice", rollout(new_percent=10.0)).explain() == "bucket 4.9545 < percentage 10"
    assert choose_backend("bob", rollout(new_percent=37.5)).explain() == "bucket 53.1481 >= percentage 37.5"


def test_a_route_held_back_by_the_guard_explains_itself_without_naming_a_backend():
    assert Route("old", "guard").explain() == "held back by the rollback guard"
