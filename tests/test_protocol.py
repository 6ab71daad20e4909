"""The session machine, driven as events in and actions out: every cell of {legacy, message} x {query, message}."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.core.auth import MAX_TOKEN_BYTES, Verifier, authenticate_message
from gateway.core.config import BackendConfig, Config
from gateway.core.protocol import (
    EVENT_PHASES,
    TRANSLATIONS,
    Action,
    CloseClient,
    CloseUpstream,
    ExpireAt,
    FetchKeys,
    OpenUpstream,
    Phase,
    RouteUser,
    SendClient,
    SendUpstream,
    Session,
    ShellError,
    StartRelay,
    TokenRefreshed,
    UpstreamResult,
    is_connected_frame,
    split_query,
    upstream_url,
)
from gateway.core.routing import choose_backend

from .helpers import make_config, make_token

TOKEN = make_token("alice")
AUTH = json.dumps({"type": "authenticate", "token": TOKEN})
BACKEND_CONNECTED = '{"type":"connected","user_id":"alice","server":"new"}'
GATEWAY_CONNECTED = '{"type":"connected","message":"Connected to Wealth Coach AI"}'
OLD_URL = "ws://127.0.0.1:1/ws/chat"
NEW_URL = "ws://127.0.0.1:2/ws/chat"


def config_for(backend: str = "old", **sections: Any) -> Config:
    """The helpers' valid config with every user routed to `backend`, changed one section at a time.

    Fallback to the old backend is off unless a test turns it on, so failures show plainly.
    """
    rollout = {"new_percent": 100 if backend == "new" else 0, "fallback_to_old": False, **sections.pop("rollout", {})}
    return make_config(rollout=rollout, **sections)


def session(backend: str = "old", query: str = "", **sections: Any) -> Session:
    """A session on the real verifier; `query` decides the client style."""
    config = config_for(backend, **sections)
    return Session(config, Verifier(config.auth), query)


def routed(s: Session, actions: list[Action]) -> list[Action]:
    """Play the shell's part for `RouteUser` (no limits, the real router): the actions `routed` returns."""
    if actions and isinstance(actions[-1], RouteUser):
        assert len(actions) == 1
        return s.routed(choose_backend(actions[0].user_id, s.config.rollout))
    return actions


def start(s: Session) -> list[Action]:
    return routed(s, s.start())


def frame(s: Session, data: str | bytes) -> list[Action]:
    return routed(s, s.client_frame(data))


def ok(s: Session) -> UpstreamResult:
    assert s.backend is not None
    return UpstreamResult(s.backend, "ok")


def legacy(backend: str = "old", extra_query: str = "", **sections: Any) -> Session:
    return session(backend, f"token={TOKEN}" + (f"&{extra_query}" if extra_query else ""), **sections)


def opened(s: Session) -> list[Action]:
    """Authenticate the client (either style) and return the actions that opened the upstream."""
    actions = s.start()
    if s.auth_style == "message":
        assert actions == []
        actions = s.client_frame(AUTH)
    assert actions == [RouteUser("alice")]
    actions = routed(s, actions)
    assert [type(a) for a in actions] == [OpenUpstream]
    return actions


def handshaking(s: Session) -> Session:
    """Drive `s` (routed new) until it waits for the backend's `connected`."""
    opened(s)
    s.upstream_opened()
    assert s.phase is Phase.UPSTREAM_HANDSHAKE
    return s


def old_backend(s: Session) -> BackendConfig:
    return s.config.backends["old"]


def new_backend(s: Session) -> BackendConfig:
    return s.config.backends["new"]


def never_opens_upstream(actions: list[Action]) -> bool:
    return not any(isinstance(a, (OpenUpstream, SendUpstream)) for a in actions)


# -- the four cells, exact action sequences ------------------------------------------------------


def test_legacy_client_routed_old_opens_upstream_with_url_token_then_relays() -> None:
    s = legacy("old")
    assert s.auth_style == "legacy"
    assert s.start() == [RouteUser("alice")]
    assert s.phase is Phase.ROUTING
    assert routed(s, [RouteUser("alice")]) == [OpenUpstream("old", f"{OLD_URL}?token={TOKEN}", old_backend(s))]
    assert s.phase is Phase.CONNECTING
    assert s.upstream_opened() == [ok(s), StartRelay()]
    assert s.phase is Phase.RELAYING


def test_legacy_client_routed_new_authenticates_upstream_on_its_behalf() -> None:
    s = legacy("new")
    assert start(s) == [OpenUpstream("new", NEW_URL, new_backend(s))]
    assert s.upstream_opened() == [SendUpstream(authenticate_message(TOKEN))]
    assert json.loads(authenticate_message(TOKEN)) == {"type": "authenticate", "token": TOKEN}
    assert s.phase is Phase.UPSTREAM_HANDSHAKE


