#!/usr/bin/env python3
"""ws-gateway benchmark (issue 8): the gateway side by side with nginx and a direct path.

    python bench/run.py                 # medians of 3 runs, about 8 minutes on 2 cores
    python bench/run.py --quick         # one short run, 1,000 idle sessions: about 1.5 minutes
    python bench/run.py --json-out r.json --plot r.png

Every process runs on its own free port on 127.0.0.1 and nothing else is ever a target:

* a stub echo backend (`ws-gateway stub-backend --style old`), the echo target of every path;
* direct: the clients talk to that backend themselves;
* nginx, one worker, as a pass-through WebSocket proxy with its own config and prefix in a
  temporary folder (installed with apt-get when missing and we are root, else skipped);
* the gateway (`ws-gateway serve --config …`), routing every user to that backend.

The load generator is Node's `ws` library (bench/load.js, installed into bench/node_modules
with npm on first use); it runs one scenario per invocation and reports JSON. Proxy CPU is
read from /proc (utime + stime of the proxy's whole process tree) at the edges of each
measured window, memory from VmRSS. Only the gateway's public surface is used: its
command line and its YAML config. See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import StartFailed, free_port, start_listening

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
SECRET = "bench-secret-0123456789abcdefghijklmnopqrstuv"
PATH = "/ws/chat"


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# -- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Benchmark ws-gateway side by side with nginx (1 worker) and the echo backend reached directly.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 run, 2 s windows, 1,000 idle sessions (about 1.5 min)")
    p.add_argument("--runs", type=int, help="runs to take the median of (default 3, --quick 1)")
    p.add_argument("--duration", type=float, help="seconds of every measured window (overrides the per-scenario defaults)")
    p.add_argument("--warmup", type=float, help="seconds of the same load before each window, not measured (default 1, --quick 0.5)")
    p.add_argument("--conns", type=int, default=100, help="saturation: connections")
    p.add_argument("--inflight", type=int, default=10, help="saturation: messages outstanding per connection")
    p.add_argument("--large-size", type=int, default=4096, help="saturation: payload of the large-message row, bytes")
    p.add_argument("--rate", type=int, default=2000, help="latency: messages per second, all connections together")
    p.add_argument("--latency-conns", type=int, default=50, help="latency: connections the rate is spread over")
    p.add_argument("--idle-sessions", type=int, help="idle: sessions to open (default 5000, --quick 1000)")
    p.add_argument("--idle-open-seconds", type=float, default=90, help="idle: bound on opening them all")
    p.add_argument("--setup-loops", type=int, default=50, help="set-up: concurrent open -> close loops")
    p.add_argument(
        "--setup-mode", choices=("echo", "open"), default="echo",
        help="set-up loop: 'echo' = open, one echoed message, close (every session provably reached the backend); "
             "'open' = close as soon as the socket is open",
    )
    p.add_argument("--frame", choices=("text", "binary"), default="text", help="frame type of every message")
    p.add_argument("--deflate-threshold", type=int, default=0,
                   help="deflate row: ws compresses messages of at least this many bytes (ws's own default is 1024)")
    p.add_argument("--users", type=int, default=10, help="distinct users (tokens); connection i uses user i mod N")
    p.add_argument("--ping-interval", type=float, default=20,
                   help="gateway limits.ping_interval_seconds (20 = production default; 0 = off)")
    p.add_argument("--paths", default="direct,nginx,gateway", help="paths to measure, comma-separated")
    p.add_argument("--scenarios", default="idle,sat64,satlarge,latency,setup,deflate64",
                   help="scenarios to run, comma-separated")
    p.add_argument("--gateway-cmd", help="command that runs ws-gateway (default: ws-gateway next to this Python, else on PATH)")
    p.add_argument("--gateway-args", default="", help='extra arguments for every `ws-gateway serve`, e.g. "--workers 2"')
    p.add_argument("--workers-scaling", type=int, metavar="N",
                   help="also run 64 B saturation with `serve --workers N` and report it against one worker")
    p.add_argument("--nginx", help="nginx binary (default: on PATH or /usr/sbin/nginx; installed with apt-get when root)")
    p.add_argument("--no-nginx", action="store_true", help="skip the nginx column")
    p.add_argument("--json-out", type=Path, help="write every run and the medians here as JSON")
    p.add_argument("--plot", type=Path, help="draw the PNG (bench/plot.py, needs matplotlib) here")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="after the measured runs, record the gateway with py-spy --native during set-up and 64 B "
                        "saturation (not counted in the table) and summarise the top frames into DIR")
    p.add_argument("--profile-seconds", type=float, default=8, help="length of each py-spy recording")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary folder (configs, logs)")
    return p


@dataclass
class Settings:
    runs: int
    warmup: float
    sat_seconds: float
    latency_seconds: float
    setup_seconds: float
    idle_sessions: int
    args: argparse.Namespace


def settings_from(args: argparse.Namespace) -> Settings:
    quick = args.quick
    runs = args.runs or (1 if quick else 3)
    base = {"sat": 2.0, "lat": 2.0, "setup": 2.0} if quick else {"sat": 3.0, "lat": 4.0, "setup": 4.0}
    if args.duration:
        base = dict.fromkeys(base, args.duration)
    return Settings(
        runs=runs,
        warmup=args.warmup if args.warmup is not None else (0.5 if quick else 1.0),
        sat_seconds=base["sat"],
        latency_seconds=base["lat"],
        setup_seconds=base["setup"],
        idle_sessions=args.idle_sessions or (1000 if quick else 5000),
        args=args,
    )


# -- the machine: file limits, node deps, nginx ----------------------------------------------


def raise_nofile(want: int) -> int:
    """Raise RLIMIT_NOFILE for this process (children inherit it); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            pass
    target = want if hard == resource.RLIM_INFINITY else min(max(soft, want), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def is_root() -> bool:
    return os.geteuid() == 0


def apt_install(*packages: str) -> bool:
    if not is_root() or shutil.which("apt-get") is None:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in range(2):
        if attempt:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300)
        done = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *packages],
                              env=env, capture_output=True, timeout=600)
        if done.returncode == 0:
            return True
    return False


