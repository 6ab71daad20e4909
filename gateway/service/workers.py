"""``ws-gateway serve --workers N``: one supervisor process, N gateway processes on one port.

The supervisor validates the config (a bad one exits 2 before any worker exists), binds
the public address itself **without listening**, with SO_REUSEPORT (so port 0 becomes one
port for every worker, a port in use fails at once, and the port stays ours while a worker
restarts; a socket that never listens gets no connections), then starts N workers:
``python -m gateway serve --config FILE --worker-fd FD``.

A worker is today's single gateway (`server.serve`) with four differences:

1. Its setup comes from the supervisor over a private socketpair (`WorkerSetup`: its
   number, the supervisor's config and file fingerprint, the port, its admin socket), so
   every worker — a restarted one too — starts from the config the supervisor validated
   and then applies whatever edit the file watcher would have applied.
2. It listens on the public port with SO_REUSEPORT: the kernel spreads new connections
   across the workers, nothing is proxied through the supervisor.
3. Its admin app listens on a unix socket in a private (0700) temporary directory named
   after the supervisor's pid (`reserve.socket_dir`), for the supervisor's admin port to read. A
   worker removes its socket as it exits; a supervisor starting removes the directories of
   supervisors no longer running, so even SIGKILL to the whole group leaves nothing behind.
4. It says ``ready`` on the socketpair once it listens, and follows the supervisor's
   commands there: ``drain`` (a first SIGTERM; idempotent, because the same SIGTERM or
   Ctrl-C may also have reached the worker directly through its process group), ``urgent``
   (a second SIGTERM/SIGINT: close everything now) and ``reload`` (SIGHUP). End of file on
   the socketpair means the supervisor is gone, however it died: the worker closes every
   session with 1012 and exits, so no worker outlives its supervisor.

The supervisor restarts a worker that exits while it is not stopping (at once the first
time, then with a doubling delay while it keeps dying within `STABLE_SECONDS`), says
"listening" once every worker listens, serves the one admin port
(`admin.create_supervisor_admin_app`), and on SIGTERM/SIGINT drains every worker and exits
0 once all have exited. Log lines of a worker carry a ``worker`` field (its number).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics import parser as openmetrics

from .admin import create_supervisor_admin_app, merge_metrics
from ..core.config import Config
from .reload import Fingerprint
from .reserve import reserve_port, socket_dir
from .server import Signals, run, serve, start_site

log = logging.getLogger("gateway")

STABLE_SECONDS = 10.0  # a worker that ran this long before it died is restarted at once
FIRST_RESTART_SECONDS = 0.1
MAX_RESTART_SECONDS = 10.0
SCRAPE_TIMEOUT = 5.0  # per worker, for the supervisor's /metrics and /rollout
_LENGTH = struct.Struct("!I")
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def restart_delay(quick_failures: int) -> float:
    """Seconds before restarting a worker that died `quick_failures` times in a row, each
    within `STABLE_SECONDS` of starting: 0 when it had been running fine, then 0.1 s,
    doubling up to `MAX_RESTART_SECONDS` (a worker that cannot start does not spin)."""
    if quick_failures <= 0:
        return 0.0
    return min(MAX_RESTART_SECONDS, FIRST_RESTART_SECONDS * (1 << min(quick_failures - 1, 20)))


def exit_status(returncode: int) -> dict[str, Any]:
    """How a process ended, for a log line: its exit code, or the signal that killed it."""
    if returncode < 0:
        try:
            return {"signal": signal.Signals(-returncode).name}
        except ValueError:
            return {"signal": -returncode}
    return {"exit_code": returncode}


# -- the worker's side ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSetup:
    """What the supervisor tells a worker before anything else (pickled on the socketpair,
    never on the command line: the config holds the secret)."""

    number: int  # 1..N, kept across restarts
    config: Config
    seen: Fingerprint | None
    port: int
    admin_path: str


class WorkerFilter(logging.Filter):
    """Adds ``worker: N`` to every record a handler writes, whichever logger it came from."""

    def __init__(self, number: int) -> None:
        super().__init__()
        self.number = number

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.number
        return True


def tag_log_lines(number: int) -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(WorkerFilter(number))


class WorkerChannel:
    """A worker's end of the socketpair to its supervisor."""

    def __init__(self, sock: socket.socket, setup: WorkerSetup) -> None:
        self.sock = sock
        self.setup = setup
        self.port = setup.port
        self.admin_path = setup.admin_path
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def open(cls, fd: int) -> WorkerChannel:
        """Read the setup (blocking: nothing else runs yet)."""
        sock = socket.socket(fileno=fd)
        try:
            (length,) = _LENGTH.unpack(_read_exactly(sock, _LENGTH.size))
            setup = pickle.loads(_read_exactly(sock, length))
        except BaseException:
            sock.close()
            raise
        if not isinstance(setup, WorkerSetup):
            sock.close()
            raise TypeError("the supervisor sent no worker setup")
        return cls(sock, setup)

    async def follow(self, signals: Signals, reload: Callable[[], object] | None) -> None:
        """Start taking commands from the supervisor: drain, urgent, reload."""
        reader, self._writer = await asyncio.open_unix_connection(sock=self.sock)
        self._task = asyncio.create_task(self._follow(reader, signals, reload))

    async def _follow(self, reader: asyncio.StreamReader, signals: Signals, reload: Callable[[], object] | None) -> None:
        while command := (await reader.readline()).strip():
            if command == b"drain":
                if not signals.stop.is_set():
                    log.info("the supervisor asks to drain")
                signals.request_stop()
            elif command == b"urgent":
                log.info("the supervisor asks to close every session now")
                signals.request_stop(urgent=True)
            elif command == b"reload":
                log.info("the supervisor asks to reload the config")
                if reload is not None:
                    reload()
        log.warning("supervisor gone: closing every session and exiting")
        signals.request_stop(urgent=True)

    def ready(self) -> None:
        assert self._writer is not None
        self._writer.write(b"ready\n")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()
        else:
            self.sock.close()


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the supervisor closed the channel before sending the worker setup")
        data += chunk
    return bytes(data)


