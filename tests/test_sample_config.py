"""`config/gateway.yaml`, the file the README's container command mounts: safe as shipped.

Its values are the defaults (the one deliberate difference, an admin listener, is at the
default loopback address), so behind a load balancer it cannot lock users out: the test
sends what a balancer forwards, every client on the balancer's address.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import websockets
import yaml

from gateway.core.config import AdminConfig, Config, config_warnings
from gateway.service.configfile import load_config
from gateway.core.configparse import parse_config
from gateway.wire.listener import listen
from gateway.service.runtime import Gateway
from gateway.service.server import start_site
from gateway.staging.stub_backend import create_stub_app

from .helpers import SECRET, TIMEOUT, authenticate_frame, closed, make_token

SAMPLE = Path(__file__).resolve().parent.parent / "config" / "gateway.yaml"


def sample() -> Config:
    return load_config(SAMPLE, env={"JWT_SECRET": SECRET})


def test_every_value_of_the_sample_is_the_default_but_the_admin_listener_it_turns_on() -> None:
    raw = yaml.safe_load(SAMPLE.read_text(encoding="utf-8"))
    defaults = parse_config({"auth": {"secret": SECRET}, "backends": raw["backends"]})
    shipped = sample()
    assert shipped.admin == AdminConfig(), "on, at the default (loopback) host and port"
    assert replace(shipped, admin=None) == defaults


def test_the_sample_gives_check_config_nothing_to_warn_about() -> None:
    assert config_warnings(sample()) == []


@pytest.fixture
async def gateway_url() -> AsyncIterator[str]:
    """The sample config in front of both stub backends, reached as through a load balancer on 127.0.0.1."""
    config = sample()
    runners = []
    ports = {}
    for style in ("old", "new"):
        runner, ports[style] = await start_site(create_stub_app(style, config.auth), "127.0.0.1", 0)
        runners.append(runner)
    backends = {name: replace(b, url=f"ws://127.0.0.1:{ports[name]}{config.path}") for name, b in config.backends.items()}
    gateway = Gateway(replace(config, backends=backends))
    listener = await listen(gateway, "127.0.0.1", 0)
    try:
        yield f"ws://127.0.0.1:{listener.port}{config.path}"
    finally:
        await listener.close()
        for runner in runners:
            await runner.cleanup()


async def test_21_bad_tokens_from_21_forwarded_clients_do_not_lock_out_the_next_valid_one(gateway_url: str) -> None:
    for n in range(21):
        headers = {"X-Forwarded-For": f"203.0.113.{n + 1}"}
        async with websockets.connect(gateway_url, additional_headers=headers, open_timeout=TIMEOUT) as ws:
            await ws.send(authenticate_frame(make_token("mallory", secret="not-the-secret-" + "x" * 32)))
            code, _ = await closed(ws)
            assert code == 1008
    headers = {"X-Forwarded-For": "198.51.100.7"}
    async with websockets.connect(gateway_url, additional_headers=headers, open_timeout=TIMEOUT) as ws:
        await ws.send(authenticate_frame(make_token("alice")))
        connected = await ws.recv(decode=True)
        assert '"connected"' in connected, connected
        await ws.send("still served")
        assert await ws.recv() == "still served"