def ensure_node() -> str:
    node = shutil.which("node")
    if node is None:
        say("node is not installed; installing nodejs and npm with apt-get")
        if not apt_install("nodejs", "npm"):
            raise BenchError("the load generator needs Node.js (node and npm); install them and rerun")
        node = shutil.which("node")
    if not (BENCH / "node_modules" / "ws").is_dir():
        npm = shutil.which("npm")
        if npm is None and not apt_install("npm"):
            raise BenchError("npm is needed once to install the load generator's `ws` into bench/node_modules")
        say("installing the load generator's Node dependencies into bench/node_modules (npm, once)")
        done = subprocess.run([shutil.which("npm") or "npm", "install", "--no-audit", "--no-fund"],
                              cwd=BENCH, capture_output=True, text=True, timeout=300)
        if done.returncode != 0 or not (BENCH / "node_modules" / "ws").is_dir():
            raise BenchError(f"npm install failed in {BENCH}: {done.stderr.strip()[-500:]}")
    assert node is not None
    return node


def find_nginx(given: str | None) -> str | None:
    if given:
        return given
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if not is_root():
        say("nginx is not installed and we are not root: skipping the nginx column")
        return None
    say("nginx is not installed; installing it with apt-get (it runs here only with its own config)")
    if not apt_install("nginx-light") and not apt_install("nginx"):
        say("apt-get could not install nginx: skipping the nginx column")
        return None
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def gateway_command(given: str | None) -> list[str]:
    if given:
        return shlex.split(given)
    beside = Path(sys.executable).with_name("ws-gateway")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ws-gateway")
    if found:
        return [found]
    return [sys.executable, "-m", "gateway"]


# -- /proc: CPU and memory of a process tree -------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, pgid, utime + stime in ticks) of a live process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[1]), int(fields[2]), int(fields[11]) + int(fields[12])