def run_worker(fd: int, config_path: str, setup_logging: Callable[[Config], None]) -> int:
    """The body of ``serve --worker-fd FD``: read the setup, then serve as worker N.

    On the way out it removes its admin socket, and the directory once that is empty: a
    supervisor killed with SIGKILL cannot, and its workers outlive it long enough to.
    """
    channel = WorkerChannel.open(fd)
    setup_logging(channel.setup.config)
    tag_log_lines(channel.setup.number)
    try:
        return run(lambda: serve(channel.setup.config, config_path, channel.setup.seen, worker=channel))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(channel.admin_path)
        with contextlib.suppress(OSError):  # not empty: another worker, or the supervisor, removes it
            os.rmdir(os.path.dirname(channel.admin_path))


# -- the supervisor's side -----------------------------------------------------------------


@dataclass(eq=False)
class Worker:
    """One running worker process, as its supervisor sees it."""

    number: int
    proc: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    admin_path: str
    started: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    families: list[Metric] | None = None  # its last /metrics, kept when a scrape fails

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, command: str) -> None:
        if not self.writer.is_closing():
            with contextlib.suppress(OSError):
                self.writer.write(command.encode() + b"\n")

    async def listen_for_ready(self) -> None:
        while line := await self.reader.readline():
            if line.strip() == b"ready":
                self.ready.set()

    async def get(self, path: str, accept: str = "*/*") -> str:
        """GET `path` from the worker's admin app, on its unix socket."""
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
        connector = aiohttp.UnixConnector(path=self.admin_path)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as http,
            http.get(f"http://worker{path}", headers={"Accept": accept}) as response,
        ):
            response.raise_for_status()
            return await response.text()

    async def ask(self, path: str, params: Mapping[str, str] | None = None) -> tuple[int, Any]:
        """GET `path` from the worker's admin app: its status and JSON body, a 404 included
        (for ``/sessions/ID`` that is an answer: "not in this worker")."""
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
        connector = aiohttp.UnixConnector(path=self.admin_path)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as http,
            http.get(f"http://worker{path}", params=params) as response,
        ):
            return response.status, await response.json()


def parse_openmetrics(text: str) -> list[Metric]:
    parse: Callable[[str], Iterable[Metric]] = openmetrics.text_string_to_metric_families
    return list(parse(text))


