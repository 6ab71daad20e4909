"""An unreachable backend's errors say what to fix: host, port and the OS's own message.

Both in the log line of the failed attempt and in `/rollout`'s last upstream error per
backend, and never the token (a query-style backend's URL carries it).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import aiohttp
import pytest

from gateway.service.admin import create_admin_app
from gateway.wire.handshake import UpgradeRefused
from gateway.service.runtime import describe_error
from gateway.service.server import start_site

from .helpers import TIMEOUT, Servers, Stack, closed, make_token, open_client, refused_port

UNKNOWN_HOST = "no-such-chat-backend.invalid"  # RFC 2606: never resolves


def backends(old_url: str, new_port: int) -> dict[str, Any]:
    return {
        "old": {"url": old_url, "auth": "query"},  # the token travels in this URL's query
        "new": {"url": f"ws://127.0.0.1:{new_port}/ws/chat", "auth": "message"},
    }


async def rollout(stack: Stack, servers: Servers) -> dict[str, Any]:
    runner, port = await start_site(create_admin_app(stack.gateway), "127.0.0.1", 0)
    servers.closing(runner.cleanup)
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/rollout") as response:
        assert response.status == 200
        text = await response.text()
        body: dict[str, Any] = await response.json()
    return {"body": body, "text": text}


async def fail_one_session(stack: Stack, token: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, "legacy", token)
        assert (await closed(ws))[0] == 1014


def unreachable_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "upstream unreachable"]


def resolver_message(host: str) -> str:
    """What this machine's resolver says about `host` (glibc: "Name or service not known")."""
    with pytest.raises(socket.gaierror) as raised:
        socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM)
    assert raised.value.strerror
    return raised.value.strerror


async def test_an_unknown_host_is_named_with_its_port_and_the_resolvers_words(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    new_port = await servers.stub("new")
    stack = await servers.stack(backends=backends(f"ws://{UNKNOWN_HOST}:8765/ws/chat", new_port))
    token = make_token("uma")
    caplog.set_level(logging.INFO)

    await fail_one_session(stack, token)

    expected = {"host": UNKNOWN_HOST, "port": 8765, "error": resolver_message(UNKNOWN_HOST)}
    assert expected["error"] != "gaierror"
    [line] = unreachable_lines(caplog)
    assert {key: getattr(line, key) for key in expected} == expected and line.backend == "old"
    answer = await rollout(stack, servers)
    last = answer["body"]["last_upstream_error"]
    assert last["new"] is None
    assert {key: last["old"][key] for key in expected} == expected and last["old"]["at"].endswith("Z")
    assert token not in answer["text"] and token not in caplog.text


async def test_a_refused_port_is_named_with_connection_refused(servers: Servers, caplog: pytest.LogCaptureFixture) -> None:
    new_port = await servers.stub("new")
    token = make_token("rob")
    caplog.set_level(logging.INFO)
    async with refused_port() as port:
        stack = await servers.stack(backends=backends(f"ws://127.0.0.1:{port}/ws/chat", new_port))
        await fail_one_session(stack, token)

    expected = {"host": "127.0.0.1", "port": port, "error": "Connection refused"}
    [line] = unreachable_lines(caplog)
    assert {key: getattr(line, key) for key in expected} == expected
    answer = await rollout(stack, servers)
    assert {key: answer["body"]["last_upstream_error"]["old"][key] for key in expected} == expected
    assert token not in answer["text"] and token not in caplog.text


def test_each_kind_of_upstream_error_reads_as_what_to_fix() -> None:
    assert describe_error(TimeoutError(), 10.0) == "no answer within 10 s"
    assert describe_error(UpgradeRefused(503, "status 503"), 10.0) == "upgrade refused with HTTP 503"
    assert describe_error(UpgradeRefused(0, "response head too large")) == "upgrade refused: response head too large"
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")  # how asyncio words it
    assert describe_error(refused) == "Connection refused"
    assert describe_error(socket.gaierror(-2, "Name or service not known")) == "Name or service not known"
    assert describe_error(ConnectionResetError("the backend closed the connection during the upgrade")) == (
        "the backend closed the connection during the upgrade"
    )
