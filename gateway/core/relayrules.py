"""The relay phase as events in and actions out: what a close, a protocol error, a lost socket,
a ping, a token refresh, an expiry or the gateway's own close does to the two legs.

A sibling of `protocol.Session` rather than more phases of it: the handshake is one linear
order of phases, where news from an earlier phase is stale; the relay is two legs, each
with its own closing handshake, and news keeps mattering after the session's verdict (an
expiry's 1008 still waits for its echoes and its lost sockets). `Session` keeps the
verdicts that need the token (`client_refresh`, `expired`); `RelayRules` passes them on and
notes what they closed. The shell creates it at `StartRelay`, feeds it the control frames,
errors and losses both pumps report (never a data frame), and performs the actions in order.

Rules:

* A peer's close is echoed and passed on, mapped by `closecodes.forward`; a close that
  answers the gateway's own is the end of that leg's handshake.
* A peer that breaks the protocol (1002, 1007, 1009, ...) is no longer read, gets its code
  and loses TCP right after it (`FailLeg`); the other leg hears 1014 (to the client) or 1001
  (to the backend). A client that does so while the backend's leg is open first sees the
  backend's leg closed (1001), then gets its own close once that handshake ends or that leg
  is lost: what the backend answered before still reaches it, as from the backend alone.
* A leg lost without a close frame vanished: the other leg hears so (1014 / 1001). Every
  way a leg ends closes the other, so nothing stays half-open.
* A frame half-relayed into a leg whose source is gone or no longer read will never end,
  so a close that waits behind it cannot be sent: `AbandonFrame` drops that socket instead.
* Once a verdict (expiry, refused refresh) closed both legs, a leg's error or loss only
  ends that leg.
* News from a leg whose socket is gone is stale: no actions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from . import closecodes
from .closecodes import ProtocolError, Side, parse_close
from .protocol import Action as SessionAction
from .protocol import CloseClient, CloseUpstream, Session


@dataclass(frozen=True)
class CloseLeg:
    """Start the gateway's closing handshake on `side` (the shell makes it wire-safe with `closecodes.sendable`)."""

    side: Side
    code: int
    reason: str


@dataclass(frozen=True)
class EchoClose:
    """Answer the close frame `side`'s peer sent."""

    side: Side
    code: int


@dataclass(frozen=True)
class CloseRead:
    """`side`'s peer sent its close frame: read nothing more, and go once both closes are exchanged."""

    side: Side


@dataclass(frozen=True)
class FailLeg:
    """Close `side`'s TCP right after the close frame just sent, without waiting for an echo (RFC 6455 §7.1.7)."""

    side: Side


@dataclass(frozen=True)
class StopReading:
    """Whatever `side`'s peer sends from now on is ignored: it broke the protocol."""

    side: Side


@dataclass(frozen=True)
class AbandonFrame:
    """The frame being relayed into `side` will never end: if a close waits behind it, drop the socket."""

    side: Side


@dataclass(frozen=True)
class AbortLeg:
    """Drop `side`'s socket at once: its peer counts as vanished."""

    side: Side


@dataclass(frozen=True)
class Ping:
    side: Side
    at: float


@dataclass(frozen=True)
class Pong:
    side: Side
    payload: bytes


@dataclass(frozen=True)
class Ended:
    """For the record: how `side`'s peer ended (`code` None: keep the code already noted)."""

    side: Side
    code: int | None
    reason: str
    lost: bool


RelayAction = Union[CloseLeg, EchoClose, CloseRead, FailLeg, StopReading, AbandonFrame, AbortLeg, Ping, Pong, Ended]
Action = Union[RelayAction, SessionAction]


def other(side: Side) -> Side:
    return Side.UPSTREAM if side is Side.CLIENT else Side.CLIENT


def gateway_close(code: int, reason: str, upstream_reason: str) -> list[CloseLeg]:
    """The gateway ends a session itself (drain, shutdown, rebalance): the client gets (`code`,
    `reason`), the backend a going-away."""
    return [CloseLeg(Side.CLIENT, code, reason), CloseLeg(Side.UPSTREAM, closecodes.GOING_AWAY, upstream_reason)]


def keepalive(side: Side, now: float, interval: float, last_read: float, ping_sent_at: float | None) -> list[RelayAction]:
    """Ping a leg quiet for `interval`; drop one that left the last ping unanswered for half of it.

    A function of the leg's times, not a method: it holds before the relay too."""
    if ping_sent_at is not None and last_read < ping_sent_at:
        return [AbortLeg(side)] if now - ping_sent_at >= interval / 2 else []
    return [Ping(side, now)] if now - last_read >= interval else []


class _LegState:
    __slots__ = ("sent", "received", "gone", "noted")

    def __init__(self) -> None:
        self.sent = False  # the gateway's close (or echo) went out
        self.received = False  # the peer's close frame was read
        self.gone = False  # the socket is lost
        self.noted = False  # how the peer ended is on record


