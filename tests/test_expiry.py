"""auth.session_expiry: close — a session ends when its token does, unless the app refreshes it in-band."""

from __future__ import annotations

import asyncio
import json
import time

import jwt
import pytest

from .helpers import SECRET, Servers, closed, make_token, metric, open_client

EXPIRY = {"session_expiry": "close"}


def token_until(user: str, exp: float) -> str:
    return jwt.encode({"user_id": user, "exp": int(exp)}, SECRET, algorithm="HS256")


async def until(moment: float) -> None:
    """Let wall-clock time reach `moment` (the scenario is about time passing)."""
    await asyncio.sleep(max(0.0, moment - time.time()))


async def expiring_stack(servers: Servers, backend_style: str):
    backend = await servers.recording(backend_style)
    ports = {"old_port": backend.port} if backend_style == "query" else {"new_port": backend.port}
    percent = 0 if backend_style == "query" else 100
    stack = await servers.stack(auth=EXPIRY, rollout={"new_percent": percent}, **ports)
    return stack, backend


async def open_session(stack, style: str, token: str, backend_style: str):
    ws = await open_client(stack, style, token)
    if style == "message":
        assert json.loads(await ws.recv())["type"] == "connected"
    await ws.send("hi")
    assert await ws.recv() == "hi"
    return ws


@pytest.mark.parametrize("style", ["legacy", "message"])
@pytest.mark.parametrize("backend_style", ["query", "message"])
async def test_the_session_closes_at_exp_on_both_legs(servers: Servers, style, backend_style):
    stack, backend = await expiring_stack(servers, backend_style)
    ws = await open_session(stack, style, token_until("alice", time.time() + 2), backend_style)
    sock = backend.sockets[-1]
    code, reason = await closed(ws)  # nothing sent: the deadline alone closes it
    assert (code, reason) == (1008, "token expired")
    assert (await sock.wait_closed())[0] == 1008
    assert metric(stack, "ws_gateway_session_expiries_total") == 1


@pytest.mark.parametrize("backend_style", ["query", "message"])
async def test_a_refresh_moves_the_deadline_and_reaches_only_a_message_backend(servers: Servers, backend_style):
    stack, backend = await expiring_stack(servers, backend_style)
    first_exp = time.time() + 2
    ws = await open_session(stack, "message", token_until("alice", first_exp), backend_style)
    sock = backend.sockets[-1]
    refresh = json.dumps({"type": "authenticate", "token": make_token("alice", ttl=3600)})
    await ws.send(refresh)
    await ws.send("after refresh")
    assert await ws.recv() == ("after refresh" if backend_style == "query" else refresh)
    if backend_style == "message":
        assert await ws.recv() == "after refresh"
    await until(first_exp + 1.5)
    await ws.send("still here")
    assert await ws.recv() == "still here"
    frames = [f for f in sock.frames if isinstance(f, str)]
    assert (refresh in frames) is (backend_style == "message")
    await ws.close()


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (make_token("mallory"), "token names another user"),
        (make_token("alice", ttl=-60), "token expired"),
        ("not-a-jwt", "malformed token"),
    ],
)
async def test_a_bad_refresh_closes_both_legs_with_1008(servers: Servers, token, reason):
    stack, backend = await expiring_stack(servers, "query")
    ws = await open_session(stack, "legacy", make_token("alice"), "query")
    sock = backend.sockets[-1]
    await ws.send(json.dumps({"type": "authenticate", "token": token}))
    assert await closed(ws) == (1008, reason)
    assert (await sock.wait_closed())[0] == 1008


async def test_a_chat_message_mentioning_authenticate_is_just_relayed(servers: Servers):
    stack, _ = await expiring_stack(servers, "query")
    ws = await open_session(stack, "legacy", make_token("alice"), "query")
    text = '{"type":"chat","text":"what does \\"authenticate\\" mean?"}'
    await ws.send(text)
    assert await ws.recv() == text
    await ws.close()


async def test_off_by_default_an_expired_token_keeps_its_session(servers: Servers):
    stack = await servers.stack()
    exp = time.time() + 1
    ws = await open_session(stack, "legacy", token_until("alice", exp), "query")
    await until(exp + 1.2)
    await ws.send("still")
    assert await ws.recv() == "still"
    await ws.close()