def test_legacy_client_routed_new_never_sees_connected_frame() -> None:
    s = handshaking(legacy("new"))
    assert s.upstream_frame(BACKEND_CONNECTED) == [ok(s), StartRelay()]
    assert s.phase is Phase.RELAYING


def test_message_client_routed_old_opens_upstream_with_url_token_and_gets_gateway_connected() -> None:
    s = session("old")
    assert s.auth_style == "message"
    assert s.start() == []
    assert frame(s, AUTH) == [OpenUpstream("old", f"{OLD_URL}?token={TOKEN}", old_backend(s))]
    assert s.upstream_opened() == [ok(s), SendClient(GATEWAY_CONNECTED), StartRelay()]


def test_message_client_routed_old_gets_the_configured_connected_text() -> None:
    greeting = '{"type":"connected","message":"hi"}'
    s = session("old", auth={"connected_message": greeting})
    opened(s)
    assert s.upstream_opened() == [ok(s), SendClient(greeting), StartRelay()]


def test_message_client_routed_new_forwards_its_own_authenticate_frame() -> None:
    own = json.dumps({"token": TOKEN, "type": "authenticate", "device": "ios"})
    s = session("new")
    s.start()
    assert frame(s, own) == [OpenUpstream("new", NEW_URL, new_backend(s))]
    assert s.upstream_opened() == [SendUpstream(own)]


def test_message_client_routed_new_gets_the_backends_own_connected_frame() -> None:
    s = handshaking(session("new"))
    assert s.upstream_frame(BACKEND_CONNECTED) == [ok(s), SendClient(BACKEND_CONNECTED), StartRelay()]
    assert s.phase is Phase.RELAYING


@pytest.mark.parametrize("backend", ["old", "new"])
@pytest.mark.parametrize("client", ["legacy", "message"])
def test_session_records_identity_and_route_of_the_verified_user(client: str, backend: str) -> None:
    s = legacy(backend) if client == "legacy" else session(backend)
    opened(s)
    assert s.identity is not None and s.identity.user_id == "alice"
    assert s.route is not None and s.route.backend == backend
    assert s.backend == backend and s.upstream_style == {"old": "query", "new": "message"}[backend]


def test_user_is_routed_by_the_user_id_claim() -> None:
    s = session("old", rollout={"force_new": ["bob"]})
    s.start()
    actions = frame(s, json.dumps({"type": "authenticate", "token": make_token("bob")}))
    assert actions == [OpenUpstream("new", NEW_URL, new_backend(s))]
    assert s.route is not None and s.route.reason == "force_new"


# -- upstream URL ------------------------------------------------------------------------------------


def test_other_query_parameters_reach_a_query_backend_byte_for_byte_in_order_with_token_last() -> None:
    s = session("old", f"z=1&q=a%20b+c&token={TOKEN}&flag&r=%E2%82%AC&a=")
    assert s.auth_style == "legacy"
    assert opened(s)[0].url == f"{OLD_URL}?z=1&q=a%20b+c&flag&r=%E2%82%AC&a=&token={TOKEN}"


def test_other_query_parameters_reach_a_message_backend_with_the_token_stripped() -> None:
    s = session("new", f"z=1&token={TOKEN}&q=a%20b+c&flag")
    assert opened(s)[0].url == f"{NEW_URL}?z=1&q=a%20b+c&flag"


def test_message_client_query_parameters_are_forwarded_too() -> None:
    s = session("new", "room=7&lang=fr")
    assert s.auth_style == "message"
    assert opened(s)[0].url == f"{NEW_URL}?room=7&lang=fr"


def test_configured_client_query_param_name_carries_the_token() -> None:
    s = session("new", f"token=ignored&access_token={TOKEN}", auth={"query_param": "access_token"})
    assert s.auth_style == "legacy"
    assert opened(s)[0].url == f"{NEW_URL}?token=ignored"


def test_empty_query_token_means_a_message_client() -> None:
    s = session("old", "token=&room=1")
    assert s.auth_style == "message"
    assert s.start() == []
    assert opened(s)[0].url == f"{OLD_URL}?room=1&token={TOKEN}"


def test_token_in_the_url_is_verified_before_anything_opens() -> None:
    s = session("old", "token=" + make_token(ttl=-10))
    assert s.start() == [CloseClient(1008, "token expired")]


def test_split_query_without_a_query_finds_nothing() -> None:
    assert split_query("", "token") == (None, [])


def test_split_query_returns_the_decoded_token_and_the_rest_raw_in_order() -> None:
    assert split_query("b=2&token=a%2Eb.c&a=%41&c", "token") == ("a.b.c", ["b=2", "a=%41", "c"])


def test_split_query_takes_the_first_non_empty_token_and_strips_every_copy() -> None:
    assert split_query("token=&x=1&token=first&token=second", "token") == ("first", ["x=1"])


def test_split_query_decodes_plus_and_percent_in_the_token() -> None:
    assert split_query("token=a+b%2Bc", "token") == ("a b+c", [])


