"""`Connection` driven against a small hand-written `GatewayServices`: no gateway, no listener.

The seam (`gateway.services`) promises that a connection asks its gateway only through
plain calls; this fake keeps every promise with a list of what it was asked, and the
client's leg is one end of a loopback socket pair.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.core import closecodes
from gateway.core.auth import Verifier
from gateway.wire.connection import Connection
from gateway.wire.connlog import record
from gateway.wire.connector import Connector
from gateway.wire.frames import Close, MessageReader, encode_close
from gateway.core.protocol import Session
from gateway.wire.relay import Flow, Leg
from gateway.core.routing import Route
from gateway.wire.services import GatewayServices, OpenConnection
from gateway.wire.upstream import REFUSED, refusal

from .helpers import TIMEOUT, make_config, make_token


class FakeServices:
    """Every call is written down; nothing is answered that the test did not decide."""

    close_timeout = 5.0

    def __init__(self) -> None:
        self.connector = Connector()
        self.wall: Callable[[], float] = lambda: 0.0
        self.calls: list[tuple[Any, ...]] = []
        self.finished: asyncio.Future[OpenConnection] = asyncio.get_running_loop().create_future()

    async def ip_blocked(self, ip: str) -> bool:
        self.calls.append(("ip_blocked", ip))
        return False

    async def acquire_slot(self, user_id: str, connection_id: str) -> bool:
        self.calls.append(("acquire_slot", user_id))
        return True

    async def refresh_keys(self) -> None:
        self.calls.append(("refresh_keys",))

    def token_refreshed(self, result: str) -> None:
        self.calls.append(("token_refreshed", result))

    def session_expired(self) -> None:
        self.calls.append(("session_expired",))

    def reply_observer(self, backend: str) -> Callable[[float], None]:
        return lambda seconds: None

    def route(self, user_id: str) -> Route:
        raise AssertionError("a refused client is never routed")

    def upstream_connected(self, backend: str, seconds: float) -> None:
        self.calls.append(("upstream_connected", backend))

    ramp_window = None

    def upstream_result(self, backend: str, result: str, ramp_window: int | None) -> None:
        self.calls.append(("upstream_result", backend, result))

    def upstream_error(self, backend: str, url: str, error: BaseException) -> dict[str, Any]:
        self.calls.append(("upstream_error", backend))
        return {}

    def fell_back(self) -> None:
        self.calls.append(("fell_back",))

    def session_ready(
        self, auth_style: str, backend: str, user_id: str, seconds: float, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.calls.append(("session_ready", backend))

    def auth_failed(self, ip: str, failure: str) -> Awaitable[bool] | None:
        self.calls.append(("auth_failed", ip, failure))
        return None

    def connection_finished(self, conn: OpenConnection) -> None:
        self.calls.append(("connection_finished",))
        self.finished.set_result(conn)


class Owner:
    """The client leg's owner until the connection takes it (as the listener's is)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock


async def test_a_refused_client_is_closed_and_reported_through_the_services_alone() -> None:
    loop = asyncio.get_running_loop()
    fake = FakeServices()
    services: GatewayServices = fake
    config = make_config()
    session = Session(config, Verifier(config.auth), "token=" + make_token("alice", secret="not-the-gateways-secret-but-as-long-as-one"))
    ours, theirs = socket.socketpair()
    leg = Leg(Owner(loop.time), is_client=True)
    await loop.connect_accepted_socket(lambda: leg, ours)
    reader, writer = await asyncio.open_connection(sock=theirs)
    conn = Connection(
        services, session, leg, request_id="fake-1", client_ip="127.0.0.1", upstream_headers=[],
        client_deflate=None, clock=loop.time,
    )
    conn.begin(b"")

    frames = MessageReader(masked=False, max_message=1024)
    events: list[Any] = []
    for _ in range(10):  # bounded: a close frame is at most 127 bytes
        events += frames.feed(await asyncio.wait_for(reader.read(256), TIMEOUT))
        if events:
            break
    assert events == [Close(closecodes.POLICY_VIOLATION, events[0].reason)]
    writer.write(encode_close(closecodes.POLICY_VIOLATION, "", mask=True))

    finished = await asyncio.wait_for(fake.finished, TIMEOUT)
    assert finished is conn
    failure = session.failure
    assert failure is not None
    assert ("auth_failed", "127.0.0.1", failure) in fake.calls
    assert fake.calls[-1] == ("connection_finished",)
    record = conn.record()
    assert (record["failure"], record["client_got"], record["backend"]) == (failure, [1008, events[0].reason], None)
    writer.close()


def test_an_upgrade_refusal_is_a_1008_for_401_and_403_the_clients_fault_for_400_414_431_else_a_connect_failure() -> None:
    assert [refusal(status) for status in (401, 403, 400, 414, 431, 404, 500, 502)] == [
        REFUSED, REFUSED, "bad_request", "bad_request", "bad_request", "connect", "connect", "connect",
    ]


def test_the_record_of_a_session_that_never_started_names_no_backend_and_no_close() -> None:
    config = make_config()
    session = Session(config, Verifier(config.auth), "")
    line = record(
        session, Flow(), Flow(), None, request_id="r", started=10.0, ready_at=None, now=12.5, access={"status": 101}
    )
    assert (line["backend"], line["ready_s"], line["duration_s"], line["client_got"], line["status"]) == (
        None, None, 2.5, None, 101,
    )
