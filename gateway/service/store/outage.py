"""`Resilient`: a shared store that may be unreachable, answered from memory while it is.

A chat session must never wait on shared state, so every call runs under a short timeout
and one that fails is answered by an internal `MemoryStore`. The outage is logged once
(logger ``gateway.store``, the location without its password), every failed round trip is
counted (`Resilient.errors`, and the ``on_error`` callback), and while the store is down no
call waits for it: the next call after a backoff starts one background probe, and once
that succeeds the recovery is logged once, shared state resumes and the usage counted in
memory meanwhile is written (`flush_pending`).

The machine knows nothing of Redis: it wraps any `Remote`, the operations of a store
whose calls raise one of its `Remote.failures` when it cannot answer. ``clock``
(monotonic, default `time.monotonic`) times the probe backoff and the outage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from datetime import date
from typing import Any, TypeVar

from .base import GUARD_TTL_SECONDS, DayUsage, Store, StoreUnavailable, VersionUsage, day_list
from .memory import DayCounts, MemoryStore

log = logging.getLogger("gateway.store")

T = TypeVar("T")


def _cancel_swallowed() -> None:
    """Raise the cancellation of this task if the remote call swallowed it: redis-py can lose
    a cancel that lands mid-command (redis/redis-py#2028, #2551), and a background loop
    that loses it never stops."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Remote(ABC):
    """What `Resilient` needs of the store it wraps: the shared operations, which raise one
    of `failures` when the store cannot answer, plus a probe and a bulk write of usage."""

    kind: str  # what log lines and errors call it ("redis")
    location: str  # where it is, for log lines: no password
    failures: tuple[type[BaseException], ...]
    session_ttl: float
    retention_days: int

    def describe(self, exc: BaseException) -> str:
        """The failure as text fit for a log line or an error message (no secret in it)."""
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    @abstractmethod
    async def ping(self) -> None: ...

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""

    @abstractmethod
    async def auth_blocked(self, ip: str, limit: int) -> bool: ...

    @abstractmethod
    async def auth_failed(self, ip: str, limit: int) -> bool: ...

    @abstractmethod
    async def acquire_session(self, user_id: str, session_id: str, limit: int) -> bool: ...

    @abstractmethod
    async def release_session(self, user_id: str, session_id: str) -> None: ...

    @abstractmethod
    async def refresh_sessions(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Extend these sessions' expiry; bounds its own batches in time."""

    @abstractmethod
    async def count_session(self, day: str, auth_style: str, backend: str, user_id: str) -> None: ...

    @abstractmethod
    async def write_usage_day(self, day: str, counts: DayCounts) -> None:
        """Add one day of usage counted in memory; writing it twice must not count users twice."""

    @abstractmethod
    async def usage_days(self, days: list[str]) -> list[DayUsage]: ...

    @abstractmethod
    async def count_app_version(self, at: float, version: str, auth_style: str, user_id: str, max_versions: int) -> str: ...

    @abstractmethod
    async def app_versions(self, days: list[str]) -> list[VersionUsage]: ...

    @abstractmethod
    async def publish_guard(self, state: dict[str, Any], ttl_seconds: float) -> None: ...

    @abstractmethod
    async def read_guard(self) -> dict[str, Any] | None: ...

    @abstractmethod
    async def read_ramp(self) -> dict[str, Any] | None: ...

    @abstractmethod
    async def write_ramp(self, record: dict[str, Any], expected_version: int) -> bool: ...

    @abstractmethod
    async def publish_ramp_window(self, window: int, replica: str, numbers: dict[str, Any]) -> None: ...

    @abstractmethod
    async def read_ramp_window(self, window: int) -> list[dict[str, Any]]: ...


class Resilient(Store):
    """`remote`, answered from `memory` while it is unreachable (see the module docstring).

    `on_error(operation)` is called for each failed round trip (wire a Prometheus counter
    to it) and `on_availability(up)` on every outage and recovery. `available` is False
    from a failure until a probe succeeds.
    """

    def __init__(
        self,
        remote: Remote,
        *,
        memory: MemoryStore,
        timeout_seconds: float = 0.25,
        retry_backoff: tuple[float, float] = (0.5, 5.0),
        on_error: Callable[[str], None] | None = None,
        on_availability: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.remote = remote
        self.memory = memory
        self.timeout = timeout_seconds
        self.bulk_timeout = max(2.0, 10 * timeout_seconds)
        self.clock = clock
        self.on_error = on_error
        self.on_availability = on_availability
        self.errors = 0
        # up -> (a call fails) down -> (backoff passes, a call starts a probe) probing -> up,
        # or down again with the backoff doubled.
        self._backoff_min, self._backoff_max = retry_backoff
        self._backoff = self._backoff_min
        self._retry_at = 0.0  # clock() time
        self._up = True
        self._down_since: float | None = None  # clock() time
        self._probe_task: asyncio.Task[bool] | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._flush_task: asyncio.Task[bool] | None = None
        self._closed = False

    @property
    def available(self) -> bool:
        return self._up

    @property
    def session_ttl(self) -> float:
        """The remote's session expiry; assignable (the refresher reads it as it loops)."""
        return self.remote.session_ttl

    @session_ttl.setter
    def session_ttl(self, seconds: float) -> None:
        self.remote.session_ttl = seconds

    @property
    def retention_days(self) -> int:
        """``usage.retention_days``; assignable on config reload (applies to usage written from then on)."""
        return self.memory.retention_days

    @retention_days.setter
    def retention_days(self, days: int) -> None:
        self.memory.retention_days = days
        self.remote.retention_days = days

    @property
    def pending_usage_days(self) -> list[str]:
        """UTC days with usage counted in memory and not yet written to the remote store."""
        return self.memory.held_usage_days()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Probe once (an outage at start-up is logged now) and start the session refresher."""
        if self._refresh_task is None or self._refresh_task.done():
            await self.probe()
            self._refresh_task = asyncio.create_task(self._refresh_loop(), name="store-session-refresher")

    async def close(self) -> None:
        """Stop the background tasks; usage still held from an outage is written first if the store is up."""
        kind = self.remote.kind
        if not self._closed and self._up and self.pending_usage_days:
            try:
                async with asyncio.timeout(self.bulk_timeout):
                    await self.flush_pending()
            except TimeoutError:
                log.error(f"usage counted during the {kind} outage could not be written before shutdown")
        elif not self._closed and self.pending_usage_days:
            log.error(
                f"{kind} is unreachable at shutdown: usage counted during the outage is lost",
                extra={"days": self.pending_usage_days},
            )
        for task in (self._refresh_task, self._probe_task, self._flush_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:  # noqa: BLE001 - cancelled or already failed and counted
                    pass
        self._refresh_task = self._probe_task = self._flush_task = None
        if not self._closed:
            self._closed = True
            try:
                async with asyncio.timeout(self.bulk_timeout):
                    await self.remote.close()
            except self.remote.failures:
                pass  # nothing left to tell a store that is gone

    async def _refresh_loop(self) -> None:
        """Refresh every held session every ``session_ttl / 3`` (20 s with the default 60 s ttl)."""
        while True:
            await asyncio.sleep(self.session_ttl / 3)
            try:
                await self.refresh_sessions()
            except Exception:  # never let the loop die; failures are counted in _run
                log.exception("session refresh failed")

    # -- availability ------------------------------------------------------------------------

    async def _run(self, op: str, remote: Callable[[], Awaitable[T]], fallback: Callable[[], Awaitable[T]]) -> T:
        if not self._up:
            self._maybe_probe()
            return await fallback()
        try:
            async with asyncio.timeout(self.timeout):
                result = await remote()
        except self.remote.failures as exc:
            _cancel_swallowed()
            self._failed(op, exc)
            return await fallback()
        _cancel_swallowed()
        return result

    async def _read(self, op: str, read: Callable[[], Awaitable[T]]) -> T:
        """A report's read: from the remote store only, never from memory."""
        try:
            async with asyncio.timeout(self.bulk_timeout):
                result = await read()
        except self.remote.failures as exc:
            _cancel_swallowed()
            self._failed(op, exc)
            remote = self.remote
            raise StoreUnavailable(f"{remote.kind} at {remote.location} did not answer: {remote.describe(exc)}") from None
        if not self._up:
            self._recovered()
        return result

    def _count_error(self, op: str) -> None:
        self.errors += 1
        if self.on_error is not None:
            try:
                self.on_error(op)
            except Exception:
                log.exception("store on_error callback failed")

    def _failed(self, op: str, exc: BaseException) -> None:
        self._count_error(op)
        if not self._up:
            return
        self._up = False
        self._down_since = now = self.clock()
        self._backoff = self._backoff_min
        self._retry_at = now + self._backoff
        remote = self.remote
        log.error(
            f"{remote.kind} unreachable: limits, usage counts and the guard use in-process state until it returns",
            extra={remote.kind: remote.location, "operation": op, "error": remote.describe(exc)},
        )
        self._notify(False)

    def _notify(self, up: bool) -> None:
        if self.on_availability is not None:
            try:
                self.on_availability(up)
            except Exception:
                log.exception("store on_availability callback failed")

    def _maybe_probe(self) -> None:
        if self.clock() < self._retry_at:
            return
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.create_task(self.probe(), name="store-probe")

    async def probe(self) -> bool:
        """Ping the remote store now (whatever the backoff); returns whether it is available afterwards."""
        try:
            async with asyncio.timeout(self.timeout):
                await self.remote.ping()
        except self.remote.failures as exc:
            _cancel_swallowed()
            if self._up:
                self._failed("probe", exc)
            else:
                self._count_error("probe")
                self._backoff = min(self._backoff * 2, self._backoff_max)
                self._retry_at = self.clock() + self._backoff
            return False
        _cancel_swallowed()
        if not self._up:
            self._recovered()
        return True

    def _recovered(self) -> None:
        self._up = True
        outage = self.clock() - self._down_since if self._down_since is not None else 0.0
        self._down_since = None
        pending = self.pending_usage_days
        remote = self.remote
        log.warning(
            f"{remote.kind} reachable again: shared limits, usage and guard resumed",
            extra={remote.kind: remote.location, "outage_s": round(outage, 1), "pending_usage_days": len(pending)},
        )
        self._notify(True)
        if pending and (self._flush_task is None or self._flush_task.done()):
            self._flush_task = asyncio.create_task(self.flush_pending(), name="store-usage-flush")

    # -- auth failures -----------------------------------------------------------------------

    async def auth_blocked(self, ip: str, limit: int | None) -> bool:
        if limit is None:
            return False
        return await self._run(
            "auth_blocked", lambda: self.remote.auth_blocked(ip, limit), lambda: self.memory.auth_blocked(ip, limit)
        )

    async def auth_failed(self, ip: str, limit: int | None) -> bool:
        if limit is None:
            return False
        return await self._run(
            "auth_failed", lambda: self.remote.auth_failed(ip, limit), lambda: self.memory.auth_failed(ip, limit)
        )

    # -- concurrent sessions ---------------------------------------------------------------

    async def acquire_session(self, user_id: str, session_id: str, limit: int | None) -> bool:
        if limit is None:
            return True

        async def remote() -> bool:
            ok = await self.remote.acquire_session(user_id, session_id, limit)
            if ok:
                self.memory.hold(user_id, session_id)
            return ok

        return await self._run(
            "acquire_session", remote, lambda: self.memory.acquire_session(user_id, session_id, limit)
        )

    async def release_session(self, user_id: str, session_id: str) -> None:
        if not self.memory.holds(user_id, session_id):
            return  # never acquired here (no limit at the time): nothing to give back
        await self.memory.release_session(user_id, session_id)

        async def fallback() -> None:
            return None  # the remote entry expires on its own after session_ttl

        await self._run("release_session", lambda: self.remote.release_session(user_id, session_id), fallback)

    def held_sessions(self) -> list[tuple[str, str]]:
        return self.memory.held_sessions()

    async def refresh_sessions(self, pairs: Iterable[tuple[str, str]] | None = None) -> None:
        """Push the expiry of these sessions (default: all this replica holds) to now + session_ttl.

        Also re-registers sessions opened during an outage. Skipped while the store is down.
        """
        held = list(self.held_sessions() if pairs is None else pairs)
        if not self._up:
            self._maybe_probe()
            return
        try:
            await self.remote.refresh_sessions(held)
        except self.remote.failures as exc:
            _cancel_swallowed()
            self._failed("refresh_sessions", exc)
        _cancel_swallowed()

    # -- migration usage -------------------------------------------------------------------

    async def count_session(self, day: str, auth_style: str, backend: str, user_id: str) -> None:
        await self._run(
            "count_session",
            lambda: self.remote.count_session(day, auth_style, backend, user_id),
            lambda: self.memory.count_session(day, auth_style, backend, user_id),
        )

    async def flush_pending(self) -> bool:
        """Write usage counted in memory during an outage; True when nothing is left pending.

        Day by day; a day written leaves memory, a day that fails goes back to memory for
        the next recovery. Runs by itself after a recovery; callers may await it too.
        """
        kind = self.remote.kind
        async with self._flush_lock:
            written = 0
            for day in self.memory.held_usage_days():
                pending = self.memory.take_usage_day(day)
                try:
                    async with asyncio.timeout(self.bulk_timeout):
                        await self.remote.write_usage_day(day, pending)
                except self.remote.failures as exc:
                    self.memory.put_back_usage_day(day, pending)
                    _cancel_swallowed()
                    self._failed("flush_pending", exc)
                    return False
                except BaseException:
                    self.memory.put_back_usage_day(day, pending)
                    raise
                _cancel_swallowed()
                written += 1
            if written:
                log.info(f"usage counted during the {kind} outage written to {kind}", extra={"days": written})
            return not self.pending_usage_days

    async def usage_days(self, days: int, today: date | str | None = None) -> list[DayUsage]:
        """Read from the remote store (never from memory); raises StoreUnavailable when it cannot answer."""
        days_asked = day_list(days, today)
        return await self._read("usage_days", lambda: self.remote.usage_days(days_asked))

    async def count_app_version(self, at: float, version: str, auth_style: str, user_id: str, max_versions: int) -> str:
        return await self._run(
            "count_app_version",
            lambda: self.remote.count_app_version(at, version, auth_style, user_id, max_versions),
            lambda: self.memory.count_app_version(at, version, auth_style, user_id, max_versions),
        )

    async def app_versions(self, days: int, today: date | str | None = None) -> list[VersionUsage]:
        """Read from the remote store (never from memory); raises StoreUnavailable when it cannot answer."""
        days_asked = day_list(days, today)
        return await self._read("app_versions", lambda: self.remote.app_versions(days_asked))

    # -- the shared guard ------------------------------------------------------------------

    async def publish_guard(self, state: dict[str, Any], ttl_seconds: float = GUARD_TTL_SECONDS) -> None:
        await self.memory.publish_guard(state, ttl_seconds)

        async def fallback() -> None:
            return None

        await self._run("publish_guard", lambda: self.remote.publish_guard(state, ttl_seconds), fallback)

    async def read_guard(self) -> dict[str, Any] | None:
        return await self._run("read_guard", self.remote.read_guard, self.memory.read_guard)

    # -- the ramp's progress ---------------------------------------------------------------------
    # While the store is down the ramp holds: its last record read stays in memory, and no
    # replica may write (it could not tell whether another wrote first).

    async def read_ramp(self) -> dict[str, Any] | None:
        async def remote() -> dict[str, Any] | None:
            record = await self.remote.read_ramp()
            self.memory.keep_ramp(record)
            return record

        return await self._run("read_ramp", remote, self.memory.read_ramp)

    async def write_ramp(self, record: dict[str, Any], expected_version: int) -> bool:
        async def refused() -> bool:
            return False

        written = await self._run("write_ramp", lambda: self.remote.write_ramp(record, expected_version), refused)
        if written:
            self.memory.keep_ramp(record)
        return written

    async def publish_ramp_window(self, window: int, replica: str, numbers: dict[str, Any]) -> None:
        async def nothing() -> None:
            return None

        await self._run("publish_ramp_window", lambda: self.remote.publish_ramp_window(window, replica, numbers), nothing)

    async def read_ramp_window(self, window: int) -> list[dict[str, Any]]:
        async def none() -> list[dict[str, Any]]:
            return []

        return await self._run("read_ramp_window", lambda: self.remote.read_ramp_window(window), none)