def test_split_query_matches_a_percent_encoded_parameter_name() -> None:
    assert split_query("tok%65n=abc", "token") == ("abc", [])


@pytest.mark.parametrize("piece", ["TOKEN=abc", "tokens=abc", "xtoken=abc", "token2=abc"])
def test_split_query_matches_the_parameter_name_exactly(piece: str) -> None:
    assert split_query(piece, "token") == (None, [piece])


def test_split_query_drops_empty_pieces() -> None:
    assert split_query("&&a=1&&", "token") == (None, ["a=1"])


def test_split_query_treats_a_bare_token_name_as_no_token() -> None:
    assert split_query("token&a=1", "token") == (None, ["a=1"])


def backend(auth: str, url: str = "ws://b/ws", query_param: str = "token") -> BackendConfig:
    return BackendConfig(url=url, auth=auth, query_param=query_param)


def test_upstream_url_of_a_message_backend_without_parameters_is_the_backend_url() -> None:
    assert upstream_url(backend("message"), [], None) == "ws://b/ws"


def test_upstream_url_of_a_query_backend_url_encodes_the_token() -> None:
    assert upstream_url(backend("query"), [], "a+b/c=d&e f") == "ws://b/ws?token=a%2Bb%2Fc%3Dd%26e%20f"
    assert quote("a+b/c=d&e f", safe="") == "a%2Bb%2Fc%3Dd%26e%20f"


def test_upstream_url_uses_the_backends_own_token_parameter_name() -> None:
    assert upstream_url(backend("query", query_param="jwt"), ["a=1"], "T") == "ws://b/ws?a=1&jwt=T"


def test_upstream_url_appends_to_a_backend_url_that_has_a_query() -> None:
    assert upstream_url(backend("query", url="ws://b/ws?v=2"), ["a=1"], "T") == "ws://b/ws?v=2&a=1&token=T"
    assert upstream_url(backend("message", url="ws://b/ws?v=2"), ["a=1"], None) == "ws://b/ws?v=2&a=1"


def test_upstream_url_of_a_query_backend_carries_only_the_verified_token() -> None:
    smuggled = ["a=1", "jwt=FORGED", "j%77t=FORGED2", "b=2"]
    assert upstream_url(backend("query", query_param="jwt"), smuggled, "T") == "ws://b/ws?a=1&b=2&jwt=T"


def test_client_cannot_smuggle_a_second_token_to_a_query_backend() -> None:
    config = {"auth": {"query_param": "access_token"}, "backends": {
        "old": {"url": OLD_URL, "auth": "query", "query_param": "token"},
        "new": {"url": NEW_URL, "auth": "message"},
    }}
    s = session("old", f"token=FORGED&access_token={TOKEN}", **config)
    assert opened(s)[0].url == f"{OLD_URL}?token={TOKEN}"


# -- frames held before the upstream is ready ---------------------------------------------------------


def test_legacy_client_frames_before_ready_are_flushed_in_order_before_start_relay() -> None:
    s = legacy("old")
    start(s)
    assert s.client_frame("one") == []
    assert s.client_frame(b"\x00two") == []
    assert s.client_frame("three") == []
    assert s.upstream_opened() == [ok(s), SendUpstream("one"), SendUpstream(b"\x00two"), SendUpstream("three"), StartRelay()]


def test_legacy_client_routed_new_frames_are_held_until_connected_and_the_auth_frame_goes_first() -> None:
    s = legacy("new")
    start(s)
    assert s.client_frame("while connecting") == []
    assert s.upstream_opened() == [SendUpstream(authenticate_message(TOKEN))]
    assert s.client_frame(b"during handshake") == []
    assert s.upstream_frame(BACKEND_CONNECTED) == [
        ok(s),
        SendUpstream("while connecting"),
        SendUpstream(b"during handshake"),
        StartRelay(),
    ]


def test_message_client_routed_new_gets_connected_before_its_held_frames_are_sent() -> None:
    s = session("new")
    s.start()
    frame(s, AUTH)
    assert s.client_frame("early") == []
    assert s.upstream_opened() == [SendUpstream(AUTH)]
    assert s.client_frame("later") == []
    assert s.upstream_frame(BACKEND_CONNECTED) == [
        ok(s),
        SendClient(BACKEND_CONNECTED),
        SendUpstream("early"),
        SendUpstream("later"),
        StartRelay(),
    ]


def test_message_client_routed_old_gets_gateway_connected_then_its_held_frames_go_up() -> None:
    s = session("old")
    opened(s)
    assert s.client_frame("early") == []
    assert s.upstream_opened() == [ok(s), SendClient(GATEWAY_CONNECTED), SendUpstream("early"), StartRelay()]


