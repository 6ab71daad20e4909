"""Signing keys from the identity provider's JWKS endpoint (`auth.jwks_url`).

The set is fetched at start-up (the gateway is not ready without it), every
``auth.jwks_refresh_seconds``, and on demand when a token names a ``kid`` the set lacks —
at most once every `ON_DEMAND_SECONDS`, so a flood of tokens with made-up kids costs one
fetch, not one each. A failed fetch keeps the last good set. The parsed set is swapped
whole, so a verification never sees half of one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from jwt import PyJWK
from jwt.exceptions import InvalidKeyError, PyJWKError

log = logging.getLogger("gateway.jwks")

ON_DEMAND_SECONDS = 30.0
RETRY_SECONDS = 5.0  # until the first set arrives (the gateway is not ready without one)
MAX_BODY_BYTES = 1024 * 1024

Fetch = Callable[[str], Awaitable[bytes]]


class KeySetError(Exception):
    """The endpoint's answer is not a usable key set; the message says why (never a key)."""


def parse_key_set(body: bytes, algorithms: tuple[str, ...]) -> dict[str, Any]:
    """kid -> the public key object, for the keys usable with `algorithms`; raises `KeySetError`."""
    try:
        data = json.loads(body)
    except ValueError:
        raise KeySetError("the answer is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeySetError('the answer is not a JWK set ({"keys": [...]})')
    keys: dict[str, Any] = {}
    for entry in data["keys"]:
        # One key at a time: a key PyJWT cannot use (an unknown kty, a symmetric key) is
        # skipped, as PyJWKSet does, without losing the others.
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str) or not _usable(entry, algorithms):
            continue
        if entry.get("use", "sig") != "sig":
            continue
        try:
            keys[entry["kid"]] = PyJWK(entry).key
        except (PyJWKError, InvalidKeyError, ValueError, TypeError):
            continue
    if not keys:
        raise KeySetError("no signing key with a kid for the configured algorithms")
    return keys


def _usable(entry: dict[str, Any], algorithms: tuple[str, ...]) -> bool:
    """A key whose own ``alg`` is outside auth.algorithms is skipped; one without may serve its family."""
    declared = entry.get("alg")
    if declared is not None:
        return declared in algorithms
    families = {"RSA": ("RS", "PS"), "EC": ("ES",), "OKP": ("EdDSA",)}
    family = families.get(str(entry.get("kty")), ("-",))
    return any(alg.startswith(family) for alg in algorithms)


async def http_fetch(url: str, timeout: float = 10.0) -> bytes:
    """The whole body, however many pieces it arrives in (a provider behind TLS may split it
    anywhere); reading stops as soon as it is past `MAX_BODY_BYTES`."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as client:
        async with client.get(url, headers={"Accept": "application/json"}) as response:
            if response.status != 200:
                raise KeySetError(f"HTTP {response.status}")
            if response.content_length is not None and response.content_length > MAX_BODY_BYTES:
                raise KeySetError("the answer is over 1 MiB")
            body = bytearray()
            async for piece in response.content.iter_any():
                body += piece
                if len(body) > MAX_BODY_BYTES:
                    raise KeySetError("the answer is over 1 MiB")
            return bytes(body)


class KeySet:
    """The current keys by kid, and the fetches that keep them current."""

    def __init__(
        self,
        url: str,
        algorithms: tuple[str, ...],
        *,
        refresh_seconds: float,
        fetch: Fetch = http_fetch,
        on_result: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.algorithms = algorithms
        self.refresh_seconds = refresh_seconds
        self._fetch = fetch
        self._on_result = on_result
        self._clock = clock
        self.keys: dict[str, Any] = {}
        self._last_on_demand = -ON_DEMAND_SECONDS
        self._inflight: asyncio.Task[bool] | None = None
        self._loop_task: asyncio.Task[None] | None = None

    def key_for(self, kid: str) -> Any | None:
        return self.keys.get(kid)

    async def refresh(self) -> bool:
        """Fetch now (one fetch at a time: concurrent callers share it); True when the set changed hands."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._refresh())
        task = self._inflight
        try:
            return await asyncio.shield(task)
        finally:
            if task.done() and self._inflight is task:
                self._inflight = None

    async def refresh_on_demand(self) -> None:
        """A token named an unknown kid: fetch, unless one was fetched on demand within 30 s."""
        now = self._clock()
        if now - self._last_on_demand < ON_DEMAND_SECONDS and self._inflight is None:
            return
        self._last_on_demand = now
        await self.refresh()

    async def _refresh(self) -> bool:
        try:
            keys = parse_key_set(await self._fetch(self.url), self.algorithms)
        except (KeySetError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            kept = f"keeping the last good set ({len(self.keys)} keys)" if self.keys else "no key set yet"
            log.error("JWKS refresh failed; " + kept, extra={"jwks_url": self.url, "error": _describe(exc)})
            self._report("failure")
            return False
        changed = keys.keys() != self.keys.keys()
        self.keys = keys
        if changed:
            log.info("JWKS loaded", extra={"jwks_url": self.url, "kids": sorted(keys)})
        self._report("success")
        return True

    def _report(self, result: str) -> None:
        if self._on_result is not None:
            self._on_result(result)

    def start(self) -> None:
        self._loop_task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds if self.keys else RETRY_SECONDS)
            await self.refresh()

    async def stop(self) -> None:
        for task in (self._loop_task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._loop_task = self._inflight = None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
