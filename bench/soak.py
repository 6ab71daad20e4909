#!/usr/bin/env python3
"""A soak: thousands of sessions through a real gateway process, and nothing lost or leaked.

    python bench/soak.py              # long form: 20,000 sessions, up to 5 minutes
    python bench/soak.py --short      # CI form: 400 sessions, up to 60 s

Everything runs on 127.0.0.1: two stub backends (`ws-gateway stub-backend`, echoing every
frame) and a gateway (`ws-gateway serve`) with a config file in a temporary folder. Clients
(the `websockets` library) use both auth styles, send random text and binary frames —
some before the session is even confirmed — and end in every way an app does: a clean
close, a close without waiting for the echoes, a dropped TCP connection, or the backend
closing with an application code. Midway the new backend is killed and restarted and
`rollout.new_percent` is changed in the file.

At the end every frame a client sent must have come back in order, unless the session
ended by something the soak itself did (the client's own early close or drop, the backend
restart); the gateway must be back to no open sessions, its file descriptors and tasks
back to where they started, and its RSS near its start. One summary line; exit 0 on PASS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import websockets

from common import StartFailed, free_port, start_listening

SECRET = "soak-secret-0123456789abcdefghijklmnopqrstuv"
ENDINGS = ("clean", "clean", "clean", "backend_close", "client_early_close", "client_drop")
RSS_SLACK = 1.10  # RSS may end this much above its warmed-up start (allocator noise)
RSS_SLACK_MIB = 8.0


def token(user: str) -> str:
    return jwt.encode({"user_id": user, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


def config_text(port: int, admin: int, old: int, new: int, new_percent: float) -> str:
    return f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
path: /ws/chat
auth: {{algorithms: [HS256], secret: "{SECRET}", timeout_seconds: 10}}
backends:
  old: {{url: "ws://127.0.0.1:{old}/ws/chat", auth: query}}
  new: {{url: "ws://127.0.0.1:{new}/ws/chat", auth: message}}
rollout: {{new_percent: {new_percent}, salt: soak, guard: {{enabled: false}}}}
limits: {{ping_interval_seconds: 5, max_pending_handshakes: 5000}}
log_level: WARNING
"""


@dataclass
class Tally:
    sessions: Counter[str] = field(default_factory=Counter)
    frames_sent: int = 0
    frames_back: int = 0
    excused: int = 0  # echoes not expected because the soak itself ended the session early
    lost: int = 0
    corrupted: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)


class Lab:
    def __init__(self, workdir: Path, gateway_cmd: list[str]) -> None:
        self.workdir = workdir
        self.cmd = gateway_cmd
        self.port, self.admin, self.old, self.new = free_port(), free_port(), free_port(), free_port()
        self.config = workdir / "gateway.yaml"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.restart_window: tuple[float, float] | None = None

    def start(self, name: str, args: list[str], port: int) -> None:
        """Start a process and wait (bounded) until `port` accepts connections."""
        try:
            self.procs[name] = start_listening(name, self.cmd + args, port, self.workdir / f"{name}.log", timeout=20)
        except StartFailed as exc:
            raise SystemExit(f"soak: {exc}") from None

    def start_all(self, new_percent: float) -> None:
        self.config.write_text(config_text(self.port, self.admin, self.old, self.new, new_percent))
        for style, port in (("old", self.old), ("new", self.new)):
            self.start(style, ["stub-backend", "--style", style, "--port", str(port), "--config", str(self.config)], port)
        self.start("gateway", ["serve", "--config", str(self.config)], self.admin)

    def restart_new(self) -> None:
        began = time.monotonic()
        self.restart_window = (began, float("inf"))
        proc = self.procs["new"]
        proc.kill()
        proc.wait()
        self.start("new", ["stub-backend", "--style", "new", "--port", str(self.new), "--config", str(self.config)],
                   self.new)
        self.restart_window = (began, time.monotonic() + 1.0)

    def in_restart(self, moment: float) -> bool:
        return self.restart_window is not None and self.restart_window[0] <= moment <= self.restart_window[1]

    def set_percent(self, new_percent: float) -> None:
        text = self.config.read_text()
        self.config.write_text(re.sub(r"new_percent: [0-9.]+", f"new_percent: {new_percent}", text))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()

    # -- what the gateway holds ------------------------------------------------------------------

    @property
    def gateway_pid(self) -> int:
        return self.procs["gateway"].pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.gateway_pid}/fd"))

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.gateway_pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))

    def tasks(self) -> int:
        status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/rollout", timeout=5).read())
        return int(status["tasks"])


