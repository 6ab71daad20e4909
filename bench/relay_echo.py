"""Round-trip throughput through the gateway against the same echo backend reached directly.

    python bench/relay_echo.py [--clients 50] [--messages 200] [--size 256]

Everything runs on 127.0.0.1 in one process (the gateway and stub backend in this event
loop, the clients too), so the numbers compare the two paths on this machine rather than
measure either in isolation. The load is bounded: clients x messages round trips, and
the whole run stops after 120 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import aiohttp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from gateway.app import create_app  # noqa: E402
from gateway.auth import mint_token  # noqa: E402
from gateway.config import parse_config  # noqa: E402
from gateway.server import start_site  # noqa: E402
from gateway.stub_backend import create_stub_app  # noqa: E402

SECRET = "bench-secret-0123456789abcdefghijklmnop"


async def clients(url: str, count: int, messages: int, payload: str) -> float:
    async with aiohttp.ClientSession() as http:
        sockets = [await http.ws_connect(url, max_msg_size=0) for _ in range(count)]

        async def chat(ws: aiohttp.ClientWebSocketResponse) -> None:
            for _ in range(messages):
                await ws.send_str(payload)
                msg = await ws.receive()
                assert msg.data == payload

        started = time.perf_counter()
        await asyncio.gather(*(chat(ws) for ws in sockets))
        elapsed = time.perf_counter() - started
        for ws in sockets:
            await ws.close()
    return elapsed


async def main(args: argparse.Namespace) -> None:
    raw = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "auth": {"algorithms": ["HS256"], "secret": SECRET},
        "backends": {
            "old": {"url": "ws://127.0.0.1:1/ws/chat", "auth": "query"},
            "new": {"url": "ws://127.0.0.1:1/ws/chat", "auth": "message"},
        },
        "limits": {"max_upstream_connections": args.clients + 10},
    }
    auth = parse_config(raw, env={}).auth
    stub, stub_port = await start_site(create_stub_app("old", auth), "127.0.0.1", 0)
    raw["backends"]["old"]["url"] = f"ws://127.0.0.1:{stub_port}/ws/chat"
    config = parse_config(raw, env={})
    gateway, port = await start_site(create_app(config), "127.0.0.1", 0)
    token = mint_token(config.auth, "bench-user", 3600)
    payload = "x" * args.size
    total = args.clients * args.messages
    try:
        async with asyncio.timeout(120):
            direct = await clients(f"ws://127.0.0.1:{stub_port}/ws/chat?token={token}", args.clients, args.messages, payload)
            relayed = await clients(f"ws://127.0.0.1:{port}/ws/chat?token={token}", args.clients, args.messages, payload)
    finally:
        await gateway.cleanup()
        await stub.cleanup()
    print(f"{total} round trips of {args.size} B, {args.clients} clients")
    print(f"direct to the backend: {total / direct:9.0f} round trips/s")
    print(f"through the gateway:   {total / relayed:9.0f} round trips/s  ({relayed / direct:.2f}x the time)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    asyncio.run(main(parser.parse_args()))