class RelayRules:
    """One relaying session's two legs, from `StartRelay` until both sockets are gone."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.legs = {Side.CLIENT: _LegState(), Side.UPSTREAM: _LegState()}
        self.held: tuple[int, str] | None = None  # a failed client's close, until the backend's leg is done
        self.over = False  # a verdict of the session closed both legs

    # -- what the pumps report ------------------------------------------------------------

    def ping(self, side: Side, payload: bytes) -> list[Action]:
        """A ping from `side`'s peer (a pong needs nothing: the shell does not report it)."""
        return [] if self.legs[side].gone else [Pong(side, payload)]

    def close_frame(self, side: Side, payload: bytes) -> list[Action]:
        """A close frame from `side`'s peer, its payload still to be checked."""
        try:
            code, reason = parse_close(payload)
        except ProtocolError as exc:
            return self.protocol_error(side, exc.code, exc.reason)
        return self.peer_closed(side, code, reason)

    def peer_closed(self, side: Side, code: int | None, reason: str) -> list[Action]:
        leg = self.legs[side]
        if leg.gone:
            return []
        leg.received = True
        actions: list[Action] = [CloseRead(side)]
        if leg.sent:
            if side is Side.UPSTREAM:
                actions += self._release_client()
            return actions  # the answer to a close the gateway sent
        leg.sent = leg.noted = True
        actions += [Ended(side, code, reason, lost=False), EchoClose(side, closecodes.echo(code))]
        to = other(side)
        return actions + self._close(to, *closecodes.forward(code, reason, to))

    def protocol_error(self, side: Side, code: int, reason: str) -> list[Action]:
        """`side`'s peer broke the protocol or a limit (1009: a message over the size limit)."""
        if self.legs[side].gone:
            return []
        self.legs[side].noted = True
        actions: list[Action] = [StopReading(side), Ended(side, code, "", lost=True)]
        to = other(side)
        passed_on = closecodes.passed_on(code, to)
        if self.over:
            return actions + self._close(side, code, reason) + [FailLeg(side)]
        if side is Side.CLIENT and not self.legs[Side.UPSTREAM].sent:
            self.held = (code, reason)
            return actions + self._close(Side.UPSTREAM, *passed_on) + [AbandonFrame(Side.UPSTREAM)]
        actions += self._close(side, code, reason) + [FailLeg(side)]
        return actions + self._close(to, *passed_on) + [AbandonFrame(to)]

    def leg_lost(self, side: Side) -> list[Action]:
        """`side`'s socket is gone; without a close frame first, its peer vanished."""
        leg = self.legs[side]
        if leg.gone:
            return []
        leg.gone = True
        actions: list[Action] = self._release_client() if side is Side.UPSTREAM else []
        vanished = not leg.received and not leg.sent
        if vanished:  # never after a verdict: it closed both legs
            actions.append(Ended(side, None if leg.noted else closecodes.ABNORMAL, "", lost=True))
            leg.noted = True
            to = other(side)
            actions += self._close(to, *closecodes.forward(closecodes.ABNORMAL, "", to))
        return actions

    # -- the gateway's and the session's own reasons to close ----------------------------------

    def close(self, code: int, reason: str, upstream_reason: str) -> list[Action]:
        """Drain, shutdown or rebalance."""
        actions: list[Action] = []
        for close in gateway_close(code, reason, upstream_reason):
            actions += self._close(close.side, close.code, close.reason)
        return actions

    def refresh(self, data: str) -> list[Action]:
        """A client frame that may be an in-band ``authenticate`` (`Session.client_refresh`)."""
        if self.legs[Side.CLIENT].gone:
            return []
        return self._verdict(self.session.client_refresh(data))

    def expired(self) -> list[Action]:
        return self._verdict(self.session.expired())

    # -- internals ----------------------------------------------------------------------------------

    def _verdict(self, actions: list[SessionAction]) -> list[Action]:
        """The session's actions; its closes end the relay (a leg that has its close already gets none)."""
        kept: list[Action] = []
        for action in actions:
            if isinstance(action, (CloseClient, CloseUpstream)):
                self.over = True
                leg = self.legs[Side.CLIENT if isinstance(action, CloseClient) else Side.UPSTREAM]
                if leg.sent or leg.gone:
                    continue
                leg.sent = True
            kept.append(action)
        return kept

    def _close(self, side: Side, code: int, reason: str) -> list[Action]:
        leg = self.legs[side]
        if leg.sent or leg.gone:
            return []
        leg.sent = True
        if self.legs[other(side)].gone:  # what it was relaying into `side` will never go on
            return [CloseLeg(side, code, reason), AbandonFrame(side)]
        return [CloseLeg(side, code, reason)]

    def _release_client(self) -> list[Action]:
        """The backend's leg is done: a client that broke the protocol gets its close now."""
        held, self.held = self.held, None
        if held is None:
            return []
        return self._close(Side.CLIENT, *held) + [FailLeg(Side.CLIENT)]
