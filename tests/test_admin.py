"""The admin listener over real HTTP: health, readiness, metrics, rollout state."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.service.admin import _latest_upstream_errors, create_admin_app
from gateway.service.runtime import Gateway
from gateway.service.server import start_site

from .helpers import SECRET, Clock, make_config

# What the guard's states were called once: circuit-breaker words, read as "healthy" at 3 a.m.
CIRCUIT_BREAKER_WORDS = {"open", "closed", "half_open", "half-open"}


def json_words(value: Any) -> Iterator[str]:
    """Every key and string value in a JSON document (what an operator reads in it)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from json_words(item)
    elif isinstance(value, list):
        for item in value:
            yield from json_words(item)
    elif isinstance(value, str):
        yield value


@pytest.fixture
async def admin() -> AsyncIterator[tuple[Gateway, str]]:
    gateway = Gateway(
        make_config(rollout={"new_percent": 12.5, "force_new": ["qa-1", "qa-2"], "force_old": ["vip"]}),
        config_path="/etc/ws-gateway/gateway.yaml",
    )
    runner, port = await start_site(create_admin_app(gateway), "127.0.0.1", 0)
    try:
        yield gateway, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, response.headers["Content-Type"], await response.text()


async def test_healthz_answers_200_while_the_process_is_alive(admin) -> None:
    gateway, base = admin
    status, _, _ = await get(f"{base}/healthz")
    assert status == 200


async def test_readyz_turns_503_once_draining_starts(admin) -> None:
    gateway, base = admin
    assert (await get(f"{base}/readyz"))[0] == 200
    gateway.start_drain()
    assert (await get(f"{base}/readyz"))[0] == 503
    assert (await get(f"{base}/healthz"))[0] == 200


async def test_metrics_are_prometheus_text_with_the_documented_names(admin) -> None:
    _, base = admin
    status, content_type, body = await get(f"{base}/metrics")
    assert status == 200 and content_type.startswith("text/plain") and "version=0.0.4" in content_type
    names = {family.name for family in text_string_to_metric_families(body)}
    for name in (
        "ws_gateway_connection_attempts", "ws_gateway_connections_opened", "ws_gateway_connections_active",
        "ws_gateway_auth_failures", "ws_gateway_upstream_failures", "ws_gateway_fallbacks",
        "ws_gateway_messages", "ws_gateway_bytes", "ws_gateway_session_ready_seconds",
        "ws_gateway_upstream_connect_seconds", "ws_gateway_rollout_configured_percent",
        "ws_gateway_rollout_effective_percent", "ws_gateway_config_reloads", "ws_gateway_guard_state",
        "ws_gateway_guard_trips",
    ):
        assert name in names, name
    samples = {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples}
    assert samples["ws_gateway_rollout_configured_percent"] == 12.5
    assert samples["ws_gateway_rollout_effective_percent"] == 12.5
    assert SECRET not in body


async def test_rollout_shows_percentages_overrides_guard_and_file_but_no_secret(admin) -> None:
    gateway, base = admin
    async with aiohttp.ClientSession() as http, http.get(f"{base}/rollout") as response:
        assert response.status == 200
        body = await response.json()
        text = await response.text()
    assert body["configured_percent"] == 12.5 and body["effective_percent"] == 12.5
    assert body["force_new_count"] == 2 and body["force_old_count"] == 1
    assert body["guard"]["state"] == "healthy" and body["guard"]["since"] is None
    assert body["config_file"] == "/etc/ws-gateway/gateway.yaml"
    assert body["config_loaded_at"].endswith("Z")
    assert SECRET not in text and "secret" not in text


async def test_rollout_reports_a_tripped_guard_and_zero_effective_percent(admin) -> None:
    gateway, base = admin
    for _ in range(gateway.config.rollout.guard.min_samples):
        gateway.new_backend_outcome(failed=True)
    async with aiohttp.ClientSession() as http, http.get(f"{base}/rollout") as response:
        body = await response.json()
    guard = body["guard"]
    assert guard["state"] == "tripped" and body["effective_percent"] == 0
    assert guard["trips"] == 1 and guard["retries_in_seconds"] > 0 and guard["step"] is None
    tripped_at = datetime.fromisoformat(guard["since"].replace("Z", "+00:00"))
    retries_at = datetime.fromisoformat(guard["retries_at"].replace("Z", "+00:00"))
    assert (retries_at - tripped_at).total_seconds() == gateway.config.rollout.guard.cooldown_seconds
    assert not CIRCUIT_BREAKER_WORDS & set(json_words(body)), body
    _, _, metrics = await get(f"{base}/metrics")
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert samples["ws_gateway_guard_state"] == 2 and samples["ws_gateway_guard_trips_total"] == 1


async def test_the_guard_reads_healthy_tripped_recovering_in_rollout_status_json_log_and_metric_help(
    admin, caplog: pytest.LogCaptureFixture
) -> None:
    gateway, base = admin
    clock = Clock(1000.0)
    gateway.clock = clock
    guard = gateway.config.rollout.guard

    async def states() -> tuple[str, str]:
        """The guard's state as /rollout and as /status.json say it, checking both for the old words."""
        said = []
        for path in ("/rollout", "/status.json"):
            body = json.loads((await get(f"{base}{path}"))[2])
            assert not CIRCUIT_BREAKER_WORDS & set(json_words(body)), (path, body)
            said.append((body if path == "/rollout" else body["rollout"])["guard"]["state"])
        return said[0], said[1]

    assert await states() == ("healthy", "healthy")
    with caplog.at_level(logging.INFO, logger="gateway"):
        for _ in range(guard.min_samples):
            gateway.new_backend_outcome(failed=True)
        assert await states() == ("tripped", "tripped")
        clock.advance(guard.cooldown_seconds)
        assert await states() == ("recovering", "recovering")
        clock.advance(guard.step_seconds * len(guard.recovery_steps))
        assert await states() == ("healthy", "healthy")
    logged = [getattr(r, "guard_state") for r in caplog.records if hasattr(r, "guard_state")]
    assert logged[0] == "tripped" and logged[1] == "recovering" and logged[-1] == "healthy", logged
    assert set(logged) == {"tripped", "recovering", "healthy"}
    _, _, metrics = await get(f"{base}/metrics")
    [help_text] = [f.documentation for f in text_string_to_metric_families(metrics) if f.name == "ws_gateway_guard_state"]
    assert help_text == "Rollback guard: 0 healthy, 1 recovering, 2 tripped."


def test_the_supervisor_shows_the_newest_upstream_error_any_worker_saw() -> None:
    older = {"at": "2026-12-07T04:00:00Z", "host": "old.example", "port": 80, "error": "Connection refused"}
    newer = {"at": "2026-12-07T04:00:05Z", "host": "old.example", "port": 80, "error": "Name or service not known"}
    states = [
        {"last_upstream_error": {"old": older, "new": None}},
        {"last_upstream_error": {"old": newer, "new": None}},
        {"last_upstream_error": {"old": None, "new": older}},
    ]
    assert _latest_upstream_errors(states) == {"old": newer, "new": older}
