"""`ws-gateway drill`: its pure helpers, and the short drill run as ops run it (it is also the
CI check that fallback, the guard and the close codes hold up when the new backend breaks)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from gateway.drill import SHORT, Outcome, describe, percentile, pick_users, run_drill

from .helpers import make_config

DRILL_SECONDS = 50.0  # the short drill takes about 12 s on a quiet machine; bounded well under pytest's 60


def test_pick_users_splits_them_between_the_backends() -> None:
    config = make_config(rollout={"new_percent": 50})
    users = pick_users(config, 7)
    assert [backend for _, backend in users].count("new") == 3
    assert [backend for _, backend in users].count("old") == 4
    assert len({user for user, _ in users}) == 7


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.95) is None
    assert percentile([0.3, 0.1, 0.2], 0.5) == 0.2
    assert percentile([float(n) for n in range(1, 101)], 0.95) == 95.0


def test_describe_counts_served_sessions_and_closes() -> None:
    outcomes = [
        Outcome("a", "legacy", "old", served_by="old", reply_seconds=0.01),
        Outcome("b", "message", "new", close_code=1008),
        Outcome("c", "message", "new", close_code=1008),
        Outcome("d", "legacy", "new", problem="timed out"),
    ]
    assert describe(outcomes) == (
        "4 sessions: 1 served (old 1, new 0); closed by the gateway: 2\u00d71008; "
        "1 client problems (first: timed out); reply p95 old 10 ms"
    )


async def test_drill_stopped_before_it_starts_reports_so() -> None:
    stop = asyncio.Event()
    stop.set()
    lines: list[str] = []
    assert await run_drill(SHORT, lines.append, stop=stop) is None
    assert lines[-1] == "stopped before the drill was over"


def test_short_drill_passes_every_step(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "drill", "--short"],
        cwd=tmp_path, capture_output=True, text=True, timeout=DRILL_SECONDS,
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line for line in lines if line.startswith("[")]
    assert [line.split("] ", 1)[1] for line in steps] == [
        "healthy backends: PASS", "slow replies: PASS", "tokens rejected: PASS", "new backend down: PASS",
        "still down, guard open: PASS", "new backend healed: PASS", "sessions dropped: PASS",
    ]
    assert not [line for line in lines if line.startswith("  FAIL")]
    assert lines[-1] == "drill passed: 7 steps, 23 checks"
    assert lines[1].startswith("status page: http://127.0.0.1:")
    assert "eyJ" not in result.stdout + result.stderr