def process_tree(root: int) -> dict[int, int]:
    """Every live process in `root`'s process group or below it: pid -> CPU ticks."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_stat(int(name))
            if st is not None:
                table[int(name)] = st
    members = {pid for pid, (_, pgid, _) in table.items() if pid == root or pgid == root}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in table.items():
            if pid not in members and ppid in members:
                members.add(pid)
                grew = True
    return {pid: table[pid][2] for pid in members}


def cpu_seconds(root: int) -> float:
    return sum(process_tree(root).values()) / CLK_TCK


def rss_kib(root: int) -> int:
    total = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


# -- the processes under test ----------------------------------------------------------------


@dataclass
class Server:
    """One process we start in its own session (so its whole tree is one process group)."""

    name: str
    argv: list[str]
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self, timeout: float = 30.0) -> Server:
        try:
            self.proc = start_listening(self.name, self.argv, self.port, self.log_path, timeout=timeout, cwd=self.workdir)
        except StartFailed as exc:
            raise BenchError(f"{exc}: {self.log_tail()}") from None
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)  # our own process group: the server and its workers
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                if not process_tree(self.proc.pid):
                    break
                time.sleep(0.2)
            except subprocess.TimeoutExpired:
                continue
        self.proc = None


@dataclass
class PathSpec:
    """One way for the clients to reach the echo backend, and how its proxy is configured."""

    key: str  # result key: direct, nginx, gateway, gateway-wN
    kind: str  # direct | nginx | gateway
    log_level: str = "WARNING"
    compress: bool = False
    extra_args: list[str] = field(default_factory=list)


@dataclass
class Stack:
    backend: Server
    proxy: Server | None
    url: str

    @property
    def watched(self) -> dict[str, int]:
        roles = {"backend": self.backend.pid}
        if self.proxy is not None:
            roles["proxy"] = self.proxy.pid
        return roles

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        self.backend.stop()


class Lab:
    """Starts and stops the processes of one path, with configs in a temporary folder."""

    def __init__(self, settings: Settings, workdir: Path, gateway_cmd: list[str], nginx: str | None) -> None:
        self.s = settings
        self.workdir = workdir
        self.gateway_cmd = gateway_cmd
        self.nginx = nginx
        self.counter = 0
        self.backend_config = self.write_json("backend.yaml", self.gateway_config(1, "WARNING", False, 0))

    def write_json(self, name: str, value: dict[str, Any]) -> Path:
        path = self.workdir / name
        path.write_text(json.dumps(value, indent=2) + "\n")  # JSON is YAML
        return path

    def gateway_config(self, backend_port: int, log_level: str, compress: bool, port: int) -> dict[str, Any]:
        backend = {"url": f"ws://127.0.0.1:{backend_port}{PATH}", "auth": "query", "compress": compress}
        return {
            "listen": {"host": "127.0.0.1", "port": port},
            "path": PATH,
            "log_level": log_level,
            "auth": {"algorithms": ["HS256"], "secret": SECRET},
            "backends": {"old": dict(backend), "new": dict(backend)},
            "rollout": {"new_percent": 0},
            "limits": {
                "ping_interval_seconds": self.s.args.ping_interval,
                "max_upstream_connections": max(10000, self.s.idle_sessions + 1000),
            },
            "drain": {"grace_seconds": 0, "window_seconds": 0},
        }

    def mint_tokens(self, users: int) -> list[str]:
        procs = [
            subprocess.Popen([*self.gateway_cmd, "token", f"bench-user-{i}", "--config", str(self.backend_config), "--ttl", "14400"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.workdir)
            for i in range(users)
        ]
        tokens = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise BenchError(f"`ws-gateway token` failed: {err.strip()}")
            tokens.append(out.strip())
        return tokens

    def name(self, base: str) -> str:
        self.counter += 1
        return f"{self.counter:03d}-{base}"

    def start(self, spec: PathSpec) -> Stack:
        bport = free_port()
        backend = Server(self.name("backend"), [*self.gateway_cmd, "stub-backend", "--style", "old", "--port", str(bport),
                                                "--config", str(self.backend_config)], bport, self.workdir).start()
        try:
            proxy = None
            port = bport
            if spec.kind == "nginx":
                assert self.nginx is not None
                port = free_port()
                proxy = self.start_nginx(bport, port)
            elif spec.kind == "gateway":
                port = free_port()
                config = self.write_json(f"{self.name('gateway')}.yaml",
                                         self.gateway_config(bport, spec.log_level, spec.compress, port))
                argv = [*self.gateway_cmd, "serve", "--config", str(config), *shlex.split(self.s.args.gateway_args),
                        *spec.extra_args]
                proxy = Server(self.name(spec.key), argv, port, self.workdir).start()
        except BaseException:
            backend.stop()
            raise
        return Stack(backend, proxy, f"ws://127.0.0.1:{port}{PATH}")

    def start_nginx(self, backend_port: int, port: int) -> Server:
        assert self.nginx is not None
        prefix = self.workdir / self.name("nginx")
        prefix.mkdir()
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / sub).mkdir()
        os.chmod(self.workdir, 0o755)  # nginx's worker may run as nobody
        connections = max(4096, 2 * self.s.idle_sessions + 2048)
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, connections=connections, nofile=connections + 1024,
                                          backend_port=backend_port, port=port))
        argv = [self.nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
        return Server(prefix.name, argv, port, self.workdir).start()


NGINX_CONF = """\
# Generated by bench/run.py: a pass-through WebSocket proxy, one worker, loopback only.
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile {nofile};

