"""Frames and broken frames read before the relay, as actions: what the legs get, and that the
session hears exactly what it would have heard from the shell directly."""

from __future__ import annotations

import json

import pytest

from gateway.core import closecodes
from gateway.core.auth import Verifier
from gateway.core.closecodes import Side
from gateway.wire.frames import Close, Message, Ping, Pong
from gateway.wire.prerelay import frame_read, protocol_error
from gateway.core.protocol import CloseClient, CloseUpstream, Phase, RouteUser, SendClient, Session, StartRelay
from gateway.core.relayrules import CloseLeg, CloseRead, EchoClose, Ended, FailLeg, StopReading
from gateway.core.relayrules import Pong as PongLeg
from gateway.core.routing import choose_backend

from .helpers import make_config, make_token

CLIENT, UPSTREAM = Side.CLIENT, Side.UPSTREAM
AUTH = json.dumps({"type": "authenticate", "token": make_token("alice")})
CONNECTED = '{"type":"connected","user_id":"alice","server":"new"}'


def session(phase: Phase = Phase.UPSTREAM_HANDSHAKE) -> Session:
    """A message client of the new backend (no fallback), brought to `phase`."""
    config = make_config(rollout={"new_percent": 100, "fallback_to_old": False})
    s = Session(config, Verifier(config.auth), "")
    if phase is Phase.AUTHENTICATING:
        return s
    [route] = s.client_frame(AUTH)
    assert isinstance(route, RouteUser)
    s.routed(choose_backend(route.user_id, config.rollout))
    s.upstream_opened()
    assert s.phase is phase
    return s


def test_a_client_frame_while_authenticating_is_the_sessions() -> None:
    assert frame_read(session(Phase.AUTHENTICATING), CLIENT, Message(AUTH), close_sent=False) == [RouteUser("alice")]


def test_a_client_frame_after_the_gateways_close_is_dropped_unheard() -> None:
    s = session(Phase.AUTHENTICATING)
    assert frame_read(s, CLIENT, Message(AUTH), close_sent=True) == []
    assert s.phase is Phase.AUTHENTICATING


@pytest.mark.parametrize("close_sent", [False, True])
def test_a_backend_frame_is_the_sessions_even_after_the_gateways_close(close_sent: bool) -> None:
    s = session()
    actions = frame_read(s, UPSTREAM, Message(CONNECTED), close_sent=close_sent)
    assert SendClient(CONNECTED) in actions and StartRelay() in actions
    assert s.phase is Phase.RELAYING


@pytest.mark.parametrize("side", [CLIENT, UPSTREAM])
def test_a_peers_close_is_read_noted_echoed_and_the_sessions(side: Side) -> None:
    s, twin = session(), session()
    actions = frame_read(s, side, Close(4000, "bye"), close_sent=False)
    said = (twin.client_closed if side is CLIENT else twin.upstream_closed)(4000, "bye")
    assert actions[:3] == [CloseRead(side), Ended(side, 4000, "bye", lost=False), EchoClose(side, 4000)]
    assert actions[3:] == said and said
    assert s.phase is twin.phase is Phase.CLOSED


def test_a_close_without_a_code_is_echoed_with_1000() -> None:
    actions = frame_read(session(), CLIENT, Close(None, ""), close_sent=False)
    assert actions[:3] == [CloseRead(CLIENT), Ended(CLIENT, None, "", lost=False), EchoClose(CLIENT, closecodes.NORMAL)]
    assert actions[3:] == [CloseUpstream(*closecodes.forward(None, "", UPSTREAM))]


def test_a_close_that_answers_the_gateways_own_only_ends_the_read() -> None:
    s = session()
    assert frame_read(s, UPSTREAM, Close(1000, ""), close_sent=True) == [CloseRead(UPSTREAM)]
    assert s.phase is Phase.UPSTREAM_HANDSHAKE


@pytest.mark.parametrize("side", [CLIENT, UPSTREAM])
def test_a_ping_is_answered_and_a_pong_needs_nothing(side: Side) -> None:
    s = session()
    assert frame_read(s, side, Ping(b"hi"), close_sent=False) == [PongLeg(side, b"hi")]
    assert frame_read(s, side, Pong(b"hi"), close_sent=False) == []
    assert s.phase is Phase.UPSTREAM_HANDSHAKE


@pytest.mark.parametrize("code", [closecodes.PROTOCOL_ERROR, closecodes.MESSAGE_TOO_BIG])
def test_a_client_that_breaks_the_protocol_fails_and_the_backend_hears_it_passed_on(code: int) -> None:
    s, twin = session(), session()
    actions = protocol_error(s, CLIENT, code, "bad")
    said = twin.client_closed(*closecodes.passed_on(code, UPSTREAM))
    assert actions[:4] == [StopReading(CLIENT), Ended(CLIENT, code, "", lost=True), CloseLeg(CLIENT, code, "bad"), FailLeg(CLIENT)]
    assert actions[4:] == said == [CloseUpstream(*closecodes.passed_on(code, UPSTREAM))]


def test_a_backend_that_breaks_the_protocol_fails_and_counts_as_lost_to_the_session() -> None:
    s, twin = session(), session()
    actions = protocol_error(s, UPSTREAM, closecodes.PROTOCOL_ERROR, "bad")
    said = twin.upstream_closed(closecodes.ABNORMAL, "")
    assert actions[:4] == [
        StopReading(UPSTREAM), Ended(UPSTREAM, closecodes.PROTOCOL_ERROR, "", lost=True),
        CloseLeg(UPSTREAM, closecodes.PROTOCOL_ERROR, "bad"), FailLeg(UPSTREAM),
    ]
    assert actions[4:] == said and any(type(a) is CloseClient for a in said)
