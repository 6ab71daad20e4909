"""`ws-gateway serve --workers N`: one supervisor, N gateway processes on one port.

Run the way ops run it: `python -m gateway serve --config FILE --workers 2` as a
subprocess in front of two `stub-backend` subprocesses, everything on loopback
port 0. Tests await log lines, or poll the admin port or process state with a deadline;
they never sleep to synchronise. Which worker the kernel hands a connection to is up to
SO_REUSEPORT's hash, so tests that need sessions on every worker open sessions until the
supervisor's /rollout shows some on each (bounded).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
import yaml
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import (
    generate_latest as generate_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection

from gateway.service.admin import merge_metrics
from gateway.service.metrics import Metrics
from gateway.service.workers import MAX_RESTART_SECONDS, parse_openmetrics, restart_delay

from .test_cli import (
    SECRET,
    assert_clean_failure,
    base_config,
    make_token,
    run_cli,
    start_stub,
)
from .test_serve_ops import (
    TIMEOUT,
    Backends,
    Running,
    Service,
    admin_get,
    close_quietly,
    dump,
    echoes,
    edit_in_place,
    gateway_config,
    legacy_client,
    rollout,
    serve,
    watch_closes,
)

WORKERS = 2
MAX_SESSIONS = 200  # bound on the sessions opened to land some on every worker


# -- helpers -------------------------------------------------------------------------------


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


@asynccontextmanager
async def supervisor(
    path: Path, cwd: Path, count: int = WORKERS, env: dict[str, str] | None = None
) -> AsyncIterator[Running]:
    """`serve --workers COUNT`, ready once the supervisor says "listening" and its admin answers."""
    service = await Service.start("serve", "--config", str(path), "--workers", str(count), cwd=cwd, env=env)
    async with serve(path, cwd, service=service) as gw:
        yield gw


def write_config(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(dump(raw), encoding="utf-8")
    return path


async def message_client(gw: Running, user: str) -> ClientConnection:
    """A current app: authenticate frame first, then the `connected` frame back."""
    ws = await websockets.connect(gw.url, open_timeout=TIMEOUT, close_timeout=TIMEOUT, ping_interval=None)
    await ws.send(json.dumps({"type": "authenticate", "token": make_token(user)}))
    connected = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert connected["type"] == "connected", connected
    return ws


async def openmetrics_get(gw: Running) -> tuple[int, str, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http:
        headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
        async with http.get(gw.admin + "/metrics", headers=headers) as response:
            return response.status, response.headers.get("Content-Type", ""), await response.text()


async def workers_of(gw: Running) -> list[dict[str, Any]]:
    return list((await rollout(gw))["workers"])


async def sessions_on_every_worker(gw: Running, count: int = WORKERS) -> list[ClientConnection]:
    """Sessions, alternately legacy and current, each proven to relay, until every worker holds one."""
    sockets: list[ClientConnection] = []
    try:
        while True:
            states = await workers_of(gw)
            if len(states) == count and all(state["active_connections"] > 0 for state in states):
                return sockets
            assert len(sockets) < MAX_SESSIONS, f"{MAX_SESSIONS} sessions and still a worker without one: {states}"
            n = len(sockets)
            ws = await (legacy_client if n % 2 == 0 else message_client)(gw, f"user-{n}")
            sockets.append(ws)
            assert await echoes(ws, f"hello {n}")
    except BaseException:
        close_quietly(sockets)
        raise


async def metric_samples(gw: Running) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, content_type, body = await admin_get(gw.admin, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4"), (status, content_type)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    """The sum of `name` over all its label sets."""
    return sum(value for (sample, _), value in samples.items() if sample == name)


def records(gw: Running, msg: str, *, after: int = 0) -> list[dict[str, Any]]:
    return [r for r in gw.service.records[after:] if r.get("msg") == msg]


async def wait_records(gw: Running, msg: str, count: int, *, after: int = 0) -> list[dict[str, Any]]:
    """The first `count` records with `msg` from index `after` on."""
    found: list[dict[str, Any]] = []
    index = after
    while len(found) < count:
        index, record = await gw.service.wait_log(msg, after=index)
        found.append(record)
        index += 1
    return found


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def until_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not all(gone(pid) for pid in pids):  # a bounded poll of process state
        assert time.monotonic() < deadline, f"still running: {[pid for pid in pids if not gone(pid)]}"
        await asyncio.sleep(0.02)


async def until(condition: Any, what: str) -> Any:
    """Poll the async `condition` until it returns something true; fail after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not (result := await condition()):
        assert time.monotonic() < deadline, f"{what}: not within {TIMEOUT}s"
        await asyncio.sleep(0.05)
    return result


