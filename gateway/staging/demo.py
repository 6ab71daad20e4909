"""``ws-gateway demo``: the gateway with both stub backends on loopback, from a config file
it writes, so every step of the runbook can be rehearsed against it before a real rollout."""

from __future__ import annotations

import os
import secrets
import tempfile
from typing import Any

import yaml

from ..core.auth import mint_token
from ..core.config import AuthConfig, Config
from ..service.configfile import load_config
from ..core.routing import choose_backend
from ..service.server import RunningGateway, Signals, start_site
from .stub_backend import create_stub_app


def demo_raw(secret: str, old_port: int, new_port: int, port: int, admin_port: int, new_percent: float) -> dict[str, Any]:
    """The demo's config file: what `serve` reads, so every runbook step works against it."""
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "auth": {"algorithms": ["HS256"], "secret": secret},
        "backends": {
            "old": {"url": f"ws://127.0.0.1:{old_port}/ws/chat", "auth": "query"},
            "new": {"url": f"ws://127.0.0.1:{new_port}/ws/chat", "auth": "message"},
        },
        "rollout": {"new_percent": new_percent, "salt": "demo"},
        "usage": {"path": "usage.db"},
        "admin": {"host": "127.0.0.1", "port": admin_port},
    }


def write_demo_config(path: str, raw: dict[str, Any]) -> None:
    """Owner-only: the file holds the demo's generated secret, so `probe --config` can mint tokens."""
    header = "# ws-gateway demo: edit rollout.new_percent and save; the gateway reloads it within seconds.\n"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(header + yaml.safe_dump(raw, sort_keys=False))


async def demo(port: int, new_percent: float) -> int:
    secret = secrets.token_urlsafe(32)
    auth = AuthConfig(secret=secret)
    runners = []
    with Signals() as signals, tempfile.TemporaryDirectory(prefix="ws-gateway-demo-") as scratch:
        path = os.path.join(scratch, "gateway.yaml")
        try:
            old_runner, old_port = await start_site(create_stub_app("old", auth), "127.0.0.1", 0)
            runners.append(old_runner)
            new_runner, new_port = await start_site(create_stub_app("new", auth), "127.0.0.1", 0)
            runners.append(new_runner)
            # Bound first, so the file names the ports really in use (restart-only keys:
            # the first edit must not read as a change of them).
            write_demo_config(path, demo_raw(secret, old_port, new_port, port, 0, new_percent))

            def bound(running: RunningGateway) -> None:
                assert running.admin_port is not None
                write_demo_config(path, demo_raw(secret, old_port, new_port, running.port, running.admin_port, new_percent))

            async with RunningGateway(load_config(path), config_path=path, signals=signals, bound=bound) as running:
                assert running.admin_port is not None
                banner = demo_banner(running.gateway.config, path, running.port, old_port, new_port, running.admin_port)
                print(banner, flush=True)
                await signals.stop.wait()
        finally:
            for runner in reversed(runners):
                await runner.cleanup()
    return 0


def demo_banner(config: Config, path: str, port: int, old_port: int, new_port: int, admin_port: int) -> str:
    """What to try, with commands a fresh install runs (`ws-gateway` itself, a browser)."""
    users: dict[str, str] = {}
    for n in range(1, 1000):
        user = f"user-{n}"
        users.setdefault(choose_backend(user, config.rollout).backend, user)
        if len(users) == 2:
            break
    url = f"ws://127.0.0.1:{port}{config.path}"
    admin = f"http://127.0.0.1:{admin_port}"
    lines = [
        f"ws-gateway demo: gateway on {url}",
        f"  old backend (token in URL):   ws://127.0.0.1:{old_port}{config.path}",
        f"  new backend (authenticate):   ws://127.0.0.1:{new_port}{config.path}",
        f"  rollout: {config.rollout.new_percent:g}% of users to the new backend",
        f"  status page: {admin}/   (also {admin}/rollout  /metrics  /readyz)",
        "  config file (edit rollout.new_percent and save: it reloads; removed when the demo stops):",
        f"config: {path}",
        "  try the runbook on it:",
        f"    ws-gateway check-config {path}",
        f"    ws-gateway route USER_ID --config {path}",
        f"    ws-gateway probe {url} --config {path} --user USER_ID",
        f"    ws-gateway report --config {path}",
        "",
    ]
    for backend, user in sorted(users.items()):
        token = mint_token(config.auth, user, 3600)
        lines += [
            f"{user} is routed to the {backend} backend ({choose_backend(user, config.rollout).explain()}). Token:",
            f"  {token}",
            f"  both app styles: ws-gateway probe {url} --config {path} --user {user}",
            f"  browser console: ws = new WebSocket('{url}'); ws.onmessage = e => console.log(e.data);"
            f" ws.onopen = () => ws.send(JSON.stringify({{type: 'authenticate', token: '{token}'}}))",
            "",
        ]
    lines.append("Anything you send after that is echoed by the backend. Ctrl-C stops the demo.")
    return "\n".join(lines)
