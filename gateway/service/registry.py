"""The open connections of a gateway: what keepalive pings, metrics count and shutdown drains.

One loop pings every connection (no timer per socket); a finished connection's byte and
frame counts are kept, so the flow counters never go back when it leaves the set.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from ..core import closecodes
from ..wire.services import OpenConnection

log = logging.getLogger("gateway")


class Registry:
    """The set of open connections (weak: a connection that is gone without finishing is not kept)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.connections: weakref.WeakSet[OpenConnection] = weakref.WeakSet()
        self._closed_flows = {"client_to_backend": [0, 0], "backend_to_client": [0, 0]}

    def add(self, conn: OpenConnection) -> None:
        self.connections.add(conn)

    def finished(self, conn: OpenConnection) -> None:
        """`conn` leaves the set; its counts stay in the totals."""
        self.connections.discard(conn)
        for direction, flow in (("client_to_backend", conn.to_upstream), ("backend_to_client", conn.to_client)):
            self._closed_flows[direction][0] += flow.frames
            self._closed_flows[direction][1] += flow.bytes

    def flows(self) -> Iterator[tuple[str, int, int]]:
        """Frames and bytes per direction, finished and open connections alike (the metrics' collector)."""
        for direction, (frames, size) in self._closed_flows.items():
            yield direction, frames, size
        for conn in list(self.connections):
            yield "client_to_backend", conn.to_upstream.frames, conn.to_upstream.bytes
            yield "backend_to_client", conn.to_client.frames, conn.to_client.bytes

    def find(self, request_id: str) -> OpenConnection | None:
        return next((c for c in list(self.connections) if c.request_id == request_id), None)

    def last_frame(self, conn: Any) -> float | None:
        """When `conn` last carried a frame; None when it is gone or not relaying."""
        placed = conn.placement() if conn in self.connections else None
        return placed.last_frame if placed is not None else None

    async def keep_alive(self, interval: Callable[[], float]) -> None:
        """Ping quiet legs and drop dead ones, every half `interval()` (the live config's; 0: off, look every 5 s)."""
        while True:
            seconds = interval()
            await asyncio.sleep(seconds / 2 if seconds else 5.0)
            now = self.clock()
            for conn in list(self.connections):
                conn.keepalive(now)

    async def close_all(self, code: int, reason: str) -> None:
        await asyncio.gather(*(conn.close(code, reason) for conn in list(self.connections)))

    async def wait_closed(self, timeout: float) -> None:
        """Until every connection has finished, or `timeout` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def close_spread(self, window: float) -> None:
        """Close every connection with 1012, spread evenly over `window` seconds."""
        pending = list(self.connections)
        log.info("closing sessions", extra={"sessions": len(pending), "window_seconds": window})
        if not pending:
            return
        interval = window / len(pending)
        closing = []
        for index, conn in enumerate(pending):
            if index and interval > 0:
                await asyncio.sleep(interval)
            closing.append(asyncio.create_task(conn.close(closecodes.SERVICE_RESTART, "server restarting")))
        await asyncio.gather(*closing)


def placement_answer(request_id: str, record: dict[str, Any]) -> dict[str, Any]:
    """Where the open session with this X-Request-ID is, and why (for ``probe --admin``),
    from its log record: a probe learns the backend that served it without the public port
    telling apps anything.

    ``why`` is ``fallback`` (the new backend failed, the old one took the session),
    ``forced`` (``rollout.force_new``/``force_old``), ``guard`` (held back by the rollback
    guard) or ``route`` (the user's bucket against the percentage); ``relaying`` is false
    while the upstream is still being opened (the backend may yet change by a fallback).
    """
    if record["backend"] is None:
        return {"request_id": request_id, "user_id": record["user_id"], "backend": None, "why": None, "relaying": False}
    route = record["route"]
    why = "fallback" if record["fell_back"] else "forced" if route in ("force_new", "force_old") else route
    return {
        "request_id": request_id,
        "user_id": record["user_id"],
        "backend": record["backend"],
        "why": "route" if why == "bucket" else why,
        "relaying": record["ready_s"] is not None,
    }
