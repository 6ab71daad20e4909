"""Opening upstream sockets: TCP (or TLS), one HTTP upgrade, nothing else.

A full HTTP client per upstream socket cost a quarter of the gateway's set-up time
(happy-eyeballs connects, a resolver call per connection, cookie and redirect handling
the gateway never needs). This does what a WebSocket upgrade needs: the backend's host is
resolved when first used and then refreshed in the background every `resolve_every`
seconds (a failed refresh keeps the last answer), the socket is opened to the first
address that answers, the upgrade request is written, and the 101 is checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from . import handshake

log = logging.getLogger("gateway.connector")
MAX_RESPONSE_HEAD = 16 * 1024


@dataclass(frozen=True)
class Target:
    """Where an upstream URL points."""

    tls: bool
    host: str
    port: int
    host_header: str
    path: str


def target_of(url: str) -> Target:
    parts = urlsplit(url)
    tls = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    default = (tls and port == 443) or (not tls and port == 80)
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if default and parts.port is None else f"{shown}:{port}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(tls, host, port, host_header, path)


class HeadReader(asyncio.Protocol):
    """The protocol of an upstream socket until its 101 is read; then `on_open` takes over.

    Bytes that arrive after the response head (a backend that greets at once) are kept
    in `rest` and the socket stops reading until the new owner resumes it.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.rest = b""
        self.lost = False
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        if self.head.done():
            self.rest += data
            return
        self._buffer += data
        try:
            end = handshake.head_end(self._buffer, MAX_RESPONSE_HEAD)
        except handshake.HttpError:
            self.head.set_exception(handshake.UpgradeRefused(0, "response head too large"))
            return
        if end is None:
            return
        self.rest = bytes(self._buffer[end:])
        self.head.set_result(bytes(self._buffer[: end - 4]))
        assert self.transport is not None
        self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.head.done():
            self.head.set_exception(ConnectionResetError("the backend closed the connection during the upgrade"))

    def forget(self) -> None:
        """The attempt was given up: nobody will await `head`, so asyncio must not report it."""
        if not self.head.done():
            self.head.cancel()
        elif not self.head.cancelled():
            self.head.exception()

class Connector:
    def __init__(self, *, resolve_every: float = 30.0) -> None:
        self.resolve_every = resolve_every
        self._addresses: dict[tuple[str, int], list[Any]] = {}
        self._tls = ssl.create_default_context()
        self._refresher: asyncio.Task[None] | None = None

    async def open(
        self,
        url: str,
        headers: list[tuple[str, str]],
        protocol_factory: Callable[[], HeadReader],
    ) -> tuple[asyncio.Transport, HeadReader, handshake.Response]:
        """Connect to `url` and upgrade. Raises OSError, `handshake.UpgradeRefused` (with the
        backend's status), or whatever the caller's timeout raises; never leaves a socket open."""
        target = target_of(url)
        transport, reader = await self._connect(target, protocol_factory)
        try:
            key = handshake.new_key(os.urandom(16))
            if transport.is_closing():  # the backend reset at once; uvloop raises on the write
                raise ConnectionResetError(f"{target.host} closed the connection before the upgrade")
            transport.write(handshake.upgrade_request(target.host_header, target.path, key, headers))
            head = await reader.head
            response = handshake.check_response(head, key)
        except BaseException:
            transport.abort()
            reader.forget()
            raise
        return transport, reader, response

    async def _connect(
        self, target: Target, protocol_factory: Callable[[], HeadReader]
    ) -> tuple[asyncio.Transport, HeadReader]:
        loop = asyncio.get_running_loop()
        addresses = await self._resolve(target.host, target.port)
        error: OSError | None = None
        for family, address in addresses:
            try:
                transport, protocol = await loop.create_connection(
                    protocol_factory,
                    sock=None,
                    host=address[0],
                    port=address[1],
                    family=family,
                    ssl=self._tls if target.tls else None,
                    server_hostname=target.host if target.tls else None,
                )
            except OSError as exc:
                error = exc
                continue
            return transport, protocol
        raise error or OSError(f"no address for {target.host}")

    async def _resolve(self, host: str, port: int) -> list[Any]:
        key = (host, port)
        cached = self._addresses.get(key)
        if cached:
            return cached
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
            self._addresses[key] = [(family, (host, port))]
            return self._addresses[key]
        found = await self._lookup(host, port)
        self._addresses[key] = found
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh(), name="connector-resolver")
        return found

    async def _lookup(self, host: str, port: int) -> list[Any]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [(family, sockaddr[:2]) for family, _, _, _, sockaddr in infos]

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.resolve_every)
            for host, port in list(self._addresses):
                try:
                    ipaddress.ip_address(host)
                    continue
                except ValueError:
                    pass
                try:
                    self._addresses[(host, port)] = await self._lookup(host, port)
                except OSError as exc:
                    log.warning("backend host did not resolve; keeping the last answer", extra={"host": host, "error": str(exc)})

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            try:
                await self._refresher
            except asyncio.CancelledError:
                pass