# -- serving -------------------------------------------------------------------------------


async def test_two_workers_share_one_port_and_relay_both_auth_styles(tmp_path: Path, backends: Backends) -> None:
    path = write_config(tmp_path, gateway_config(backends, 50))
    async with supervisor(path, tmp_path) as gw:
        listening_at, listening = await gw.service.wait_log("listening")
        assert listening["workers"] == WORKERS and "worker" not in listening
        ready = [r for r in gw.service.records[:listening_at] if r.get("msg") == "worker listening"]
        assert sorted(r["worker"] for r in ready) == [1, 2], "the supervisor said listening before every worker"
        assert {r["port"] for r in ready} == {gw.public_port}

        sockets = await sessions_on_every_worker(gw)
        try:
            states = await workers_of(gw)
            assert sum(state["active_connections"] for state in states) == len(sockets)
            assert len({state["pid"] for state in states}) == WORKERS
            assert (await rollout(gw))["active_connections"] == len(sockets)
        finally:
            close_quietly(sockets)

        started = records(gw, "worker started")
        assert sorted(r["worker"] for r in started) == [1, 2]
        assert {r["pid"] for r in started} == {state["pid"] for state in states}
    # Every worker line says which worker; no token and no secret anywhere.
    assert all("worker" in r for r in gw.service.records if r.get("msg") in ("worker listening", "connection closed"))
    output = "\n".join(gw.service.lines)
    assert "eyJ" not in output and SECRET not in output


async def test_workers_1_is_todays_single_process_without_a_supervisor(tmp_path: Path, backends: Backends) -> None:
    path = write_config(tmp_path, gateway_config(backends, 0))
    service = await Service.start("serve", "--config", str(path), "--workers", "1", cwd=tmp_path)
    async with serve(path, tmp_path, service=service) as gw:
        ws = await legacy_client(gw, "alice")
        async with ws:
            assert await echoes(ws, "one process")
        assert "workers" not in (await rollout(gw))
        children = Path(f"/proc/{service.proc.pid}/task/{service.proc.pid}/children")
        if children.exists():
            assert children.read_text().split() == []
        gw.service.signal(signal.SIGTERM)
        assert await gw.service.exit_code() == 0
    assert not records(gw, "worker started") and not records(gw, "worker listening")
    assert not any("worker" in r for r in gw.service.records)


# -- the admin port ------------------------------------------------------------------------


async def test_admin_metrics_add_up_every_worker_and_keep_shared_gauges_as_they_are(
    tmp_path: Path, backends: Backends
) -> None:
    path = write_config(tmp_path, gateway_config(backends, 12.5))
    async with supervisor(path, tmp_path) as gw:
        sockets = await sessions_on_every_worker(gw)
        try:
            samples = await metric_samples(gw)
            sessions = len(sockets)
            assert total(samples, "ws_gateway_connections_opened_total") == sessions
            assert total(samples, "ws_gateway_connections_active") == sessions
            assert total(samples, "ws_gateway_connection_attempts_total") == sessions
            assert total(samples, "ws_gateway_session_ready_seconds_count") == sessions
            inf = ("le", "+Inf")
            assert sum(v for (n, labels), v in samples.items() if n == "ws_gateway_session_ready_seconds_bucket" and inf in labels) == sessions
            echoed = total(samples, "ws_gateway_messages_total")
            assert echoed >= 2 * sessions  # one frame each way per session at least (the auth frame is not relayed)
            # Config and state every worker shares are not added up.
            assert samples[("ws_gateway_rollout_configured_percent", ())] == 12.5
            assert samples[("ws_gateway_rollout_effective_percent", ())] == 12.5
            assert samples[("ws_gateway_guard_state", ())] == 0
            assert samples[("ws_gateway_draining", ())] == 0
            assert samples[("ws_gateway_store_up", ())] == 1
            assert samples[("ws_gateway_workers", ())] == WORKERS
            assert samples[("ws_gateway_worker_restarts_total", ())] == 0

            status, content_type, body = await openmetrics_get(gw)
            assert status == 200 and content_type.startswith("application/openmetrics-text"), content_type
            assert body.rstrip().endswith("# EOF")
            families = {family.name: family for family in parse_openmetrics(body)}
            assert sum(s.value for s in families["ws_gateway_connections_opened"].samples if s.name.endswith("_total")) == sessions

            for endpoint in ("/healthz", "/readyz"):
                status, _, body = await admin_get(gw.admin, endpoint)
                assert status == 200 and json.loads(body)["workers"] == WORKERS
            state = await rollout(gw)
            assert (state["configured_percent"], state["active_connections"]) == (12.5, sessions)
            assert SECRET not in json.dumps(state)
        finally:
            close_quietly(sockets)


