"""One PNG of a bench/run.py result: throughput, proxy CPU per unit, latency and memory per path.

    python bench/plot.py results.json out.png      # or `bench/run.py --plot out.png`
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PATHS = (("direct", "direct", "#9e9e9e"), ("nginx", "nginx, 1 worker", "#2e7d32"), ("gateway", "ws-gateway", "#1565c0"))
PANELS = (
    ("echoed messages per second", (("sat64", "msgs_per_s", "64 B"), ("satlarge", "msgs_per_s", "4 KiB"),
                                    ("deflate64", "msgs_per_s", "deflate 64 B"))),
    ("proxy CPU per echoed message, µs", (("sat64", "cpu_us_per_msg", "64 B"), ("satlarge", "cpu_us_per_msg", "4 KiB"),
                                          ("deflate64", "cpu_us_per_msg", "deflate 64 B"))),
    ("round trip at a fixed rate, ms", (("latency", "p50_ms", "p50"), ("latency", "p90_ms", "p90"),
                                        ("latency", "p99_ms", "p99"))),
    ("set-up and idle cost", (("setup", "cpu_us_per_setup", "CPU per set-up, µs"),
                              ("idle", "kib_per_session", "RSS per idle session, KiB"))),
)


def value(medians: dict[str, Any], path: str, scenario: str, key: str) -> float:
    """The median, or 0 where a path was not measured (direct has no proxy CPU: its row is the backend's)."""
    if path == "direct" and key in ("cpu_us_per_msg", "cpu_us_per_setup", "kib_per_session"):
        return 0.0
    got = medians.get(path, {}).get(scenario, {}).get(key)
    return float(got) if isinstance(got, (int, float)) else 0.0


def plot(result: dict[str, Any], out: Path) -> None:
    medians = result["medians"]
    fig, grid = plt.subplots(2, 2, figsize=(11, 8))
    axes = list(grid.flat)
    width = 0.8 / len(PATHS)
    for ax, (title, bars) in zip(axes, PANELS):
        for i, (path, label, colour) in enumerate(PATHS):
            heights = [value(medians, path, scenario, key) for scenario, key, _ in bars]
            ax.bar([x + i * width for x in range(len(bars))], heights, width, label=label, color=colour)
        ax.set_xticks([x + width for x in range(len(bars))], [name for _, _, name in bars], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    meta = result.get("meta", {})
    machine = meta.get("machine", {})
    fig.suptitle(f"ws-gateway vs nginx — {machine.get('cores', '?')} cores, {machine.get('cpu', '')}, "
                 f"{meta.get('date', '')[:10]} (medians; direct has no proxy, so no proxy CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python bench/plot.py results.json out.png")
    plot(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