class Supervisor:
    """Starts N workers, keeps N running, forwards signals, answers the admin port."""

    def __init__(self, config: Config, config_path: str, seen: Fingerprint | None, count: int) -> None:
        self.config = config
        self.config_path = config_path
        self.seen = seen
        self.count = count
        self.port = config.listen.port
        self.workers: dict[int, Worker] = {}
        self.restarts = 0
        self.draining = False
        self.stopping = asyncio.Event()
        self.listening = False
        self.failed: asyncio.Event = asyncio.Event()
        self.command: str | None = None  # the last stop command sent to every worker
        self.retired: list[Metric] = []  # counters and histograms of workers that exited
        self._dir = ""

    # -- what the admin app asks ----------------------------------------------------------

    def workers_ready(self) -> int:
        return sum(1 for worker in self.workers.values() if worker.ready.is_set())

    def _live(self) -> list[Worker]:
        return [self.workers[n] for n in sorted(self.workers) if self.workers[n].ready.is_set()]

    async def worker_metrics(self) -> list[list[Metric]]:
        """Every live worker's metrics (its last good scrape if it does not answer now), and the
        counters and histograms of workers that have exited, so the sums never go down when a
        worker is restarted (what it counted after its last scrape is lost)."""
        live = self._live()
        texts = await asyncio.gather(*(worker.get("/metrics", OPENMETRICS) for worker in live), return_exceptions=True)
        scraped: list[list[Metric]] = []
        for worker, text in zip(live, texts):
            if isinstance(text, str):
                with contextlib.suppress(ValueError):
                    worker.families = parse_openmetrics(text)
            elif isinstance(text, Exception):
                log.warning("worker did not answer /metrics", extra={"worker": worker.number, "error": str(text)})
            if worker.families is not None:
                scraped.append(worker.families)
        return [*scraped, self.retired]

    def own_metrics(self) -> list[Metric]:
        up = GaugeMetricFamily("ws_gateway_workers", "Worker processes listening now (serve --workers).")
        up.add_metric([], self.workers_ready())
        restarts = CounterMetricFamily(
            "ws_gateway_worker_restarts", "Worker processes restarted after exiting unexpectedly."
        )
        restarts.add_metric([], self.restarts)
        return [up, restarts]

    async def worker_rollouts(self) -> list[dict[str, Any]]:
        """Each live worker's /rollout, with its number and pid first; workers that do not answer are left out."""
        live = self._live()
        bodies = await asyncio.gather(*(worker.get("/rollout") for worker in live), return_exceptions=True)
        return [
            {"worker": worker.number, "pid": worker.pid, **json.loads(body)}
            for worker, body in zip(live, bodies)
            if isinstance(body, str)
        ]

    async def worker_answers(self, path: str, params: Mapping[str, str] | None = None) -> list[tuple[int, Any]]:
        """Each live worker's answer to GET `path` (status, JSON body), in worker order;
        workers that do not answer, or not in JSON, are left out."""
        answers = await asyncio.gather(*(worker.ask(path, params) for worker in self._live()), return_exceptions=True)
        return [answer for answer in answers if isinstance(answer, tuple)]

    # -- running --------------------------------------------------------------------------

    async def run(self) -> int:
        """Start everything, wait for a stop signal, drain every worker; the exit code."""
        runner = None
        reserved: list[socket.socket] = []
        keepers: list[asyncio.Task[None]] = []
        with Signals() as signals:
            signals.on_hangup(self.reload)
            try:
                reserved, self.port = reserve_port(self.config.listen.host, self.config.listen.port)
                self._dir = socket_dir()
                admin = self.config.admin
                if admin is not None:
                    runner, admin_port = await start_site(create_supervisor_admin_app(self), admin.host, admin.port)
                    log.info("admin listening", extra={"host": admin.host, "port": admin_port})
                for number in range(1, self.count + 1):
                    self.workers[number] = await self._spawn(number)
                keepers = [asyncio.create_task(self._keep(worker)) for worker in list(self.workers.values())]
                if not await self._started(signals):
                    self._stop(urgent=True)
                    await asyncio.gather(*keepers)
                    return 1
                if not signals.stop.is_set():
                    self.listening = True
                    log.info(
                        "listening",
                        extra={"host": self.config.listen.host, "port": self.port, "path": self.config.path, "workers": self.count},
                    )
                await signals.stop.wait()
                self._stop(urgent=False)
                everyone: asyncio.Future[Any] = asyncio.gather(*keepers)
                urgent: asyncio.Future[Any] = asyncio.create_task(signals.urgent.wait())
                await asyncio.wait({everyone, urgent}, return_when=asyncio.FIRST_COMPLETED)
                if not everyone.done():
                    self._stop(urgent=True)
                    await everyone
                urgent.cancel()
            finally:
                # Nothing is left running on the way out, whatever went wrong.
                self.stopping.set()
                self.command = "urgent"
                for worker in list(self.workers.values()):
                    with contextlib.suppress(ProcessLookupError):
                        worker.proc.kill()
                await asyncio.gather(*keepers, return_exceptions=True)
                for worker in list(self.workers.values()):  # started, but never kept (a failed start)
                    await worker.proc.wait()
                for sock in reserved:
                    sock.close()
                if runner is not None:
                    await runner.cleanup()
                if self._dir:
                    shutil.rmtree(self._dir, ignore_errors=True)
        log.info("stopped")
        return 0

    async def _started(self, signals: Signals) -> bool:
        """Until every worker listens (True), one exits first (False), or a stop signal comes (True)."""
        loop = asyncio.get_running_loop()
        while self.workers_ready() < self.count:
            if self.failed.is_set():
                return False
            if signals.stop.is_set():
                return True
            waits = {loop.create_task(self.failed.wait()), loop.create_task(signals.stop.wait())}
            waits |= {loop.create_task(w.ready.wait()) for w in self.workers.values() if not w.ready.is_set()}
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
        return True

    def _stop(self, *, urgent: bool) -> None:
        if not self.draining:
            self.draining = True
            log.info("draining: readiness is now 503", extra={"workers": len(self.workers)})
        self.stopping.set()
        self.command = "urgent" if urgent else "drain"
        for worker in self.workers.values():
            worker.send(self.command)

    def reload(self) -> None:
        for worker in self.workers.values():
            worker.send("reload")

    async def _keep(self, worker: Worker) -> None:
        """Keep `worker`'s slot filled until the supervisor stops."""
        loop = asyncio.get_running_loop()
        number = worker.number
        quick_failures = 0
        while True:
            if self.command is not None:  # a stop that came while it was being started
                worker.send(self.command)
            watcher = asyncio.create_task(worker.listen_for_ready())
            try:
                returncode = await worker.proc.wait()
            finally:
                watcher.cancel()
                worker.writer.close()
                del self.workers[number]
            self._retire(worker)
            status = {"worker": number, "pid": worker.pid, **exit_status(returncode)}
            if self.stopping.is_set():
                (log.info if returncode == 0 else log.warning)("worker exited", extra=status)
                return
            if not self.listening:
                log.error("worker exited before it was listening: stopping", extra=status)
                self.failed.set()
                return
            ran = loop.time() - worker.started
            quick_failures = quick_failures + 1 if ran < STABLE_SECONDS else 0
            delay = restart_delay(quick_failures)
            self.restarts += 1
            log.error("worker exited; restarting it", extra={**status, "restart_in_seconds": delay})
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
                if self.stopping.is_set():
                    return
                try:
                    worker = self.workers[number] = await self._spawn(number)
                    break
                except OSError as exc:  # no fork, no file descriptors: try again later
                    quick_failures += 1
                    delay = restart_delay(quick_failures)
                    log.error("cannot start worker", extra={"worker": number, "error": str(exc), "restart_in_seconds": delay})

    async def _spawn(self, number: int) -> Worker:
        admin_path = os.path.join(self._dir, f"worker-{number}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(admin_path)  # left by the process this one replaces
        parent, child = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "serve", "--config", self.config_path, "--worker-fd", str(child.fileno()),
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        setup = pickle.dumps(WorkerSetup(number, self.config, self.seen, self.port, admin_path))
        writer.write(_LENGTH.pack(len(setup)) + setup)
        log.info("worker started", extra={"worker": number, "pid": proc.pid})
        return Worker(number, proc, reader, writer, admin_path, asyncio.get_running_loop().time())

    def _retire(self, worker: Worker) -> None:
        if worker.families is not None:
            cumulative = [family for family in worker.families if family.type in ("counter", "histogram", "summary")]
            self.retired = merge_metrics([self.retired, cumulative])


async def supervise(config: Config, config_path: str, seen: Fingerprint | None, count: int) -> int:
    return await Supervisor(config, config_path, seen, count).run()