async def test_admin_sessions_and_route_answer_for_every_worker_and_probe_admin_tells_the_backend(
    tmp_path: Path, backends: Backends
) -> None:
    path = write_config(tmp_path, gateway_config(backends, 0, rollout={"new_percent": 0, "salt": "cli-test", "force_new": ["qa-new-1"]}))
    async with supervisor(path, tmp_path) as gw:
        sockets: list[ClientConnection] = []
        try:
            # Sessions with their own X-Request-ID until every worker holds one, so that
            # some of them can only be found by asking a worker other than the first.
            while not ((states := await workers_of(gw)) and len(states) == WORKERS and all(s["active_connections"] for s in states)):
                assert len(sockets) < MAX_SESSIONS, "a worker without sessions"
                n = len(sockets)
                ws = await websockets.connect(
                    f"{gw.url}?token={make_token(f'user-{n}')}",
                    additional_headers={"X-Request-ID": f"req-{n}"},
                    open_timeout=TIMEOUT,
                    ping_interval=None,
                )
                sockets.append(ws)
                assert await echoes(ws, f"hello {n}")
            for n in range(len(sockets)):
                status, _, body = await admin_get(gw.admin, f"/sessions/req-{n}")
                assert status == 200, body
                placed = json.loads(body)
                assert (placed["user_id"], placed["backend"], placed["why"], placed["relaying"]) == (f"user-{n}", "old", "route", True)
        finally:
            close_quietly(sockets)

        status, _, body = await admin_get(gw.admin, "/sessions/req-unknown")
        assert status == 404 and json.loads(body)["error"] == "no open session with X-Request-ID 'req-unknown' in any worker"

        status, _, body = await admin_get(gw.admin, "/route?user=qa-new-1")
        cli = await asyncio.to_thread(run_cli, "route", "qa-new-1", "--config", str(path), cwd=tmp_path)
        assert status == 200 and json.loads(body)["line"] == cli.stdout.strip(), (body, cli.stdout)
        status, _, body = await admin_get(gw.admin, "/route?user=")
        assert status == 400 and json.loads(body)["error"] == "give a user id: /route?user=ID"

        args = ("--secret", SECRET, "--user", "qa-new-1", "--hold", "0.2", "--admin", gw.admin, "--expect-backend", "new", "--json")
        probe = await asyncio.to_thread(run_cli, "probe", gw.url, *args, cwd=tmp_path)
        assert probe.returncode == 0, probe.stdout + probe.stderr
        checks = json.loads(probe.stdout)["checks"]
        assert [(c["backend"], c["why"], c["result"]) for c in checks[:2]] == [("new", "forced", "PASS")] * 2


def test_merge_adds_counts_up_takes_the_earliest_created_and_one_value_of_shared_gauges() -> None:
    one, two = Metrics(), Metrics()
    for metrics, opened, percent, store_up in ((one, 3, 10.0, 1), (two, 4, 20.0, 0)):
        for _ in range(opened):
            metrics.opened.labels("legacy", "old").inc()
            metrics.active.labels("legacy", "old").inc()
            metrics.ready_seconds.labels("legacy", "old").observe(0.02)
        metrics.configured_percent.set(percent)
        metrics.store_up.set(store_up)
    one.ramp_step_percent.set(25.0)  # the other worker has not read the ramp yet: NaN
    merged = merge_metrics([parse_openmetrics(generate_openmetrics(m.registry).decode()) for m in (one, two)])

    text = generate_latest(_Collected(merged)).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    legacy_old = (("auth_style", "legacy"), ("backend", "old"))
    assert samples[("ws_gateway_connections_opened_total", legacy_old)] == 7
    assert samples[("ws_gateway_connections_active", legacy_old)] == 7
    assert samples[("ws_gateway_session_ready_seconds_count", legacy_old)] == 7
    assert samples[("ws_gateway_session_ready_seconds_bucket", (*legacy_old, ("le", "0.025")))] == 7
    assert samples[("ws_gateway_session_ready_seconds_bucket", (*legacy_old, ("le", "0.01")))] == 0
    assert samples[("ws_gateway_rollout_configured_percent", ())] == 20.0  # max, not 30
    assert samples[("ws_gateway_store_up", ())] == 0  # min: some worker cannot reach Redis
    assert samples[("ws_gateway_ramp_step_percent", ())] == 25.0  # the known step, not NaN
    created = [
        sample.value
        for metrics in (one, two)
        for family in parse_openmetrics(generate_openmetrics(metrics.registry).decode())
        for sample in family.samples
        if sample.name == "ws_gateway_fallbacks_created"
    ]
    assert len(created) == 2 and samples[("ws_gateway_fallbacks_created", ())] == min(created)


