"""What a frame or a broken frame read before the relay does: the session's event, in the
relay machine's words for the legs.

Until `StartRelay` the shell parses both legs frame by frame and the session decides; the
legs still need the same few things the relay machine asks of them later (read the close,
echo it, answer a ping, stop reading a peer that broke the protocol). Saying those with
`relayrules`' actions lets one performer (`Connection.act`) carry both phases, and keeps
this part of the shell free of I/O, testable without sockets. A module of its own rather
than part of `RelayRules`: that machine starts at the switch, with both legs open, while
these rules hold from the 101 on, with an upstream that may not exist yet.
"""

from __future__ import annotations

from ..core import closecodes
from ..core.closecodes import Side
from .frames import Close, Event, Message, Ping
from ..core.protocol import Session
from ..core.relayrules import Action, CloseLeg, CloseRead, EchoClose, Ended, FailLeg, Pong, StopReading


def frame_read(session: Session, side: Side, event: Event, close_sent: bool) -> list[Action]:
    """One frame from `side`'s peer; `close_sent`: the gateway's close already went to that leg."""
    if type(event) is Message:
        if side is Side.UPSTREAM:
            return list(session.upstream_frame(event.data))
        return [] if close_sent else list(session.client_frame(event.data))
    if type(event) is Close:
        if close_sent:
            return [CloseRead(side)]  # the answer to the gateway's own close
        closed = session.client_closed if side is Side.CLIENT else session.upstream_closed
        ended: list[Action] = [
            CloseRead(side), Ended(side, event.code, event.reason, lost=False), EchoClose(side, closecodes.echo(event.code))
        ]
        return ended + closed(event.code, event.reason)
    if type(event) is Ping:
        return [Pong(side, event.payload)]
    return []


def protocol_error(session: Session, side: Side, code: int, reason: str) -> list[Action]:
    """`side`'s peer broke the protocol or a limit: it gets `code` and loses TCP right after, and the
    session hears that leg ended (the client's code as the backend would get it; a backend's as lost)."""
    actions: list[Action] = [StopReading(side), Ended(side, code, "", lost=True), CloseLeg(side, code, reason), FailLeg(side)]
    if side is Side.CLIENT:
        return actions + session.client_closed(*closecodes.passed_on(code, Side.UPSTREAM))
    return actions + session.upstream_closed(closecodes.ABNORMAL, "")
