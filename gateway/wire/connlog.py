"""A connection's log line: who, which path, how it ended. Never the token.

Apart from `connection` because it only reads what the session and the two flows ended
with, and so is a pure function, tested without sockets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.protocol import Session
from .relay import Flow, Reply


def record(
    session: Session,
    to_upstream: Flow,
    to_client: Flow,
    reply: Reply | None,
    *,
    request_id: str,
    started: float,
    ready_at: float | None,
    now: float,
    access: Mapping[str, Any],
) -> dict[str, Any]:
    """The line's fields; `access` is the upgrade request (remote, method, path, status)."""
    median, longest = reply.summary() if reply is not None else (None, None)
    return {
        "request_id": request_id,
        "user_id": session.identity.user_id if session.identity else None,
        "auth_style": session.auth_style,
        "backend": session.backend,
        "route": session.route.reason if session.route else None,
        "fell_back": session.fell_back,
        "failure": session.failure,
        "ready_s": round(ready_at - started, 4) if ready_at is not None else None,
        "duration_s": round(now - started, 3),
        "client_frames": to_upstream.frames,
        "client_bytes": to_upstream.bytes,
        "backend_frames": to_client.frames,
        "backend_bytes": to_client.bytes,
        "reply_p50_s": round(median, 4) if median is not None else None,
        "reply_max_s": round(longest, 4) if longest is not None else None,
        # what each peer sent (null: it did not close first) ...
        "client_close_code": to_upstream.close_code,
        "client_close_reason": to_upstream.close_reason,
        "backend_close_code": to_client.close_code,
        "backend_close_reason": to_client.close_reason,
        # ... and what the gateway sent each peer (an echo when that peer closed first)
        "client_got": _got(to_client.delivered, to_upstream),
        "backend_got": _got(to_upstream.delivered, to_client),
        **access,
    }


def _got(delivered: tuple[int, str] | None, own: Flow) -> list[object] | None:
    if delivered is not None:
        return list(delivered)
    return [own.close_code, ""] if own.close_code is not None else None
