"""What the supervisor of ``serve --workers N`` holds on the machine for its workers: the
public port, bound but not listening, and a private directory for their admin sockets.

Apart from `workers` because both are claims on the operating system taken once, before
any worker exists, and given back only as the supervisor exits; nothing in them knows
about workers.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile

SOCKET_DIR_PREFIX = "ws-gateway-"
_SOCKET_DIR = re.compile(re.escape(SOCKET_DIR_PREFIX) + r"(\d+)-")


def socket_dir() -> str:
    """A private (0700) directory for the workers' admin sockets, named after this process,
    after removing any such directory left by a supervisor that no longer runs (it and its
    workers were killed together, e.g. SIGKILL to the process group)."""
    parent = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            match = _SOCKET_DIR.match(entry.name)
            if match is None or not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            pid = int(match.group(1))
            if pid == os.getpid() or not _alive(pid):  # our own pid: a restarted container's PID 1
                shutil.rmtree(entry.path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{os.getpid()}-", dir=parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def reserve_port(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Bind host:port with SO_REUSEPORT for every address `host` resolves to, without listening.

    Port 0 becomes one free port, the same for every worker; a port held by another
    program fails here, once, with the same message as a single gateway gives.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address[:2]) in seen:
                continue
            seen.add((family, address[:2]))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio's own listener
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {reason}") from None
    return sockets, port