def test_second_authenticate_frame_is_an_ordinary_held_frame() -> None:
    s = session("old")
    opened(s)
    assert s.client_frame(AUTH) == []
    assert s.upstream_opened() == [ok(s), SendClient(GATEWAY_CONNECTED), SendUpstream(AUTH), StartRelay()]


def test_relaying_session_passes_frames_straight_through() -> None:
    s = legacy("old")
    start(s)
    s.upstream_opened()
    assert s.client_frame("up") == [SendUpstream("up")]
    assert s.upstream_frame(b"down") == [SendClient(b"down")]
    assert s.upstream_frame(BACKEND_CONNECTED) == [SendClient(BACKEND_CONNECTED)]


def test_held_frames_are_sent_only_once() -> None:
    s = legacy("old")
    start(s)
    s.client_frame("one")
    s.upstream_opened()
    assert s.client_frame("two") == [SendUpstream("two")]


# -- hold overflow ------------------------------------------------------------------------------------

OVERFLOW = CloseClient(1013, "too many messages before the session was ready")


def test_hold_buffer_full_by_frame_count_closes_the_client_with_1013() -> None:
    s = legacy("old", limits={"hold_buffer_frames": 3})
    s.start()
    assert [s.client_frame(f"f{i}") for i in range(3)] == [[], [], []]
    assert s.client_frame("f3") == [OVERFLOW]
    assert s.phase is Phase.CLOSED and s.failure == "hold_overflow"


def test_hold_buffer_full_by_bytes_closes_the_client_with_1013() -> None:
    s = legacy("old", limits={"max_message_bytes": 10, "hold_buffer_bytes": 10})
    s.start()
    assert s.client_frame("12345") == []
    assert s.client_frame(b"67890") == []
    assert s.client_frame(b"x") == [OVERFLOW]


def test_hold_buffer_counts_text_in_utf8_bytes() -> None:
    s = legacy("old", limits={"max_message_bytes": 10, "hold_buffer_bytes": 10})
    s.start()
    assert s.client_frame("ééééé") == []  # 10 bytes
    assert s.client_frame("é") == [OVERFLOW]


def test_hold_overflow_during_upstream_handshake_closes_the_upstream_too() -> None:
    s = handshaking(legacy("new", limits={"hold_buffer_frames": 1}))
    assert s.client_frame("f0") == []
    actions = s.client_frame("f1")
    assert actions[0] == OVERFLOW
    assert [type(a) for a in actions] == [CloseClient, CloseUpstream]
    assert actions[1].code == 1001


def test_nothing_is_sent_after_hold_overflow() -> None:
    s = legacy("old", limits={"hold_buffer_frames": 1})
    s.start()
    s.client_frame("f0")
    s.client_frame("f1")
    assert s.client_frame("f2") == []
    assert s.upstream_frame(BACKEND_CONNECTED) == []
    assert s.upstream_failed("connect") == []


# -- auth failures ------------------------------------------------------------------------------------

LEGACY_FAILURES = {
    "bad_signature": make_token(secret="another-secret-0123456789-abcdefghij"),
    "expired": make_token(ttl=-10),
    "bad_algorithm": make_token(secret="k" * 64, algorithm="HS512"),
    "bad_user_id": make_token(None),
    "malformed_token": "garbage",
    "token_too_large": "x" * (MAX_TOKEN_BYTES + 1),
}


@pytest.mark.parametrize("backend", ["old", "new"])
@pytest.mark.parametrize("reason", sorted(LEGACY_FAILURES))
def test_legacy_auth_failure_closes_1008_and_never_opens_upstream(reason: str, backend: str) -> None:
    token = LEGACY_FAILURES[reason]
    s = session(backend, f"token={token}")
    actions = s.start()
    assert [(type(a), a.code) for a in actions] == [(CloseClient, 1008)]  # type: ignore[union-attr]
    assert token not in actions[0].reason  # type: ignore[union-attr]
    assert s.failure == reason and s.phase is Phase.CLOSED
    later = s.client_frame("chat") + s.client_frame(AUTH) + s.auth_timed_out()
    assert later == [] and s.identity is None and s.backend is None


MESSAGE_FAILURES: dict[str, Any] = {
    "binary_frame": AUTH.encode(),
    "bad_frame": "not json",
    "not_authenticate": json.dumps({"type": "hello", "token": TOKEN}),
    "missing_token": json.dumps({"type": "authenticate"}),
    "expired": json.dumps({"type": "authenticate", "token": make_token(ttl=-10)}),
    "not_yet_valid": json.dumps({"type": "authenticate", "token": make_token(nbf=9_999_999_999)}),
    "bad_algorithm": json.dumps({"type": "authenticate", "token": make_token(secret="k" * 64, algorithm="HS512")}),
    "bad_signature": json.dumps({"type": "authenticate", "token": make_token(secret="another-secret-0123456789-abcdefghij")}),
}


