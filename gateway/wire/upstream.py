"""Opening a session's upstream: the connector, the deflate offer and the backend's answer,
and what each way of failing is to the session.

Apart from `connection` because it is the one step of a handshake that waits on the network
and owns nothing of the connection: it hands back an open socket, or the failure the session
hears, and the connection feeds that to the session machine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

from . import deflate
from .connector import Connector, HeadReader
from .deflate import Deflate, NegotiationError
from .handshake import UpgradeRefused
from ..core.protocol import FailureKind, OpenUpstream

# The connection's logger: these lines are part of one connection's story.
log = logging.getLogger("gateway.connection")

# Upgrade refusals caused by the client's own request (its URL or headers are too big or
# malformed for the backend): answered with 1014, never counted against the backend.
CLIENT_FAULT_STATUSES = frozenset({400, 414, 431})

# The backend refused the client (401, 403): the session hears a 1008 close, not a failure.
REFUSED: Literal["refused"] = "refused"
Failure = Literal["refused", FailureKind]


class Opened(NamedTuple):
    transport: asyncio.Transport
    head: HeadReader  # the socket's protocol until the connection takes it over
    deflate: Deflate | None  # what the backend agreed to, None without compression


def refusal(status: int) -> Failure:
    """What an upgrade refused with `status` is to the session: `REFUSED`, or the reason for
    `Session.upstream_failed`."""
    if status in (401, 403):
        return REFUSED
    if status in CLIENT_FAULT_STATUSES:
        return "bad_request"
    return "connect"


async def open_upstream(
    connector: Connector,
    action: OpenUpstream,
    headers: Sequence[tuple[str, str]],
    client_deflate: Deflate | None,
    timeout: float,
    request_id: str,
    report: Callable[[str, str, BaseException], dict[str, Any]],
) -> Opened | Failure:
    """The upgraded socket, or what its failure is (`refusal`, or ``connect``). Each failure
    goes to `report` (the gateway's ``upstream_error``: where, never the URL, whose query may
    carry a token), and its answer into the log line."""
    request_headers = list(headers)
    offer = None
    if action.config.compress and client_deflate is not None:
        offer = deflate.upstream_offer(client_deflate)
        request_headers.append(("Sec-WebSocket-Extensions", offer))
    try:
        async with asyncio.timeout(timeout):
            transport, reader, response = await connector.open(action.url, request_headers, HeadReader)
    except UpgradeRefused as exc:
        where = report(action.backend, action.url, exc)
        log.warning(
            "upstream refused the upgrade",
            extra={"request_id": request_id, "backend": action.backend, "status": exc.status, **where},
        )
        return refusal(exc.status)
    except (OSError, TimeoutError) as exc:
        where = report(action.backend, action.url, exc)
        log.warning("upstream unreachable", extra={"request_id": request_id, "backend": action.backend, **where})
        return "connect"
    try:
        answer = response.headers.get("Sec-WebSocket-Extensions")
        if offer is None and answer:
            raise NegotiationError("extension not offered")
        agreed = deflate.accept_answer(answer) if offer else None
    except NegotiationError as exc:
        transport.abort()
        where = report(action.backend, action.url, exc)
        log.warning(
            "upstream answered an extension it was not offered",
            extra={"request_id": request_id, "backend": action.backend, **where},
        )
        return "connect"
    return Opened(transport, reader, agreed)
