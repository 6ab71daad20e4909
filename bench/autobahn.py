"""The Autobahn TestSuite's fuzzing client through the gateway, beside the backend alone.

    python bench/autobahn.py --wstest PATH/TO/wstest [--cases '*'] [--exclude '9.*'] [--relays byte,frame]

Starts a strict echo backend (the `websockets` library, permessage-deflate on), then runs
`wstest -m fuzzingclient` (Autobahn is Python 2 code: install it with pip into a Python 2.7
virtualenv and pass its `wstest`) against three targets on loopback: the backend alone, and
the gateway in front of it on each relay (a legacy client, token in the URL, routed to a
query-style backend that echoes). It prints one table: per target, how many cases ended in
each verdict, for behaviour and for the close, and every case where a gateway column is worse
than the backend's. Exit 1 when one is. The reports stay in --out (HTML and JSON per case).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jwt
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.core.configparse import parse_config  # noqa: E402
from gateway.wire.listener import listen  # noqa: E402
from gateway.service.runtime import Gateway  # noqa: E402

SECRET = "autobahn-run-secret-at-least-32-bytes-long"
# Autobahn's verdicts, best first: a gateway column may not have a case further down than the backend's.
RANK = {"OK": 0, "NON-STRICT": 1, "INFORMATIONAL": 1, "UNIMPLEMENTED": 2, "WRONG CODE": 3, "UNCLEAN": 3, "FAILED": 4}


async def echo(ws: Any) -> None:
    try:
        async for message in ws:
            await ws.send(message)
    except websockets.ConnectionClosed:
        pass  # the fuzzing client breaks connections on purpose


async def start_gateway(backend_port: int, relay: str) -> tuple[Any, str]:
    url = f"ws://127.0.0.1:{backend_port}/echo"
    config = parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "auth": {"algorithms": ["HS256"], "secret": SECRET},
            "backends": {"old": {"url": url, "auth": "query", "compress": True}, "new": {"url": url, "auth": "message"}},
            "rollout": {"new_percent": 0, "salt": "autobahn"},
            # Autobahn's 9.x cases send messages of up to 16 MiB.
            "limits": {"max_message_bytes": 32 * 1024 * 1024, "ping_interval_seconds": 0},
        },
        env={},
    )
    listener = await listen(Gateway(config, byte_relay=relay == "byte"), "127.0.0.1", 0)
    token = jwt.encode({"user_id": "autobahn", "exp": int(time.time()) + 6 * 3600}, SECRET, algorithm="HS256")
    return listener, f"ws://127.0.0.1:{listener.port}/ws/chat?token={token}"


async def fuzz(wstest: str, name: str, url: str, cases: list[str], exclude: list[str], out: Path) -> dict[str, Any]:
    spec = {
        "outdir": str(out / name),
        "servers": [{"agent": name, "url": url}],
        "cases": cases,
        "exclude-cases": exclude,
        "exclude-agent-cases": {},
    }
    spec_path = out / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    print(f"autobahn: {name} ...", file=sys.stderr, flush=True)
    proc = await asyncio.create_subprocess_exec(
        wstest, "-m", "fuzzingclient", "-s", str(spec_path), cwd=out,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    if await proc.wait() != 0:
        raise SystemExit(f"wstest failed on {name} (exit {proc.returncode})")
    report: dict[str, Any] = json.loads((out / name / "index.json").read_text())[name]
    return report


def table(results: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    names = list(results)
    lines = ["| verdict | " + " | ".join(f"{n} behaviour | {n} close" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    counts = {n: (Counter(c["behavior"] for c in r.values()), Counter(c["behaviorClose"] for c in r.values())) for n, r in results.items()}
    for verdict in sorted({v for b, c in counts.values() for v in (*b, *c)}, key=lambda v: RANK.get(v, 9)):
        cells = [f"{counts[n][0][verdict]} | {counts[n][1][verdict]}" for n in names]
        lines.append(f"| {verdict} | " + " | ".join(cells) + " |")
    lines.append(f"| cases | " + " | ".join(f"{len(r)} | {len(r)}" for r in results.values()) + " |")
    base = results[names[0]]
    worse = []
    for name in names[1:]:
        for case, got in sorted(results[name].items()):
            want = base.get(case)
            if want is None:
                continue
            for key in ("behavior", "behaviorClose"):
                if RANK.get(got[key], 9) > RANK.get(want[key], 9):
                    worse.append(f"{name} {case} {key}: {got[key]} (backend alone: {want[key]})")
    return "\n".join(lines), worse


async def main_async(args: argparse.Namespace) -> int:
    logging.getLogger("websockets").setLevel(logging.CRITICAL)  # every broken connection is on purpose
    out = Path(args.out or tempfile.mkdtemp(prefix="autobahn-"))
    out.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")
    exclude = [c for c in args.exclude.split(",") if c]
    results: dict[str, dict[str, Any]] = {}
    async with websockets.serve(echo, "127.0.0.1", 0, max_size=None, compression="deflate") as server:
        port = server.sockets[0].getsockname()[1]
        results["backend"] = await fuzz(args.wstest, "backend", f"ws://127.0.0.1:{port}/echo", cases, exclude, out)
        for relay in args.relays.split(","):
            listener, url = await start_gateway(port, relay)
            try:
                results[f"gateway-{relay}"] = await fuzz(args.wstest, f"gateway-{relay}", url, cases, exclude, out)
            finally:
                await listener.close()
    text, worse = table(results)
    print(text)
    print()
    print("\n".join(worse) if worse else "no case where the gateway does worse than the backend alone")
    print(f"reports: {out}", file=sys.stderr)
    return 1 if worse else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wstest", required=True, help="the wstest command of an Autobahn TestSuite install (Python 2.7)")
    parser.add_argument("--cases", default="*", help="comma-separated case patterns (default: all)")
    parser.add_argument("--exclude", default="", help="comma-separated case patterns to skip (default: none)")
    parser.add_argument("--relays", default="byte,frame", help="the gateway's relays to run (default: byte,frame)")
    parser.add_argument("--out", help="where the reports go (default: a new temporary directory)")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