@pytest.mark.parametrize("backend", ["old", "new"])
@pytest.mark.parametrize("reason", sorted(MESSAGE_FAILURES))
def test_message_auth_failure_closes_1008_and_never_opens_upstream(reason: str, backend: str) -> None:
    s = session(backend)
    s.start()
    actions = s.client_frame(MESSAGE_FAILURES[reason])
    assert [(type(a), a.code) for a in actions] == [(CloseClient, 1008)]  # type: ignore[union-attr]
    assert TOKEN not in actions[0].reason  # type: ignore[union-attr]
    assert s.failure == reason
    assert never_opens_upstream(s.client_frame(AUTH) + s.client_frame("chat") + s.auth_timed_out())


def test_auth_timeout_closes_a_silent_message_client_with_1008() -> None:
    s = session("new")
    assert s.auth_timeout == 5.0
    assert s.start() == []
    assert s.auth_timed_out() == [CloseClient(1008, "authentication timed out")]
    assert s.failure == "timeout"
    assert s.client_frame(AUTH) == []


def test_auth_timeout_after_authenticating_does_nothing() -> None:
    s = session("new")
    opened(s)
    assert s.auth_timed_out() == []
    assert s.phase is Phase.CONNECTING


def test_auth_timeout_does_not_apply_to_a_legacy_client() -> None:
    s = legacy("old")
    s.start()
    assert s.auth_timed_out() == []


def test_client_leaving_before_authenticating_opens_nothing() -> None:
    s = session("new")
    s.start()
    assert s.client_closed(1000, "") == []
    assert s.phase is Phase.CLOSED
    assert s.client_frame(AUTH) == []


# -- upstream failures ------------------------------------------------------------------------------------

REJECTED = CloseClient(1008, "token rejected by backend")
BAD_GATEWAY = CloseClient(1014, "backend unavailable")


def result(s: Session, kind: str) -> UpstreamResult:
    assert s.backend is not None
    return UpstreamResult(s.backend, kind)  # type: ignore[arg-type]


@pytest.mark.parametrize("client", ["legacy", "message"])
def test_upstream_closing_1008_during_its_handshake_closes_the_client_1008(client: str) -> None:
    s = handshaking(legacy("new") if client == "legacy" else session("new"))
    assert s.upstream_closed(1008, "invalid token") == [result(s, "rejected"), REJECTED]
    assert s.failure == "rejected"


def test_upstream_refusing_with_1008_while_connecting_closes_the_client_1008() -> None:
    s = legacy("old")
    start(s)
    assert s.upstream_closed(1008, "") == [result(s, "rejected"), REJECTED]


@pytest.mark.parametrize("code", [None, 1000, 1001, 1006, 1011, 4000])
def test_upstream_closing_otherwise_during_its_handshake_is_a_bad_gateway(code: int | None) -> None:
    s = handshaking(legacy("new"))
    assert s.upstream_closed(code, "x") == [result(s, "handshake"), BAD_GATEWAY]
    assert s.failure == "handshake"


@pytest.mark.parametrize("frame", [b'{"type":"connected"}', "hello", '{"type":"error","message":"no"}', "[]", "[" * 5000])
def test_upstream_first_frame_other_than_connected_is_a_bad_gateway(frame: str | bytes) -> None:
    s = handshaking(session("new"))
    s.client_frame("held")
    actions = s.upstream_frame(frame)
    assert [type(a) for a in actions] == [UpstreamResult, CloseUpstream, CloseClient]
    assert actions[0] == result(s, "handshake")
    assert actions[1].code == 1002 and actions[2] == BAD_GATEWAY  # type: ignore[union-attr]
    assert never_opens_upstream(actions)


def test_upstream_unreachable_is_a_bad_gateway() -> None:
    s = legacy("old")
    start(s)
    s.client_frame("held")
    assert s.upstream_failed("connect") == [result(s, "connect"), BAD_GATEWAY]
    assert s.failure == "connect"


def test_upstream_handshake_deadline_closes_both_legs() -> None:
    s = handshaking(legacy("new"))
    assert s.handshake_timeout == 10.0 and s.connect_timeout == 10.0
    actions = s.upstream_failed("handshake")
    assert [type(a) for a in actions] == [UpstreamResult, CloseUpstream, CloseClient]
    assert actions[2] == BAD_GATEWAY


def test_upstream_events_after_the_session_closed_do_nothing() -> None:
    s = handshaking(legacy("new"))
    s.upstream_closed(1011, "")
    assert s.upstream_frame(BACKEND_CONNECTED) == []
    assert s.upstream_closed(1008, "") == []
    assert s.upstream_failed("handshake") == []


# -- the client leaving during the upstream handshake ---------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (4000, "bye", CloseUpstream(4000, "bye")),
        (1000, "", CloseUpstream(1000, "")),
        (None, "", CloseUpstream(1000, "")),
        (1005, "", CloseUpstream(1000, "")),
        (1006, "", CloseUpstream(1001, "client connection lost")),
    ],
)
def test_client_closing_during_upstream_handshake_forwards_its_close(
    code: int | None, reason: str, expected: CloseUpstream
) -> None:
    s = handshaking(session("new"))
    assert s.client_closed(code, reason) == [expected]
    assert s.phase is Phase.CLOSED
    assert s.upstream_frame(BACKEND_CONNECTED) == []


