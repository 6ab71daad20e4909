"""The session handshake as a state machine: events in, actions out, no I/O.

A client authenticates in one of two styles and is routed to a backend that speaks one
of two styles. The four combinations, as the gateway plays them:

=====================  ==========================================  ==============================================
client \\ backend       ``query`` (old)                              ``message`` (new)
=====================  ==========================================  ==============================================
legacy (``?token=``)   open upstream with ``?token=``; relay         open without token, send ``authenticate``,
                                                                     wait for ``connected`` and swallow it; relay
message (first frame)  open upstream with ``?token=``, send the      open without token, forward the client's own
                       gateway's ``connected`` to the client; relay  ``authenticate``, forward the backend's
                                                                     ``connected``; relay
=====================  ==========================================  ==============================================

Rules that hold in every cell:

* Nothing reaches a backend before the gateway has verified the token itself.
* Client frames that arrive before the upstream is ready are held, in order, up to a
  bound; they are sent upstream right after the handshake. Overflow closes with 1013.
* A message-style client's first frame after authenticating is always ``connected``.
* A legacy client never sees a frame the old backend would not have sent.

The shell (`gateway.relay`) feeds events, performs the returned actions in order, and
enforces the deadlines this object names (`auth_timeout`, `handshake_timeout`). Once it
gets `StartRelay` it pumps frames itself; this object is no longer consulted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal, Union
from urllib.parse import quote, unquote_plus

from . import closecodes
from .auth import AuthError, Identity, Verifier, authenticate_message, parse_authenticate_frame
from .config import BackendConfig, Config
from .routing import Route

Frame = Union[str, bytes]
"""A data frame: `str` is a text frame, `bytes` a binary one."""

AuthStyle = Literal["legacy", "message"]


class Phase(Enum):
    AUTHENTICATING = "authenticating"
    CONNECTING = "connecting"
    UPSTREAM_HANDSHAKE = "upstream_handshake"
    RELAYING = "relaying"
    CLOSED = "closed"


@dataclass(frozen=True)
class OpenUpstream:
    backend: str
    url: str
    config: BackendConfig
    fallback: bool = False


@dataclass(frozen=True)
class SendClient:
    data: Frame


@dataclass(frozen=True)
class SendUpstream:
    data: Frame


@dataclass(frozen=True)
class CloseClient:
    code: int
    reason: str


@dataclass(frozen=True)
class CloseUpstream:
    code: int
    reason: str


@dataclass(frozen=True)
class StartRelay:
    pass


Action = Union[OpenUpstream, SendClient, SendUpstream, CloseClient, CloseUpstream, StartRelay]


def split_query(raw_query: str, param: str) -> tuple[str | None, list[str]]:
    """The first non-empty value of `param`, and the other raw ``k=v`` pieces unchanged."""
    token = None
    kept = []
    for piece in raw_query.split("&"):
        if not piece:
            continue
        key, _, value = piece.partition("=")
        if unquote_plus(key) == param:
            if token is None and value:
                token = unquote_plus(value)
            continue
        kept.append(piece)
    return token, kept


def upstream_url(backend: BackendConfig, kept_query: list[str], token: str) -> str:
    """The backend URL with the client's other parameters and, for ``query`` backends, the token.

    For a ``query`` backend the client's own pieces named like the backend's token parameter
    are dropped, so the only token the backend sees is the one the gateway verified.
    """
    pieces = list(kept_query)
    if backend.auth == "query":
        pieces = [p for p in pieces if unquote_plus(p.partition("=")[0]) != backend.query_param]
        pieces.append(f"{quote(backend.query_param, safe='')}={quote(token, safe='')}")
    if not pieces:
        return backend.url
    separator = "&" if "?" in backend.url else "?"
    return backend.url + separator + "&".join(pieces)


def is_connected_frame(data: Frame) -> bool:
    if not isinstance(data, str):
        return False
    try:
        message = json.loads(data)
    except (ValueError, RecursionError):  # deep nesting ("[[[[…") raises RecursionError
        return False
    return isinstance(message, dict) and message.get("type") == "connected"


class Session:
    """One client connection from upgrade to `StartRelay` (or to its close)."""

    def __init__(
        self,
        config: Config,
        verifier: Verifier,
        route: Callable[[str], Route],
        raw_query: str,
    ) -> None:
        self._config = config
        self._verifier = verifier
        self._route_for = route
        self._hold_limit_frames = config.limits.hold_buffer_frames
        self._hold_limit_bytes = config.limits.hold_buffer_bytes
        query_token, self._kept_query = split_query(raw_query, config.auth.query_param)
        self._token = query_token
        self.auth_style: AuthStyle = "legacy" if query_token is not None else "message"
        self.phase = Phase.AUTHENTICATING
        self.identity: Identity | None = None
        self.route: Route | None = None
        self.backend: str | None = None
        self.failure: str | None = None
        self.fell_back = False
        self.fallback_reason: str | None = None
        self.client_close: tuple[int, str] | None = None
        self.outcomes: list[tuple[str | None, str]] = []
        """(backend, ok|connect|handshake|rejected) per upstream attempt, for the shell to report."""
        self._auth_frame: str | None = None
        self._held: list[Frame] = []
        self._held_bytes = 0

    @property
    def config(self) -> Config:
        """The config this session was accepted under; a reload does not change it."""
        return self._config

    # -- deadlines the shell enforces -------------------------------------------------

    @property
    def auth_timeout(self) -> float:
        return self._config.auth.timeout_seconds

    @property
    def handshake_timeout(self) -> float:
        assert self.backend is not None
        return self._config.backends[self.backend].handshake_timeout_seconds

    @property
    def connect_timeout(self) -> float:
        assert self.backend is not None
        return self._config.backends[self.backend].connect_timeout_seconds

    @property
    def upstream_style(self) -> str | None:
        return None if self.backend is None else self._config.backends[self.backend].auth

    # -- events ------------------------------------------------------------------------

    def start(self) -> list[Action]:
        """The client's upgrade completed. Legacy clients are verified right away."""
        if self.auth_style == "legacy":
            if self._config.auth.legacy == "deny":
                return self._reject(AuthError("legacy_denied"))
            return self._authenticated(self._token)
        return []

    def client_frame(self, data: Frame) -> list[Action]:
        if self.phase is Phase.AUTHENTICATING:
            try:
                token, _ = parse_authenticate_frame(data)
            except AuthError as exc:
                return self._reject(exc)
            assert isinstance(data, str)
            self._auth_frame = data
            return self._authenticated(token)
        if self.phase in (Phase.CONNECTING, Phase.UPSTREAM_HANDSHAKE):
            return self._hold(data)
        if self.phase is Phase.RELAYING:
            return [SendUpstream(data)]
        return []

    def refuse(self, reason: str) -> list[Action]:
        """The shell refuses the client for a reason of its own (a limit); `reason` is an auth reason."""
        if self.phase in (Phase.RELAYING, Phase.CLOSED):
            return []
        return self._reject(AuthError(reason))

    def auth_timed_out(self) -> list[Action]:
        if self.phase is not Phase.AUTHENTICATING:
            return []
        return self._reject(AuthError("timeout"))

    def upstream_opened(self) -> list[Action]:
        assert self.phase is Phase.CONNECTING and self._token is not None
        if self.upstream_style == "message":
            self.phase = Phase.UPSTREAM_HANDSHAKE
            frame = self._auth_frame if self._auth_frame is not None else authenticate_message(self._token)
            return [SendUpstream(frame)]
        return self._ready(greeting=self._config.auth.connected_message)

    def upstream_frame(self, data: Frame) -> list[Action]:
        if self.phase is Phase.UPSTREAM_HANDSHAKE:
            if not is_connected_frame(data):
                return self._upstream_failed("handshake", close_upstream=True)
            return self._ready(greeting=data)
        if self.phase is Phase.RELAYING:
            return [SendClient(data)]
        return []

    def upstream_closed(self, code: int | None, reason: str) -> list[Action]:
        """The upstream closed (or vanished, code 1006) before the relay started."""
        if self.phase not in (Phase.CONNECTING, Phase.UPSTREAM_HANDSHAKE):
            return []
        if code == closecodes.POLICY_VIOLATION:
            self.phase = Phase.CLOSED
            self.failure = "rejected"
            self.outcomes.append((self.backend, "rejected"))
            return [CloseClient(closecodes.POLICY_VIOLATION, AuthError("upstream_rejected").close_reason)]
        return self._upstream_failed("handshake", close_upstream=False)

    def upstream_failed(self, kind: Literal["connect", "handshake"]) -> list[Action]:
        """Connecting timed out or was refused, or the handshake deadline passed."""
        if self.phase not in (Phase.CONNECTING, Phase.UPSTREAM_HANDSHAKE):
            return []
        return self._upstream_failed(kind, close_upstream=self.phase is Phase.UPSTREAM_HANDSHAKE)

    def client_closed(self, code: int | None, reason: str) -> list[Action]:
        """The client closed (or vanished) before the relay started.

        Frames it sent first are still owed to the backend: the session carries on until
        the upstream is ready, delivers them, then passes the client's close on.
        """
        forwarded = closecodes.forward(code, reason, closecodes.Leg.UPSTREAM)
        if self._held and self.phase in (Phase.CONNECTING, Phase.UPSTREAM_HANDSHAKE):
            self.client_close = forwarded
            return []
        previous, self.phase = self.phase, Phase.CLOSED
        if previous is Phase.UPSTREAM_HANDSHAKE:
            return [CloseUpstream(*forwarded)]
        return []

    # -- internals -----------------------------------------------------------------------

    def _authenticated(self, token: str | None) -> list[Action]:
        try:
            self.identity = self._verifier.verify(token)
        except AuthError as exc:
            return self._reject(exc)
        self._token = token
        self.route = self._route_for(self.identity.user_id)
        self.backend = self.route.backend
        self.phase = Phase.CONNECTING
        assert token is not None
        backend = self._config.backends[self.backend]
        return [OpenUpstream(self.backend, upstream_url(backend, self._kept_query, token), backend)]

    def _reject(self, error: AuthError) -> list[Action]:
        self.phase = Phase.CLOSED
        self.failure = error.reason
        return [CloseClient(closecodes.POLICY_VIOLATION, error.close_reason)]

    def _hold(self, data: Frame) -> list[Action]:
        self._held.append(data)
        self._held_bytes += len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
        if len(self._held) > self._hold_limit_frames or self._held_bytes > self._hold_limit_bytes:
            close_upstream = self.phase is Phase.UPSTREAM_HANDSHAKE
            self.phase = Phase.CLOSED
            self.failure = "hold_overflow"
            actions: list[Action] = [
                CloseClient(closecodes.TRY_AGAIN_LATER, "too many messages before the session was ready")
            ]
            if close_upstream:
                actions.append(CloseUpstream(closecodes.GOING_AWAY, "client closed"))
            return actions
        return []

    def _ready(self, greeting: Frame | None = None) -> list[Action]:
        """The upstream is ready: greet the client if it waits for `connected`, flush what was held."""
        self.outcomes.append((self.backend, "ok"))
        actions: list[Action] = []
        if greeting is not None and self.auth_style == "message" and self.client_close is None:
            actions.append(SendClient(greeting))
        actions += [SendUpstream(frame) for frame in self._held]
        self._held = []
        self._held_bytes = 0
        if self.client_close is not None:
            self.phase = Phase.CLOSED
            actions.append(CloseUpstream(*self.client_close))
            return actions
        self.phase = Phase.RELAYING
        actions.append(StartRelay())
        return actions

    def _upstream_failed(self, kind: str, *, close_upstream: bool) -> list[Action]:
        """Give up on this upstream: fall back to the old backend once if allowed, else 1014."""
        self.outcomes.append((self.backend, kind))
        actions: list[Action] = []
        if close_upstream:
            actions.append(CloseUpstream(closecodes.PROTOCOL_ERROR, "authentication handshake failed"))
        if self.backend == "new" and self._config.rollout.fallback_to_old and not self.fell_back:
            assert self._token is not None
            self.fell_back = True
            self.fallback_reason = kind
            self.backend = "old"
            self.phase = Phase.CONNECTING
            backend = self._config.backends["old"]
            url = upstream_url(backend, self._kept_query, self._token)
            return actions + [OpenUpstream("old", url, backend, fallback=True)]
        self.phase = Phase.CLOSED
        self.failure = kind
        actions.append(CloseClient(closecodes.BAD_GATEWAY, "backend unavailable"))
        return actions
