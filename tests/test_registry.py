"""`Registry` with plain connection objects: totals, lookups, keepalive and the spread close."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from gateway.service.registry import Registry, placement_answer
from gateway.wire.relay import Flow

from .helpers import TIMEOUT, Clock


@dataclass(eq=False)
class Conn:
    request_id: str = "r1"
    placed: Any = None
    to_upstream: Flow = field(default_factory=Flow)
    to_client: Flow = field(default_factory=Flow)
    pinged: list[float] = field(default_factory=list)
    closes: list[tuple[int, str]] = field(default_factory=list)

    def keepalive(self, now: float) -> None:
        self.pinged.append(now)

    async def close(self, code: int, reason: str, upstream_reason: str = "") -> None:
        self.closes.append((code, reason))

    def placement(self) -> Any:
        return self.placed


@dataclass
class Placed:
    last_frame: float


def test_a_finished_connection_keeps_its_counts_in_the_totals() -> None:
    registry = Registry(Clock())
    conn = Conn()
    registry.add(conn)  # type: ignore[arg-type]
    conn.to_upstream.frames, conn.to_upstream.bytes = 2, 20
    assert ("client_to_backend", 2, 20) in list(registry.flows())
    registry.finished(conn)  # type: ignore[arg-type]
    assert not registry.connections
    assert list(registry.flows()) == [("client_to_backend", 2, 20), ("backend_to_client", 0, 0)]


def test_find_and_last_frame_only_see_open_connections() -> None:
    registry = Registry(Clock())
    conn = Conn("abc", Placed(last_frame=7.5))
    registry.add(conn)  # type: ignore[arg-type]
    assert registry.find("abc") is conn and registry.find("other") is None
    assert registry.last_frame(conn) == 7.5
    registry.finished(conn)  # type: ignore[arg-type]
    assert registry.last_frame(conn) is None


async def test_keepalive_pings_every_connection_with_the_clock() -> None:
    registry = Registry(Clock(42.0))
    conns = [Conn(str(n)) for n in range(3)]
    for conn in conns:
        registry.add(conn)  # type: ignore[arg-type]
    last_pinged = asyncio.Event()
    conns[-1].keepalive = lambda now: (conns[-1].pinged.append(now), last_pinged.set())  # type: ignore[method-assign]
    task = asyncio.create_task(registry.keep_alive(lambda: 0.02))
    try:
        await asyncio.wait_for(last_pinged.wait(), TIMEOUT)
    finally:
        task.cancel()
    assert all(conn.pinged[0] == 42.0 for conn in conns)


async def test_close_spread_and_close_all_close_every_connection_with_1012() -> None:
    registry = Registry(Clock())
    conns = [Conn(str(n)) for n in range(3)]
    for conn in conns:
        registry.add(conn)  # type: ignore[arg-type]
    await registry.close_spread(0.0)
    assert [conn.closes for conn in conns] == [[(1012, "server restarting")]] * 3
    await registry.close_all(1001, "bye")
    assert conns[0].closes[-1] == (1001, "bye")


def test_placement_answer_says_why() -> None:
    record = {"user_id": "u", "backend": "old", "route": "bucket", "fell_back": False, "ready_s": 0.1}
    assert placement_answer("r", record)["why"] == "route"
    assert placement_answer("r", {**record, "route": "force_old"})["why"] == "forced"
    assert placement_answer("r", {**record, "fell_back": True, "ready_s": None}) == {
        "request_id": "r", "user_id": "u", "backend": "old", "why": "fallback", "relaying": False
    }
    assert placement_answer("r", {**record, "backend": None})["relaying"] is False
