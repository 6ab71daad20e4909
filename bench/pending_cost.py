#!/usr/bin/env python3
"""What one pending handshake costs: the numbers `limits.max_pending_handshakes` is sized by.

    python bench/pending_cost.py                 # 2,000 sockets per row, 3 runs
    python bench/pending_cost.py --sockets 5000 --runs 1

A gateway process (`ws-gateway serve`) on 127.0.0.1; for each row, N loopback sockets are
opened against it and held until its `ws_gateway_pending_handshakes` gauge shows them all,
then its VmRSS and the kernel's TCP buffer pages (/proc/net/sockstat, both ends of every
loopback socket, so an upper bound) are read again. Rows: sockets that send nothing, and
sockets that sent half a request head (the parser and the head buffer allocated), and
sockets upgraded that never authenticate (a message-style session waiting for its token,
still counted as pending). The
gateway is a fresh process for every measurement (memory freed by earlier sockets would be
reused and hide the cost). Prints the median per socket of each row.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import StartFailed, free_port, start_listening

PARTIAL_HEAD = (
    b"GET /ws/chat?room=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"User-Agent: Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 Chrome/131.0 Mobile Safari/537.36\r\n"
)
WHOLE_HEAD = PARTIAL_HEAD + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"


def config_text(port: int, admin: int) -> str:
    return f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
path: /ws/chat
auth: {{algorithms: [HS256], secret: "pending-cost-secret-0123456789abcdefgh", timeout_seconds: 600}}
backends:
  old: {{url: "ws://127.0.0.1:9/ws/chat", auth: query}}
  new: {{url: "ws://127.0.0.1:9/ws/chat", auth: message}}
limits: {{max_pending_handshakes: 100000, max_pending_handshakes_per_ip: 100000, handshake_timeout_seconds: 600}}
log_level: WARNING
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("pending_cost: no VmRSS")


def tcp_mem_kib() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    raise SystemExit("pending_cost: no TCP line in /proc/net/sockstat")


def pending(admin: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("ws_gateway_pending_handshakes "):
            return int(float(line.split()[1]))
    raise SystemExit("pending_cost: no ws_gateway_pending_handshakes gauge")


def await_pending(admin: int, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if pending(admin) == count:
            return
        time.sleep(0.1)
    raise SystemExit(f"pending_cost: the gateway did not reach {count} pending handshakes within 60 s")


def start_gateway(workdir: Path, python: str) -> tuple[subprocess.Popen[bytes], int, int]:
    port, admin = free_port(), free_port()
    config = workdir / "gateway.yaml"
    config.write_text(config_text(port, admin))
    argv = [python, "-m", "gateway", "serve", "--config", str(config)]
    try:
        return start_listening("the gateway", argv, admin, workdir / "gateway.log", timeout=20), port, admin
    except StartFailed as exc:
        raise SystemExit(f"pending_cost: {exc}") from None


def measure(proc: subprocess.Popen[bytes], port: int, admin: int, count: int, send: bytes) -> tuple[float, float]:
    """KiB per socket: (the gateway's RSS, the kernel's TCP buffers)."""
    await_pending(admin, 0)
    rss_before, tcp_before = rss_kib(proc.pid), tcp_mem_kib()
    sockets = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if send:
                sock.sendall(send)
            sockets.append(sock)
        await_pending(admin, count)
        rss_after, tcp_after = rss_kib(proc.pid), tcp_mem_kib()
    finally:
        for sock in sockets:
            sock.close()
    return (rss_after - rss_before) / count, (tcp_after - tcp_before) / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=2000, help="sockets held per row")
    parser.add_argument("--runs", type=int, default=3, help="runs per row; the median is printed")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs the gateway")
    args = parser.parse_args()
    rows = {
        "idle (nothing sent)": b"",
        "half a request head sent": PARTIAL_HEAD,
        "upgraded, not authenticated": WHOLE_HEAD,
    }
    with tempfile.TemporaryDirectory(prefix="pending-cost-") as tmp:
        print(f"{'row':<28} {'RSS KiB/socket':>15} {'kernel TCP KiB/socket':>22}")
        for name, send in rows.items():
            results = [fresh(Path(tmp), args.python, args.sockets, send) for _ in range(args.runs)]
            rss = statistics.median(r[0] for r in results)
            tcp = statistics.median(r[1] for r in results)
            print(f"{name:<28} {rss:>15.2f} {tcp:>22.2f}")
    return 0


def fresh(workdir: Path, python: str, count: int, send: bytes) -> tuple[float, float]:
    """One measurement in a new gateway process: memory freed by earlier sockets would hide the cost."""
    proc, port, admin = start_gateway(workdir, python)
    try:
        return measure(proc, port, admin, count, send)
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    raise SystemExit(main())