def test_client_closing_while_upstream_connects_leaves_it_to_the_shell() -> None:
    s = legacy("old")
    s.start()
    assert s.client_closed(4000, "bye") == []
    assert s.phase is Phase.CLOSED


# -- small helpers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("frame", ['{"type":"connected"}', '{"type": "connected", "user_id": 7}'])
def test_connected_frame_is_a_text_json_object_of_type_connected(frame: str) -> None:
    assert is_connected_frame(frame)


@pytest.mark.parametrize(
    "frame", [b'{"type":"connected"}', '{"type":"Connected"}', '["connected"]', '"connected"', "connected", "", "[" * 3000]
)
def test_anything_else_is_not_a_connected_frame(frame: str | bytes) -> None:
    assert not is_connected_frame(frame)


# -- fallback to the old backend -------------------------------------------------------------

FALLBACK = {"rollout": {"fallback_to_old": True}}


@pytest.mark.parametrize("style", ["legacy", "message"])
def test_new_backend_unreachable_falls_back_to_old_within_the_same_client_connection(style: str) -> None:
    s = legacy("new", **FALLBACK) if style == "legacy" else session("new", **FALLBACK)
    opened(s)
    failed, action = s.upstream_failed("connect")
    assert failed == UpstreamResult("new", "connect")
    assert isinstance(action, OpenUpstream) and action.backend == "old" and action.fallback
    assert action.url == f"{OLD_URL}?token={quote(TOKEN, safe='')}"
    assert s.fell_back and s.fallback_reason == "connect" and s.failure is None
    ready = s.upstream_opened()
    assert ready[0] == UpstreamResult("old", "ok")
    if style == "message":
        assert ready[1] == SendClient(GATEWAY_CONNECTED)
    assert ready[-1] == StartRelay()


def test_failed_new_handshake_closes_that_upstream_before_opening_the_old_one() -> None:
    s = handshaking(legacy("new", **FALLBACK))
    actions = s.upstream_frame('{"type":"error"}')
    assert actions[0] == UpstreamResult("new", "handshake")
    assert isinstance(actions[1], CloseUpstream)
    assert isinstance(actions[2], OpenUpstream) and actions[2].backend == "old"


def test_frames_held_during_a_fallback_reach_the_old_backend_in_order() -> None:
    s = legacy("new", **FALLBACK)
    opened(s)
    s.client_frame("one")
    s.upstream_failed("connect")
    s.client_frame("two")
    assert s.upstream_opened() == [UpstreamResult("old", "ok"), SendUpstream("one"), SendUpstream("two"), StartRelay()]


def test_backend_rejecting_the_token_never_falls_back() -> None:
    s = handshaking(legacy("new", **FALLBACK))
    assert s.upstream_closed(1008, "bad token") == [UpstreamResult("new", "rejected"), CloseClient(1008, "token rejected by backend")]
    assert not s.fell_back


def test_old_backend_failing_after_a_fallback_is_a_bad_gateway() -> None:
    s = legacy("new", **FALLBACK)
    opened(s)
    s.upstream_failed("connect")
    assert s.upstream_failed("connect") == [UpstreamResult("old", "connect"), CloseClient(1014, "backend unavailable")]
    assert s.failure == "connect"


def test_old_backend_failing_never_falls_anywhere() -> None:
    s = legacy("old", **FALLBACK)
    opened(s)
    assert s.upstream_failed("connect") == [UpstreamResult("old", "connect"), CloseClient(1014, "backend unavailable")]


# -- legacy sunset -----------------------------------------------------------------------------


def test_legacy_clients_are_refused_with_1008_when_legacy_auth_is_denied() -> None:
    s = legacy("old", auth={"legacy": "deny"})
    [action] = s.start()
    assert action.code == 1008 and "update" in action.reason and s.failure == "legacy_denied"


def test_message_clients_are_unaffected_when_legacy_auth_is_denied() -> None:
    s = session("new", auth={"legacy": "deny"})
    assert s.start() == []
    assert isinstance(frame(s, AUTH)[0], OpenUpstream)


# -- the translation table, cell by cell --------------------------------------------------------


def test_the_translation_table_has_exactly_the_four_cells() -> None:
    assert set(TRANSLATIONS) == {(c, b) for c in ("legacy", "message") for b in ("query", "message")}


