"""Running an aiohttp application until a signal: the one place that owns the event loop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from .logs import AccessLogger

log = logging.getLogger("gateway")


def runner_for(app: web.Application) -> web.AppRunner:
    """An AppRunner whose access log never prints the query string."""
    return web.AppRunner(
        app,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("gateway.access"),
        handle_signals=False,
        shutdown_timeout=5.0,
    )


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start `app` on host:port (0 picks a free port); returns the runner and the bound port."""
    runner = runner_for(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]


async def wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(main: Callable[[], Awaitable[int]]) -> int:
    """Run `main` on uvloop where available (a faster loop for a socket-bound process)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())
