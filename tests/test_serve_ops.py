"""Live operations on a real `python -m gateway serve` process: the admin listener, hot
reload (file watch and SIGHUP), and the graceful drain on SIGTERM.

Every test runs the gateway the way ops do: a subprocess with a config file, in front of
two `stub-backend` subprocesses (shared by the module), all on loopback port 0. The
gateway's JSON log lines are collected from stderr as they arrive; tests await a line
(or poll an admin endpoint with a deadline), never sleep to synchronise, and kill
whatever is still running when they end.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
import yaml
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection

from gateway.service.reload import fingerprint

from .test_cli import SECRET, base_config, cli_env, make_token, start_stub

TIMEOUT = 10.0  # the one bound on every wait in this file
RELOAD_PROMISE = 5.0  # issue 3: a valid change applies to new connections within 5 s


# -- processes -----------------------------------------------------------------------------


def gateway_process(
    *args: str, cwd: Path, stderr: int, env: dict[str, str] | None = None
) -> Awaitable[asyncio.subprocess.Process]:
    return asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args,
        cwd=cwd,
        env=cli_env(**{"JWT_SECRET": SECRET, **(env or {})}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )


@dataclass
class Service:
    """A `python -m gateway ...` subprocess whose stderr JSON lines are collected as they come."""

    proc: asyncio.subprocess.Process
    stream: asyncio.StreamReader | None = None  # None: read from `pipe_fd` once reading starts
    pipe_fd: int | None = None
    lines: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    eof: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, *args: str, cwd: Path, env: dict[str, str] | None = None) -> Service:
        """`env`: variables added to (or replacing) the test's environment."""
        proc = await gateway_process(*args, cwd=cwd, stderr=subprocess.PIPE, env=env)
        assert proc.stderr is not None
        service = cls(proc, stream=proc.stderr)
        await service.start_reading()
        return service

    async def start_reading(self) -> None:
        if self.stream is None:
            assert self.pipe_fd is not None
            stream = self.stream = asyncio.StreamReader()
            await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(stream), os.fdopen(self.pipe_fd, "rb", buffering=0)
            )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.stream is not None
        async for raw in self.stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if not line:
                continue
            self.lines.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                self.records.append(record)
            self._changed.set()
        self.eof = True
        self._changed.set()

    async def wait_log(self, msg: str, *, after: int = 0, timeout: float = TIMEOUT) -> tuple[int, dict[str, Any]]:
        """The first record from index `after` on whose msg is `msg`; returns (index, record)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for index in range(after, len(self.records)):
                record = self.records[index]
                if record.get("msg") == msg:
                    return index, record
            after = len(self.records)
            if self.eof:
                code = await asyncio.wait_for(self.proc.wait(), TIMEOUT)
                raise AssertionError(f"stderr closed (exit {code}) before {msg!r}; saw:\n" + self.tail())
            self._changed.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(self._changed.wait(), max(remaining, 0))
            except TimeoutError:
                raise AssertionError(f"no {msg!r} log line within {timeout}s; saw:\n" + self.tail()) from None

    def tail(self, count: int = 30) -> str:
        return "\n".join(self.lines[-count:])

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def exit_code(self, timeout: float = TIMEOUT) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"still running {timeout}s later; saw:\n" + self.tail()) from None

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), TIMEOUT)
        if self._reader is None:
            await self.start_reading()  # drain what is left, so the pipe closes
        assert self._reader is not None
        await asyncio.wait_for(self._reader, TIMEOUT)


async def stalled_at_its_first_log_line(*args: str, cwd: Path) -> Service:
    """Start the gateway with a stderr pipe that is already full, so it stalls inside its
    first log write (as behind a stalled log shipper: logging is synchronous). For `serve`
    that is the "listening" line: the config is loaded, nothing after the log call has run.
    Returns once the kernel shows the process blocked in that write; nothing is read from
    the pipe until `start_reading()`.
    """
    read_fd, write_fd = os.pipe()
    try:
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
        os.write(write_fd, b"\n" * fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ))  # empty lines: skipped when read
        proc = await gateway_process(*args, cwd=cwd, stderr=write_fd)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    service = Service(proc, pipe_fd=read_fd)

    def waiting_in() -> str:
        try:
            return Path(f"/proc/{proc.pid}/wchan").read_text()
        except OSError:
            return ""

    seen = set()
    deadline = time.monotonic() + TIMEOUT
    while "pipe_write" not in (where := waiting_in()):  # a bounded poll of the process state
        seen.add(where)
        if proc.returncode is not None or time.monotonic() > deadline:
            await service.close()
            if seen <= {"", "0"}:  # "0" while running, and always where the kernel hides it
                pytest.skip("/proc/PID/wchan does not show where the gateway waits")
            raise AssertionError(f"the gateway never blocked writing its first log line (wchan: {sorted(seen)})")
        await asyncio.sleep(0.01)
    return service


@dataclass
class Running:
    service: Service
    url: str  # ws://127.0.0.1:PORT/ws/chat
    admin: str  # http://127.0.0.1:ADMIN_PORT
    public_port: int


@asynccontextmanager
async def serve(
    config_path: Path, cwd: Path, *, service: Service | None = None
) -> AsyncIterator[Running]:
    """`python -m gateway serve --config FILE` (or `service`, already started), ready once
    it has said where it listens and its admin listener has answered a request."""
    if service is None:
        service = await Service.start("serve", "--config", str(config_path), cwd=cwd)
    try:
        _, listening = await service.wait_log("listening")
        _, admin = await service.wait_log("admin listening")
        gw = Running(
            service,
            f"ws://127.0.0.1:{listening['port']}{listening['path']}",
            f"http://127.0.0.1:{admin['port']}",
            int(listening["port"]),
        )
        # The event loop answers HTTP only once serve() has finished starting (the file
        # watcher included), so edits made from here on are never racing the start-up.
        status, _, _ = await admin_get(gw.admin, "/healthz")
        assert status == 200
        yield gw
    finally:
        await service.close()


@dataclass
class Backends:
    old_port: int
    new_port: int


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    """Both stub backends as subprocesses, shared by the module (they hold no state)."""
    cwd = tmp_path_factory.mktemp("stubs")
    stub_config = cwd / "stub.yaml"
    stub_config.write_text(yaml.safe_dump(base_config()), encoding="utf-8")
    old, old_port = start_stub("old", stub_config, cwd)
    with old:
        new, new_port = start_stub("new", stub_config, cwd)
        with new:
            yield Backends(old_port, new_port)


def gateway_config(backends: Backends, new_percent: float = 0, **sections: Any) -> dict[str, Any]:
    raw = base_config(backends.old_port, backends.new_port)
    raw["rollout"]["new_percent"] = new_percent
    raw["admin"] = {"host": "127.0.0.1", "port": 0}
    raw.update(sections)
    return raw


def dump(raw: dict[str, Any]) -> str:
    return yaml.safe_dump(raw, sort_keys=False)


# -- clients -------------------------------------------------------------------------------


async def admin_get(base: str, path: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http:
        async with http.get(base + path) as response:
            return response.status, response.headers.get("Content-Type", ""), await response.text()


async def rollout(gw: Running) -> dict[str, Any]:
    status, _, body = await admin_get(gw.admin, "/rollout")
    assert status == 200, body
    return json.loads(body)


async def poll_rollout(gw: Running, predicate: Callable[[dict[str, Any]], bool], within: float) -> dict[str, Any]:
    """Poll /rollout until `predicate` holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        state = await rollout(gw)
        if predicate(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"/rollout did not change within {within}s: {state}; log:\n" + gw.service.tail())
        await asyncio.sleep(0.05)  # poll interval of a bounded poll, not a synchronisation


