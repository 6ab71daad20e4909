"""The session machine: one client connection from its upgrade to the relay, as events in
and actions out, with no I/O and no clock.

A client authenticates in one of two styles and is routed to a backend that speaks one of
two styles. `TRANSLATIONS` says what the gateway does in each of the four cells; the code
reads it and the tests iterate over it.

Rules that hold in every cell:

* Nothing reaches a backend before the gateway has verified the token itself.
* Client frames that arrive before the upstream is ready are held, in order, up to a
  bound; they are sent upstream right after the handshake. Overflow closes with 1013.
* A message-style client's first frame after authenticating is always ``connected``.
* A legacy client never sees a frame the old backend would not have sent.

The shell (`gateway.relay`) feeds events, performs the returned actions in order, and
enforces the deadlines this object names (`auth_timeout`, `connect_timeout`,
`handshake_timeout`). Everything with a side effect outside the session — limits, the
route and the guard behind it, metrics — is an action the shell performs (`RouteUser`,
`UpstreamResult`) or an event it feeds back (`routed`). Once it gets `StartRelay` it
pumps frames itself.

Out-of-phase events follow one rule (`EVENT_PHASES`): an event fed *after* the phases it
belongs to is stale news — a deadline that lost a race, the other leg's news after the
session moved on or closed — and yields no actions; an event fed *before* them is a bug in
the shell and raises `ShellError`. A peer can never cause an exception: whatever a client
or backend sends becomes actions (a close with a precise code).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Literal, Union, cast
from urllib.parse import quote, unquote_plus

from . import closecodes
from .auth import REASONS, AuthError, Identity, Verifier, authenticate_message, parse_authenticate_frame
from .config import BackendConfig, Config
from .routing import Route

Frame = Union[str, bytes]
"""A data frame: `str` is a text frame, `bytes` a binary one."""

ClientStyle = Literal["legacy", "message"]
BackendStyle = Literal["query", "message"]
UpstreamResultKind = Literal["ok", "connect", "handshake", "rejected", "bad_request"]
# The backend refused the upgrade because of the client's own request (400, 414, 431): the
# client's fault, so it is answered but never counted against the backend by the guard.
FailureKind = Literal["connect", "handshake", "bad_request"]


@dataclass(frozen=True)
class Translation:
    """What the gateway does for one (client style, backend style) cell.

    `upstream_auth`: ``url`` opens the upstream with the verified token as a query
    parameter; ``frame`` opens it without and sends ``authenticate`` (the client's own
    frame when it sent one), then waits for the backend's ``connected``.
    `connected`: what the client gets when the upstream is ready: ``none`` (a legacy client
    of a query backend: nothing), ``greet`` (the gateway's ``auth.connected_message``),
    ``forward`` (the backend's own ``connected``), ``swallow`` (the backend's ``connected``
    is dropped, because a legacy client never expects one).
    """

    upstream_auth: Literal["url", "frame"]
    connected: Literal["none", "greet", "forward", "swallow"]


TRANSLATIONS: dict[tuple[ClientStyle, BackendStyle], Translation] = {
    ("legacy", "query"): Translation(upstream_auth="url", connected="none"),
    ("legacy", "message"): Translation(upstream_auth="frame", connected="swallow"),
    ("message", "query"): Translation(upstream_auth="url", connected="greet"),
    ("message", "message"): Translation(upstream_auth="frame", connected="forward"),
}


class Phase(Enum):
    AUTHENTICATING = "authenticating"
    FETCHING_KEYS = "fetching_keys"  # the token names a JWKS kid the gateway has not seen yet
    ROUTING = "routing"
    CONNECTING = "connecting"
    UPSTREAM_HANDSHAKE = "upstream_handshake"
    RELAYING = "relaying"
    CLOSED = "closed"


_ORDER = {phase: index for index, phase in enumerate(Phase)}
_UPSTREAM_PENDING = frozenset({Phase.CONNECTING, Phase.UPSTREAM_HANDSHAKE})

EVENT_PHASES: dict[str, frozenset[Phase]] = {
    "start": frozenset({Phase.AUTHENTICATING}),
    "auth_timed_out": frozenset({Phase.AUTHENTICATING, Phase.FETCHING_KEYS}),
    "keys_fetched": frozenset({Phase.FETCHING_KEYS}),
    "client_refresh": frozenset({Phase.RELAYING}),
    "expired": frozenset({Phase.RELAYING}),
    "client_frame": frozenset(Phase) - {Phase.CLOSED},
    "client_closed": frozenset(Phase),
    "refuse": frozenset({Phase.AUTHENTICATING, Phase.FETCHING_KEYS, Phase.ROUTING}),
    "routed": frozenset({Phase.ROUTING}),
    "upstream_opened": frozenset({Phase.CONNECTING}),
    "upstream_frame": frozenset({Phase.UPSTREAM_HANDSHAKE, Phase.RELAYING}),
    "upstream_closed": _UPSTREAM_PENDING,
    "upstream_failed": _UPSTREAM_PENDING,
}
"""The phases each event belongs to (see the module docstring for the rule)."""


class ShellError(RuntimeError):
    """The shell fed an event before the session could take it: a gateway bug, never a peer's doing."""


@dataclass(frozen=True)
class FetchKeys:
    """The token's signing key is not in the JWKS the gateway holds: refresh it, then feed `keys_fetched`."""


@dataclass(frozen=True)
class RouteUser:
    """The token is verified: the shell checks the user's limits and answers `routed` or `refuse`."""

    user_id: str


@dataclass(frozen=True)
class OpenUpstream:
    backend: str
    url: str
    config: BackendConfig
    fallback: bool = False


@dataclass(frozen=True)
class UpstreamResult:
    """How one upstream attempt ended, for the metrics and the guard."""

    backend: str
    result: UpstreamResultKind


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


@dataclass(frozen=True)
class ExpireAt:
    """With ``auth.session_expiry: close``: feed `expired` at this wall-clock time (None: never)."""

    at: float | None


@dataclass(frozen=True)
class TokenRefreshed:
    """An in-band ``authenticate`` frame during the relay, and how it ended (for the metrics)."""

    result: Literal["ok", "invalid", "other_user"]


Action = Union[
    FetchKeys, RouteUser, OpenUpstream, UpstreamResult, SendClient, SendUpstream, CloseClient, CloseUpstream,
    StartRelay, ExpireAt, TokenRefreshed,
]


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


def upstream_url(backend: BackendConfig, kept_query: list[str], token: str | None) -> str:
    """The backend URL with the client's other parameters and, when `token` is given, the token.

    The client's own pieces named like the backend's token parameter are dropped, so the
    only token a backend reads from its URL is the one the gateway verified.
    """
    pieces = list(kept_query)
    if token is not None:
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

    def __init__(self, config: Config, verifier: Verifier, raw_query: str) -> None:
        self._config = config
        self._verifier = verifier
        query_token, self._kept_query = split_query(raw_query, config.auth.query_param)
        self._token = query_token
        self.auth_style: ClientStyle = "legacy" if query_token is not None else "message"
        self.phase = Phase.AUTHENTICATING
        self.identity: Identity | None = None
        self.route: Route | None = None
        self.backend: str | None = None
        self.failure: str | None = None
        self.fell_back = False
        self.fallback_reason: str | None = None
        self.client_close: tuple[int, str] | None = None
        self._auth_frame: str | None = None
        self._held: list[Frame] = []
        self._held_bytes = 0

    @property
    def config(self) -> Config:
        """The config this session was accepted under; a reload does not change it."""
        return self._config

    @property
    def translation(self) -> Translation:
        """The cell of `TRANSLATIONS` for this client and the backend it is (now) routed to."""
        return TRANSLATIONS[(self.auth_style, cast(BackendStyle, self._backend_config.auth))]

    @property
    def _backend_config(self) -> BackendConfig:
        assert self.backend is not None
        return self._config.backends[self.backend]

    # -- deadlines the shell enforces -------------------------------------------------

    @property
    def auth_timeout(self) -> float:
        return self._config.auth.timeout_seconds

    @property
    def handshake_timeout(self) -> float:
        return self._backend_config.handshake_timeout_seconds

    @property
    def connect_timeout(self) -> float:
        return self._backend_config.connect_timeout_seconds

    @property
    def upstream_style(self) -> str | None:
        return None if self.backend is None else self._backend_config.auth

    # -- events ------------------------------------------------------------------------

    def _takes(self, event: str) -> bool:
        """Whether `event` applies now: False for stale news; ShellError when it is early."""
        phases = EVENT_PHASES[event]
        if self.phase in phases:
            return True
        if _ORDER[self.phase] > max(_ORDER[p] for p in phases):
            return False
        raise ShellError(f"{event} fed in phase {self.phase.value}")

    def start(self) -> list[Action]:
        """The client's upgrade completed. Legacy clients are verified right away."""
        if not self._takes("start") or self.auth_style != "legacy":
            return []
        if self._config.auth.legacy == "deny":
            return self._reject(AuthError("legacy_denied"))
        return self._authenticated(self._token)

    def client_frame(self, data: Frame) -> list[Action]:
        if not self._takes("client_frame"):
            return []
        if self.phase is Phase.AUTHENTICATING:
            try:
                token, _ = parse_authenticate_frame(data)
            except AuthError as exc:
                return self._reject(exc)
            assert isinstance(data, str)
            self._auth_frame = data
            return self._authenticated(token)
        if self.phase is Phase.RELAYING:
            return [SendUpstream(data)]
        return self._hold(data)

    def keys_fetched(self) -> list[Action]:
        """The JWKS refresh `FetchKeys` asked for is done (or was not due): verify once more."""
        if not self._takes("keys_fetched"):
            return []
        return self._authenticated(self._token)

    @property
    def expires_at(self) -> float | None:
        """When the session must end (``auth.session_expiry: close``): the token's exp plus the leeway."""
        auth = self._config.auth
        if auth.session_expiry != "close" or self.identity is None or self.identity.expires_at is None:
            return None
        return self.identity.expires_at + auth.leeway_seconds

    def client_refresh(self, data: str) -> list[Action]:
        """A relayed client frame that may be an in-band ``authenticate`` (``session_expiry: close``).

        Not one after all (a chat message that mentions the word): relayed as usual. A valid
        token of the same user moves the deadline; the frame goes on to a message-style
        backend and is swallowed for a query-style one, which would not understand it. A bad
        token or another user's ends the session with 1008 on both legs.
        """
        if not self._takes("client_refresh"):
            return []
        try:
            token, _ = parse_authenticate_frame(data)
        except AuthError:
            return [SendUpstream(data)]
        assert self.identity is not None
        try:
            identity = self._verifier.verify(token)
        except AuthError as exc:
            return [TokenRefreshed("invalid"), *self._end(exc.reason, exc.close_reason)]
        if identity.user_id != self.identity.user_id:
            return [TokenRefreshed("other_user"), *self._end("other_user", "token names another user")]
        self.identity, self._token = identity, token
        actions: list[Action] = [TokenRefreshed("ok"), ExpireAt(self.expires_at)]
        if self._backend_config.auth == "message":
            actions.append(SendUpstream(data))
        return actions

    def expired(self) -> list[Action]:
        """The deadline of `ExpireAt` passed."""
        if not self._takes("expired"):
            return []
        return self._end("session_expired", REASONS["expired"])  # not an auth failure: the session ran its course

    def _end(self, failure: str, reason: str) -> list[Action]:
        self.phase = Phase.CLOSED
        self.failure = failure
        return [CloseClient(closecodes.POLICY_VIOLATION, reason), CloseUpstream(closecodes.POLICY_VIOLATION, reason)]

    def auth_timed_out(self) -> list[Action]:
        if not self._takes("auth_timed_out"):
            return []
        return self._reject(AuthError("timeout"))

    def refuse(self, reason: str) -> list[Action]:
        """The shell refuses the client for a reason of its own (a limit); `reason` is an auth reason."""
        if not self._takes("refuse"):
            return []
        return self._reject(AuthError(reason))

    def routed(self, route: Route) -> list[Action]:
        """The shell's answer to `RouteUser`: the backend this user goes to."""
        if not self._takes("routed"):
            return []
        assert self._token is not None
        self.route = route
        self.backend = route.backend
        self.phase = Phase.CONNECTING
        return [self._open(fallback=False)]

    def upstream_opened(self) -> list[Action]:
        if not self._takes("upstream_opened"):
            return []
        assert self._token is not None
        if self.translation.upstream_auth == "frame":
            self.phase = Phase.UPSTREAM_HANDSHAKE
            frame = self._auth_frame if self._auth_frame is not None else authenticate_message(self._token)
            return [SendUpstream(frame)]
        greeting = self._config.auth.connected_message if self.translation.connected == "greet" else None
        return self._ready(greeting)

    def upstream_frame(self, data: Frame) -> list[Action]:
        if not self._takes("upstream_frame"):
            return []
        if self.phase is Phase.RELAYING:
            return [SendClient(data)]
        if not is_connected_frame(data):
            return self._upstream_failed("handshake", close_upstream=True)
        return self._ready(data if self.translation.connected == "forward" else None)

    def upstream_closed(self, code: int | None, reason: str) -> list[Action]:
        """The upstream closed (or vanished, code 1006) before the relay started."""
        if not self._takes("upstream_closed"):
            return []
        if code == closecodes.POLICY_VIOLATION:
            assert self.backend is not None
            self.phase = Phase.CLOSED
            self.failure = "rejected"
            return [
                UpstreamResult(self.backend, "rejected"),
                CloseClient(closecodes.POLICY_VIOLATION, AuthError("upstream_rejected").close_reason),
            ]
        return self._upstream_failed("handshake", close_upstream=False)

    def upstream_failed(self, kind: FailureKind) -> list[Action]:
        """Connecting timed out or was refused, the backend refused the client's request, or
        the handshake deadline passed."""
        if not self._takes("upstream_failed"):
            return []
        return self._upstream_failed(kind, close_upstream=self.phase is Phase.UPSTREAM_HANDSHAKE)

    def client_closed(self, code: int | None, reason: str) -> list[Action]:
        """The client closed (or vanished) before the relay started.

        Frames it sent first are still owed to the backend: the session carries on until
        the upstream is ready, delivers them, then passes the client's close on.
        """
        forwarded = closecodes.forward(code, reason, closecodes.Side.UPSTREAM)
        if self._held and self.phase in _UPSTREAM_PENDING:
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
            if exc.reason == "unknown_key" and self.phase is Phase.AUTHENTICATING:
                self._token = token
                self.phase = Phase.FETCHING_KEYS
                return [FetchKeys()]
            return self._reject(exc)
        self._token = token
        self.phase = Phase.ROUTING
        return [RouteUser(self.identity.user_id)]

    def _open(self, *, fallback: bool) -> OpenUpstream:
        assert self.backend is not None and self._token is not None
        backend = self._backend_config
        token = self._token if self.translation.upstream_auth == "url" else None
        return OpenUpstream(self.backend, upstream_url(backend, self._kept_query, token), backend, fallback=fallback)

    def _reject(self, error: AuthError) -> list[Action]:
        self.phase = Phase.CLOSED
        self.failure = error.reason
        return [CloseClient(closecodes.POLICY_VIOLATION, error.close_reason)]

    def _hold(self, data: Frame) -> list[Action]:
        self._held.append(data)
        self._held_bytes += len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
        limits = self._config.limits
        if len(self._held) > limits.hold_buffer_frames or self._held_bytes > limits.hold_buffer_bytes:
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

    def _ready(self, greeting: Frame | None) -> list[Action]:
        """The upstream is ready: greet the client if it waits for `connected`, flush what was held."""
        assert self.backend is not None
        actions: list[Action] = [UpstreamResult(self.backend, "ok")]
        if greeting is not None and self.client_close is None:
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
        if self.expires_at is not None:
            actions.append(ExpireAt(self.expires_at))
        return actions

    def _upstream_failed(self, kind: FailureKind, *, close_upstream: bool) -> list[Action]:
        """Give up on this upstream: fall back to the old backend once if allowed, else 1014.

        A request the backend refused as bad would be refused by the other backend too: no fallback."""
        assert self.backend is not None
        actions: list[Action] = [UpstreamResult(self.backend, kind)]
        if close_upstream:
            actions.append(CloseUpstream(closecodes.PROTOCOL_ERROR, "authentication handshake failed"))
        if self.backend == "new" and self._config.rollout.fallback_to_old and not self.fell_back and kind != "bad_request":
            self.fell_back = True
            self.fallback_reason = kind
            self.backend = "old"
            self.phase = Phase.CONNECTING
            return actions + [self._open(fallback=True)]
        self.phase = Phase.CLOSED
        self.failure = kind
        actions.append(CloseClient(closecodes.BAD_GATEWAY, "backend unavailable"))
        return actions
