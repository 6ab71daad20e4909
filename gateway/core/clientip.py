"""The client's IP address, the one limits are keyed on.

It is the socket peer, unless the peer is one of `trusted_proxies`: then X-Forwarded-For is
read from the right (each proxy appends the address it received the request from), past
every entry that is itself a trusted proxy, and the first entry that is not is the client.
Entries left of that were written by the client and are never believed.

Garbage is tolerated and never trusted: an entry that is not an IP address (``unknown``,
an obfuscated nginx identifier, a hostname, empty) stops the walk, and the answer is the
last address that a trusted hop vouched for, so a client can never pick its own address
by sending junk. Entries may carry a port (``1.2.3.4:5678``, ``[2001:db8::1]:443``).
IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``, seen on dual-stack sockets) are
compared and returned as IPv4.

Several X-Forwarded-For header lines are one list: join them with ``,`` in order before
calling (``", ".join(request.headers.getall("X-Forwarded-For", []))``).

Also here, from the same trust: the scheme a trusted proxy says the client used
(`forwarded_proto`) and the key a socket's share of the pending handshakes is counted
under (`share_key`).
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

IPAddress = IPv4Address | IPv6Address
UNKNOWN = "unknown"


def parse_ip(text: str | None) -> IPAddress | None:
    """An address from a peer or an X-Forwarded-For entry, with an optional port; None for garbage."""
    if text is None:
        return None
    entry = text.strip().strip('"')
    if not entry:
        return None
    if entry.startswith("["):  # [v6] or [v6]:port
        close = entry.find("]")
        if close < 0 or (close + 1 < len(entry) and not entry[close + 1 :].startswith(":")):
            return None
        entry = entry[1:close]
    elif entry.count(":") == 1:  # v4:port
        entry = entry.partition(":")[0]
    try:
        address = ip_address(entry)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, proxies: Iterable[IPv4Network | IPv6Network]) -> bool:
    return any(address.version == net.version and address in net for net in proxies)


def client_ip(
    peer: str | None,
    x_forwarded_for: str | None,
    trusted_proxies: Iterable[IPv4Network | IPv6Network],
) -> str:
    """The client address as text; ``"unknown"`` only when the peer itself is not an IP (e.g. a unix socket)."""
    proxies = tuple(trusted_proxies)
    peer_address = parse_ip(peer)
    if peer_address is None:
        return peer.strip() if peer and peer.strip() else UNKNOWN
    if not x_forwarded_for or not _trusted(peer_address, proxies):
        return str(peer_address)
    vouched = peer_address
    for entry in reversed(x_forwarded_for.split(",")):
        address = parse_ip(entry)
        if address is None:
            break
        if not _trusted(address, proxies):
            return str(address)
        vouched = address
    return str(vouched)


def share_key(peer: str | None, trusted_proxies: Iterable[IPv4Network | IPv6Network]) -> str | None:
    """What a socket's share of the pending handshakes is keyed on; None for no share.

    An IPv6 peer is keyed on its /64, as one host commonly holds the whole prefix. A
    trusted proxy speaks for many clients, so it has no share of its own (the global
    bound still counts it); neither has a peer that is not an IP address.
    """
    address = parse_ip(peer)
    if address is None or _trusted(address, tuple(trusted_proxies)):
        return None
    if isinstance(address, IPv6Address):
        return str(IPv6Network((address, 64), strict=False))
    return str(address)


def forwarded_proto(
    peer: str | None, x_forwarded_proto: str | None, trusted_proxies: Iterable[IPv4Network | IPv6Network]
) -> str:
    """The scheme the client used: a trusted proxy's single ``http`` or ``https``, else ``http`` (the gateway's own)."""
    address = parse_ip(peer)
    if address is None or x_forwarded_proto is None or not _trusted(address, tuple(trusted_proxies)):
        return "http"
    proto = x_forwarded_proto.strip().lower()
    return proto if proto in ("http", "https") else "http"