async def session(lab: Lab, index: int, rng: random.Random, tally: Tally) -> None:
    style = rng.choice(("legacy", "message"))
    ending = rng.choice(ENDINGS)
    user = f"soak-{index % 500}"
    url = f"ws://127.0.0.1:{lab.port}/ws/chat"
    frames: list[str | bytes] = []
    for n in range(rng.randint(1, 12)):
        size = rng.choice((1, 16, 200, 2000))
        frames.append(f"{index}:{n}:" + "x" * size if rng.random() < 0.7 else os.urandom(size))
    early = rng.randint(0, len(frames))  # sent before waiting for anything
    tally.sessions[style] += 1
    tally.sessions[ending] += 1
    back: list[str | bytes] = []
    sent = 0
    try:
        async with asyncio.timeout(30):
            if style == "legacy":
                ws = await websockets.connect(f"{url}?token={token(user)}", max_size=None, ping_interval=None)
            else:
                ws = await websockets.connect(url, max_size=None, ping_interval=None)
                await ws.send(f'{{"type":"authenticate","token":"{token(user)}"}}')
            for frame in frames[:early]:
                await ws.send(frame)
                sent += 1
            if style == "message":
                first = await ws.recv()
                if not (isinstance(first, str) and json.loads(first).get("type") == "connected"):
                    tally.corrupted += 1
                    tally.problem(f"session {index}: first frame was not connected: {first!r:.80}")
            for frame in frames[early:]:
                await ws.send(frame)
                sent += 1
            tally.frames_sent += sent
            if ending == "client_early_close":
                await ws.close()
                tally.excused += sent
                return
            if ending == "client_drop":
                ws.transport.abort()
                tally.excused += sent
                return
            while len(back) < sent:
                back.append(await ws.recv())
            if back != frames:
                tally.corrupted += 1
                tally.problem(f"session {index}: echoes out of order or changed")
            tally.frames_back += len(back)
            if ending == "backend_close":
                code = 4000 + index % 900
                await ws.send(f'{{"type":"stub.close","code":{code},"reason":"soak"}}')
                with contextlib.suppress(websockets.ConnectionClosed):
                    extra = await ws.recv()
                    tally.problem(f"session {index}: frame after stub.close: {extra!r:.80}")
                if ws.close_code == 1014 and lab.in_restart(time.monotonic()):
                    tally.sessions["ended_by_restart"] += 1
                elif ws.close_code != code:
                    tally.problem(f"session {index}: backend closed {code}, client got {ws.close_code}")
                    tally.corrupted += 1
            else:
                await ws.close()
                if ws.close_code == 1014 and lab.in_restart(time.monotonic()):
                    tally.sessions["ended_by_restart"] += 1
                elif ws.close_code != 1000:
                    tally.problem(f"session {index}: clean close answered with {ws.close_code}")
                    tally.corrupted += 1
    except (websockets.ConnectionClosed, OSError, TimeoutError, websockets.InvalidStatus) as exc:
        missing = max(sent - len(back), 0)
        tally.frames_back += len(back)
        if sent and tally.frames_sent < sent:
            tally.frames_sent += sent
        code = getattr(exc, "rcvd", None) and exc.rcvd.code  # type: ignore[union-attr]
        if lab.in_restart(time.monotonic()) and code in (None, 1011, 1012, 1014):
            tally.excused += missing
            tally.sessions["ended_by_restart"] += 1
        else:
            tally.lost += missing
            tally.problem(f"session {index} ({style}, {ending}): {type(exc).__name__} {exc!s:.100}")


