"""Running the gateway: its composition root (`RunningGateway`), `serve` and its drain, the
signals, and the aiohttp sites of the admin app and the stub backends."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from aiohttp import web

from ..core import closecodes
from .admin import create_admin_app
from ..core.config import Config
from ..wire.listener import Listener, listen
from .logs import AccessLogger, install_redaction
from .reload import Fingerprint, Reloader
from .runtime import Gateway
from .store import Store

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


class RunningGateway:
    """A running gateway: the gateway, its public listener, its admin app, the reloader that
    watches its config file, and its store. The one composition root: `serve`, the demo,
    the drill and the tests all start one, and stop it with the same teardown.

    `signals`: SIGHUP reloads the config file. `drain`: the stop is serve's numbered
    sequence (`drain`), hurried by a second signal, after which the signals are released
    (one more takes its default action at once); otherwise the stop closes every session
    with 1012 at once. `worker`: one of the workers of ``serve --workers N`` (see `serve`).
    `bound`: called once the ports are bound and before the file is watched (the demo
    writes the ports it got into its config file, which then is the config in force:
    applied, not reloaded, since ports are restart-only keys).
    """

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        seen: Fingerprint | None = None,
        signals: Signals | None = None,
        drain: bool = False,
        worker: WorkerChannel | None = None,
        byte_relay: bool = True,
        bound: Callable[[RunningGateway], None] | None = None,
    ) -> None:
        self.gateway = Gateway(config, config_path=config_path, byte_relay=byte_relay)
        self.signals = signals
        self.worker = worker
        self.public: Listener | None = None
        self.admin_port: int | None = None
        self.reloader: Reloader | None = None
        self._seen = seen
        self._drain = drain
        self._bound = bound
        self._runners: list[web.AppRunner] = []

    @property
    def store(self) -> Store:
        return self.gateway.store

    @property
    def port(self) -> int:
        assert self.public is not None
        return self.public.port

    async def start(self) -> RunningGateway:
        """Listen, serve the admin app, watch the file; on a failure, whatever started is stopped."""
        gateway, config, worker = self.gateway, self.gateway.config, self.worker
        path = gateway.config_path
        # Before anything listens: whoever waits for "listening" may edit the file or send SIGHUP at once.
        if path is not None:
            self.reloader = Reloader(path, gateway.reload, gateway.reload_failed, seen=self._seen)
            if self.signals is not None:
                self.signals.on_hangup(self.reloader.reload)
        install_redaction(config.auth.query_param)
        try:
            if worker is None:
                self.public = await listen(gateway, config.listen.host, config.listen.port)
                if config.admin is not None:
                    runner, self.admin_port = await start_site(create_admin_app(gateway), config.admin.host, config.admin.port)
                    self._runners.append(runner)
            else:
                assert self.signals is not None
                await worker.follow(self.signals, self.reloader.reload if self.reloader is not None else None)
                if self.reloader is not None:
                    self.reloader.check()  # a restarted worker catches up with edits made since its supervisor started
                self.public = await listen(gateway, config.listen.host, worker.port, reuse_port=True)
                self._runners.append(await start_unix_site(create_admin_app(gateway), worker.admin_path))
            if self._bound is not None and self.reloader is not None:
                self._bound(self)
                gateway.apply(self.reloader.adopt())
            if self.reloader is not None:
                self.reloader.start()
        except BaseException:
            await self._close()
            raise
        return self

    async def stop(self) -> None:
        """The one teardown: drain (when asked), then close everything in the reverse order of start."""
        if self._drain:
            assert self.signals is not None
            await drain(self.gateway, self.signals)
        await self._close()

    async def _close(self) -> None:
        if self._drain and self.signals is not None:
            self.signals.close()
        if self.worker is not None:
            await self.worker.close()
        if self.reloader is not None:
            await self.reloader.stop()
        if self.public is not None:
            await self.public.close()
        for runner in reversed(self._runners):
            await runner.cleanup()

    async def __aenter__(self) -> RunningGateway:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        """A failure or a cancellation inside the block closes at once, without the drain."""
        if exc_type is None:
            await self.stop()
        else:
            await self._close()


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
    with Signals() as signals:
        running = RunningGateway(config, config_path=config_path, seen=seen, signals=signals, drain=True, worker=worker)
        async with running:
            announced = {"host": config.listen.host, "port": running.port, "path": config.path}
            if worker is None:
                log.info("listening", extra=announced)
                if config.admin is not None:
                    log.info("admin listening", extra={"host": config.admin.host, "port": running.admin_port})
            else:
                log.info("worker listening", extra=announced)
                worker.ready()
            await signals.stop.wait()
    log.info("stopped")
    return 0


async def drain(gateway: Gateway, signals: Signals) -> None:
    """Steps 1 to 3 of `serve`'s sequence; step 4 is the listener's close."""
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
