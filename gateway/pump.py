"""The post-handshake relay: frames from one leg to the other until one leg ends.

This is the hot path and the piece meant to be swapped for a byte-level relay: it does
no parsing, logging or allocation per frame beyond what aiohttp itself does. Each
direction runs one `pump`; whichever leg ends first closes the other through
`closecodes.forward`, so a close code never crosses unmapped.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Union

from aiohttp import ClientWebSocketResponse, WSMsgType, web

from . import closecodes
from .closecodes import Leg

_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_CLOSE = WSMsgType.CLOSE
_CLOSING = WSMsgType.CLOSING

WebSocket = Union[web.WebSocketResponse, ClientWebSocketResponse]
"""Either leg: the client's socket (server side) or the upstream's (client side)."""


@dataclass
class Flow:
    """What one direction carried, and how its source ended (None: the other side ended first)."""

    frames: int = 0
    bytes: int = 0
    close_code: int | None = None
    close_reason: str = ""
    lost: bool = False  # the source vanished or broke the protocol instead of closing
    delivered: tuple[int, str] | None = None  # the close the gateway sent to the destination


async def close_leg(ws: WebSocket, code: int, reason: str) -> None:
    """Close `ws` with a wire-safe code; a leg that is already gone is not an error."""
    code, reason = closecodes.sendable(code, reason)
    try:
        await ws.close(code=code, message=reason.encode("utf-8"))
    except (ConnectionError, RuntimeError, asyncio.TimeoutError):
        pass


def wire_limit(limit: int) -> int:
    """The `max_msg_size` to give aiohttp for a leg whose frames may be up to `limit` bytes.

    aiohttp applies its limit to the compressed wire length too (and is exclusive), so an
    incompressible frame of exactly `limit` bytes from a permessage-deflate peer would be
    refused. It gets room for deflate's expansion of random data (stored blocks cost 5
    bytes each; peers with small windows use many: 0.25 % was seen from `websockets`);
    `too_big` is the exact check.
    """
    return limit + limit // 64 + 1024 + 1


def too_big(data: str | bytes, limit: int) -> bool:
    """Is this payload over `limit` bytes? Only text longer than limit/4 pays for an encode."""
    size = len(data)
    if size > limit:
        return True
    return isinstance(data, str) and size * 4 > limit and len(data.encode("utf-8")) > limit


async def pump(src: WebSocket, dst: WebSocket, to: Leg, flow: Flow, limit: int) -> None:
    """Forward data frames from `src` to `dst` (the `to` leg) until `src` ends."""
    receive = src.receive
    send_str = dst.send_str
    send_bytes = dst.send_bytes
    quarter = limit // 4
    try:
        while True:
            msg = await receive()
            kind = msg.type
            data = msg.data
            if kind is _TEXT:
                if len(data) > quarter and too_big(data, limit):
                    break
                await send_str(data)
            elif kind is _BINARY:
                if len(data) > limit:
                    break
                await send_bytes(data)
            else:
                break
            # Counted on the Flow itself, so metrics scraped mid-session see it.
            flow.frames += 1
            flow.bytes += len(data)
    except (ConnectionError, RuntimeError):
        # dst is gone; the pump reading dst sees that and closes src.
        return

    if kind is _CLOSING:
        return  # the other pump closed src on the other leg's behalf
    if kind is _CLOSE:
        flow.close_code, flow.close_reason = msg.data, msg.extra or ""
        flow.delivered = closecodes.forward(msg.data, flow.close_reason, to)
        await asyncio.gather(close_leg(dst, *flow.delivered), close_leg(src, closecodes.echo(msg.data), ""))
        return
    flow.lost = True
    if kind is _TEXT or kind is _BINARY or src.close_code == closecodes.MESSAGE_TOO_BIG:
        flow.close_code = closecodes.MESSAGE_TOO_BIG
        flow.delivered = closecodes.oversize(to)
        await asyncio.gather(close_leg(src, closecodes.MESSAGE_TOO_BIG, "message too big"), close_leg(dst, *flow.delivered))
        return
    # CLOSED or ERROR: src vanished, failed a ping, or broke the protocol (aiohttp has
    # already closed it with the code that says how, e.g. 1007 for invalid UTF-8).
    flow.close_code = src.close_code or closecodes.ABNORMAL
    flow.delivered = closecodes.forward(closecodes.ABNORMAL, "", to)
    await close_leg(dst, *flow.delivered)