async def legacy_client(gw: Running, user: str) -> ClientConnection:
    return await websockets.connect(
        f"{gw.url}?token={make_token(user)}", open_timeout=TIMEOUT, close_timeout=TIMEOUT, ping_interval=None
    )


async def backend_of(ws: ClientConnection) -> str:
    """Which stub backend answers this session (its style: old or new)."""
    await ws.send('{"type":"stub.info"}')
    info = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert info["type"] == "stub.info", info
    return info["style"]


async def echoes(ws: ClientConnection, text: str) -> bool:
    await ws.send(text)
    return await asyncio.wait_for(ws.recv(), TIMEOUT) == text


# -- admin listener ------------------------------------------------------------------------


async def test_admin_listener_serves_health_readiness_metrics_and_rollout_on_its_own_port(
    tmp_path: Path, backends: Backends
) -> None:
    raw = gateway_config(backends, 12.5)
    raw["rollout"].update(force_new=["qa-1", "qa-2"], force_old=["vip"])
    path = tmp_path / "gateway.yaml"
    path.write_text(dump(raw), encoding="utf-8")
    async with serve(path, tmp_path) as gw:
        assert not gw.admin.endswith(f":{gw.public_port}")

        ws = await legacy_client(gw, "vip")
        async with ws:
            assert await backend_of(ws) == "old"

        status, _, body = await admin_get(gw.admin, "/healthz")
        assert status == 200, body
        status, _, body = await admin_get(gw.admin, "/readyz")
        assert (status, json.loads(body)["status"]) == (200, "ready")

        status, content_type, body = await admin_get(gw.admin, "/metrics")
        assert status == 200
        assert content_type.startswith("text/plain; version=0.0.4"), content_type
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }
        assert samples[("ws_gateway_rollout_configured_percent", ())] == 12.5
        assert samples[("ws_gateway_draining", ())] == 0
        opened = ("ws_gateway_connections_opened_total", (("auth_style", "legacy"), ("backend", "old")))
        assert samples[opened] == 1

        status, content_type, body = await admin_get(gw.admin, "/rollout")
        assert (status, content_type.split(";")[0]) == (200, "application/json")
        state = json.loads(body)
        assert state["configured_percent"] == 12.5
        assert state["effective_percent"] == 12.5
        assert (state["force_new_count"], state["force_old_count"]) == (2, 1)
        assert state["config_file"] == str(path)
        assert state["guard"]["state"] == "healthy"
        assert SECRET not in body

        # The admin routes are not on the public port.
        status, _, _ = await admin_get(f"http://127.0.0.1:{gw.public_port}", "/healthz")
        assert status == 404


