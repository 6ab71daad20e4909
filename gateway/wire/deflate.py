"""permessage-deflate (RFC 7692): negotiation on both legs, and inflating what the gateway must read.

The gateway never compresses. Frames it originates (``connected``, close frames, pings)
go uncompressed, which RFC 7692 allows on a compressed leg and which leaves the peer's
LZ77 window untouched. A client's compressed messages are inflated (the gateway has to
read them before the relay starts and forward them to backends that may not speak
deflate); a backend's compressed messages pass to the client unchanged when the two legs
agree — the backend compresses each message on its own (``server_no_context_takeover``,
which the gateway always asks for) within a window the client accepts — and are inflated
otherwise.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from ..core import closecodes

NAME = "permessage-deflate"
_TAIL = b"\x00\x00\xff\xff"


class NegotiationError(Exception):
    """An extension header the gateway cannot accept (a backend's answer it did not ask for)."""


@dataclass(frozen=True)
class Deflate:
    """The parameters agreed on one leg (RFC 7692 §7.1)."""

    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int = 15
    client_max_window_bits: int = 15


def parse_extensions(header: str) -> list[tuple[str, dict[str, str | None]]]:
    """``Sec-WebSocket-Extensions`` as (name, params) in order; raises ValueError when malformed."""
    offers = []
    for item in _split(header, ","):
        parts = _split(item, ";")
        if not parts or not parts[0]:
            raise ValueError("empty extension")
        params: dict[str, str | None] = {}
        for part in parts[1:]:
            key, sep, value = part.partition("=")
            key = key.strip()
            if not key or key in params:
                raise ValueError("bad extension parameter")
            params[key] = value.strip().strip('"') if sep else None
        offers.append((parts[0].strip().lower(), params))
    return offers


def _split(text: str, separator: str) -> list[str]:
    return [piece.strip() for piece in text.split(separator) if piece.strip()]


def _bits(value: str | None, *, allow_empty: bool) -> int | None:
    if value is None:
        return 15 if allow_empty else None
    if not value.isdigit() or not 8 <= int(value) <= 15:
        return None
    return int(value)


def accept_offer(header: str | None) -> tuple[Deflate, str] | None:
    """The first permessage-deflate offer in a client's header the gateway accepts, and its answer.

    The gateway inflates with a full window, so any ``client_max_window_bits`` is fine; it
    honours ``server_no_context_takeover`` and ``server_max_window_bits`` (and passes them
    on to the backend). Malformed headers and unknown parameters decline the offer.
    """
    if not header:
        return None
    try:
        offers = parse_extensions(header)
    except ValueError:
        return None
    for name, params in offers:
        if name != NAME or not set(params) <= {
            "server_no_context_takeover", "client_no_context_takeover", "server_max_window_bits", "client_max_window_bits",
        }:
            continue
        flags = ("server_no_context_takeover", "client_no_context_takeover")
        if any(params[flag] is not None for flag in flags if flag in params):
            continue
        server_bits = 15
        if "server_max_window_bits" in params:
            bits = _bits(params["server_max_window_bits"], allow_empty=False)
            if bits is None:
                continue
            server_bits = bits
        if "client_max_window_bits" in params and _bits(params["client_max_window_bits"], allow_empty=True) is None:
            continue
        agreed = Deflate(
            server_no_context_takeover="server_no_context_takeover" in params,
            client_no_context_takeover="client_no_context_takeover" in params,
            server_max_window_bits=server_bits,
        )
        answer = NAME
        if agreed.server_no_context_takeover:
            answer += "; server_no_context_takeover"
        if agreed.client_no_context_takeover:
            answer += "; client_no_context_takeover"
        if "server_max_window_bits" in params:
            answer += f"; server_max_window_bits={server_bits}"
        return agreed, answer
    return None


def upstream_offer(client: Deflate) -> str:
    """What the gateway offers a backend whose frames should reach this client unchanged."""
    offer = f"{NAME}; server_no_context_takeover; client_max_window_bits"
    if client.server_max_window_bits < 15:
        offer += f"; server_max_window_bits={client.server_max_window_bits}"
    return offer


def accept_answer(header: str | None) -> Deflate | None:
    """A backend's answer to `upstream_offer`: the agreed parameters, None when it declined.

    Raises `NegotiationError` for anything the gateway did not offer (RFC 6455 §9.1: the
    client must then fail the connection).
    """
    if not header:
        return None
    try:
        answers = parse_extensions(header)
    except ValueError:
        raise NegotiationError("malformed Sec-WebSocket-Extensions") from None
    if len(answers) != 1 or answers[0][0] != NAME:
        raise NegotiationError("extension not offered")
    params = answers[0][1]
    agreed = {"server_no_context_takeover": False, "client_no_context_takeover": False}
    bits = {"server_max_window_bits": 15, "client_max_window_bits": 15}
    for key, value in params.items():
        if key in agreed:
            if value is not None:
                raise NegotiationError(f"{key} takes no value")
            agreed[key] = True
        elif key in bits:
            parsed = _bits(value, allow_empty=False)
            if parsed is None:
                raise NegotiationError(f"bad {key}")
            bits[key] = parsed
        else:
            raise NegotiationError(f"unknown parameter {key}")
    return Deflate(
        server_no_context_takeover=agreed["server_no_context_takeover"],
        client_no_context_takeover=agreed["client_no_context_takeover"],
        server_max_window_bits=bits["server_max_window_bits"],
        client_max_window_bits=bits["client_max_window_bits"],
    )


def passes_through(backend: Deflate | None, client: Deflate | None) -> bool:
    """Whether the backend's compressed messages can reach the client as they are."""
    if backend is None:
        return True  # the backend sends nothing compressed
    return (
        client is not None
        and backend.server_no_context_takeover
        and backend.server_max_window_bits <= client.server_max_window_bits
    )


class InflateError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Inflater:
    """Decompresses one direction's messages; keeps the LZ77 window unless told not to.

    `inflate(data, limit)` never produces more than `limit` bytes: a message that would
    is refused with 1009 before the rest is decompressed (a deflate bomb costs nothing).
    """

    def __init__(self, *, no_context_takeover: bool = False) -> None:
        self._reset = no_context_takeover
        self._inflater = zlib.decompressobj(-15)

    def inflate(self, data: bytes, limit: int) -> bytes:
        inflater = self._inflater
        if self._reset:
            self._inflater = zlib.decompressobj(-15)
        try:
            out = inflater.decompress(data + _TAIL, limit + 1)
        except zlib.error:
            raise InflateError(closecodes.INVALID_PAYLOAD, "invalid compressed data") from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise InflateError(closecodes.MESSAGE_TOO_BIG, "message too big")
        return out