async def settle(lab: Lab, seconds: float) -> None:
    """Wait (bounded) until the gateway holds no session and no handshake."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if lab.metric("ws_gateway_connections_active") == 0 and lab.metric("ws_gateway_pending_handshakes") == 0:
            return
        await asyncio.sleep(0.2)


async def soak(args: argparse.Namespace, lab: Lab) -> int:
    rng = random.Random(args.seed)
    tally = Tally()
    # Warm up at full concurrency, so the baseline already holds what the allocator keeps
    # after a peak (freed memory is not given back to the OS): growth after it is a leak.
    warm = asyncio.Semaphore(args.concurrency)

    async def warm_one(n: int) -> None:
        async with warm:
            await session(lab, -1 - n, rng, Tally())

    await asyncio.gather(*(warm_one(n) for n in range(args.warmup)))
    await settle(lab, 10)
    start_fds, start_rss, start_tasks = lab.fds(), lab.rss_mib(), lab.tasks()
    started = time.monotonic()
    limit = asyncio.Semaphore(args.concurrency)
    events = {"restart": args.sessions // 3, "percent": args.sessions // 2}

    async def one(index: int) -> None:
        async with limit:
            if time.monotonic() - started > args.duration:
                tally.sessions["not_started_time_bound"] += 1
                return
            if index == events["restart"]:
                await asyncio.to_thread(lab.restart_new)
            if index == events["percent"]:
                lab.set_percent(20)
            await session(lab, index, rng, tally)

    await asyncio.gather(*(one(n) for n in range(args.sessions)))
    await settle(lab, 15)
    await asyncio.sleep(0.5)  # let closed sockets' file descriptors be released
    end_fds, end_rss, end_tasks = lab.fds(), lab.rss_mib(), lab.tasks()
    active = lab.metric("ws_gateway_connections_active")
    leaks = []
    if end_fds > start_fds:
        leaks.append(f"fds {start_fds}->{end_fds}")
    if end_tasks > start_tasks:
        leaks.append(f"tasks {start_tasks}->{end_tasks}")
    if end_rss > max(start_rss * RSS_SLACK, start_rss + RSS_SLACK_MIB):
        leaks.append(f"rss {start_rss:.1f}->{end_rss:.1f} MiB")
    if active:
        leaks.append(f"{active:g} sessions still open")
    log_text = (lab.workdir / "gateway.log").read_text(errors="replace")
    errors = log_text.count('"level": "error"') + log_text.count('"level": "critical"')
    if errors:
        leaks.append(f"{errors} error lines in the gateway's log ({lab.workdir / 'gateway.log'})")
    ok = not leaks and tally.lost == 0 and tally.corrupted == 0 and lab.procs["gateway"].poll() is None
    s = tally.sessions
    print(
        f"soak: {sum(s[k] for k in ('legacy', 'message'))} sessions (legacy {s['legacy']}, message {s['message']}; "
        f"clean {s['clean']}, backend close {s['backend_close']}, client early close {s['client_early_close']}, "
        f"client drop {s['client_drop']}, ended by restart {s['ended_by_restart']}) in {time.monotonic() - started:.0f} s; "
        f"frames sent {tally.frames_sent}, echoed {tally.frames_back}, excused {tally.excused}, lost {tally.lost}, "
        f"corrupted {tally.corrupted}; fds {start_fds}->{end_fds}, tasks {start_tasks}->{end_tasks}, "
        f"rss {start_rss:.1f}->{end_rss:.1f} MiB, error log lines {errors}: {'PASS' if ok else 'FAIL ' + ', '.join(leaks)}"
    )
    for problem in tally.problems:
        print("  " + problem, file=sys.stderr)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="the CI form: 400 sessions within 60 s")
    p.add_argument("--sessions", type=int, help="sessions in all (default 20000, --short 400)")
    p.add_argument("--duration", type=float, help="stop starting sessions after this many seconds (300, --short 60)")
    p.add_argument("--concurrency", type=int, default=100, help="sessions open at once")
    p.add_argument("--seed", type=int, default=6455)
    p.add_argument("--warmup", type=int, help="sessions before the baseline (default 10000, --short 1000)")
    p.add_argument("--gateway-cmd", default=str(Path(sys.executable).with_name("ws-gateway")))
    args = p.parse_args()
    args.sessions = args.sessions or (400 if args.short else 20000)
    args.duration = args.duration or (60.0 if args.short else 300.0)
    args.warmup = args.warmup or (1000 if args.short else 10000)
    workdir = Path(tempfile.mkdtemp(prefix="ws-gateway-soak-"))
    cmd = [args.gateway_cmd] if Path(args.gateway_cmd).exists() else [shutil.which("ws-gateway") or "ws-gateway"]
    lab = Lab(workdir, cmd)
    try:
        lab.start_all(new_percent=50)
        status = asyncio.run(soak(args, lab))
        if status:
            print(f"soak: logs kept in {workdir}", file=sys.stderr)
        return status
    finally:
        lab.stop()
        if "status" in locals() and status == 0:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
