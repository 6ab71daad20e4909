"""The soak's short form (bench/soak.py --short): a real gateway process, hundreds of mixed
sessions, a backend restart and a percentage change midway; nothing lost, nothing leaked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def test_the_short_soak_passes():
    result = subprocess.run(
        [sys.executable, str(SOAK), "--short"], capture_output=True, text=True, timeout=180, check=False
    )
    summary = [line for line in result.stdout.splitlines() if line.startswith("soak:")]
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary and summary[-1].endswith("PASS")
    assert " lost 0," in summary[-1] and " corrupted 0;" in summary[-1]
