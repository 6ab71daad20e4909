"""What the bench scripts share: loopback ports, and starting a process under test.

Imported as ``common`` by the scripts beside it (``python bench/run.py`` puts this folder
first on the import path).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


class StartFailed(Exception):
    """A process under test exited or did not listen in time; the message says which and where its log is."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_listening(
    name: str, argv: list[str], port: int, log_path: Path, *, timeout: float, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start `argv` with its output appended to `log_path`, and wait (bounded) until it
    accepts connections on 127.0.0.1:`port`.

    In its own session, so its whole tree is one process group that `os.killpg` stops
    (a gateway with workers), and a Ctrl-C meant for the script does not reach it first.
    """
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd
        )
    deadline = time.monotonic() + timeout
    while not port_open(port):  # bounded readiness poll: a process offers no event to await
        if proc.poll() is not None:
            raise StartFailed(f"{name} exited with {proc.returncode} at start: see {log_path}")
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise StartFailed(f"{name} did not listen on 127.0.0.1:{port} within {timeout:g} s: see {log_path}")
        time.sleep(0.05)
    return proc