@pytest.mark.parametrize(("client", "backend_style"), sorted(TRANSLATIONS))
def test_each_cell_of_the_translation_table_is_what_the_session_plays(client: str, backend_style: str) -> None:
    """Drive one session per cell to relaying and check it against its row of the table."""
    backend = {"query": "old", "message": "new"}[backend_style]
    cell = TRANSLATIONS[(client, backend_style)]  # type: ignore[index]
    s = legacy(backend) if client == "legacy" else session(backend)
    [open_action] = opened(s)
    assert isinstance(open_action, OpenUpstream)
    assert s.translation == cell
    assert (quote(TOKEN, safe="") in open_action.url) == (cell.upstream_auth == "url")
    after_open = s.upstream_opened()
    if cell.upstream_auth == "frame":
        assert after_open == [SendUpstream(AUTH if client == "message" else authenticate_message(TOKEN))]
        ready = s.upstream_frame(BACKEND_CONNECTED)
    else:
        ready = after_open
    to_client = [a.data for a in ready if isinstance(a, SendClient)]
    expected = {
        "none": [],
        "swallow": [],
        "greet": [GATEWAY_CONNECTED],
        "forward": [BACKEND_CONNECTED],
    }[cell.connected]
    assert to_client == expected
    assert ready[-1] == StartRelay()


# -- events out of their phase ---------------------------------------------------------------------

EVENTS: dict[str, Any] = {
    "start": lambda s: s.start(),
    "auth_timed_out": lambda s: s.auth_timed_out(),
    "client_frame": lambda s: s.client_frame("chat"),
    "client_closed": lambda s: s.client_closed(1000, ""),
    "refuse": lambda s: s.refuse("too_many_sessions"),
    "routed": lambda s: s.routed(choose_backend("alice", s.config.rollout)),
    "upstream_opened": lambda s: s.upstream_opened(),
    "upstream_frame": lambda s: s.upstream_frame(BACKEND_CONNECTED),
    "upstream_closed": lambda s: s.upstream_closed(1000, ""),
    "upstream_failed": lambda s: s.upstream_failed("connect"),
    "keys_fetched": lambda s: s.keys_fetched(),
    "client_refresh": lambda s: s.client_refresh("chat"),
    "expired": lambda s: s.expired(),
}


def in_phase(phase: Phase) -> Session:
    """A message client routed new, driven to `phase`."""
    if phase is Phase.FETCHING_KEYS:
        s, _ = jwks_session({})
        s.client_frame(json.dumps({"type": "authenticate", "token": RS_TOKEN}))
        assert s.phase is phase
        return s
    s = session("new")
    if phase is Phase.AUTHENTICATING:
        return s
    if phase is Phase.CLOSED:
        s.client_closed(1000, "")
        return s
    s.client_frame(AUTH)
    if phase is not Phase.ROUTING:
        routed(s, [RouteUser("alice")])
    if phase in (Phase.UPSTREAM_HANDSHAKE, Phase.RELAYING):
        s.upstream_opened()
    if phase is Phase.RELAYING:
        s.upstream_frame(BACKEND_CONNECTED)
    assert s.phase is phase
    return s


# -- signing keys from a JWKS endpoint -----------------------------------------------------------

RS_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RS_TOKEN = jwt.encode({"user_id": "alice", "exp": 2**31}, RS_KEY, algorithm="RS256", headers={"kid": "k1"})


class KeysByKid(dict):
    """The `auth.Keys` a `jwks.KeySet` is, without its fetching."""

    def key_for(self, kid: str) -> Any:
        return self.get(kid)


def jwks_session(keys: dict[str, Any]) -> tuple[Session, KeysByKid]:
    config = config_for("new", auth={"algorithms": ["RS256"], "secret": None, "jwks_url": "https://idp/jwks.json"})
    held = KeysByKid(keys)
    return Session(config, Verifier(config.auth, held), ""), held


def test_a_kid_the_gateway_lacks_asks_for_the_keys_once_and_holds_early_frames() -> None:
    s, keys = jwks_session({})
    assert s.client_frame(json.dumps({"type": "authenticate", "token": RS_TOKEN})) == [FetchKeys()]
    assert s.phase is Phase.FETCHING_KEYS
    assert s.client_frame("early") == []
    keys["k1"] = RS_KEY.public_key()
    assert s.keys_fetched() == [RouteUser("alice")]


def test_a_kid_still_unknown_after_the_refresh_closes_1008() -> None:
    s, _ = jwks_session({})
    s.client_frame(json.dumps({"type": "authenticate", "token": RS_TOKEN}))
    assert s.keys_fetched() == [CloseClient(1008, "token signed by an unknown key")]
    assert s.failure == "unknown_key"


def test_a_known_kid_verifies_without_asking() -> None:
    s, _ = jwks_session({"k1": RS_KEY.public_key()})
    assert s.client_frame(json.dumps({"type": "authenticate", "token": RS_TOKEN})) == [RouteUser("alice")]


