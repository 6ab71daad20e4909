"""The HTTP/1.1 side of a WebSocket: the upgrade request and its answer, on both legs, with no I/O.

Server side (the public listener): `parse_request` reads a request head, `check_upgrade`
applies RFC 6455 §4.2.1 (GET, HTTP/1.1, ``Upgrade: websocket``, ``Connection: upgrade``,
version 13, a 16-byte key) and `HttpError` carries the precise status for everything
else. Client side (towards a backend): `upgrade_request` and `check_response`.

The parser is deliberately strict where leniency lets a request mean two things to two
parsers (whitespace before a colon, folded lines, bare CR, a body on an upgrade) and
bounded everywhere (`head_end` refuses a head over its limit before parsing it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([A-Z]+) (\S+) HTTP/(\d)\.(\d)")
_STATUS_LINE = re.compile(rb"HTTP/1\.\d (\d{3})(?: ([^\r\n]*))?")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

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
    target: str
    headers: Headers = field(compare=False)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        """The raw query string, undecoded."""
        return self.target.partition("?")[2]


def head_end(buffer: bytes | bytearray, limit: int) -> int | None:
    """Where the head in `buffer` ends (after its blank line), None while incomplete.

    Raises `HttpError` 431 once `limit` bytes have arrived without a complete head, so a
    client can never make the gateway hold more than that for one request.
    """
    end = buffer.find(b"\r\n\r\n", 0, limit + 4)
    if end >= 0:
        return end + 4
    if len(buffer) >= limit:
        if b"\r\n" not in buffer[:limit]:
            raise HttpError(414, "request line too long")
        raise HttpError(431, "request header fields too large")
    return None


def _lines(head: bytes) -> list[bytes]:
    if b"\r" in head.replace(b"\r\n", b""):
        raise HttpError(400, "bare CR in the request head")
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


def parse_request(head: bytes) -> Request:
    """The request in `head` (request line and fields, up to and including the blank line)."""
    lines = _lines(head)
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise HttpError(400, "malformed request line")
    method, target, major, minor = match.groups()
    if (major, minor) != (b"1", b"1"):
        if major == b"1":
            raise HttpError(400, "WebSocket needs HTTP/1.1")
        raise HttpError(505, "HTTP version not supported")
    if not target.startswith(b"/"):
        raise HttpError(400, "the request target must be a path")
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "non-ASCII request target") from None
    headers = _fields(lines[1:])
    if len(headers.getall("Host")) != 1:
        raise HttpError(400, "exactly one Host header is required")
    if "Content-Length" in headers and headers.get("Content-Length") != "0" or "Transfer-Encoding" in headers:
        raise HttpError(400, "an upgrade request has no body")
    return Request(method.decode("ascii"), text, headers)


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