events {{
    worker_connections {connections};
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://127.0.0.1:{backend_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


# -- driving one scenario ---------------------------------------------------------------------


SCENARIOS = ("idle", "sat64", "satlarge", "latency", "setup", "deflate64")


def load_options(settings: Settings, scenario: str, url: str, tokens: list[str]) -> dict[str, Any]:
    a = settings.args
    common = {"urls": [f"{url}?token={t}" for t in tokens], "warmup": settings.warmup, "binary": a.frame == "binary"}
    if scenario in ("sat64", "satlarge", "deflate64"):
        size = a.large_size if scenario == "satlarge" else 64
        return {**common, "scenario": "saturate", "conns": a.conns, "inflight": a.inflight, "size": size,
                "duration": settings.sat_seconds, "deflate": scenario == "deflate64",
                "deflateThreshold": a.deflate_threshold}
    if scenario == "latency":
        return {**common, "scenario": "latency", "conns": a.latency_conns, "rate": a.rate, "size": 64,
                "duration": settings.latency_seconds}
    if scenario == "idle":
        return {**common, "scenario": "idle", "size": 64, "sessions": settings.idle_sessions,
                "openSeconds": a.idle_open_seconds, "settle": 1 if a.quick else 2}
    if scenario == "setup":
        return {**common, "scenario": "setup", "conns": a.setup_loops, "size": 64, "duration": settings.setup_seconds,
                "setupMode": a.setup_mode}
    raise ValueError(scenario)


def window_bound(opts: dict[str, Any]) -> float:
    """Seconds the harness waits for any one step of the load generator."""
    if opts["scenario"] == "idle":
        return opts["openSeconds"] + 60
    return opts["warmup"] + opts["duration"] + 60


async def quiesce(roots: dict[str, int], limit: float = 5.0) -> None:
    """Wait (bounded) until the watched processes are idle, so no earlier work leaks into a window."""
    deadline = time.monotonic() + limit
    before = sum(cpu_seconds(pid) for pid in roots.values())
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        now = sum(cpu_seconds(pid) for pid in roots.values())
        if now - before < 0.025:  # under 10 % of a core
            return
        before = now


def sample(roots: dict[str, int]) -> dict[str, float]:
    out = {role: cpu_seconds(pid) for role, pid in roots.items()}
    out["t"] = time.monotonic()
    return out


async def expect(proc: asyncio.subprocess.Process, events: set[str], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"load generator: no {'/'.join(sorted(events))} within {timeout:.0f} s")
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), remaining)
        except asyncio.TimeoutError:
            continue
        if not line:
            raise BenchError(f"load generator exited ({await proc.wait()}) before {'/'.join(sorted(events))}")
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("event") == "error":
            raise BenchError(f"load generator: {msg.get('error')}")
        if msg.get("event") in events:
            return msg


