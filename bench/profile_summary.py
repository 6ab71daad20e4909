"""Where the time goes, from a py-spy ``--format raw`` (folded stacks) recording.

    python bench/profile_summary.py gateway-setup.folded

Prints the functions with the largest share of samples, inclusive (the function and what it
calls) and self (the function's own frames, native ones included with ``--native``).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

TOP = 25
# "name (path/to/file.py:123)" -> "name (file.py)": lines differ across a function's samples.
FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^():]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{match['name']} ({Path(match['file']).name})"


def summarise(path: Path) -> dict[str, Any]:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";")]
        # The first frame is the process/thread header py-spy adds; it is in every sample.
        frames = frames[1:] or frames
        total += n
        for name in set(frames):
            inclusive[name] += n
        own[frames[-1]] += n
    lines = [f"{total} samples ({path.name})", "", "inclusive %  function"]
    lines += [f"{100 * n / total:10.1f}   {name}" for name, n in inclusive.most_common(TOP)] if total else []
    lines += ["", "self %       function"]
    lines += [f"{100 * n / total:10.1f}   {name}" for name, n in own.most_common(TOP)] if total else []
    return {
        "samples": total,
        "inclusive": {k: round(100 * v / total, 1) for k, v in inclusive.most_common(TOP)} if total else {},
        "self": {k: round(100 * v / total, 1) for k, v in own.most_common(TOP)} if total else {},
        "text": "\n".join(lines) + "\n",
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/profile_summary.py FILE.folded")
    print(summarise(Path(sys.argv[1]))["text"], end="")