# -- hot reload ----------------------------------------------------------------------------


def edit_in_place(path: Path, text: str) -> None:
    with path.open("r+", encoding="utf-8") as f:  # same inode, new content
        f.write(text)
        f.truncate()


def edit_by_rename(path: Path, text: str) -> None:
    staged = path.with_name("." + path.name + ".tmp")
    staged.write_text(text, encoding="utf-8")
    os.replace(staged, path)


def configmap_mount(directory: Path, text: str) -> Path:
    """kubelet's layout: gateway.yaml -> ..data/gateway.yaml, ..data -> ..<version>/."""
    version = directory / "..v1"
    version.mkdir()
    (version / "gateway.yaml").write_text(text, encoding="utf-8")
    (directory / "..data").symlink_to(version.name)
    (directory / "gateway.yaml").symlink_to("..data/gateway.yaml")
    return directory / "gateway.yaml"


def edit_by_symlink_swap(path: Path, text: str) -> None:
    directory = path.parent
    version = directory / f"..v{len(list(directory.glob('..v*'))) + 1}"
    version.mkdir()
    (version / "gateway.yaml").write_text(text, encoding="utf-8")
    (directory / "..data_tmp").symlink_to(version.name)
    os.replace(directory / "..data_tmp", directory / "..data")


EDITS = {"in_place": edit_in_place, "write_then_rename": edit_by_rename, "configmap_symlink_swap": edit_by_symlink_swap}