class _Collected:
    """Families as something prometheus-client's encoders take."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Any:
        return iter(self.families)


def test_restart_delay_is_immediate_after_a_stable_run_then_doubles_up_to_a_cap() -> None:
    assert restart_delay(0) == 0
    delays = [restart_delay(n) for n in range(1, 12)]
    assert delays[0] > 0
    assert all(later == min(2 * earlier, MAX_RESTART_SECONDS) for earlier, later in pairwise(delays))
    assert delays[-1] == MAX_RESTART_SECONDS
    assert restart_delay(10_000) == MAX_RESTART_SECONDS


# -- restarts ------------------------------------------------------------------------------


async def test_a_killed_worker_is_restarted_its_counts_stay_in_the_totals_and_the_supervisor_stays_up(
    tmp_path: Path, backends: Backends
) -> None:
    path = write_config(tmp_path, gateway_config(backends, 0))
    async with supervisor(path, tmp_path) as gw:
        sockets = await sessions_on_every_worker(gw)
        try:
            before = await metric_samples(gw)  # the supervisor keeps this scrape of every worker
            opened = total(before, "ws_gateway_connections_opened_total")
            assert opened == len(sockets)
            victim = (await workers_of(gw))[0]
            mark = len(gw.service.records)
            os.kill(victim["pid"], signal.SIGKILL)

            _, exited = await gw.service.wait_log("worker exited; restarting it", after=mark)
            assert (exited["worker"], exited["pid"], exited["signal"]) == (victim["worker"], victim["pid"], "SIGKILL")
            index, started = await gw.service.wait_log("worker started", after=mark)
            assert started["worker"] == victim["worker"] and started["pid"] != victim["pid"]
            _, back = await gw.service.wait_log("worker listening", after=index)
            assert back["worker"] == victim["worker"] and back["port"] == gw.public_port

            async def both_up() -> list[dict[str, Any]] | None:
                states = await workers_of(gw)
                return states if len(states) == WORKERS else None

            states = await until(both_up, "both workers answering again")
            assert started["pid"] in {state["pid"] for state in states}
            status, _, _ = await admin_get(gw.admin, "/readyz")
            assert status == 200

            after = await metric_samples(gw)
            assert after[("ws_gateway_worker_restarts_total", ())] == 1
            assert after[("ws_gateway_workers", ())] == WORKERS
            # The dead worker's sessions are gone, what it counted is not.
            assert total(after, "ws_gateway_connections_opened_total") == opened
            survivors = sum(state["active_connections"] for state in states)
            assert total(after, "ws_gateway_connections_active") == survivors < len(sockets)

            # New sessions work, whichever worker the kernel picks.
            fresh = await sessions_on_every_worker(gw)
            close_quietly(fresh)
            assert gw.service.proc.returncode is None
        finally:
            close_quietly(sockets)


# -- reload --------------------------------------------------------------------------------


async def test_sighup_reloads_the_config_in_every_worker(tmp_path: Path, backends: Backends) -> None:
    text = dump(gateway_config(backends, 10))
    path = tmp_path / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    async with supervisor(path, tmp_path) as gw:
        assert [state["configured_percent"] for state in await workers_of(gw)] == [10] * WORKERS
        # Same size, mtime put back: the file watchers cannot see it, only SIGHUP can.
        stat = path.stat()
        edited = text.replace("new_percent: 10\n", "new_percent: 90\n")
        assert edited != text and len(edited) == len(text)
        edit_in_place(path, edited)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

        gw.service.signal(signal.SIGHUP)
        hup, record = await gw.service.wait_log("SIGHUP: reloading config")
        assert "worker" not in record  # the supervisor's
        reloaded = await wait_records(gw, "config reloaded", WORKERS, after=hup)
        assert sorted(r["worker"] for r in reloaded) == [1, 2]
        assert {(r["file"], r["new_percent"]) for r in reloaded} == {(str(path), 90)}
        states = await workers_of(gw)
        assert [(s["configured_percent"], s["effective_percent"]) for s in states] == [(90, 90)] * WORKERS
        samples = await metric_samples(gw)
        assert samples[("ws_gateway_rollout_configured_percent", ())] == 90
        assert samples[("ws_gateway_config_reloads_total", (("result", "success"),))] == WORKERS
        assert gw.service.proc.returncode is None


async def test_a_short_secret_is_warned_about_once_per_start_not_per_worker_or_reload(tmp_path: Path, backends: Backends) -> None:
    short = "only-31-bytes-long-secret-value"
    path = write_config(tmp_path, gateway_config(backends, 10))
    async with supervisor(path, tmp_path, env={"JWT_SECRET": short}) as gw:
        gw.service.signal(signal.SIGHUP)
        await wait_records(gw, "config reloaded", WORKERS)
        warned = [r for r in gw.service.records if "shorter than 32 bytes" in json.dumps(r)]
        assert [r["msg"] for r in warned] == ["config warning"] and "worker" not in warned[0], warned
        assert warned[0]["warning"].startswith("auth.secret: ")
        assert short not in "\n".join(gw.service.lines)


# -- stopping ------------------------------------------------------------------------------


async def test_sigterm_drains_every_worker_readyz_503_sessions_1012_and_exit_0(tmp_path: Path, backends: Backends) -> None:
    path = write_config(tmp_path, gateway_config(backends, 0, drain={"grace_seconds": 0.5, "window_seconds": 1.0}))
    async with supervisor(path, tmp_path) as gw:
        sockets = await sessions_on_every_worker(gw)
        try:
            closes = watch_closes(sockets)
            pids = [state["pid"] for state in await workers_of(gw)]
            gw.service.signal(signal.SIGTERM)

            at, draining = await gw.service.wait_log("draining: readiness is now 503")
            assert "worker" not in draining  # the supervisor's own line comes first
            status, _, body = await admin_get(gw.admin, "/readyz")
            assert (status, json.loads(body)["status"]) == (503, "draining")
            closing = await wait_records(gw, "closing sessions", WORKERS, after=at)
            assert sum(r["sessions"] for r in closing) == len(sockets)

            results = await asyncio.wait_for(closes, TIMEOUT)
            assert {(r.code, r.reason) for r in results} == {(1012, "server restarting")}
            assert await gw.service.exit_code() == 0
            await gw.service.close()  # every line read
            exited = records(gw, "worker exited", after=at)
            assert sorted((r["worker"], r["exit_code"]) for r in exited) == [(1, 0), (2, 0)]
            assert gw.service.records[-1]["msg"] == "stopped" and "worker" not in gw.service.records[-1]
            assert all(gone(pid) for pid in pids)
            assert not records(gw, "second signal: closing every session now")
        finally:
            close_quietly(sockets)


async def test_second_sigterm_closes_every_session_in_every_worker_at_once(tmp_path: Path, backends: Backends) -> None:
    slow = 60.0  # far beyond every wait here: only the second signal can end it in time
    path = write_config(tmp_path, gateway_config(backends, 0, drain={"grace_seconds": slow, "window_seconds": slow}))
    async with supervisor(path, tmp_path) as gw:
        sockets = await sessions_on_every_worker(gw)
        try:
            closes = watch_closes(sockets)
            gw.service.signal(signal.SIGTERM)
            at, _ = await gw.service.wait_log("draining: readiness is now 503")
            await wait_records(gw, "the supervisor asks to drain", WORKERS, after=at)
            gw.service.signal(signal.SIGTERM)
            results = await asyncio.wait_for(closes, TIMEOUT)
            assert {(r.code, r.reason) for r in results} == {(1012, "server restarting")}
            assert await gw.service.exit_code() == 0
        finally:
            close_quietly(sockets)


async def test_sigterm_to_the_whole_process_group_still_drains_gracefully(tmp_path: Path, backends: Backends) -> None:
    # systemd's default KillMode and a terminal's Ctrl-C signal every process of the group:
    # each worker gets the signal directly *and* the supervisor's drain; that is one stop, not two.
    path = write_config(tmp_path, gateway_config(backends, 0, drain={"grace_seconds": 0.5, "window_seconds": 1.0}))
    async with supervisor(path, tmp_path) as gw:
        sockets = await sessions_on_every_worker(gw)
        try:
            closes = watch_closes(sockets)
            for state in await workers_of(gw):
                os.kill(state["pid"], signal.SIGTERM)
            gw.service.signal(signal.SIGTERM)
            results = await asyncio.wait_for(closes, TIMEOUT)
            assert {(r.code, r.reason) for r in results} == {(1012, "server restarting")}
            assert await gw.service.exit_code() == 0
            await gw.service.close()  # every line read
            closing = records(gw, "closing sessions")
            assert len(closing) == WORKERS and {r["window_seconds"] for r in closing} == {1.0}
            assert not records(gw, "second signal: closing every session now")
            assert not records(gw, "worker exited; restarting it")
        finally:
            close_quietly(sockets)


async def test_workers_close_their_sessions_and_exit_when_the_supervisor_is_killed(
    tmp_path: Path, backends: Backends
) -> None:
    path = write_config(tmp_path, gateway_config(backends, 0, drain={"grace_seconds": 60, "window_seconds": 60}))
    async with supervisor(path, tmp_path) as gw:
        sockets = await sessions_on_every_worker(gw)
        try:
            closes = watch_closes(sockets)
            pids = [state["pid"] for state in await workers_of(gw)]
            gw.service.proc.kill()
            gone_lines = await wait_records(gw, "supervisor gone: closing every session and exiting", WORKERS)
            assert sorted(r["worker"] for r in gone_lines) == [1, 2]
            results = await asyncio.wait_for(closes, TIMEOUT)
            assert {(r.code, r.reason) for r in results} == {(1012, "server restarting")}
            await until_gone(pids)
        finally:
            close_quietly(sockets)


def socket_dirs(tmp: Path) -> list[str]:
    return sorted(entry.name for entry in tmp.iterdir() if entry.name.startswith("ws-gateway-"))


async def test_a_supervisor_killed_with_sigkill_leaves_no_worker_socket_behind(tmp_path: Path, backends: Backends) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    path = write_config(tmp_path, gateway_config(backends, 0))
    async with supervisor(path, tmp_path, env={"TMPDIR": str(tmp)}) as gw:
        (own,) = socket_dirs(tmp)
        assert own.startswith(f"ws-gateway-{gw.service.proc.pid}-")
        assert sorted(p.name for p in (tmp / own).iterdir()) == ["worker-1.sock", "worker-2.sock"]
        pids = [state["pid"] for state in await workers_of(gw)]
        gw.service.proc.kill()
        await until_gone(pids)
    assert socket_dirs(tmp) == []


async def test_a_start_removes_the_sockets_of_a_supervisor_killed_with_its_workers(tmp_path: Path, backends: Backends) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    path = write_config(tmp_path, gateway_config(backends, 0))
    async with supervisor(path, tmp_path, env={"TMPDIR": str(tmp)}) as gw:
        pids = [state["pid"] for state in await workers_of(gw)]
        for pid in [gw.service.proc.pid, *pids]:  # SIGKILL to the process group: nobody cleans up
            os.kill(pid, signal.SIGKILL)
        await until_gone(pids)
    (stale,) = socket_dirs(tmp)
    assert (tmp / stale / "worker-1.sock").exists()
    async with supervisor(path, tmp_path, env={"TMPDIR": str(tmp)}) as gw:
        assert socket_dirs(tmp) == [own for own in socket_dirs(tmp) if own.startswith(f"ws-gateway-{gw.service.proc.pid}-")]
        assert stale not in socket_dirs(tmp)


# -- refusing to start ---------------------------------------------------------------------


def test_a_bad_config_exits_2_before_any_worker_starts(tmp_path: Path) -> None:
    raw = base_config()
    raw["rollout"]["new_percent"] = 150
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = run_cli("serve", "--config", str(path), "--workers", "2", cwd=tmp_path)
    lines = assert_clean_failure(result)
    assert any("rollout.new_percent" in line for line in lines)


def test_a_port_in_use_fails_with_one_line_before_any_worker_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        raw = base_config()
        raw["listen"]["port"] = port
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        result = run_cli("serve", "--config", str(path), "--workers", "2", cwd=tmp_path)
    lines = assert_clean_failure(result, code=1)
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0].lower(), lines
    assert "worker started" not in result.stderr


@pytest.mark.parametrize("workers", ["0", "-1", "two", "1.5"])
def test_workers_must_be_a_whole_number_from_1(tmp_path: Path, workers: str) -> None:
    result = run_cli("serve", "--config", "missing.yaml", "--workers", workers, cwd=tmp_path)
    assert result.returncode == 2
    assert "--workers" in result.stderr and "Traceback" not in result.stderr
