"""Which backend a user gets: a pure function of the rollout config and the user id.

The bucket is LaunchDarkly's: the first 15 hex digits of SHA-1 over ``"{salt}.{user_id}"``,
read as an integer and divided by ``0xFFFFFFFFFFFFFFF``, times 100. It is stable across
processes and replicas (no ``hash()``), uniform, and monotonic in the percentage: a user
goes to the new backend when ``bucket < new_percent``, so raising the percentage only ever
moves users from old to new. Any system can reproduce it::

    python3 -c 'import hashlib,sys; h=hashlib.sha1(f"{sys.argv[1]}.{sys.argv[2]}".encode()).hexdigest(); print(int(h[:15],16)/0xFFFFFFFFFFFFFFF*100)' SALT USER
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from .config import RolloutConfig

Backend = Literal["old", "new"]
_SCALE = 0xFFFFFFFFFFFFFFF


def bucket(salt: str, user_id: str) -> float:
    """The user's position in [0, 100]."""
    digest = hashlib.sha1(f"{salt}.{user_id}".encode("utf-8")).hexdigest()
    return int(digest[:15], 16) / _SCALE * 100.0


@dataclass(frozen=True)
class Route:
    backend: Backend
    reason: Literal["force_new", "force_old", "bucket", "guard"]
    bucket: float | None = None
    new_percent: float | None = None

    def explain(self) -> str:
        if self.reason == "guard":
            return "held back by the rollback guard"
        if self.reason != "bucket":
            return f"forced by rollout.{self.reason}"
        relation = "<" if self.backend == "new" else ">="
        return f"bucket {self.bucket:.4f} {relation} percentage {self.new_percent:g}"


def held_back(chosen: Route, rollout: RolloutConfig, share: float, blocks_forced: bool) -> Route:
    """`chosen`, or the old backend when the rollback guard holds this user back.

    `share` is the fraction of the configured percentage the guard lets through now;
    `blocks_forced` whether it also holds back users in ``force_new``. Only the highest
    buckets are held back, so routing stays monotonic while the guard recovers.
    """
    if chosen.backend != "new" or share >= 1.0:
        return chosen
    if chosen.reason == "force_new":
        return Route("old", "guard") if blocks_forced else chosen
    effective = rollout.new_percent * share
    assert chosen.bucket is not None
    return chosen if chosen.bucket < effective else Route("old", "guard", chosen.bucket, effective)


def choose_backend(user_id: str, rollout: RolloutConfig) -> Route:
    if user_id in rollout.force_new:
        return Route("new", "force_new")
    if user_id in rollout.force_old:
        return Route("old", "force_old")
    position = bucket(rollout.salt, user_id)
    chosen: Backend = "new" if rollout.new_percent >= 100.0 or position < rollout.new_percent else "old"
    return Route(chosen, "bucket", position, rollout.new_percent)
