"""Shared builders for tests: one valid config and token, changed one thing at a time."""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import jwt
from aiohttp import web

from gateway.app import GATEWAY, Gateway, create_app
from gateway.config import Config, parse_config
from gateway.server import start_site
from gateway.stub_backend import create_stub_app

SECRET = "test-secret-0123456789-abcdefghijklmnop"
TIMEOUT = 10.0  # the one time unit every test wait is bounded by


def raw_config(old_port: int = 1, new_port: int = 2, **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "path": "/ws/chat",
        "auth": {"algorithms": ["HS256"], "secret": SECRET, "timeout_seconds": 5},
        "backends": {
            "old": {"url": f"ws://127.0.0.1:{old_port}/ws/chat", "auth": "query"},
            "new": {"url": f"ws://127.0.0.1:{new_port}/ws/chat", "auth": "message"},
        },
        "rollout": {"new_percent": 0, "salt": "test-salt"},
        "limits": {"ping_interval_seconds": 0},
    }
    for key, value in sections.items():
        if isinstance(value, Mapping) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **copy.deepcopy(dict(value))}
        else:
            raw[key] = value
    return raw


def make_config(old_port: int = 1, new_port: int = 2, **sections: Any) -> Config:
    return parse_config(raw_config(old_port, new_port, **sections), env={})


def make_token(user_id: Any = "alice", *, secret: str = SECRET, algorithm: str = "HS256", ttl: float = 300, **claims: Any) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"user_id": user_id, "iat": now, "exp": now + ttl}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, secret, algorithm=algorithm)


@dataclass
class Stack:
    """A gateway and both stub backends, each on its own free loopback port."""

    gateway_url: str
    old_port: int
    new_port: int
    gateway: Gateway
    runners: list[web.AppRunner]

    def url(self, query: str = "") -> str:
        return self.gateway_url + (f"?{query}" if query else "")

    def route_to(self, backend: str) -> None:
        """Send every user to `backend` from now on."""
        config = self.gateway.config
        rollout = replace(config.rollout, new_percent=100.0 if backend == "new" else 0.0)
        self.gateway.apply(replace(config, rollout=rollout))

    async def close(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()


async def start_stack(*, old_port: int | None = None, new_port: int | None = None, **sections: Any) -> Stack:
    """Start stubs (unless ports are given, e.g. of a custom backend) and a gateway in front."""
    runners = []
    auth = make_config().auth
    if old_port is None:
        runner, old_port = await start_site(create_stub_app("old", auth), "127.0.0.1", 0)
        runners.append(runner)
    if new_port is None:
        runner, new_port = await start_site(create_stub_app("new", auth), "127.0.0.1", 0)
        runners.append(runner)
    config = make_config(old_port, new_port, **sections)
    app = create_app(config)
    runner, port = await start_site(app, "127.0.0.1", 0)
    runners.append(runner)
    return Stack(f"ws://127.0.0.1:{port}{config.path}", old_port, new_port, app[GATEWAY], runners)