@pytest.mark.parametrize("how", list(EDITS))
async def test_edited_config_routes_new_connections_within_5s_while_an_open_session_keeps_echoing(
    tmp_path: Path, backends: Backends, how: str
) -> None:
    text = dump(gateway_config(backends, 0))
    if how == "configmap_symlink_swap":
        (tmp_path / "config").mkdir()
        path = configmap_mount(tmp_path / "config", text)
    else:
        path = tmp_path / "gateway.yaml"
        path.write_text(text, encoding="utf-8")
    async with serve(path, tmp_path) as gw:
        before = await legacy_client(gw, "alice")
        async with before:
            assert await backend_of(before) == "old"
            assert (await rollout(gw))["configured_percent"] == 0

            EDITS[how](path, dump(gateway_config(backends, 100)))
            state = await poll_rollout(gw, lambda s: s["configured_percent"] == 100, within=RELOAD_PROMISE)
            assert state["effective_percent"] == 100
            _, reloaded = await gw.service.wait_log("config reloaded")
            assert (reloaded["file"], reloaded["new_percent"]) == (str(path), 100)

            after = await legacy_client(gw, "alice")
            async with after:
                assert await backend_of(after) == "new"
            # The session opened before the edit stays where it was and keeps working.
            assert await echoes(before, "still here")
            assert await backend_of(before) == "old"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (("new_percent", 150), "rollout.new_percent: 150 is out of range [0, 100]"),
        (("new_percnet", 100), "rollout.new_percnet: unknown key"),
    ],
    ids=["percent_150", "unknown_key"],
)
async def test_invalid_edit_keeps_the_previous_config_and_logs_file_and_key_path(
    tmp_path: Path, backends: Backends, change: tuple[str, Any], problem: str
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(dump(gateway_config(backends, 0)), encoding="utf-8")
    async with serve(path, tmp_path) as gw:
        before = await rollout(gw)
        bad = gateway_config(backends, 0)
        bad["rollout"][change[0]] = change[1]
        edit_by_rename(path, dump(bad))

        _, refused = await gw.service.wait_log(
            "config reload refused; the previous config keeps serving", timeout=RELOAD_PROMISE
        )
        assert refused["level"] == "error"
        assert refused["file"] == str(path)
        assert any(p.startswith(problem) for p in refused["problems"]), refused
        assert SECRET not in json.dumps(refused)

        assert await rollout(gw) == before
        ws = await legacy_client(gw, "alice")
        async with ws:
            assert await backend_of(ws) == "old"
        assert not any(r.get("msg") == "config reloaded" for r in gw.service.records)


async def test_listen_change_is_logged_as_needing_a_restart_and_the_rest_applies(tmp_path: Path, backends: Backends) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(dump(gateway_config(backends, 0)), encoding="utf-8")
    async with serve(path, tmp_path) as gw:
        changed = gateway_config(backends, 100)
        changed["listen"]["port"] = 8081  # it started with 0
        edit_by_rename(path, dump(changed))

        _, restart = await gw.service.wait_log("config change needs a restart to take effect", timeout=RELOAD_PROMISE)
        assert restart["level"] == "warning"
        assert (restart["file"], restart["keys"]) == (str(path), ["listen"])
        state = await poll_rollout(gw, lambda s: s["configured_percent"] == 100, within=RELOAD_PROMISE)
        assert state["effective_percent"] == 100
        ws = await legacy_client(gw, "alice")  # still on the port it started on
        async with ws:
            assert await backend_of(ws) == "new"


async def test_sighup_reloads_a_change_the_file_watcher_cannot_see(tmp_path: Path, backends: Backends) -> None:
    path = tmp_path / "gateway.yaml"
    text = dump(gateway_config(backends, 10))
    path.write_text(text, encoding="utf-8")
    async with serve(path, tmp_path) as gw:
        assert (await rollout(gw))["configured_percent"] == 10
        # Same size, same inode, mtime put back: only SIGHUP can tell the file changed.
        seen = fingerprint(str(path))
        stat = path.stat()
        edited = text.replace("new_percent: 10\n", "new_percent: 90\n")
        assert edited != text and len(edited) == len(text)
        edit_in_place(path, edited)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert fingerprint(str(path)) == seen

        gw.service.signal(signal.SIGHUP)
        hup, _ = await gw.service.wait_log("SIGHUP: reloading config")
        _, reloaded = await gw.service.wait_log("config reloaded", after=hup)
        assert (reloaded["file"], reloaded["new_percent"]) == (str(path), 90)
        state = await rollout(gw)
        assert (state["configured_percent"], state["effective_percent"]) == (90, 90)
        assert gw.service.proc.returncode is None


async def test_sighup_sent_the_moment_it_says_it_listens_reloads_instead_of_killing_it(
    tmp_path: Path, backends: Backends
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(dump(gateway_config(backends, 10)), encoding="utf-8")
    service = await stalled_at_its_first_log_line("serve", "--config", str(path), cwd=tmp_path)
    service.signal(signal.SIGHUP)  # while it writes "listening"
    await service.start_reading()
    async with serve(path, tmp_path, service=service) as gw:
        _, reloaded = await gw.service.wait_log("config reloaded")
        assert reloaded["new_percent"] == 10
        assert gw.service.proc.returncode is None


async def test_edit_made_after_the_config_was_loaded_but_before_listening_is_applied(
    tmp_path: Path, backends: Backends
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(dump(gateway_config(backends, 0)), encoding="utf-8")
    service = await stalled_at_its_first_log_line("serve", "--config", str(path), cwd=tmp_path)
    edit_by_rename(path, dump(gateway_config(backends, 100)))
    await service.start_reading()
    async with serve(path, tmp_path, service=service) as gw:
        await poll_rollout(gw, lambda s: s["configured_percent"] == 100, within=RELOAD_PROMISE)


# -- graceful drain ------------------------------------------------------------------------


@dataclass
class Closed:
    at: float  # time.monotonic() when the client saw the connection closed
    code: int | None
    reason: str | None


async def open_sessions(gw: Running, count: int) -> list[ClientConnection]:
    """`count` legacy sessions, each proven to relay (an echo) before it is returned."""
    limit = asyncio.Semaphore(50)  # stay under the listen backlog

    async def one(n: int) -> ClientConnection:
        async with limit:
            ws = await legacy_client(gw, f"drain-user-{n}")
            assert await echoes(ws, f"hello {n}")
            return ws

    return list(await asyncio.gather(*(one(n) for n in range(count))))


def watch_closes(sockets: list[ClientConnection]) -> asyncio.Future[list[Closed]]:
    async def watch(ws: ClientConnection) -> Closed:
        await ws.wait_closed()
        return Closed(time.monotonic(), ws.close_code, ws.close_reason)

    return asyncio.gather(*(watch(ws) for ws in sockets))


def close_quietly(sockets: list[ClientConnection]) -> None:
    for ws in sockets:
        ws.transport.abort()


async def test_sigterm_drains_sessions_with_1012_spread_over_the_window_and_exits_0(
    tmp_path: Path, backends: Backends
) -> None:
    sessions, grace, window = 300, 0.5, 2.0
    path = tmp_path / "gateway.yaml"
    path.write_text(dump(gateway_config(backends, 0, drain={"grace_seconds": grace, "window_seconds": window})), encoding="utf-8")
    async with serve(path, tmp_path) as gw:
        sockets = await open_sessions(gw, sessions)
        try:
            closes = watch_closes(sockets)
            gw.service.signal(signal.SIGTERM)

            _, draining = await gw.service.wait_log("draining: readiness is now 503")
            assert (draining["grace_seconds"], draining["window_seconds"]) == (grace, window)
            status, _, body = await admin_get(gw.admin, "/readyz")
            assert (status, json.loads(body)["status"]) == (503, "draining")

            _, closing = await gw.service.wait_log("closing sessions")
            assert (closing["sessions"], closing["window_seconds"]) == (sessions, window)
            # Past the grace period a new upgrade is refused before it becomes a WebSocket.
            with pytest.raises(websockets.InvalidStatus) as refused:
                await legacy_client(gw, "late-user")
            assert refused.value.response.status_code == 503
            assert refused.value.response.headers.get("Retry-After") is not None

            results = await asyncio.wait_for(closes, window + TIMEOUT)
            assert {(r.code, r.reason) for r in results} == {(1012, "server restarting")}
            # Not all at once: a loose bound, a quarter of the configured window.
            times = sorted(r.at for r in results)
            assert times[-1] - times[0] >= window / 4, f"all {sessions} closes within {times[-1] - times[0]:.3f}s"

            assert await gw.service.exit_code() == 0
            await gw.service.wait_log("stopped")
        finally:
            close_quietly(sockets)


@pytest.mark.parametrize(
    ("second", "phase"),
    [
        (signal.SIGTERM, "grace"),
        (signal.SIGINT, "grace"),
        (signal.SIGTERM, "window"),
    ],
    ids=["sigterm_in_grace", "sigint_in_grace", "sigterm_in_window"],
)
async def test_second_signal_closes_every_session_at_once_with_1012_and_exits_0(
    tmp_path: Path, backends: Backends, second: signal.Signals, phase: str
) -> None:
    # Grace and window far beyond every wait in this test: only the second signal can end it in time.
    sessions, slow = 20, 60.0
    grace = slow if phase == "grace" else 0.0
    path = tmp_path / "gateway.yaml"
    path.write_text(dump(gateway_config(backends, 0, drain={"grace_seconds": grace, "window_seconds": slow})), encoding="utf-8")
    async with serve(path, tmp_path) as gw:
        sockets = await open_sessions(gw, sessions)
        try:
            closes = watch_closes(sockets)
            gw.service.signal(signal.SIGTERM)
            at, _ = await gw.service.wait_log("draining: readiness is now 503")
            if phase == "window":
                at, closing = await gw.service.wait_log("closing sessions", after=at)
                assert (closing["sessions"], closing["window_seconds"]) == (sessions, slow)

            gw.service.signal(second)
            results = await asyncio.wait_for(closes, TIMEOUT)
            assert {(r.code, r.reason) for r in results} == {(1012, "server restarting")}
            assert await gw.service.exit_code() == 0
            await gw.service.wait_log("stopped", after=at)
        finally:
            close_quietly(sockets)
