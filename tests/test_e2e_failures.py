"""End to end over loopback: every way a session can fail, and what each leg then sees.

Every close the client gets goes through `helpers.closed`, which also asserts that the
code is legal on the wire (never 1005, 1006 or 1015).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass

import jwt
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.core.closecodes import SENDABLE

from .helpers import (
    MiB,
    TIMEOUT,
    RecordingBackend,
    Servers,
    Stack,
    authenticate_frame,
    closed,
    make_token,
    open_client,
    receive_until_closed,
    refused_port,
)

# Issue 2's contract: a failing new backend means 1014. (Falling back to the old backend is
# a separate, optional feature; these tests switch it off.)
NO_FALLBACK = {"fallback_to_old": False}
STYLES = ["legacy", "message"]
PATHS = [("legacy", "old"), ("legacy", "new"), ("message", "old"), ("message", "new")]
PATH_IDS = [f"{style}-{backend}" for style, backend in PATHS]

# The contract holds on both relays (`Gateway(byte_relay=...)`): each test runs once per relay,
# except those that end before any session relays (they never read the setting) ...
pytestmark = pytest.mark.relays("byte", "frame")
# ... which run on the default relay only.
before_the_relay = pytest.mark.relays("byte")


def assert_not_echoed(token: str, text: str) -> None:
    assert token not in text
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in text


# -- auth failures: 1008, a short reason without the token, and no upstream ever -------------


@dataclass
class Guarded:
    """A gateway whose backends count every upgrade attempt that reaches them."""

    stack: Stack
    old: RecordingBackend
    new: RecordingBackend

    async def assert_no_upstream_was_opened(self) -> None:
        # A valid session afterwards must be the first upgrade either backend ever sees.
        ws = await open_client(self.stack, "legacy", make_token("probe"), early=["probe"])
        assert await ws.recv() == "probe"
        await ws.close()
        await (await self.old.next_socket()).wait_closed()
        assert (self.old.connections, self.new.connections) == (1, 0)
        assert (self.old.upgrades, self.new.upgrades) == (1, 0)


@pytest.fixture
async def guarded(servers: Servers) -> Guarded:
    old = await servers.recording("query")
    new = await servers.recording("message")
    stack = await servers.stack(old_port=old.port, new_port=new.port, auth={"timeout_seconds": 0.5})
    return Guarded(stack, old, new)


async def expect_auth_failure(guarded: Guarded, ws, token: str) -> None:
    frames = await receive_until_closed(ws)
    code, reason = await closed(ws)
    assert (code, frames) == (1008, [])
    assert reason and len(reason.encode()) <= 123
    assert_not_echoed(token, reason)
    await guarded.assert_no_upstream_was_opened()


def _unsigned_token() -> str:
    return jwt.encode({"user_id": "mallory", "exp": int(time.time()) + 300}, None, algorithm="none")


def _rs256_token() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode({"user_id": "mallory", "exp": int(time.time()) + 300}, key, algorithm="RS256")


BAD_TOKENS = {
    "bad_signature": lambda: make_token(secret="some-other-secret-0123456789-abcdefgh"),
    "expired": lambda: make_token(ttl=-60),
    "not_yet_valid": lambda: make_token(nbf=int(time.time()) + 600),
    "alg_hs512_not_allowed": lambda: make_token(algorithm="HS512"),
    "alg_none": _unsigned_token,
    "alg_rs256_not_allowed": _rs256_token,
    "missing_user_id": lambda: make_token(user_id=None),
    "empty_user_id": lambda: make_token(user_id=""),
    "user_id_not_a_string": lambda: make_token(user_id={"id": 1}),
    "not_a_jwt": lambda: "not-a-jwt-but-secret-looking-0123456789",
}


@before_the_relay
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # HS512 with the HS256 test secret
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("kind", BAD_TOKENS)
async def test_bad_token_closes_1008_without_echoing_it_and_opens_no_upstream(guarded, style, kind):
    token = BAD_TOKENS[kind]()
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(guarded.stack, style, token, early=["sent too early"])
        await expect_auth_failure(guarded, ws, token)


@before_the_relay
async def test_token_over_8_kib_in_authenticate_frame_closes_1008(guarded):
    token = make_token(pad="x" * 8 * 1024)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(guarded.stack, "message", token)
        await expect_auth_failure(guarded, ws, token)


@before_the_relay
async def test_token_over_8_kib_in_url_is_refused_with_4xx_or_1008(guarded):
    token = make_token(pad="x" * 8 * 1024)
    async with asyncio.timeout(TIMEOUT):
        try:
            ws = await websockets.connect(guarded.stack.url(f"token={token}"))
        except websockets.InvalidStatus as exc:  # refused before the upgrade: allowed too
            assert 400 <= exc.response.status_code < 500
            assert_not_echoed(token, exc.response.body.decode("utf-8", "replace"))
            await guarded.assert_no_upstream_was_opened()
        except websockets.InvalidMessage as exc:  # aiohttp answers an over-long request line in HTTP/1.0
            assert re.search(r"HTTP/1\.[01] 4\d\d ", str(exc.__cause__)), exc.__cause__
            await guarded.assert_no_upstream_was_opened()
        else:
            await expect_auth_failure(guarded, ws, token)


BAD_FIRST_FRAMES = {
    "not_json": lambda token: "authenticate " + token,
    "not_an_object": lambda token: json.dumps([{"type": "authenticate", "token": token}]),
    "wrong_type": lambda token: json.dumps({"type": "auth", "token": token}),
    "binary": lambda token: authenticate_frame(token).encode(),
    "missing_token": lambda token: json.dumps({"type": "authenticate", "tok": token}),
    "token_not_a_string": lambda token: json.dumps({"type": "authenticate", "token": [token]}),
    "frame_too_large_for_auth": lambda token: json.dumps({"type": "authenticate", "token": token, "pad": "x" * 20000}),
}


@before_the_relay
@pytest.mark.parametrize("kind", BAD_FIRST_FRAMES)
async def test_bad_first_frame_closes_1008_without_echoing_the_token(guarded, kind):
    token = make_token("mallory")  # valid: only the frame around it is wrong
    async with asyncio.timeout(TIMEOUT):
        ws = await websockets.connect(guarded.stack.url())
        await ws.send(BAD_FIRST_FRAMES[kind](token))
        await ws.send(authenticate_frame(token))  # a correct one afterwards changes nothing
        await expect_auth_failure(guarded, ws, token)


@before_the_relay
async def test_no_first_frame_within_auth_timeout_closes_1008(guarded):
    assert guarded.stack.gateway.config.auth.timeout_seconds == 0.5
    async with asyncio.timeout(TIMEOUT):
        ws = await websockets.connect(guarded.stack.url())
        assert await closed(ws) == (1008, "authentication timed out")
    await guarded.assert_no_upstream_was_opened()


# -- upstream failures ----------------------------------------------------------------------------


@before_the_relay
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
async def test_unreachable_upstream_closes_1014(servers: Servers, path):
    style, backend = path
    async with refused_port() as port:
        stack = await servers.stack(old_port=port, new_port=port, rollout=NO_FALLBACK)
        stack.route_to(backend)
        async with asyncio.timeout(TIMEOUT):
            ws = await open_client(stack, style, make_token(), early=["held"])
            assert await receive_until_closed(ws) == []  # not even a `connected`
            assert (await closed(ws))[0] == 1014


@before_the_relay
@pytest.mark.parametrize(("status", "code"), [(401, 1008), (403, 1008), (503, 1014), (404, 1014)])
@pytest.mark.parametrize("backend", ["old", "new"])
async def test_upstream_refusing_the_upgrade_over_http(servers: Servers, backend, status, code):
    recorder = await servers.recording("query" if backend == "old" else "message", reject_status=status)
    stack = await servers.stack(old_port=recorder.port, new_port=recorder.port, rollout=NO_FALLBACK)
    stack.route_to(backend)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, "legacy", make_token())
        assert (await closed(ws))[0] == code
    assert recorder.upgrades == 1


@before_the_relay
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
async def test_upstream_rejecting_the_token_in_its_handshake_gives_the_client_1008(servers: Servers, path):
    style, backend = path
    other = "the-backends-own-secret-0123456789-abcdef"
    stack = await servers.stack(old_port=await servers.stub("old", secret=other), new_port=await servers.stub("new", secret=other), rollout=NO_FALLBACK)
    stack.route_to(backend)
    token = make_token()
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, style, token, early=["held"])
        frames = await receive_until_closed(ws)
        code, reason = await closed(ws)
    assert code == 1008
    assert_not_echoed(token, reason)
    # An old backend speaks only after the upgrade, so a message client has its `connected` by then.
    assert frames == ([stack.gateway.config.auth.connected_message] if path == ("message", "old") else [])


@before_the_relay
@pytest.mark.parametrize("greeting", ['{"type":"welcome"}', b'{"type":"connected"}', "not json"], ids=["other_type", "binary", "not_json"])
@pytest.mark.parametrize("style", STYLES)
async def test_new_backend_whose_first_frame_is_not_connected_gives_1014(servers: Servers, style, greeting):
    new = await servers.recording("message", greeting=greeting)
    stack = await servers.stack(new_port=new.port, rollout=NO_FALLBACK)
    stack.route_to("new")
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, style, make_token(), early=["held"])
        assert await receive_until_closed(ws) == []  # the bad frame is not passed on
        assert (await closed(ws))[0] == 1014
        sock = await new.next_socket()
        code, _ = await sock.wait_closed()
    assert code in SENDABLE  # closed with a close frame, not dropped
    assert sock.frames == []  # held frames never reach an unready backend


@before_the_relay
@pytest.mark.parametrize("style", STYLES)
async def test_new_backend_that_never_says_connected_gives_1014_after_its_handshake_timeout(servers: Servers, style):
    new = await servers.recording("message", hold_greeting=True)
    stack = await servers.stack(new_port=new.port, backends={"new": {"url": f"ws://127.0.0.1:{new.port}/ws/chat", "auth": "message", "handshake_timeout_seconds": 0.3}}, rollout=NO_FALLBACK)
    stack.route_to("new")
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, style, make_token(), early=["held"])
        assert await receive_until_closed(ws) == []
        assert (await closed(ws))[0] == 1014
        sock = await new.next_socket()
        code, _ = await sock.wait_closed()
    assert code in SENDABLE and sock.frames == []


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
async def test_upstream_that_vanishes_mid_session_gives_the_client_1014(servers: Servers, path):
    style, backend = path
    stack = await servers.stack(rollout=NO_FALLBACK)
    stack.route_to(backend)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, style, make_token(), early=["one", json.dumps({"type": "stub.drop"})])
        frames = await receive_until_closed(ws)
        assert frames[-1] == "one"
        assert (await closed(ws))[0] == 1014


@pytest.mark.parametrize("style", STYLES)
async def test_upstream_that_vanishes_right_after_the_upgrade_gives_the_client_1014(servers: Servers, style):
    old = await servers.recording("query", hold_upgrade=True, abort_after_upgrade=True)
    stack = await servers.stack(old_port=old.port)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, style, make_token(), early=["held-1", b"held-2"])
        await old.requested.wait()
        old.release.set()
        frames = await receive_until_closed(ws)
        assert frames in ([], [stack.gateway.config.auth.connected_message])
        assert (await closed(ws))[0] == 1014


async def test_client_that_vanishes_mid_session_gives_the_backend_1001(servers: Servers):
    old = await servers.recording("query")
    stack = await servers.stack(old_port=old.port)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, "legacy", make_token(), early=["ping"])
        assert await ws.recv() == "ping"
        ws.transport.abort()
        sock = await old.next_socket()
        assert await sock.wait_closed() == (1001, "client connection lost")


# The path only changes the handshake: on the frame relay this rule is covered by
# test_frame_one_byte_over_the_limit_is_refused_1009 and tests/test_relay_switch.py. (Each
# run here waits out the gateway's 5 s close timeout: see _one_byte_over_the_limit_is_refused_1009.)
@pytest.mark.relays("byte")
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
async def test_client_frame_over_max_message_bytes_closes_client_1009_and_backend_cleanly(servers: Servers, path):
    style, backend = path
    old = await servers.recording("query")
    new = await servers.recording("message")
    stack = await servers.stack(old_port=old.port, new_port=new.port)
    stack.route_to(backend)
    recorder = old if backend == "old" else new
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, style, make_token(), early=["ping"], compression=None)
        if style == "message":
            assert json.loads(await ws.recv())["type"] == "connected"
        assert await ws.recv() == "ping"
        await ws.send(b"x" * (MiB + 1))
        assert (await closed(ws))[0] == 1009
        sock = await recorder.next_socket()
        code, _ = await sock.wait_closed()
    assert code in SENDABLE and code not in (1000, 1009)  # a close frame, that says the client went
    assert sock.frames == ["ping"]


@pytest.mark.parametrize("style", STYLES)
async def test_backend_frame_over_max_message_bytes_closes_backend_1009_and_client_cleanly(servers: Servers, style):
    old = await servers.recording("query")
    stack = await servers.stack(old_port=old.port)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, style, make_token(), early=["ping"])
        frames = [await ws.recv() for _ in range(2 if style == "message" else 1)]
        assert frames[-1] == "ping"
        sock = await old.next_socket()
        await sock.ws.send_bytes(b"y" * (MiB + 1))
        assert await receive_until_closed(ws) == []
        code, _ = await closed(ws)
        assert code not in (1000, 1009)
        assert (await sock.wait_closed())[0] == 1009


@pytest.mark.parametrize("code", [0, 1005, 1006, 1015, 999, 2999, 5000])
async def test_backend_sending_an_illegal_close_code_never_reaches_the_client(stack, code):
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, "legacy", make_token(), early=[json.dumps({"type": "stub.close", "code": code, "reason": "r"})])
        assert await receive_until_closed(ws) == []
        got, _ = await closed(ws)  # asserts a legal, non-reserved code
        assert got != code


async def test_close_reason_of_123_bytes_passes_through_unchanged(stack):
    reason = "\u00e9" * 61 + "x"  # 123 UTF-8 bytes
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, "legacy", make_token(), early=[json.dumps({"type": "stub.close", "code": 4999, "reason": reason})])
        assert await closed(ws) == (4999, reason)


# -- the hold buffer -------------------------------------------------------------------------------


async def _held_stack(servers: Servers, backend: str, **limits) -> tuple[Stack, RecordingBackend]:
    if backend == "new":  # upgrade done, `connected` withheld: the gateway is in the upstream handshake
        recorder = await servers.recording("message", hold_greeting=True)
    else:  # the upgrade itself withheld: the gateway is still connecting
        recorder = await servers.recording("query", hold_upgrade=True)
    stack = await servers.stack(old_port=recorder.port, new_port=recorder.port, limits=limits, rollout=NO_FALLBACK)
    stack.route_to(backend)
    return stack, recorder


@before_the_relay
@pytest.mark.parametrize("style", STYLES)
async def test_hold_buffer_overflow_while_connecting_closes_1013(servers: Servers, style):
    stack, old = await _held_stack(servers, "old", hold_buffer_frames=3)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, style, make_token())
        await old.requested.wait()  # the gateway is mid-upgrade
        for frame in ["1", "2", "3", "4"]:
            await ws.send(frame)
        assert await receive_until_closed(ws) == []
        assert (await closed(ws))[0] == 1013
        old.release.set()
        await old.next_finished()
    assert all(sock.frames == [] for sock in old.sockets)


@before_the_relay
@pytest.mark.parametrize("style", STYLES)
async def test_hold_buffer_overflow_during_upstream_handshake_closes_1013_and_the_backend_cleanly(servers: Servers, style):
    stack, new = await _held_stack(servers, "new", hold_buffer_frames=3)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, style, make_token())
        sock = await new.next_socket()
        await sock.authenticated.wait()  # the gateway now waits for `connected`
        for frame in ["1", "2", "3", "4"]:
            await ws.send(frame)
        assert await receive_until_closed(ws) == []
        assert (await closed(ws))[0] == 1013
        code, _ = await sock.wait_closed()
    assert code in SENDABLE and sock.frames == []


@before_the_relay
@pytest.mark.parametrize("style", STYLES)
async def test_hold_buffer_overflow_by_bytes_closes_1013(servers: Servers, style):
    stack, _ = await _held_stack(servers, "old", max_message_bytes=1000, hold_buffer_bytes=1000)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, style, make_token(), early=["\u00e9" * 300, b"b" * 500])  # 600 + 500 bytes
        assert (await closed(ws))[0] == 1013


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
async def test_hold_buffer_filled_exactly_delivers_every_frame_once_ready(servers: Servers, path):
    style, backend = path
    stack, recorder = await _held_stack(servers, backend, hold_buffer_frames=3)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, style, make_token(), early=["1", b"2", "3"])
        await recorder.requested.wait()
        recorder.release.set()
        frames = [await ws.recv() for _ in range(4 if style == "message" else 3)]
        assert frames[-3:] == ["1", b"2", "3"]
        await ws.close()
        sock = await recorder.next_socket()
        assert await sock.wait_closed() == (1000, "")
        assert sock.frames == ["1", b"2", "3"] and sock.frames_before_ready == 0


ONE_BYTE_OVER = pytest.mark.parametrize(
    "frame",
    [b"x" * (MiB + 1), "x" * (MiB + 1), "\u00e9" * (MiB // 2 + 1)],
    ids=["binary", "ascii-text", "two-byte-text-fewer-chars-than-the-limit"],
)


async def _one_byte_over_the_limit_is_refused_1009(servers: Servers, frame, compression) -> None:
    # Takes close_timeout (5 s): after refusing a frame the gateway reads nothing more from the
    # client, its echo of the close included, and drops the socket only when the timer fires.
    old = await servers.recording("query", max_message_bytes=4 * MiB)  # would take it: the gateway must not
    stack = await servers.stack(old_port=old.port)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, "legacy", make_token(), early=["ping"], compression=compression)
        assert await ws.recv() == "ping"
        await ws.send("pong")  # the first frame after ready moves the client side into the pump
        assert await ws.recv() == "pong"
        await ws.send(frame)
        assert (await closed(ws))[0] == 1009
        sock = await old.next_socket()
        assert await sock.wait_closed() == (1001, "client sent a message over the size limit")
    assert sock.frames == ["ping", "pong"]


@ONE_BYTE_OVER
async def test_frame_one_byte_over_the_limit_is_refused_1009(servers: Servers, frame):
    await _one_byte_over_the_limit_is_refused_1009(servers, frame, None)


# A deflate client's messages take the frame pump on either relay (the gateway inflates them),
# so the frame relay would repeat this test exactly.
@pytest.mark.relays("byte")
@ONE_BYTE_OVER
async def test_compressed_frame_one_byte_over_the_limit_is_refused_1009(servers: Servers, frame):
    await _one_byte_over_the_limit_is_refused_1009(servers, frame, "deflate")


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_frame_of_exactly_the_limit_in_two_byte_text_passes(stack, compression):
    frame = "\u00e9" * (MiB // 2)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, "legacy", make_token(), early=[frame], compression=compression)
        assert await ws.recv() == frame
        await ws.close()


@before_the_relay
async def test_oversized_frame_before_the_upstream_is_ready_closes_1009_after_delivering_what_came_before(servers: Servers):
    old = await servers.recording("query", hold_upgrade=True)
    stack = await servers.stack(old_port=old.port)
    async with asyncio.timeout(TIMEOUT):
        ws = await open_client(stack, "legacy", make_token(), early=["first", b"x" * (MiB + 1)], compression=None)
        assert (await closed(ws))[0] == 1009
        old.release.set()
        sock = await old.next_socket()
        code, reason = await sock.wait_closed()
    assert sock.frames == ["first"]
    assert (code, reason) == (1001, "client sent a message over the size limit")
