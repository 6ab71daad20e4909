"""Running one gateway process until a signal, then draining it: the one place that owns the event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from aiohttp import web

from . import closecodes
from .admin import create_admin_app
from .config import Config
from .listener import Listener, listen
from .logs import AccessLogger, install_redaction
from .reload import Fingerprint, Reloader
from .runtime import Gateway

log = logging.getLogger("gateway")


class WorkerChannel(Protocol):
    """What a worker of ``serve --workers N`` gets from its supervisor (`workers.WorkerChannel`):
    named here so the import arrow runs one way, from the supervisor to the server."""

    port: int
    admin_path: str

    async def follow(self, signals: Signals, reload: Callable[[], object] | None) -> None: ...

    def ready(self) -> None: ...

    async def close(self) -> None: ...


def runner_for(app: web.Application) -> web.AppRunner:
    """An AppRunner (admin listener, stub backends) whose access log never prints the query string."""
    return web.AppRunner(
        app,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("gateway.access"),
        handle_signals=False,
        shutdown_timeout=5.0,
        # Room for a URL token up to the 8 KiB the gateway accepts and well past it, so an
        # oversized token gets a precise 1008 rather than aiohttp's bare 400.
        max_line_size=32 * 1024,
    )


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start `app` on host:port (0 picks a free port); returns the runner and the bound port."""
    runner = runner_for(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        # asyncio's own text repeats the address; the errno's name says it once.
        reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {reason}") from None
    return runner, runner.addresses[0][1]


async def start_unix_site(app: web.Application, path: str) -> web.AppRunner:
    """Start `app` on the unix socket `path` (a worker's admin app, for its supervisor only).

    Without an access log: the supervisor reads it on every scrape of its own admin port,
    which logs the request once.
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.UnixSite(runner, path).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner


async def serve(
    config: Config,
    config_path: str | None = None,
    seen: Fingerprint | None = None,
    *,
    worker: WorkerChannel | None = None,
) -> int:
    """Run the gateway until SIGTERM/SIGINT, then drain; the sequence ops can rely on:

    1. SIGTERM: /readyz turns 503 so the load balancer stops sending new clients.
    2. After ``drain.grace_seconds`` new upgrades get HTTP 503.
    3. Established sessions are closed with 1012, spread evenly over ``drain.window_seconds``.
    4. Whatever is left is closed the same way; the process exits 0.

    A second SIGTERM or SIGINT at any point closes everything at once. SIGHUP reloads
    the config file, which is also watched for changes. `seen` is the file's fingerprint
    taken before `config` was loaded from it, so an edit made meanwhile is not missed.

    As one of the workers of ``serve --workers N`` (`worker` given; see gateway/workers.py)
    it listens with SO_REUSEPORT on the port its supervisor chose, serves its admin app on
    a private unix socket instead of ``admin``, says "worker listening" rather than
    "listening" (the supervisor says that once every worker does), and also takes drain,
    reload and stop from its supervisor.
    """
    gateway = Gateway(config, config_path=config_path)
    signals = Signals()
    # Before "listening": whoever waits for that line may edit the file or send SIGHUP at once.
    reloader = None
    if config_path is not None:
        reloader = Reloader(config_path, gateway.reload, gateway.reload_failed, seen=seen)
        signals.on_hangup(reloader.reload)
    runners = []
    public: Listener | None = None
    install_redaction(config.auth.query_param)
    try:
        if worker is None:
            public = await listen(gateway, config.listen.host, config.listen.port)
            log.info("listening", extra={"host": config.listen.host, "port": public.port, "path": config.path})
            if config.admin is not None:
                admin_runner, admin_port = await start_site(create_admin_app(gateway), config.admin.host, config.admin.port)
                runners.append(admin_runner)
                log.info("admin listening", extra={"host": config.admin.host, "port": admin_port})
        else:
            await worker.follow(signals, reloader.reload if reloader is not None else None)
            if reloader is not None:
                reloader.check()  # a restarted worker catches up with edits made since its supervisor started
            public = await listen(gateway, config.listen.host, worker.port, reuse_port=True)
            runners.append(await start_unix_site(create_admin_app(gateway), worker.admin_path))
            log.info("worker listening", extra={"host": config.listen.host, "port": public.port, "path": config.path})
            worker.ready()
        if reloader is not None:
            reloader.start()
        await signals.stop.wait()
        await drain(gateway, signals)
    finally:
        signals.close()
        if worker is not None:
            await worker.close()
        if reloader is not None:
            await reloader.stop()
        if public is not None:
            await public.close()
        for runner in reversed(runners):
            await runner.cleanup()
    log.info("stopped")
    return 0


async def drain(gateway: Gateway, signals: Signals) -> None:
    drain_config = gateway.config.drain
    gateway.start_drain()
    urgent = asyncio.create_task(signals.urgent.wait())
    try:
        grace = asyncio.create_task(asyncio.sleep(drain_config.grace_seconds))
        await asyncio.wait({grace, urgent}, return_when=asyncio.FIRST_COMPLETED)
        grace.cancel()
        spread = asyncio.create_task(gateway.close_spread(0.0 if urgent.done() else drain_config.window_seconds))
        await asyncio.wait({spread, urgent}, return_when=asyncio.FIRST_COMPLETED)
        if not spread.done():
            log.warning("second signal: closing every session now")
            spread.cancel()
            await gateway.close_all(closecodes.SERVICE_RESTART, "server restarting")
    finally:
        urgent.cancel()


class Signals:
    """SIGTERM/SIGINT set `stop`, a second one sets `urgent`; SIGHUP calls its handler.

    Create it *before* announcing readiness ("listening", the demo banner): whoever waits
    for that line may signal at once, and a signal that lands before the handlers exist
    kills the process with the default action (no drain, no cleanup).
    """

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.urgent = asyncio.Event()
        self._signalled = False
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop)

    def _stop(self) -> None:
        if self._signalled:
            self.urgent.set()
        else:
            self._signalled = True
            log.info("stop signal received")
            self.stop.set()

    def request_stop(self, *, urgent: bool = False) -> None:
        """Stop as on a signal, at a worker's supervisor's request. Only `urgent` hurries it,
        and it does not count as a signal: the same SIGTERM or Ctrl-C may also reach the
        worker directly through its process group, before or after, and together they are
        one stop, not two."""
        self.stop.set()
        if urgent:
            self.urgent.set()

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def __enter__(self) -> Signals:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def on_hangup(self, handler: Callable[[], object]) -> None:
        def hangup() -> None:
            log.info("SIGHUP: reloading config")
            handler()

        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hangup)


def run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run `main` on uvloop where available (a faster loop for a socket-bound process)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())
