"""The relay phase, driven as events in and actions out: every event in every state of the two legs."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from gateway.core.auth import Verifier
from gateway.core.closecodes import SENDABLE
from gateway.core.closecodes import Side
from gateway.core.protocol import CloseClient, CloseUpstream, ExpireAt, Phase, RouteUser, SendUpstream, Session, TokenRefreshed
from gateway.core.relayrules import (
    AbandonFrame,
    AbortLeg,
    CloseLeg,
    CloseRead,
    EchoClose,
    Ended,
    FailLeg,
    Ping,
    Pong,
    RelayRules,
    StopReading,
    gateway_close,
    keepalive,
)
from gateway.core.routing import choose_backend

from .helpers import make_config, make_token

CLIENT, UPSTREAM = Side.CLIENT, Side.UPSTREAM
SIDES = [CLIENT, UPSTREAM]
BACKEND_CONNECTED = '{"type":"connected","user_id":"alice","server":"new"}'


def relaying(backend: str = "new") -> RelayRules:
    """A message client relaying to `backend` with ``session_expiry: close``, handed to the relay machine."""
    config = make_config(
        rollout={"new_percent": 100 if backend == "new" else 0, "fallback_to_old": False},
        auth={"session_expiry": "close"},
    )
    s = Session(config, Verifier(config.auth), "")
    [route] = s.client_frame(json.dumps({"type": "authenticate", "token": make_token("alice")}))
    assert isinstance(route, RouteUser)
    s.routed(choose_backend(route.user_id, config.rollout))
    s.upstream_opened()
    if backend == "new":
        s.upstream_frame(BACKEND_CONNECTED)
    assert s.phase is Phase.RELAYING
    return RelayRules(s)


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()


def other(side: Side) -> Side:
    return UPSTREAM if side is CLIENT else CLIENT


# -- a peer's close --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "to_upstream", "to_client"),
    [
        (1000, "bye", (1000, "bye"), (1000, "bye")),
        (4001, "custom", (4001, "custom"), (4001, "custom")),
        (None, "", (1000, ""), (1000, "")),
    ],
)
@pytest.mark.parametrize("side", SIDES, ids=lambda s: s.value)
def test_a_peers_close_is_echoed_and_passed_on_mapped_for_the_other_leg(side, code, reason, to_upstream, to_client) -> None:
    r = relaying()
    payload = b"" if code is None else close_payload(code, reason)
    passed = to_upstream if side is CLIENT else to_client
    assert r.close_frame(side, payload) == [
        CloseRead(side),
        Ended(side, code, reason, lost=False),
        EchoClose(side, 1000 if code is None else code),
        CloseLeg(other(side), *passed),
    ]


def test_a_close_reason_over_123_bytes_is_cut_when_passed_on() -> None:
    r = relaying()
    actions = r.peer_closed(UPSTREAM, 1000, "é" * 100)
    [passed] = [a for a in actions if isinstance(a, CloseLeg)]
    assert passed.side is CLIENT and len(passed.reason.encode()) <= 123


@pytest.mark.parametrize("side", SIDES, ids=lambda s: s.value)
def test_a_close_that_answers_the_gateways_own_only_ends_that_legs_handshake(side: Side) -> None:
    r = relaying()
    r.close(1001, "draining", "gateway shutting down")
    assert r.peer_closed(side, 1001, "") == [CloseRead(side)]


@pytest.mark.parametrize("payload", [b"\x03", close_payload(1005), close_payload(999), b"\x03\xe8\xff"])
@pytest.mark.parametrize("side", SIDES, ids=lambda s: s.value)
def test_a_malformed_close_frame_is_a_protocol_error(side: Side, payload: bytes) -> None:
    r = relaying()
    actions = r.close_frame(side, payload)
    assert actions[0] == StopReading(side)
    assert [a for a in actions if isinstance(a, Ended)][0].code in (1002, 1007)


@pytest.mark.parametrize("side", SIDES, ids=lambda s: s.value)
def test_a_ping_gets_its_pong_on_the_same_leg_and_a_pong_needs_nothing(side: Side) -> None:
    r = relaying()
    assert r.ping(side, b"hi") == [Pong(side, b"hi")]
    

# -- a peer that breaks the protocol -------------------------------------------------------------------


@pytest.mark.parametrize(("code", "reason"), [(1002, "reserved opcode"), (1007, "invalid UTF-8")])
def test_a_backend_breaking_the_protocol_gets_its_code_and_loses_tcp_and_the_client_hears_1014(code, reason) -> None:
    r = relaying()
    assert r.protocol_error(UPSTREAM, code, reason) == [
        StopReading(UPSTREAM),
        Ended(UPSTREAM, code, "", lost=True),
        CloseLeg(UPSTREAM, code, reason),
        FailLeg(UPSTREAM),
        CloseLeg(CLIENT, 1014, "upstream connection lost"),
        AbandonFrame(CLIENT),
    ]


def test_a_backend_message_over_the_size_limit_gets_1009_and_the_client_hears_1014_saying_so() -> None:
    r = relaying()
    actions = r.protocol_error(UPSTREAM, 1009, "message too big")
    assert CloseLeg(UPSTREAM, 1009, "message too big") in actions
    assert CloseLeg(CLIENT, 1014, "backend sent a message over the size limit") in actions


@pytest.mark.parametrize(("code", "passed"), [
    (1002, (1001, "client connection lost")),
    (1007, (1001, "client connection lost")),
    (1009, (1001, "client sent a message over the size limit")),
])
def test_a_client_breaking_the_protocol_first_closes_the_backend_and_its_own_close_waits(code, passed) -> None:
    r = relaying()
    assert r.protocol_error(CLIENT, code, "bad") == [
        StopReading(CLIENT),
        Ended(CLIENT, code, "", lost=True),
        CloseLeg(UPSTREAM, *passed),
        AbandonFrame(UPSTREAM),
    ]


def test_a_failed_clients_close_follows_the_backends_answer() -> None:
    r = relaying()
    r.protocol_error(CLIENT, 1007, "invalid UTF-8")
    assert r.peer_closed(UPSTREAM, 1001, "") == [CloseRead(UPSTREAM), CloseLeg(CLIENT, 1007, "invalid UTF-8"), FailLeg(CLIENT)]
    assert r.leg_lost(UPSTREAM) == []  # once


def test_a_failed_clients_close_follows_the_backends_loss() -> None:
    r = relaying()
    r.protocol_error(CLIENT, 1002, "reserved opcode")
    assert r.leg_lost(UPSTREAM) == [CloseLeg(CLIENT, 1002, "reserved opcode"), AbandonFrame(CLIENT), FailLeg(CLIENT)]


def test_a_failed_client_stays_open_while_the_backends_leg_is_open() -> None:
    """Until the backend answers, what it sends still reaches the client, as from the backend alone."""
    r = relaying()
    r.protocol_error(CLIENT, 1002, "reserved opcode")
    assert r.ping(UPSTREAM, b"") == [Pong(UPSTREAM, b"")]
    assert r.close(1001, "draining", "gateway shutting down") == [CloseLeg(CLIENT, 1001, "draining")]


def test_a_client_breaking_the_protocol_once_the_backends_leg_closed_is_closed_at_once() -> None:
    r = relaying()
    r.peer_closed(UPSTREAM, 1000, "")
    assert r.protocol_error(CLIENT, 1002, "bad") == [
        StopReading(CLIENT),
        Ended(CLIENT, 1002, "", lost=True),
        FailLeg(CLIENT),
        AbandonFrame(UPSTREAM),
    ]


# -- a lost socket -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("side", "passed"), [
    (CLIENT, (1001, "client connection lost")),
    (UPSTREAM, (1014, "upstream connection lost")),
], ids=["client", "upstream"])
def test_a_leg_lost_without_a_close_frame_vanished_and_the_other_leg_hears_so(side, passed) -> None:
    r = relaying()
    assert r.leg_lost(side) == [
        Ended(side, 1006, "", lost=True), CloseLeg(other(side), *passed), AbandonFrame(other(side)),
    ]


@pytest.mark.parametrize("side", SIDES, ids=lambda s: s.value)
def test_a_leg_lost_after_its_close_handshake_is_no_news(side: Side) -> None:
    r = relaying()
    r.peer_closed(side, 1000, "")
    assert r.leg_lost(side) == []


def test_a_failed_client_that_then_vanishes_keeps_its_error_code_on_record() -> None:
    r = relaying()
    r.protocol_error(CLIENT, 1007, "invalid UTF-8")
    assert r.leg_lost(CLIENT) == [Ended(CLIENT, None, "", lost=True)]


def test_a_lost_leg_gets_no_close() -> None:
    r = relaying()
    r.leg_lost(UPSTREAM)
    assert r.close(1001, "draining", "gateway shutting down") == []


# -- the gateway's and the session's own closes -------------------------------------------------------


def test_the_gateways_close_gives_the_client_its_code_and_the_backend_1001() -> None:
    r = relaying()
    assert r.close(1012, "server restarting", "gateway shutting down") == [
        CloseLeg(CLIENT, 1012, "server restarting"),
        CloseLeg(UPSTREAM, 1001, "gateway shutting down"),
    ]
    assert r.close(1012, "server restarting", "gateway shutting down") == []


def test_the_gateways_close_before_the_relay_is_the_same_rule() -> None:
    assert gateway_close(1001, "draining", "rebalancing") == [
        CloseLeg(CLIENT, 1001, "draining"), CloseLeg(UPSTREAM, 1001, "rebalancing"),
    ]


def test_expiry_closes_both_legs_1008_and_then_an_error_or_a_loss_only_ends_that_leg() -> None:
    r = relaying()
    assert r.expired() == [CloseClient(1008, "token expired"), CloseUpstream(1008, "token expired")]
    assert r.protocol_error(UPSTREAM, 1002, "bad") == [StopReading(UPSTREAM), Ended(UPSTREAM, 1002, "", lost=True), FailLeg(UPSTREAM)]
    assert r.peer_closed(CLIENT, 1008, "") == [CloseRead(CLIENT)]


def test_a_refused_refresh_closes_both_legs_1008_as_the_session_says() -> None:
    r = relaying()
    actions = r.refresh(json.dumps({"type": "authenticate", "token": make_token("mallory")}))
    assert actions == [TokenRefreshed("other_user"), CloseClient(1008, "token names another user"),
                       CloseUpstream(1008, "token names another user")]
    assert r.leg_lost(CLIENT) == []  # its close was sent: no vanishing


def test_a_good_refresh_moves_the_deadline_and_the_relay_goes_on() -> None:
    r = relaying()
    frame = json.dumps({"type": "authenticate", "token": make_token("alice", ttl=3600)})
    actions = r.refresh(frame)
    assert actions[0] == TokenRefreshed("ok") and isinstance(actions[1], ExpireAt) and actions[2] == SendUpstream(frame)
    assert r.leg_lost(UPSTREAM) == [
        Ended(UPSTREAM, 1006, "", lost=True), CloseLeg(CLIENT, 1014, "upstream connection lost"), AbandonFrame(CLIENT),
    ]


# -- keepalive ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("now", "last_read", "ping_sent_at", "expected"), [
    (100.0, 95.0, None, []),  # quiet for less than the interval
    (100.0, 90.0, None, [Ping(CLIENT, 100.0)]),  # quiet for the interval: ping
    (100.0, 80.0, 96.0, []),  # the ping is out, but not for half the interval yet
    (100.0, 80.0, 95.0, [AbortLeg(CLIENT)]),  # unanswered for half the interval: a dead peer
    (100.0, 96.0, 95.0, []),  # answered (read since the ping), quiet less than the interval
    (110.0, 96.0, 95.0, [Ping(CLIENT, 110.0)]),  # answered, then quiet again
])
def test_keepalive_pings_a_quiet_leg_and_drops_one_that_left_the_ping_unanswered(now, last_read, ping_sent_at, expected) -> None:
    assert keepalive(CLIENT, now, 10.0, last_read, ping_sent_at) == expected


# -- every event in every state ------------------------------------------------------------------------

STATES: dict[str, Callable[[RelayRules], Any]] = {
    "relaying": lambda r: None,
    "client_closed_first": lambda r: r.peer_closed(CLIENT, 1000, ""),
    "backend_closed_first": lambda r: r.peer_closed(UPSTREAM, 1000, ""),
    "client_failed": lambda r: r.protocol_error(CLIENT, 1002, "bad"),
    "backend_failed": lambda r: r.protocol_error(UPSTREAM, 1002, "bad"),
    "client_vanished": lambda r: r.leg_lost(CLIENT),
    "backend_vanished": lambda r: r.leg_lost(UPSTREAM),
    "draining": lambda r: r.close(1001, "draining", "gateway shutting down"),
    "expired": lambda r: r.expired(),
    "both_closed": lambda r: (r.close(1001, "", ""), r.peer_closed(CLIENT, 1001, ""), r.peer_closed(UPSTREAM, 1001, "")),
    "both_gone": lambda r: (r.leg_lost(CLIENT), r.leg_lost(UPSTREAM)),
}

REFRESH = json.dumps({"type": "authenticate", "token": make_token("alice", ttl=3600)})
FOREIGN_REFRESH = json.dumps({"type": "authenticate", "token": make_token("mallory")})

EVENTS: dict[str, tuple[Side | None, Callable[[RelayRules], list[Any]]]] = {
    **{f"{side.value}_{name}": (side, call) for side in SIDES for name, call in {
        "ping": lambda r, side=side: r.ping(side, b"p"),
                "close": lambda r, side=side: r.close_frame(side, close_payload(1000, "bye")),
        "bad_close": lambda r, side=side: r.close_frame(side, b"\x03"),
        "protocol_error": lambda r, side=side: r.protocol_error(side, 1002, "bad"),
        "oversize": lambda r, side=side: r.protocol_error(side, 1009, "too big"),
        "lost": lambda r, side=side: r.leg_lost(side),
    }.items()},
    "gateway_close": (None, lambda r: r.close(1012, "server restarting", "gateway shutting down")),
    "expired": (None, lambda r: r.expired()),
    "refresh": (CLIENT, lambda r: r.refresh(REFRESH)),
    "foreign_refresh": (CLIENT, lambda r: r.refresh(FOREIGN_REFRESH)),
}


def closes(actions: list[Any]) -> list[Side]:
    """The legs `actions` start or answer a closing handshake on."""
    sides = []
    for action in actions:
        if isinstance(action, (CloseLeg, EchoClose)):
            sides.append(action.side)
        elif isinstance(action, CloseClient):
            sides.append(CLIENT)
        elif isinstance(action, CloseUpstream):
            sides.append(UPSTREAM)
    return sides


@pytest.mark.parametrize("state", sorted(STATES))
@pytest.mark.parametrize("event", sorted(EVENTS))
def test_every_event_in_every_state_closes_each_leg_once_never_a_gone_one_and_never_behind_a_dead_frame(event: str, state: str) -> None:
    r = relaying()
    STATES[state](r)
    before = {side: (leg.sent, leg.gone) for side, leg in r.legs.items()}
    side, feed = EVENTS[event]
    actions = feed(r)
    closed = closes(actions)
    assert len(closed) == len(set(closed))
    for leg in closed:
        assert before[leg] == (False, False), f"{leg.value} closed twice or after it was gone"
    for index, action in enumerate(actions):
        if isinstance(action, CloseLeg):
            assert action.code in SENDABLE and len(action.reason.encode()) <= 123
            if r.legs[other(action.side)].gone:  # its source is gone: a half-relayed frame into it never ends
                assert AbandonFrame(action.side) in actions[index:]
    if side is not None and before[side][1]:
        assert actions == [], "news from a gone leg is stale"


@pytest.mark.parametrize("state", sorted(STATES))
@pytest.mark.parametrize("side", SIDES, ids=lambda s: s.value)
def test_in_every_state_a_lost_leg_leaves_the_other_closed_or_gone(side: Side, state: str) -> None:
    r = relaying()
    STATES[state](r)
    r.leg_lost(side)
    the_other = r.legs[other(side)]
    assert the_other.sent or the_other.gone


@pytest.mark.parametrize("state", sorted(STATES))
@pytest.mark.parametrize("side", SIDES, ids=lambda s: s.value)
def test_in_every_state_a_protocol_error_stops_that_leg_and_closes_the_other(side: Side, state: str) -> None:
    r = relaying()
    STATES[state](r)
    gone = r.legs[side].gone
    actions = r.protocol_error(side, 1002, "bad")
    if gone:
        assert actions == []
        return
    assert actions[0] == StopReading(side)
    assert r.legs[other(side)].sent or r.legs[other(side)].gone
    assert r.legs[side].sent or r.held == (1002, "bad")


@pytest.mark.parametrize("state", sorted(STATES))
def test_in_every_state_the_gateways_close_leaves_no_leg_open(state: str) -> None:
    r = relaying()
    STATES[state](r)
    r.close(1001, "draining", "gateway shutting down")
    assert all(leg.sent or leg.gone for leg in r.legs.values())
