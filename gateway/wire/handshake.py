"""The HTTP/1.1 side of a WebSocket: the upgrade request and its answer, on both legs, with no I/O.

Server side (the public listener): `RequestReader` reads a request head as it arrives,
`check_upgrade` applies RFC 6455 §4.2.1 (GET, HTTP/1.1, ``Upgrade: websocket``,
``Connection: upgrade``, version 13, a 16-byte key) and `HttpError` carries the precise
status for everything else. Client side (towards a backend): `upgrade_request`,
`head_end` and `check_response`.

The request head is parsed by llhttp, through aiohttp's compiled `HttpRequestParser`: it
refuses what request smuggling needs (control bytes in the target, folded lines,
whitespace before a colon, bare CR or LF, duplicate Host or Content-Length). This module
adds what llhttp leaves to its caller: the head's byte bound, a request line of single
spaces, a Host that is a host, a target that is a path (or an absolute http/ws URL) and
no body on an upgrade. aiohttp's exception texts quote the client's bytes (which may
hold a token), so they are mapped by class to fixed messages and never passed on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import cast

from aiohttp import http_exceptions
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpRequestParser, RawRequestMessage

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_STATUS_LINE = re.compile(rb"HTTP/1\.\d (\d{3})(?: ([^\r\n]*))?")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9112 §3.2 / RFC 3986 §3.2.2: uri-host [":" port]; a reg-name is unreserved,
# pct-encoded and sub-delims characters (so no "/", "@", space, ...).
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?")
_LATER_VERSION = re.compile(rb" HTTP/[2-9]")
_ABSOLUTE_SCHEMES = frozenset({"http", "https", "ws", "wss"})
# The parser's errors by class, each with the fixed text answered for it; any other is
# "malformed request head". (LineTooLong is the head's bound: 414 or 431.)
_PARSER_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (http_exceptions.InvalidURLError, "invalid request target"),
    (http_exceptions.BadStatusLine, "malformed request line"),
    (http_exceptions.InvalidHeader, "malformed header field"),
)

REASONS = {
    101: "Switching Protocols",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    414: "URI Too Long",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class HttpError(Exception):
    """Answer the request with this status and close; `headers` are added to the response."""

    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


class Headers:
    """Header fields in arrival order, looked up case-insensitively."""

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self._fields = list(fields)
        self._index: dict[str, list[str]] = {}
        for name, value in self._fields:
            self._index.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The field's value; several lines of it joined with ", " (RFC 9110 §5.3)."""
        values = self._index.get(name.lower())
        return ", ".join(values) if values else default

    def getall(self, name: str) -> list[str]:
        return list(self._index.get(name.lower(), ()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # in origin form (path and query), whatever form the client sent
    headers: Headers = field(compare=False)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        """The raw query string, undecoded."""
        return self.target.partition("?")[2]


class _NoFlow:
    """Flow control for a request body, which the parser wants even for an empty one; there is none to control."""

    def pause_reading(self, *args: object, **kwargs: object) -> None: ...

    def resume_reading(self, *args: object, **kwargs: object) -> None: ...


_NO_FLOW = cast(BaseProtocol, _NoFlow())
# The parser makes a reader for a body (which an upgrade is refused for) on this loop; with
# none it would look one up, and outside a running loop find none. Nothing ever reads it.
_NO_LOOP = cast(asyncio.AbstractEventLoop, object())


def _too_large(head: bytes | bytearray, limit: int) -> HttpError:
    if b"\r\n" not in head[:limit]:
        return HttpError(414, "request line too long")
    return HttpError(431, "request header fields too large")


class RequestReader:
    """One request head, fed in whatever pieces it arrives in, bounded by `limit` bytes.

    The parser sees every byte as it arrives (so a bare LF or a control byte in the target
    is answered at once, not at the timeout) but never a byte past the head: what follows
    it is the client's first WebSocket data, returned untouched.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._head = bytearray()
        # The byte bound is ours (414/431 by where it is hit); the parser's own line, field
        # and count limits are set so that ours is always reached first.
        self._parser = HttpRequestParser(
            _NO_FLOW, _NO_LOOP, limit, max_line_size=limit + 4, max_field_size=limit + 4, max_headers=limit
        )

    def feed(self, data: bytes) -> tuple[Request, bytes] | None:
        """The request and the bytes after its head once the head is complete, else None; `HttpError` when it is bad."""
        head = self._head
        fed = len(head)
        head += data
        end = head.find(b"\r\n\r\n", max(0, fed - 3), self.limit + 4)
        if end < 0 and len(head) >= self.limit + 4:
            raise _too_large(head, self.limit)
        stop = len(head) if end < 0 else end + 4
        try:
            messages, _, _ = self._parser.feed_data(bytes(head[fed:stop]))
        except http_exceptions.LineTooLong:
            raise _too_large(head, self.limit) from None
        except http_exceptions.HttpProcessingError as exc:
            raise _parser_error(exc, head) from None
        if end < 0:
            return None
        if not messages:
            raise HttpError(400, "malformed request head")
        request = _request(messages[0][0], bytes(head[:end]))
        return request, bytes(head[stop:])


def _parser_error(exc: http_exceptions.HttpProcessingError, head: bytes | bytearray) -> HttpError:
    if isinstance(exc, http_exceptions.BadStatusLine) and not isinstance(exc, http_exceptions.BadHttpMethod):
        if _LATER_VERSION.search(head.partition(b"\r\n")[0]):
            return HttpError(505, "HTTP version not supported")
    for kind, message in _PARSER_ERRORS:
        if isinstance(exc, kind):
            return HttpError(400, message)
    return HttpError(400, "malformed request head")


def _origin_form(message: RawRequestMessage) -> str:
    """The target as path and query; an absolute http(s)/ws(s) URL is accepted (RFC 9112 §3.2.2)."""
    target: str = message.path
    if target.startswith("/"):
        return target.partition("#")[0]
    url = message.url
    if not url.absolute or url.scheme not in _ABSOLUTE_SCHEMES or url.raw_user is not None or url.raw_password is not None:
        raise HttpError(400, "the request target must be a path or an http or ws URL")
    query = url.raw_query_string
    return (url.raw_path or "/") + ("?" + query if query else "")


def _is_host(value: str) -> bool:
    match = _HOST.fullmatch(value)
    if match is None:
        return False
    host = match.group(1)
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
    return True


def _request(message: RawRequestMessage, head: bytes) -> Request:
    version = (message.version.major, message.version.minor)
    if version != (1, 1):
        if version[0] >= 2:
            raise HttpError(505, "HTTP version not supported")
        raise HttpError(400, "WebSocket needs HTTP/1.1")
    line = f"{message.method} {message.path} HTTP/1.1".encode("ascii", "surrogateescape")
    if head.partition(b"\r\n")[0] != line:
        raise HttpError(400, "malformed request line")
    headers = Headers((name.decode("ascii"), value.decode("latin-1")) for name, value in message.raw_headers)
    if not _is_host(headers.get("Host") or ""):
        raise HttpError(400, "the Host header is not a host")
    if "Content-Length" in headers and headers.get("Content-Length") != "0" or "Transfer-Encoding" in headers:
        raise HttpError(400, "an upgrade request has no body")
    return Request(message.method, _origin_form(message), headers)


def head_end(buffer: bytes | bytearray, limit: int) -> int | None:
    """Where the response head in `buffer` ends (after its blank line), None while incomplete.

    Raises `HttpError` 431 once `limit` bytes have arrived without a complete head, so a
    backend can never make the gateway hold more than that for one answer.
    """
    end = buffer.find(b"\r\n\r\n", 0, limit + 4)
    if end >= 0:
        return end + 4
    if len(buffer) >= limit:
        raise _too_large(buffer, limit)
    return None


def _lines(head: bytes) -> list[bytes]:
    if b"\r" in head.replace(b"\r\n", b""):
        raise HttpError(400, "bare CR in the response head")
    return head.split(b"\r\n")


def _fields(lines: list[bytes]) -> Headers:
    fields = []
    for line in lines:
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            raise HttpError(400, "folded header line")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header line")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise HttpError(400, "control character in a header value")
        fields.append((name.decode("ascii"), value.decode("latin-1")))
    return Headers(fields)


def _tokens(value: str | None) -> set[str]:
    return {token.strip().lower() for token in (value or "").split(",")}


def check_upgrade(request: Request) -> str:
    """The client's Sec-WebSocket-Key when `request` is a valid WebSocket upgrade, else `HttpError`."""
    headers = request.headers
    if request.method != "GET":
        raise HttpError(405, "WebSocket upgrades use GET", [("Allow", "GET")])
    if "Upgrade" not in headers:
        raise HttpError(426, "WebSocket upgrade required", [("Upgrade", "websocket")])
    if "websocket" not in _tokens(headers.get("Upgrade")) or "upgrade" not in _tokens(headers.get("Connection")):
        raise HttpError(400, "not a WebSocket upgrade (Upgrade: websocket and Connection: upgrade)")
    if headers.getall("Sec-WebSocket-Version") != ["13"]:
        raise HttpError(426, "unsupported WebSocket version", [("Sec-WebSocket-Version", "13")])
    keys = headers.getall("Sec-WebSocket-Key")
    if len(keys) != 1:
        raise HttpError(400, "one Sec-WebSocket-Key is required")
    try:
        raw = base64.b64decode(keys[0], validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise HttpError(400, "invalid Sec-WebSocket-Key")
    return keys[0]


def accept_value(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode("ascii")).digest()).decode("ascii")


def switching_protocols(key: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_value(key)}",
    ]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_response(status: int, message: str, headers: Iterable[tuple[str, str]] = (), *, head_only: bool = False) -> bytes:
    """A complete response that ends the connection (no keep-alive on the public port)."""
    body = (message + "\n").encode("utf-8")
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
        f"Date: {formatdate(usegmt=True)}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


# -- client side: the gateway upgrading to a backend --------------------------------------------


def new_key(random16: bytes) -> str:
    return base64.b64encode(random16).decode("ascii")


def upgrade_request(host: str, target: str, key: str, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True)
class Response:
    status: int
    headers: Headers = field(compare=False)


class UpgradeRefused(Exception):
    """The backend did not switch protocols; `status` is its HTTP status (0: not HTTP at all)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_response(head: bytes, key: str) -> Response:
    """The backend's answer to `upgrade_request`, checked as RFC 6455 §4.1 asks of a client."""
    try:
        lines = _lines(head)
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            raise UpgradeRefused(0, "malformed status line")
        headers = _fields(lines[1:])
    except HttpError as exc:
        raise UpgradeRefused(0, exc.message) from None
    status = int(match.group(1))
    if status != 101:
        raise UpgradeRefused(status, f"upgrade answered with HTTP {status}")
    if "websocket" not in _tokens(headers.get("Upgrade")) or "upgrade" not in _tokens(headers.get("Connection")):
        raise UpgradeRefused(status, "101 without Upgrade: websocket")
    if headers.get("Sec-WebSocket-Accept") != accept_value(key):
        raise UpgradeRefused(status, "wrong Sec-WebSocket-Accept")
    return Response(status, headers)
