"""What one leg's close becomes on the other leg.

A relay must never put 0, 1005, 1006 or 1015 on the wire (they mean "no close frame
arrived" and strict peers answer them with 1002), and a close reason is limited to 123
UTF-8 bytes. Every close the gateway sends goes through here.
"""

from __future__ import annotations

import struct
from enum import Enum

NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012
TRY_AGAIN_LATER = 1013
BAD_GATEWAY = 1014

NO_STATUS = 1005
ABNORMAL = 1006
TLS_FAILURE = 1015

# The codes an endpoint may send in a close frame (RFC 6455 section 7.4 and the IANA registry).
SENDABLE = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015)) | frozenset(range(3000, 5000))

MAX_REASON_BYTES = 123


class Side(Enum):
    """The leg a close is sent *to*."""

    CLIENT = "client"
    UPSTREAM = "upstream"


def cut_reason(reason: str) -> str:
    """Cut `reason` to 123 UTF-8 bytes without splitting a character."""
    encoded = reason.encode("utf-8")
    if len(encoded) <= MAX_REASON_BYTES:
        return reason
    return encoded[:MAX_REASON_BYTES].decode("utf-8", errors="ignore")


def forward(code: int | None, reason: str, to: Side) -> tuple[int, str]:
    """The close to send on leg `to` after the other leg closed with (`code`, `reason`).

    Legal codes and their reasons pass through unchanged. A close frame without a code
    becomes a plain 1000. A leg that vanished without a close frame (1006, 1015) reads as
    "bad gateway" to the client and "going away" to the backend.
    """
    if code in SENDABLE:
        return code, cut_reason(reason)
    if code in (None, 0, NO_STATUS):
        return NORMAL, ""
    if code in (ABNORMAL, TLS_FAILURE):
        if to is Side.CLIENT:
            return BAD_GATEWAY, "upstream connection lost"
        return GOING_AWAY, "client connection lost"
    return PROTOCOL_ERROR, "invalid close code"


def echo(code: int | None) -> int:
    """The code that answers a peer's close frame: its own when legal on the wire, else 1000."""
    return code if code is not None and code in SENDABLE else NORMAL


def oversize(to: Side) -> tuple[int, str]:
    """What the other leg gets when one leg sent a frame over the size limit (and got 1009)."""
    if to is Side.CLIENT:
        return BAD_GATEWAY, "backend sent a message over the size limit"
    return GOING_AWAY, "client sent a message over the size limit"


def passed_on(code: int, to: Side) -> tuple[int, str]:
    """What leg `to` gets when the other leg's peer broke the protocol and was closed with `code`."""
    if code == MESSAGE_TOO_BIG:
        return oversize(to)
    return forward(ABNORMAL, "", to)


def sendable(code: int, reason: str) -> tuple[int, str]:
    """Make a close the gateway itself originates safe for the wire."""
    if code not in SENDABLE:
        code = INTERNAL_ERROR
    return code, cut_reason(reason)


# -- what a peer can get wrong about them ---------------------------------------------------------


class ProtocolError(Exception):
    """The peer broke RFC 6455 (or a limit): close its leg with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """(code, reason) of a close frame's payload; None for an empty one.

    A one-byte payload, a reason that is not UTF-8, or a code that may not appear on the
    wire (RFC 6455 §7.4) is a protocol error.
    """
    if not payload:
        return None, ""
    if len(payload) < 2:
        raise ProtocolError(PROTOCOL_ERROR, "close frame with a one-byte payload")
    (code,) = struct.unpack("!H", payload[:2])
    if code not in SENDABLE:
        raise ProtocolError(PROTOCOL_ERROR, "invalid close code")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(INVALID_PAYLOAD, "close reason is not UTF-8") from None
    return code, reason
