"""`ws-gateway drill`, its short form run as ops run it: the CI check that a ramp with a failing
new backend costs the apps nothing, and (``--ramp``) that the automatic ramp stops at the
fault and finishes after the heal. Its plan, table and verdict: tests/test_drill_plan.py."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.staging.drill import run_drill
from gateway.staging.drill_plan import Plan

SHORT = ("--duration", "21", "--steps", "0,50,100")  # 7 s per step; about 25 s in all
# A 6.7 s hold: the ramp 10 -> 50 (the fault) -> back to 10 -> 50 -> 100 is done by about 27 s.
SHORT_RAMP = ("--ramp", "--duration", "40", "--steps", "10,50,100")
DRILL_SECONDS = 55.0  # the bound on the short drill's process, under pytest's 60


# -- the run --------------------------------------------------------------------------------------


async def test_drill_stopped_before_it_starts_reports_so() -> None:
    stop = asyncio.Event()
    stop.set()
    lines: list[str] = []
    assert await run_drill(Plan(), lines.append, stop) is None
    assert lines == ["stopped before the drill was over"]


def run_cli(*args: str, cwd: Path, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_short_drill_has_no_app_visible_failure_and_the_guard_trips_and_recovers(tmp_path: Path) -> None:
    result = run_cli("drill", *SHORT, cwd=tmp_path, timeout=DRILL_SECONDS)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("step  new %"))
    rows = [line.split() for line in lines[header + 1 : header + 4]]  # read from the right: "30% fail" is two words
    assert [row[1] for row in rows] == ["0", "50", "100"]
    assert [row[-7] for row in rows] == ["0", "0", "0"]  # failed, as the apps saw it
    assert int(rows[1][-5]) >= 1  # trips during the fault
    assert rows[2][-4] == "healthy"  # recovered by the end
    assert re.fullmatch(
        r"verdict: PASS: 0 app-visible failures in \d+ sessions; the guard tripped (once|\d+ times) and recovered; "
        r"usage shows 30\.0% legacy users \(--legacy-share 30%\)",
        lines[-1],
    ), lines[-1]
    assert "eyJ" not in result.stdout + result.stderr


def test_short_ramp_drill_stops_at_the_fault_and_is_done_after_the_heal(tmp_path: Path) -> None:
    result = run_cli("drill", *SHORT_RAMP, cwd=tmp_path, timeout=DRILL_SECONDS)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("leg  at s"))
    end = lines.index("", header)
    legs = []
    for line in lines[header + 1 : end]:
        cells = line.split()
        backend = cells[4] + (" fail" if cells[5] == "fail" else "")  # "30% fail" is two words
        failed = cells[4 + len(backend.split()) + 2]
        legs.append((cells[2], cells[3], backend, failed))
    if legs[3] == ("10", "holding", "healthy", "0"):  # the fault's last handshakes, counted after the step back
        del legs[3]
    assert legs == [
        ("10", "advancing", "healthy", "0"),
        ("50", "advancing", "30% fail", "0"),
        ("10", "stepped_back", "healed", "0"),
        ("50", "advancing", "healthy", "0"),
        ("100", "done", "healthy", "0"),
    ], result.stdout
    assert re.fullmatch(
        r"verdict: PASS: 0 app-visible failures in \d+ sessions; the ramp stopped at the failed gate: "
        r"(the rollback guard tripped|[a-z_ ]+ failed), stepped back from 50% to 10%( \(after the heal .*\))?; "
        r"the ramp reached 100% \(done\) at [\d.]+ s, [\d.]+ s after the heal; usage shows 30\.0% legacy users \(--legacy-share 30%\)",
        lines[-1],
    ), lines[-1]
    assert "eyJ" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--steps", "0,100"), "error: --steps needs 3 to 20 percentages (a step before, during and after the fault), got 2"),
        (("--steps", "0,x"), "argument --steps: 'x' is not a percentage"),
        (("--duration", "5"), "argument --duration: 5 is out of range [6, 3600]"),
        (("--ramp", "--steps", "0,50,100"), "error: --ramp needs 3 to 20 steps above 0 in --steps"),
    ],
)
def test_drill_refuses_a_plan_it_cannot_run(tmp_path: Path, args: tuple[str, ...], error: str) -> None:
    result = run_cli("drill", *args, cwd=tmp_path)
    assert result.returncode == 2 and error in result.stderr, result.stderr
