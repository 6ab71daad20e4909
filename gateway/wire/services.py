"""The seam between a connection and the gateway it belongs to, both ways.

`GatewayServices` is all a `connection.Connection` asks of the gateway and `OpenConnection`
all the gateway reads of a connection, so that each can be driven without the other: a
connection against a small fake (tests/test_connection_fake.py), the gateway against
anything that keeps these promises.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, Protocol

from ..core.config import Config
from .connector import Connector
from .relay import Flow
from ..core.routing import Route


class Placement(NamedTuple):
    user_id: str
    routed: str  # the backend the route chose at connect, before any fallback
    backend: str  # the backend the session is on
    last_frame: float  # clock() of the last frame read from either side


class GatewayServices(Protocol):
    """What a connection needs from the gateway it belongs to (`runtime.Gateway` in production).

    Calls take and return plain values: the gateway never reads or writes a connection's
    fields, so a connection can be driven against a small fake.
    """

    close_timeout: float
    connector: Connector
    wall: Callable[[], float]  # the injected wall clock: token times are wall-clock times

    async def ip_blocked(self, ip: str) -> bool: ...

    async def acquire_slot(self, user_id: str, connection_id: str) -> bool: ...

    async def refresh_keys(self) -> None: ...

    def token_refreshed(self, result: str) -> None: ...

    def session_expired(self) -> None: ...

    def reply_observer(self, backend: str) -> Callable[[float], None]: ...

    def route(self, user_id: str) -> Route: ...

    def upstream_connected(self, backend: str, seconds: float) -> None: ...

    @property
    def ramp_window(self) -> int | None:
        """The ramp's window an upstream attempt begins in, handed back with its result."""

    def upstream_result(self, backend: str, result: str, ramp_window: int | None) -> None: ...

    def upstream_error(self, backend: str, url: str, error: BaseException) -> dict[str, Any]: ...

    def fell_back(self) -> None: ...

    def session_ready(
        self, auth_style: str, backend: str, user_id: str, seconds: float, headers: Sequence[tuple[str, str]] = ()
    ) -> None: ...

    def auth_failed(self, ip: str, failure: str) -> Awaitable[bool] | None:
        """Count a refused client's failure against its address; None when it does not count."""

    def connection_finished(self, conn: OpenConnection) -> None: ...


class Started(Protocol):
    """A connection's session, as far as the gateway looks into it."""

    @property
    def config(self) -> Config:
        """The config the session started with (a reload does not change it)."""


class OpenConnection(Protocol):
    """What the gateway reads of a connection: its live counts, its keepalive, its close, its
    record and where it is."""

    to_upstream: Flow
    to_client: Flow
    client_ip: str
    connection_id: str
    request_id: str

    @property
    def session(self) -> Started: ...

    @property
    def upstream_dropped(self) -> bool: ...

    def keepalive(self, now: float) -> None: ...

    async def close(self, code: int, reason: str, upstream_reason: str = ...) -> None: ...

    def record(self) -> dict[str, Any]: ...

    def placement(self) -> Placement | None: ...
