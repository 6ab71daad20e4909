"""Signing keys from a JWKS endpoint: a local HTTP server plays the identity provider."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.service.admin import create_admin_app
from gateway.service.jwks import MAX_BODY_BYTES, KeySetError, parse_key_set
from gateway.service.server import start_site

from .helpers import Servers, Stack, closed, make_config, metric, open_client


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(private: Any, kid: str, **extra: Any) -> dict[str, Any]:
    algorithm = RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else ECAlgorithm
    return {**json.loads(algorithm.to_jwk(private.public_key())), "kid": kid, **extra}


def signed(private: Any, kid: str | None, user: str = "alice", algorithm: str = "RS256") -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode({"user_id": user, "exp": int(time.time()) + 300}, private, algorithm=algorithm, headers=headers)


PIECE_GAP = 0.2  # how long the provider pauses between pieces: the fault itself, not a wait for anything


class Provider:
    """Serves `keys` as a JWK set at /jwks.json and counts the fetches.

    `pieces` > 1 sends the set in that many writes with a pause between them, announced
    by its `Content-Length` unless `chunked`; `padding` adds that many bytes of whitespace.
    """

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.up = True
        self.pieces = 1
        self.chunked = False
        self.padding = 0

    async def start(self, servers: Servers) -> str:
        async def jwks(request: web.Request) -> web.StreamResponse:
            self.fetches += 1
            if not self.up:
                return web.Response(status=503)
            if self.pieces == 1 and not self.padding:
                return web.json_response({"keys": self.keys})
            body = (json.dumps({"keys": self.keys}) + " " * self.padding).encode()
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            if self.chunked:
                response.enable_chunked_encoding()
            else:
                response.content_length = len(body)
            await response.prepare(request)
            size = -(-len(body) // self.pieces)
            for start in range(0, len(body), size):
                if start:
                    await asyncio.sleep(PIECE_GAP)
                await response.write(body[start : start + size])
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_get("/jwks.json", jwks)
        runner, port = await start_site(app, "127.0.0.1", 0)
        servers._closers.append(runner.cleanup)
        return f"http://127.0.0.1:{port}/jwks.json"


@pytest.fixture
async def provider(servers: Servers) -> tuple[Provider, str]:
    p = Provider()
    return p, await p.start(servers)


async def jwks_stack(servers: Servers, url: str):
    old = await servers.recording("query")
    new = await servers.recording("message")
    auth = {"algorithms": ["RS256", "ES256"], "secret": None, "jwks_url": url, "jwks_refresh_seconds": 3600}
    return await servers.stack(old_port=old.port, new_port=new.port, auth=auth)


async def chat(stack, style: str, token: str) -> None:
    ws = await open_client(stack, style, token)
    if style == "message":
        assert json.loads(await ws.recv())["type"] == "connected"
    await ws.send("hello")
    assert await ws.recv() == "hello"
    await ws.close()


@pytest.mark.parametrize("style", ["legacy", "message"])
async def test_a_token_signed_by_a_key_in_the_set_passes(servers, provider, style):
    source, url = provider
    key = rsa_key()
    source.keys = [jwk(key, "k1")]
    stack = await jwks_stack(servers, url)
    assert stack.gateway.ready
    await chat(stack, style, signed(key, "k1"))


async def test_a_rotated_key_passes_at_once_without_a_restart(servers, provider):
    source, url = provider
    first, second = rsa_key(), ec.generate_private_key(ec.SECP256R1())
    source.keys = [jwk(first, "k1")]
    stack = await jwks_stack(servers, url)
    fetched = source.fetches
    source.keys = [jwk(first, "k1"), jwk(second, "k2")]
    # The first token naming k2 makes the gateway fetch the set, then it passes.
    await chat(stack, "message", signed(second, "k2", algorithm="ES256"))
    assert source.fetches == fetched + 1
    await chat(stack, "legacy", signed(first, "k1"))


async def test_unknown_kids_cost_one_fetch_per_30_seconds_and_get_1008(servers, provider):
    source, url = provider
    key = rsa_key()
    source.keys = [jwk(key, "k1")]
    stack = await jwks_stack(servers, url)
    fetched = source.fetches
    for n in range(5):
        ws = await open_client(stack, "legacy", signed(rsa_key(), f"made-up-{n}"))
        code, reason = await closed(ws)
        assert (code, reason) == (1008, "token signed by an unknown key")
    assert source.fetches == fetched + 1


async def test_the_provider_down_at_refresh_keeps_the_last_good_set(servers, provider):
    source, url = provider
    key = rsa_key()
    source.keys = [jwk(key, "k1")]
    stack = await jwks_stack(servers, url)
    source.up = False
    assert await stack.gateway.keys.refresh() is False
    await chat(stack, "legacy", signed(key, "k1"))
    assert stack.gateway.ready
    assert metric(stack, "ws_gateway_jwks_refreshes_total", result="failure") == 1
    assert metric(stack, "ws_gateway_jwks_refreshes_total", result="success") >= 1


async def test_no_key_set_at_start_means_not_ready_and_every_token_refused(servers, provider):
    source, url = provider
    source.up = False
    stack = await jwks_stack(servers, url)
    assert not stack.gateway.ready
    ws = await open_client(stack, "legacy", signed(rsa_key(), "k1"))
    assert (await closed(ws))[0] == 1008


async def test_only_the_configured_algorithms_count_whatever_the_key_says(servers, provider):
    source, url = provider
    key = rsa_key()
    source.keys = [jwk(key, "k1")]
    stack = await jwks_stack(servers, url)
    ws = await open_client(stack, "legacy", signed(key, "k1", algorithm="RS512"))
    assert (await closed(ws))[0] == 1008
    hmac_token = jwt.encode({"user_id": "mallory"}, "x" * 32, algorithm="HS256", headers={"kid": "k1"})
    ws = await open_client(stack, "legacy", hmac_token)
    assert (await closed(ws))[0] == 1008


async def readyz(servers: Servers, stack: Stack) -> int:
    runner, port = await start_site(create_admin_app(stack.gateway), "127.0.0.1", 0)
    servers.closing(runner.cleanup)
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as response:
        return response.status


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_key_set_that_arrives_in_pieces_is_read_to_its_end(servers, provider, chunked):
    source, url = provider
    key = rsa_key()
    source.keys = [jwk(key, "k1"), jwk(rsa_key(), "k2")]
    source.pieces, source.chunked = 3, chunked
    stack = await jwks_stack(servers, url)
    assert await readyz(servers, stack) == 200
    assert sorted(stack.gateway.keys.keys) == ["k1", "k2"]
    await chat(stack, "legacy", signed(key, "k1"))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_key_set_past_the_size_cap_is_refused_with_a_clear_error(servers, provider, caplog, chunked):
    source, url = provider
    source.keys = [jwk(rsa_key(), "k1")]
    source.pieces, source.chunked, source.padding = 4, chunked, MAX_BODY_BYTES
    caplog.set_level(logging.ERROR, logger="gateway.jwks")
    stack = await jwks_stack(servers, url)
    assert await readyz(servers, stack) == 503
    [line] = [r for r in caplog.records if r.getMessage().startswith("JWKS refresh failed")]
    assert line.error == "KeySetError: the answer is over 1 MiB"


def test_parse_key_set_skips_what_it_cannot_use_and_refuses_an_empty_result():
    rsa_private = rsa_key()
    body = json.dumps({"keys": [
        jwk(rsa_private, "good"),
        jwk(rsa_key(), "wrong-alg", alg="RS512"),
        jwk(rsa_key(), "encryption", use="enc"),
        {**jwk(rsa_key(), "x"), "kid": None},
        {"kty": "oct", "k": "c2VjcmV0", "kid": "symmetric"},
        {"kty": "nonsense", "kid": "junk"},
    ]}).encode()
    assert set(parse_key_set(body, ("RS256",))) == {"good"}
    for bad in (b"not json", b"[]", b'{"keys": {}}', json.dumps({"keys": [jwk(rsa_key(), "k", alg="RS512")]}).encode()):
        with pytest.raises(KeySetError):
            parse_key_set(bad, ("RS256",))


@pytest.mark.parametrize(
    ("auth", "problem"),
    [
        ({"algorithms": ["HS256"], "jwks_url": "https://idp/jwks.json"}, "auth.jwks_url"),
        ({"algorithms": ["RS256"], "secret": None, "jwks_url": "ftp://idp/jwks"}, "auth.jwks_url"),
        ({"algorithms": ["RS256"], "secret": None, "jwks_url": "https://idp/jwks", "public_key_file": "k.pem"},
         "auth.public_key_file"),
        ({"algorithms": ["RS256"], "secret": None, "jwks_url": "https://idp/jwks", "jwks_refresh_seconds": 1},
         "auth.jwks_refresh_seconds"),
    ],
)
def test_jwks_config_rules_name_their_key(auth, problem):
    from gateway.core.config import ConfigError

    with pytest.raises(ConfigError, match=problem):
        make_config(auth=auth)
