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
command line and its YAML config. See docs/benchmarks.md for what each number means. The
processes and the machine are in `lab.py`, the numbers and the table in `results.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lab import (
    BENCH,
    ROOT,
    BenchError,
    Lab,
    PathSpec,
    Settings,
    Stack,
    cpu_seconds,
    ensure_node,
    find_nginx,
    gateway_command,
    raise_nofile,
    rss_kib,
    say,
)
from results import brief, medians, metrics, render_table


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