def test_every_event_has_its_phases() -> None:
    assert set(EVENT_PHASES) == set(EVENTS)


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.value)
@pytest.mark.parametrize("event", sorted(EVENTS))
def test_an_event_fed_late_is_stale_news_and_one_fed_early_is_the_shells_bug(event: str, phase: Phase) -> None:
    s = in_phase(phase)
    order = list(Phase)
    belongs = EVENT_PHASES[event]
    if phase in belongs:
        return  # in its phase: the other tests say what it does
    if order.index(phase) > max(order.index(p) for p in belongs):
        assert EVENTS[event](s) == []
        assert s.phase is phase
    else:
        with pytest.raises(ShellError, match=f"{event} fed in phase {phase.value}"):
            EVENTS[event](s)


def test_every_event_is_stale_once_the_session_is_closed() -> None:
    for event, feed in EVENTS.items():
        assert feed(in_phase(Phase.CLOSED)) == [], event


def test_a_refusal_after_the_route_is_stale() -> None:
    s = in_phase(Phase.CONNECTING)
    assert s.refuse("too_many_sessions") == []
    assert s.phase is Phase.CONNECTING and s.failure is None


def test_refusing_a_verified_user_closes_1008_and_opens_nothing() -> None:
    s = in_phase(Phase.ROUTING)
    assert s.refuse("too_many_sessions") == [CloseClient(1008, "too many open sessions for this user")]
    assert s.failure == "too_many_sessions" and s.phase is Phase.CLOSED


# -- token expiry and in-band refresh (auth.session_expiry: close) -------------------------------


def relaying(backend: str = "new", ttl: float = 300, **auth: Any) -> tuple[Session, list[Action]]:
    """A message client relaying to `backend` with session_expiry close; the actions of the switch."""
    s = session(backend, auth={"session_expiry": "close", **auth})
    token = make_token("alice", ttl=ttl)
    actions = routed(s, s.client_frame(json.dumps({"type": "authenticate", "token": token})))
    actions += s.upstream_opened()
    if backend == "new":
        actions += s.upstream_frame(BACKEND_CONNECTED)
    assert s.phase is Phase.RELAYING
    return s, actions


def test_the_switch_to_the_relay_sets_the_deadline_at_exp_plus_leeway() -> None:
    s, actions = relaying(leeway_seconds=5)
    assert s.identity is not None and s.identity.expires_at is not None
    assert actions[-2:] == [StartRelay(), ExpireAt(s.identity.expires_at + 5)]


def test_without_session_expiry_no_deadline_is_set() -> None:
    s = session("old")
    actions = routed(s, s.client_frame(AUTH)) + s.upstream_opened()
    assert not any(isinstance(a, ExpireAt) for a in actions)
    assert s.expires_at is None


def test_expiry_closes_both_legs_with_1008() -> None:
    s, _ = relaying()
    assert s.expired() == [CloseClient(1008, "token expired"), CloseUpstream(1008, "token expired")]
    assert s.phase is Phase.CLOSED and s.failure == "session_expired"


@pytest.mark.parametrize(("backend", "forwarded"), [("new", True), ("old", False)])
def test_a_refresh_of_the_same_user_moves_the_deadline_and_reaches_only_a_message_backend(backend, forwarded) -> None:
    s, _ = relaying(backend, ttl=60)
    before = s.expires_at
    frame = json.dumps({"type": "authenticate", "token": make_token("alice", ttl=3600)})
    actions = s.client_refresh(frame)
    assert actions[0] == TokenRefreshed("ok")
    assert isinstance(actions[1], ExpireAt) and actions[1].at == s.expires_at
    assert before is not None and s.expires_at is not None and s.expires_at >= before + 3000
    assert (SendUpstream(frame) in actions) is forwarded
    assert s.phase is Phase.RELAYING


def test_a_refresh_with_another_users_token_closes_1008() -> None:
    s, _ = relaying()
    actions = s.client_refresh(json.dumps({"type": "authenticate", "token": make_token("mallory")}))
    assert actions == [TokenRefreshed("other_user"), CloseClient(1008, "token names another user"),
                       CloseUpstream(1008, "token names another user")]


@pytest.mark.parametrize("token", [make_token("alice", ttl=-10), make_token("alice", secret="x" * 40), "junk"])
def test_a_refresh_with_a_bad_token_closes_1008(token: str) -> None:
    s, _ = relaying()
    actions = s.client_refresh(json.dumps({"type": "authenticate", "token": token}))
    assert actions[0] == TokenRefreshed("invalid")
    assert [type(a) for a in actions[1:]] == [CloseClient, CloseUpstream]
    assert all(a.code == 1008 for a in actions[1:])  # type: ignore[union-attr]


@pytest.mark.parametrize("text", ['{"type":"message","text":"how do I authenticate?"}', '{"type": "authenticate"}'])
def test_a_frame_that_is_no_refresh_after_all_is_relayed(text: str) -> None:
    s, _ = relaying()
    assert s.client_refresh(text) == [SendUpstream(text)]
    assert s.phase is Phase.RELAYING