async def drive(node: str, opts: dict[str, Any], stack: Stack, logdir: Path,
                on_go: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one scenario; returns the load generator's report and what /proc said."""
    bound = window_bound(opts)
    opts = {**opts, "maxSeconds": bound * 3}
    with open(logdir / "load.stderr", "ab") as err:
        proc = await asyncio.create_subprocess_exec(
            node, str(BENCH / "load.js"), json.dumps(opts), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=err, cwd=BENCH, limit=1 << 20)
    assert proc.stdin is not None
    watched = stack.watched
    observed: dict[str, Any] = {}
    helper = None
    try:
        await expect(proc, {"ready"}, bound)
        await quiesce(watched)
        roots = {**watched, "loadgen": proc.pid}
        if opts["scenario"] == "idle":
            observed["rss_before_kib"] = {role: rss_kib(pid) for role, pid in watched.items()}
        s0 = sample(roots)
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        if on_go is not None:
            helper = on_go()
        if opts["scenario"] == "idle":
            observed["opened"] = await expect(proc, {"opened"}, bound)
            observed["rss_after_kib"] = {role: rss_kib(pid) for role, pid in watched.items()}
            proc.stdin.write(b"close\n")
            await proc.stdin.drain()
        report = await expect(proc, {"done"}, bound)
        s1 = sample(roots)
        observed["cpu_s"] = {role: s1[role] - s0[role] for role in roots}
        # The load generator may have exited by the second sample (its /proc entry gone):
        # its own account of the window, from process.cpuUsage(), is the one to use.
        if isinstance(report.get("loadgen_cpu_s"), (int, float)):
            observed["cpu_s"]["loadgen"] = report["loadgen_cpu_s"]
        observed["wall_s"] = s1["t"] - s0["t"]
    finally:
        if proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if helper is not None:
            try:
                helper.wait(timeout=60)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
    return report, observed


def metrics(scenario: str, kind: str, report: dict[str, Any], seen: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one scenario on one path. For `direct`, "proxy" figures are the backend's."""
    cpu, wall = seen.get("cpu_s", {}), seen.get("wall_s") or 1.0
    proxy_role = "proxy" if kind != "direct" else "backend"
    busy = {f"{role}_cpu_pct": 100 * cpu[role] / wall for role in ("loadgen", "proxy", "backend") if role in cpu}
    trouble = {k: report.get(k, 0) for k in ("errors", "unexpected_closes", "bad_echoes", "failed", "lost", "failures")
               if report.get(k)}
    if report.get("error_samples"):
        trouble["error_samples"] = report["error_samples"]
    out: dict[str, Any] = {**busy, **trouble}
    if scenario in ("sat64", "satlarge", "deflate64"):
        n = max(report["echoed"], 1)
        out.update(msgs_per_s=report["msgs_per_s"], echoed=report["echoed"],
                   cpu_us_per_msg=1e6 * cpu[proxy_role] / n, backend_cpu_us_per_msg=1e6 * cpu["backend"] / n,
                   loadgen_cpu_us_per_msg=1e6 * cpu["loadgen"] / n)
    elif scenario == "latency":
        rtt = report["rtt_ms"]
        out.update(p50_ms=rtt["p50"], p90_ms=rtt["p90"], p99_ms=rtt["p99"], max_ms=rtt["max"],
                   samples=rtt["samples"], msgs_per_s=report["msgs_per_s"])
    elif scenario == "idle":
        opened = seen["opened"]["opened"]
        before, after = seen["rss_before_kib"], seen["rss_after_kib"]
        out.update(sessions=opened, open_seconds=seen["opened"]["open_seconds"],
                   timed_out=seen["opened"].get("timed_out", False),
                   rss_before_kib=before[proxy_role], rss_after_kib=after[proxy_role],
                   kib_per_session=(after[proxy_role] - before[proxy_role]) / max(opened, 1),
                   backend_kib_per_session=(after["backend"] - before["backend"]) / max(opened, 1),
                   still_open=report.get("still_open"))
    elif scenario == "setup":
        n = max(report["completed"], 1)
        out.update(handshakes_per_s=report["handshakes_per_s"], completed=report["completed"],
                   cpu_us_per_setup=1e6 * cpu[proxy_role] / n, backend_cpu_us_per_setup=1e6 * cpu["backend"] / n,
                   loadgen_cpu_us_per_setup=1e6 * cpu["loadgen"] / n, open_ms_p50=report["open_ms"]["p50"])
    return out


def brief(scenario: str, m: dict[str, Any]) -> str:
    if "error" in m:
        return f"error: {m['error']}"
    if scenario in ("sat64", "satlarge", "deflate64"):
        text = f"{m['msgs_per_s']:,.0f} msgs/s, {m['cpu_us_per_msg']:.1f} µs/msg"
    elif scenario == "latency":
        text = f"p50 {m['p50_ms']:.3f} ms, p99 {m['p99_ms']:.3f} ms"
    elif scenario == "idle":
        text = f"{m['sessions']} sessions in {m['open_seconds']:.1f} s, {m['kib_per_session']:.1f} KiB each"
    else:
        text = f"{m['handshakes_per_s']:,.0f}/s, {m['cpu_us_per_setup']:.0f} µs each"
    text += f" (CPU % load gen {m.get('loadgen_cpu_pct', 0):.0f}"
    if "proxy_cpu_pct" in m:
        text += f", proxy {m['proxy_cpu_pct']:.0f}"
    text += f", backend {m.get('backend_cpu_pct', 0):.0f})"
    problems = {k: m[k] for k in ("errors", "unexpected_closes", "bad_echoes", "failed", "lost", "failures") if m.get(k)}
    if problems:
        text += f" PROBLEMS {problems}"
    return text


# -- the plan ---------------------------------------------------------------------------------


def plan(settings: Settings, nginx: str | None) -> list[tuple[PathSpec, list[str]]]:
    a = settings.args
    paths = [p.strip() for p in a.paths.split(",") if p.strip()]
    wanted = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SCENARIOS]
    if unknown:
        raise BenchError(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    steps: list[tuple[PathSpec, list[str]]] = []

    def add(spec: PathSpec, scenarios: list[str]) -> None:
        chosen = [s for s in scenarios if s in wanted]
        if chosen:
            steps.append((spec, chosen))

    order = list(SCENARIOS)  # idle first: each stack starts fresh, so its memory baseline is clean
    if "direct" in paths:
        add(PathSpec("direct", "direct"), order)
    if "nginx" in paths and nginx is not None:
        add(PathSpec("nginx", "nginx"), order)
    if "gateway" in paths:
        add(PathSpec("gateway", "gateway"), ["idle", "sat64", "satlarge", "latency"])
        # Set-up cost includes the session's log line (issue 8): this gateway logs at INFO.
        add(PathSpec("gateway", "gateway", log_level="INFO"), ["setup"])
        add(PathSpec("gateway", "gateway", compress=True), ["deflate64"])
        if a.workers_scaling:
            add(PathSpec(f"gateway-w{a.workers_scaling}", "gateway", extra_args=["--workers", str(a.workers_scaling)]),
                ["sat64"])
    return steps


async def measure(settings: Settings, lab: Lab, node: str, tokens: list[str]) -> list[dict[str, dict[str, Any]]]:
    steps = plan(settings, lab.nginx)
    runs: list[dict[str, dict[str, Any]]] = []
    for r in range(settings.runs):
        results: dict[str, dict[str, Any]] = {}
        for spec, scenarios in steps:
            label = spec.key + ("" if spec.log_level == "WARNING" and not spec.compress else
                                f" ({'log INFO' if spec.log_level != 'WARNING' else 'compress: true'})")
            try:
                stack = lab.start(spec)
            except BenchError as exc:
                say(f"[run {r + 1}/{settings.runs}] {label}: could not start: {exc}")
                for scenario in scenarios:
                    results.setdefault(spec.key, {})[scenario] = {"error": f"start failed: {exc}"}
                continue
            try:
                for scenario in scenarios:
                    opts = load_options(settings, scenario, stack.url, tokens)
                    try:
                        report, seen = await drive(node, opts, stack, lab.workdir)
                        m = metrics(scenario, spec.kind, report, seen)
                    except (BenchError, KeyError) as exc:
                        m = {"error": str(exc)}
                    results.setdefault(spec.key, {})[scenario] = m
                    say(f"[run {r + 1}/{settings.runs}] {label:<24} {scenario:<9} {brief(scenario, m)}")
                    for server in (stack.proxy, stack.backend):
                        if server is not None and server.proc is not None and server.proc.poll() is not None:
                            raise BenchError(f"{server.name} died: {server.log_tail()}")
            except BenchError as exc:
                say(f"[run {r + 1}/{settings.runs}] {label}: {exc}")
            finally:
                stack.stop()
        runs.append(results)
    return runs


def medians(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in {p for run in runs for p in run}:
        for scenario in {s for run in runs for s in run.get(path, {})}:
            values = [run[path][scenario] for run in runs if scenario in run.get(path, {})]
            good = [v for v in values if "error" not in v]
            if not good:
                out.setdefault(path, {})[scenario] = {"error": values[0]["error"]}
                continue
            merged: dict[str, Any] = {"runs": len(good)}
            for key in good[0]:
                numbers = [v[key] for v in good if isinstance(v.get(key), (int, float)) and not isinstance(v.get(key), bool)]
                if numbers:
                    merged[key] = statistics.median(numbers)
            if len(good) < len(values):
                merged["failed_runs"] = len(values) - len(good)
            out.setdefault(path, {})[scenario] = merged
    return out


# -- the table --------------------------------------------------------------------------------


def fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100 and digits <= 1:
        text = f"{value:,.0f}"
    else:
        text = f"{value:,.{digits}f}"
    return text + unit


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    r = a / b
    return f"{r:.2f}×" if r < 10 else f"{r:.0f}×"


def get(med: dict[str, dict[str, Any]], path: str, scenario: str, key: str) -> float | None:
    value = med.get(path, {}).get(scenario, {}).get(key)
    return value if isinstance(value, (int, float)) else None


def render_table(med: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    s = meta["settings"]
    size_large = s["large_size"]
    large = f"{size_large // 1024} KiB" if size_large % 1024 == 0 else f"{size_large} B"
    rows: list[tuple[str, str, str, str, str, str]] = []

    def row(label: str, scenario: str, key: str, unit: str, digits: int = 1, cpu_like: bool = False) -> None:
        d, n, g = (get(med, p, scenario, key) for p in ("direct", "nginx", "gateway"))
        dtext = fmt(d, unit, digits)
        if cpu_like and d is not None:
            dtext = f"({dtext})"
        rows.append((label, dtext, fmt(n, unit, digits), fmt(g, unit, digits), ratio(g, n), ratio(g, d)))

    rows.append((f"saturation 64 B ({s['conns']} conns × {s['inflight']} in flight)", "", "", "", "", ""))
    row("  echoed msgs/s", "sat64", "msgs_per_s", "", 0)
    row("  proxy CPU per echoed message", "sat64", "cpu_us_per_msg", " µs", 1, True)
    rows.append((f"saturation {large}", "", "", "", "", ""))
    row("  echoed msgs/s", "satlarge", "msgs_per_s", "", 0)
    row("  proxy CPU per echoed message", "satlarge", "cpu_us_per_msg", " µs", 1, True)
    rows.append((f"latency at {s['rate']:,} msgs/s, 64 B ({s['latency_conns']} conns)", "", "", "", "", ""))
    for q in ("p50", "p90", "p99"):
        row(f"  round trip {q}", "latency", f"{q}_ms", " ms", 3)
    d50, n50, g50 = (get(med, p, "latency", "p50_ms") for p in ("direct", "nginx", "gateway"))
    n_add = None if n50 is None or d50 is None else n50 - d50
    g_add = None if g50 is None or d50 is None else g50 - d50
    rows.append(("  added median over direct", "—", ("+" + fmt(n_add, " ms", 3)) if n_add is not None else "—",
                 ("+" + fmt(g_add, " ms", 3)) if g_add is not None else "—", ratio(g_add, n_add), ""))
    rows.append((f"idle sessions ({s['idle_sessions']:,})", "", "", "", "", ""))
    row("  RSS per idle session", "idle", "kib_per_session", " KiB", 1, True)
    rows.append((f"set-up ({s['setup_loops']} concurrent loops, {s['setup_mode']})", "", "", "", "", ""))
    row("  handshakes per second", "setup", "handshakes_per_s", "", 0)
    row("  proxy CPU per session set-up", "setup", "cpu_us_per_setup", " µs", 0, True)
    rows.append(("permessage-deflate clients, 64 B saturation", "", "", "", "", ""))
    row("  echoed msgs/s", "deflate64", "msgs_per_s", "", 0)
    row("  proxy CPU per echoed message", "deflate64", "cpu_us_per_msg", " µs", 1, True)

    head = ("", "direct¹", "nginx, 1 worker", "ws-gateway", "gw ÷ nginx", "gw ÷ direct¹")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(6)]
    lines = [
        f"ws-gateway benchmark — {meta['machine']['cores']} cores ({meta['machine']['cpu']}), "
        f"median of {s['runs']} run(s), loopback, Node ws load generator",
        f"legacy clients (?token=), {s['frame']} frames, no compression except the deflate rows; gateway log level WARNING "
        f"(set-up: INFO); gateway pings every {s['ping_interval']:g} s; nginx access_log off",
        "",
    ]
    fmt_line = "  ".join(["{:<%d}" % widths[0]] + ["{:>%d}" % w for w in widths[1:]])
    lines.append(fmt_line.format(*head))
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(fmt_line.format(*r))
    lines.append("")
    lines.append("¹ direct: the clients talk to the echo backend itself. There is no proxy: figures in parentheses are")
    lines.append("  the backend's own CPU or memory, and the gw ÷ direct column compares the gateway's cost with the backend's.")
    lines.append("  CPU per message = utime + stime of the proxy's whole process tree over the window ÷ echoed messages")
    lines.append("  (one frame each way through the proxy).")

    workers = [p for p in med if p.startswith("gateway-w")]
    for p in workers:
        n_workers = int(p.split("-w")[1])
        w = med[p].get("sat64", {})
        one = get(med, "gateway", "sat64", "msgs_per_s")
        if "error" in w:
            lines.append(f"\nworkers scaling (--workers {n_workers}): not measured: {w['error']}")
        elif one:
            lines.append(f"\nworkers scaling: --workers {n_workers}, saturation 64 B: {w['msgs_per_s']:,.0f} msgs/s = "
                         f"{w['msgs_per_s'] / one:.2f}× one worker ({one:,.0f}); goal ≥ {0.9 * n_workers:.1f}×; "
                         f"CPU {w.get('cpu_us_per_msg', 0):.1f} µs/msg; load generator at {w.get('loadgen_cpu_pct', 0):.0f} % "
                         "of a core")

    lines.append("")
    lines.append("CPU busy during each window, % of one core — load generator / proxy / backend:")
    names = {"sat64": "saturation 64 B", "satlarge": f"saturation {large}", "latency": "latency",
             "idle": "idle (opening)", "setup": "set-up", "deflate64": "deflate 64 B"}
    paths = [p for p in ("direct", "nginx", "gateway", *workers) if p in med]
    lines.append("  {:<18}".format("") + "".join(f"{p:>22}" for p in paths))
    for scenario in ("sat64", "satlarge", "latency", "setup", "deflate64"):
        cells = []
        for p in paths:
            m = med.get(p, {}).get(scenario)
            if not m or "error" in m:
                cells.append("—" if not m else "error")
                continue
            proxy = "–" if p == "direct" else f"{m.get('proxy_cpu_pct', 0):.0f}"
            cells.append(f"{m.get('loadgen_cpu_pct', 0):.0f} / {proxy} / {m.get('backend_cpu_pct', 0):.0f}")
        if any(c != "—" for c in cells):
            lines.append("  {:<18}".format(names[scenario]) + "".join(f"{c:>22}" for c in cells))
    hot = [(p, sc) for p in paths for sc, m in med.get(p, {}).items() if (m.get("loadgen_cpu_pct") or 0) >= 90]
    if hot:
        lines.append("  note: the load generator was at ≥ 90 % of a core in " + ", ".join(f"{p}/{sc}" for p, sc in hot)
                     + ": there its throughput is the load generator's; the CPU-per-unit figures still hold.")
    problems = [(p, sc, m) for p in med for sc, m in med[p].items() if "error" in m or m.get("failed_runs")]
    for p, sc, m in problems:
        lines.append(f"  problem: {p}/{sc}: {m.get('error') or str(m.get('failed_runs')) + ' run(s) failed'}")
    return "\n".join(lines)


# -- machine description -----------------------------------------------------------------------


def run_text(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (done.stdout + done.stderr).strip() or "unknown"


def machine(node: str, nginx: str | None, gateway_cmd: list[str]) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gw_python = Path(gateway_cmd[0]).with_name("python") if Path(gateway_cmd[0]).name == "ws-gateway" else None
    py = str(gw_python) if gw_python and gw_python.exists() else sys.executable
    versions = run_text([py, "-c", "import sys, aiohttp; v = sys.version.split()[0]\n"
                                   "try:\n import uvloop; u = uvloop.__version__\nexcept ImportError: u = 'none'\n"
                                   "print(v, aiohttp.__version__, u)"]).split()
    try:
        ws_version = json.loads((BENCH / "node_modules" / "ws" / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        ws_version = "unknown"
    commit = run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = run_text(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", "gateway"])
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": versions[0] if len(versions) == 3 else platform.python_version(),
        "aiohttp": versions[1] if len(versions) == 3 else "unknown",
        "uvloop": versions[2] if len(versions) == 3 else "unknown",
        "node": run_text([node, "--version"]),
        "ws": ws_version,
        "nginx": run_text([nginx, "-v"]).replace("nginx version: ", "") if nginx else "not run",
        "git_commit": commit + ("+dirty gateway/" if dirty not in ("", "unknown") else ""),
        "gateway_cmd": " ".join(gateway_cmd),
    }


# -- profiling -----------------------------------------------------------------------------------


def find_py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def profile(settings: Settings, lab: Lab, node: str, tokens: list[str], outdir: Path) -> dict[str, Any]:
    py_spy = find_py_spy()
    if py_spy is None:
        say("py-spy is not installed (pip install py-spy): no profile")
        return {}
    outdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(BENCH))
    from profile_summary import summarise  # noqa: PLC0415

    seconds = settings.args.profile_seconds
    summaries = {}
    for name, spec, scenario in (("setup", PathSpec("gateway", "gateway", log_level="INFO"), "setup"),
                                 ("sat64", PathSpec("gateway", "gateway"), "sat64")):
        stack = lab.start(spec)
        try:
            assert stack.proxy is not None
            out = outdir / f"gateway-{name}.folded"
            opts = load_options(settings, scenario, stack.url, tokens)
            opts["duration"] = seconds + 2
            pid = stack.proxy.pid

            def start_spy(out: Path = out, pid: int = pid) -> subprocess.Popen[bytes]:
                return subprocess.Popen([py_spy, "record", "--native", "--subprocesses", "--format", "raw",
                                         "-o", str(out), "--pid", str(pid), "--duration", str(int(seconds))],
                                        stdout=subprocess.DEVNULL, stderr=open(lab.workdir / "py-spy.log", "ab"))

            report, seen = await drive(node, opts, stack, lab.workdir, on_go=start_spy)
            m = metrics(scenario, "gateway", report, seen)
            say(f"[profile] gateway {scenario:<9} {brief(scenario, m)} (under py-spy: not in the table)")
            if out.exists():
                summaries[name] = summarise(out)
                (outdir / f"gateway-{name}.txt").write_text(summaries[name]["text"])
                say(f"[profile] {out} and its summary {outdir / f'gateway-{name}.txt'}")
            else:
                say(f"[profile] py-spy wrote nothing for {name}: see {lab.workdir / 'py-spy.log'}")
        finally:
            stack.stop()
    return summaries


# -- main ----------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> int:
    started = time.monotonic()
    settings = settings_from(args)
    nofile = raise_nofile(max(65536, 4 * settings.idle_sessions + 4096))
    if nofile < 2 * settings.idle_sessions + 1024:
        say(f"open-file limit is {nofile}: lowering idle sessions to fit")
        settings.idle_sessions = max(100, (nofile - 1024) // 2)
    node = ensure_node()
    nginx = None if args.no_nginx else find_nginx(args.nginx)
    gateway_cmd = gateway_command(args.gateway_cmd)
    workdir = Path(tempfile.mkdtemp(prefix="ws-gateway-bench-"))
    lab = Lab(settings, workdir, gateway_cmd, nginx)
    say(f"bench: working folder {workdir}; gateway command: {' '.join(gateway_cmd)}; nginx: {nginx or 'skipped'}")
    try:
        tokens = lab.mint_tokens(args.users)
        meta = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
            "machine": machine(node, nginx, gateway_cmd),
            "settings": {
                "runs": settings.runs, "warmup_s": settings.warmup, "saturation_s": settings.sat_seconds,
                "latency_s": settings.latency_seconds, "setup_s": settings.setup_seconds,
                "idle_sessions": settings.idle_sessions, "conns": args.conns, "inflight": args.inflight,
                "large_size": args.large_size, "rate": args.rate, "latency_conns": args.latency_conns,
                "setup_loops": args.setup_loops, "setup_mode": args.setup_mode, "frame": args.frame,
                "deflate_threshold": args.deflate_threshold, "users": args.users, "ping_interval": args.ping_interval,
                "gateway_args": args.gateway_args, "workers_scaling": args.workers_scaling,
                "gateway_log_level": "WARNING (set-up: INFO)", "nginx_access_log": "off",
            },
        }
        runs = await measure(settings, lab, node, tokens)
        med = medians(runs)
        profiles = await profile(settings, lab, node, tokens, args.profile) if args.profile else {}
        elapsed = time.monotonic() - started
        meta["elapsed_s"] = round(elapsed, 1)
        table = render_table(med, meta)
        print(table)
        print(f"\n(finished in {elapsed / 60:.1f} min; command: {meta['command']})")
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            result = {"meta": meta, "medians": med, "runs": runs, "table": table,
                      "profiles": {k: {kk: vv for kk, vv in v.items() if kk != "text"} for k, v in profiles.items()}}
            args.json_out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
            say(f"results: {args.json_out}")
        if args.plot:
            try:
                sys.path.insert(0, str(BENCH))
                from plot import plot  # noqa: PLC0415

                plot({"meta": meta, "medians": med}, args.plot)
                say(f"plot: {args.plot}")
            except ImportError as exc:
                say(f"no plot ({exc}): pip install matplotlib (or pip install -e '.[bench]')")
        return 0
    finally:
        if args.keep_tmp:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    args = build_parser().parse_args()
    try:
        return asyncio.run(main_async(args))
    except BenchError as exc:
        say(f"bench: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
