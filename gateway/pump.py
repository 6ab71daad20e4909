"""The post-handshake relay: frames from one leg to the other until one leg ends.

This is the hot path and the piece meant to be swapped for a byte-level relay: it does
no parsing, logging or allocation per frame beyond what aiohttp itself does. Each
direction runs one `pump`; whichever leg ends first closes the other through
`closecodes.forward`, so a close code never crosses unmapped.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType

from . import closecodes
from .closecodes import Leg

_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_CLOSE = WSMsgType.CLOSE
_CLOSING = WSMsgType.CLOSING


@dataclass
class Flow:
    """What one direction carried, and how its source ended (None: the other side ended first)."""

    frames: int = 0
    bytes: int = 0
    close_code: int | None = None
    close_reason: str = ""
    lost: bool = False  # the source vanished or broke the protocol instead of closing


async def close_leg(ws: Any, code: int, reason: str) -> None:
    """Close `ws` with a wire-safe code; a leg that is already gone is not an error."""
    code, reason = closecodes.sendable(code, reason)
    try:
        await ws.close(code=code, message=reason.encode("utf-8"))
    except (ConnectionError, RuntimeError, asyncio.TimeoutError):
        pass


async def pump(src: Any, dst: Any, to: Leg, flow: Flow) -> None:
    """Forward data frames from `src` to `dst` (the `to` leg) until `src` ends."""
    receive = src.receive
    send_str = dst.send_str
    send_bytes = dst.send_bytes
    frames = size = 0
    try:
        while True:
            msg = await receive()
            kind = msg.type
            if kind is _TEXT:
                await send_str(msg.data)
            elif kind is _BINARY:
                await send_bytes(msg.data)
            else:
                break
            frames += 1
            size += len(msg.data)
    except (ConnectionError, RuntimeError):
        # dst is gone; the pump reading dst sees that and closes src.
        return
    finally:
        flow.frames += frames
        flow.bytes += size

    if kind is _CLOSING:
        return  # the other pump closed src on the other leg's behalf
    if kind is _CLOSE:
        flow.close_code, flow.close_reason = msg.data, msg.extra or ""
        echo = msg.data if msg.data in closecodes.SENDABLE else closecodes.NORMAL
        code, reason = closecodes.forward(msg.data, flow.close_reason, to)
        await asyncio.gather(close_leg(dst, code, reason), close_leg(src, echo, ""))
        return
    # CLOSED or ERROR: src vanished, failed a ping, or broke the protocol (aiohttp has
    # already closed it with the right code, e.g. 1009 for an oversized frame).
    flow.close_code = src.close_code or closecodes.ABNORMAL
    flow.lost = True
    code, reason = closecodes.forward(closecodes.ABNORMAL, "", to)
    await close_leg(dst, code, reason)
