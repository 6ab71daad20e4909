"""The benchmark's lab: the machine it runs on and the processes it measures.

What `run.py` starts (a stub backend, nginx, the gateway, each on a free loopback port in
a temporary folder), what it needs installed (Node's `ws`, nginx), and /proc readings of
a process tree's CPU and memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
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


@dataclass
class Settings:
    """What the command line chose, with the --quick defaults applied (`run.settings_from`)."""

    runs: int
    warmup: float
    sat_seconds: float
    latency_seconds: float
    setup_seconds: float
    idle_sessions: int
    args: argparse.Namespace


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
