"""The status page: its numbers from samples (pure), the admin routes over real HTTP, and the
page itself rendered by headless Chromium."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.metrics_core import Metric

from gateway.service import status_assets
from gateway.service.admin import create_admin_app, create_supervisor_admin_app, merge_metrics
from gateway.service.metrics import Metrics
from gateway.service.runtime import Gateway
from gateway.service.server import start_site
from gateway.service.status_page import History, Sample, interval, quantile, sample_of, status_json

from .helpers import (
    CHROMIUM, SECRET, TIMEOUT, Servers, dump_dom, headless_chromium, make_token, open_client, raw_config, status_page_dom,
)

INF = float("inf")


# -- samples from metric families ------------------------------------------------------------------


def busy_metrics() -> Metrics:
    m = Metrics()
    m.attempts.labels("legacy").inc(3)
    m.attempts.labels("message").inc(7)
    m.opened.labels("legacy", "old").inc(2)
    m.opened.labels("message", "old").inc(3)
    m.opened.labels("message", "new").inc(4)
    m.active.labels("legacy", "old").set(1)
    m.active.labels("message", "new").set(2)
    m.auth_failures.labels("expired").inc()
    m.upstream_failures.labels("new", "connect").inc(2)
    m.upstream_failures.labels("new", "dropped").inc()
    m.fallbacks.inc(2)
    m.reply_seconds.labels("new").observe(0.3)
    m.ready_seconds.labels("message", "old").observe(0.02)
    m.configured_percent.set(50)
    m.effective_percent.set(25)
    m.guard_state.set(1)
    return m


def test_sample_reads_every_number_the_page_shows() -> None:
    sample = sample_of(busy_metrics().registry.collect(), at=100.0)
    assert (sample.at, sample.attempts, sample.auth_failures, sample.fallbacks) == (100.0, 10, 1, 2)
    assert sample.opened == {"old": 5, "new": 4}
    assert sample.active == {"old": 1, "new": 2}
    assert sample.active_by_style == {"legacy": 1, "message": 2}
    assert sample.upstream_failures == {"old": 0, "new": 3}
    assert (sample.configured_percent, sample.effective_percent, sample.guard_state) == (50, 25, 1)
    assert dict(sample.reply["new"])[0.5] == 1 and dict(sample.reply["new"])[0.25] == 0
    assert sample.reply["new"][-1] == (INF, 1)
    assert dict(sample.ready["old"])[0.025] == 1
    assert (sample.reply_sum["new"], sample.reply_count["new"], sample.reply_count["old"]) == (0.3, 1, 0)


def test_sample_of_merged_worker_metrics_adds_them_up() -> None:
    merged = merge_metrics([list(busy_metrics().registry.collect()), list(busy_metrics().registry.collect())])
    sample = sample_of(merged, at=0.0)
    assert sample.opened == {"old": 10, "new": 8}
    assert sample.configured_percent == 50  # a shared gauge: the largest, not the sum
    assert sample.reply["new"][-1] == (INF, 2)


def ramp_gauge(percent: float) -> list[Metric]:
    registry = CollectorRegistry()
    Gauge("ws_gateway_ramp_step_percent", "the ramp's step", registry=registry).set(percent)
    return list(registry.collect())


def test_the_ramps_step_is_sampled_and_its_nan_while_off_is_none_so_status_json_stays_json() -> None:
    on, off = sample_of(ramp_gauge(5.0), at=0.0), sample_of(ramp_gauge(math.nan), at=5.0)
    assert (on.ramp_step_percent, off.ramp_step_percent, Sample(at=0.0).ramp_step_percent) == (5.0, None, None)
    history = History(every=5, window=60)
    for sample in (on, off):
        history.add(sample)
    body = status_json(history, sample_of(ramp_gauge(math.nan), at=10.0), {})
    assert body["series"]["ramp_step_percent"] == [None] and body["recent"]["ramp_step_percent"] is None
    json.dumps(body, allow_nan=False)
    assert interval(off, on)["ramp_step_percent"] == 5.0


# -- percentiles and rates -------------------------------------------------------------------------


BEFORE = ((0.1, 10.0), (0.5, 10.0), (1.0, 10.0), (INF, 10.0))


def test_quantile_interpolates_within_the_bucket_like_prometheus() -> None:
    after = ((0.1, 10.0), (0.5, 20.0), (1.0, 20.0), (INF, 20.0))  # ten new observations in (0.1, 0.5]
    assert quantile(0.5, BEFORE, after) == pytest.approx(0.3)
    assert quantile(0.95, BEFORE, after) == pytest.approx(0.48)


def test_quantile_in_the_inf_bucket_is_the_largest_finite_bound() -> None:
    after = ((0.1, 10.0), (0.5, 10.0), (1.0, 10.0), (INF, 14.0))
    assert quantile(0.95, BEFORE, after) == 1.0


def test_quantile_without_new_observations_is_none() -> None:
    assert quantile(0.95, BEFORE, BEFORE) is None
    assert quantile(0.95, (), ()) is None


def test_quantile_of_a_backends_first_observations_counts_from_zero() -> None:
    assert quantile(0.5, (), ((0.1, 2.0), (INF, 2.0))) == pytest.approx(0.05)


def test_quantile_after_a_restart_counts_from_zero() -> None:
    assert quantile(0.5, BEFORE, ((0.1, 0.0), (0.5, 0.0), (1.0, 2.0), (INF, 2.0))) == pytest.approx(0.75)


def test_interval_gives_rates_per_second_and_the_success_share() -> None:
    a = Sample(at=0.0, attempts=10, opened={"old": 4, "new": 4}, auth_failures=1)
    b = Sample(at=10.0, attempts=30, opened={"old": 14, "new": 13}, auth_failures=2, active={"old": 3}, guard_state=2)
    point = interval(a, b)
    assert (point["t"], point["attempts_per_s"], point["sessions_per_s_old"], point["sessions_per_s_new"]) == (10.0, 2.0, 1.0, 0.9)
    assert point["success_percent"] == 95.0
    assert point["auth_failure_percent"] == 5.0
    assert (point["active_old"], point["active_new"], point["guard_state"]) == (3, 0.0, 2)


def test_interval_averages_reply_time_like_the_alert() -> None:
    a = Sample(at=0.0, reply_sum={"new": 10.0}, reply_count={"new": 5})
    b = Sample(at=5.0, reply_sum={"new": 16.0}, reply_count={"new": 8})
    point = interval(a, b)
    assert point["reply_avg_new"] == 2.0 and point["reply_avg_old"] is None


def test_interval_without_attempts_has_no_success_share() -> None:
    point = interval(Sample(at=0.0), Sample(at=5.0))
    assert point["success_percent"] is None and point["auth_failure_percent"] is None


def test_interval_after_a_counter_reset_counts_from_zero() -> None:
    point = interval(Sample(at=0.0, attempts=100, opened={"old": 100}), Sample(at=5.0, attempts=10, opened={"old": 10}))
    assert point["attempts_per_s"] == 2.0 and point["success_percent"] == 100.0


# -- the ring buffer ---------------------------------------------------------------------------------


def test_history_keeps_only_the_window() -> None:
    history = History(every=5, window=20)
    for n in range(10):
        history.add(Sample(at=5.0 * n))
    assert [s.at for s in history.samples] == [25.0, 30.0, 35.0, 40.0, 45.0]


def test_series_has_one_row_per_interval() -> None:
    history = History(every=5, window=60)
    for n, opened in enumerate((0, 5, 15)):
        history.add(Sample(at=5.0 * n, opened={"old": opened}))
    series = history.series()
    assert series["t"] == [5.0, 10.0]
    assert series["sessions_per_s_old"] == [1.0, 2.0]


def test_empty_history_still_names_every_column() -> None:
    series = History().series()
    assert series["t"] == [] and series["reply_p95_new"] == [] and series["guard_state"] == []


def test_recent_covers_the_last_five_minutes_up_to_a_fresh_sample() -> None:
    history = History(every=60, window=3600)
    for n in range(10):
        history.add(Sample(at=60.0 * n, attempts=10.0 * n, opened={"old": 10.0 * n}))
    recent = history.recent(Sample(at=570.0, attempts=100.0, opened={"old": 95.0}))
    assert recent["seconds"] == 270.0  # from the sample at 300 s, the oldest within five minutes
    assert recent["attempts_per_s"] == pytest.approx(50 / 270)


def test_recent_has_every_column_the_charts_draw_so_legend_and_tiles_read_one_window() -> None:
    history = History(every=5, window=60)
    history.add(Sample(at=0.0))
    history.add(Sample(at=5.0))
    assert set(history.series()) <= set(history.recent(Sample(at=10.0))) | {"t"}


def test_recent_without_history_has_no_span() -> None:
    recent = History().recent(Sample(at=10.0, active={"new": 4}))
    assert recent["seconds"] == 0.0 and recent["active_new"] == 4


# -- the admin routes ------------------------------------------------------------------------------------


@pytest.fixture
async def admin(servers: Servers) -> AsyncIterator[tuple[Gateway, str, Any]]:
    stack = await servers.stack(rollout=ROUTE_ROLLOUT)
    runner, port = await start_site(create_admin_app(stack.gateway), "127.0.0.1", 0)
    try:
        yield stack.gateway, f"http://127.0.0.1:{port}", stack
    finally:
        await runner.cleanup()


# A page on the admin app's origin that drives the status page as a person would: opens it (a
# window, since the page may not be framed), types a user into the route form, submits it, and
# posts back what the answer says once it is final.
DRIVE = """<!doctype html><html><body><script>
const win = window.open("/", "status");
win.addEventListener("load", () => {
  const page = win.document, answer = page.getElementById("route-answer");
  new MutationObserver(() => {
    if (answer.textContent && !answer.textContent.startsWith("asking")) fetch("/result", {method: "POST", body: answer.textContent});
  }).observe(answer, {childList: true, characterData: true, subtree: true});
  page.getElementById("route-user").value = %s;
  page.getElementById("route-form").requestSubmit();
});
</script></body></html>"""


async def route_form_answer(gateway: Gateway, user: str) -> str:
    """What the status page's route form shows for `user`, typed and submitted in headless Chromium."""
    answered: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def drive(request: web.Request) -> web.Response:
        return web.Response(text=DRIVE % json.dumps(user), content_type="text/html")

    async def result(request: web.Request) -> web.Response:
        if not answered.done():
            answered.set_result(await request.text())
        return web.Response(text="ok")

    app = create_admin_app(gateway)
    app.router.add_get("/drive", drive)
    app.router.add_post("/result", result)
    runner, port = await start_site(app, "127.0.0.1", 0)
    assert CHROMIUM is not None
    try:
        url = f"http://127.0.0.1:{port}/drive"
        async with headless_chromium(CHROMIUM, url, "--disable-popup-blocking"), asyncio.timeout(3 * TIMEOUT):
            return await answered
    finally:
        await runner.cleanup()


async def fetch(url: str) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, dict(response.headers), await response.text()


async def test_page_script_and_style_are_served_under_a_strict_csp(admin) -> None:
    _, base, _ = admin
    for path, content_type in (("/", "text/html"), ("/status.js", "text/javascript"), ("/status.css", "text/css")):
        status, headers, body = await fetch(base + path)
        assert status == 200 and headers["Content-Type"].startswith(content_type), path
        assert headers["Content-Security-Policy"] == status_assets.CSP
        assert "'unsafe-inline'" not in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
    assert '<script src="status.js"' in (await fetch(base + "/"))[2]


async def test_status_json_shows_live_sessions_and_the_rollout_but_no_secret(admin) -> None:
    gateway, base, stack = admin
    token = make_token("nina")
    ws = await open_client(stack, "message", token)
    assert json.loads(await ws.recv())["type"] == "connected"
    status, headers, text = await fetch(base + "/status.json")
    await ws.close()
    assert status == 200 and headers["Cache-Control"] == "no-store"
    body = json.loads(text)
    assert body["recent"]["active_new"] == 1 and body["recent"]["active_message"] == 1
    assert body["rollout"]["configured_percent"] == 30 and body["rollout"]["guard"]["state"] == "healthy"
    assert body["sampled_every_seconds"] == 5.0 and body["workers"] is None
    assert set(body["series"]) >= {"t", "sessions_per_s_new", "reply_p95_old", "effective_percent"}
    assert SECRET not in text and token not in text


class FakeWorkers:
    """What the supervisor's admin app asks of the supervisor, from two real registries."""

    draining = False

    def __init__(self) -> None:
        self.registries = [busy_metrics().registry, busy_metrics().registry]

    def workers_ready(self) -> int:
        return 2

    async def worker_metrics(self) -> list[list[Metric]]:
        return [list(r.collect()) for r in self.registries]

    def own_metrics(self) -> list[Metric]:
        return []

    async def worker_rollouts(self) -> list[dict[str, Any]]:
        return [{"worker": n, "pid": n, "configured_percent": 50, "active_connections": 3, "draining": False} for n in (1, 2)]


async def test_supervisor_serves_the_page_over_every_workers_metrics() -> None:
    runner, port = await start_site(create_supervisor_admin_app(FakeWorkers()), "127.0.0.1", 0)
    try:
        status, _, page = await fetch(f"http://127.0.0.1:{port}/")
        assert status == 200 and "ws-gateway" in page
        body = json.loads((await fetch(f"http://127.0.0.1:{port}/status.json"))[2])
    finally:
        await runner.cleanup()
    assert body["workers"] == 2
    assert (body["recent"]["active_old"], body["recent"]["active_new"]) == (2, 4)
    assert body["rollout"]["active_connections"] == 6 and len(body["rollout"]["workers"]) == 2


# -- "where does user X go, and why" --------------------------------------------------------------------

ROUTE_ROLLOUT = {"new_percent": 30, "force_new": ["nina"], "salt": "test-salt"}


def cli_route(user: str, tmp_path: Path) -> str:
    """What ``ws-gateway route USER`` prints for the stack's rollout (the secret is in the file)."""
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(raw_config(rollout=ROUTE_ROLLOUT)))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "route", user, "--config", str(config)],
        cwd=tmp_path, capture_output=True, text=True, timeout=3 * TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("user", ["nina", "user-5", "user-7"])
async def test_route_answers_what_the_route_command_prints(admin, tmp_path: Path, user: str) -> None:
    _, base, _ = admin
    status, _, text = await fetch(f"{base}/route?user={user}")
    body = json.loads(text)
    assert status == 200 and body["user_id"] == user
    assert body["line"] == cli_route(user, tmp_path) == f"{body['backend']} ({body['why']})"
    assert body["now"] == {"backend": body["backend"], "why": body["why"]}


async def test_route_says_when_the_guard_holds_a_user_back_right_now(admin) -> None:
    gateway, base, _ = admin
    gateway.guard.trip(gateway.clock(), "tripped by the test")
    body = json.loads((await fetch(f"{base}/route?user=nina"))[2])
    assert body["line"] == "new (forced by rollout.force_new)"
    assert body["now"] == {"backend": "old", "why": "held back by the rollback guard"}


@pytest.mark.parametrize(
    ("query", "error"),
    [("", "give a user id: /route?user=ID"), ("?user=" + "x" * 257, "a user id is at most 256 printable characters, as in a token")],
    ids=["no-user", "too-long"],
)
async def test_route_refuses_a_missing_or_impossible_user_id(admin, query: str, error: str) -> None:
    _, base, _ = admin
    status, _, text = await fetch(f"{base}/route{query}")
    assert (status, json.loads(text)) == (400, {"error": error})


# -- the page in a real browser ----------------------------------------------------------------------


def eventful_status() -> dict[str, Any]:
    """Ten minutes of a rollout: the new backend fails, the guard trips and recovers."""
    history = History(every=60, window=3600)
    opened = {"old": 0.0, "new": 0.0}
    failures = {"old": 0.0, "new": 0.0}
    for minute in range(11):
        tripped = minute in (5, 6)
        opened["old"] += 60
        opened["new"] += 0 if tripped else 60
        failures["new"] += 30 if minute == 5 else 0
        history.add(
            Sample(
                at=60.0 * minute, attempts=sum(opened.values()) + sum(failures.values()), opened=dict(opened),
                active={"old": 40, "new": 0 if tripped else 35}, upstream_failures=dict(failures),
                reply={"new": ((0.1, 10.0 * minute), (1.0, 20.0 * minute), (INF, 20.0 * minute))},
                reply_sum={"new": 5.0 * minute}, reply_count={"new": 20.0 * minute},
                configured_percent=50, effective_percent=0 if tripped else 50, guard_state=2 if tripped else 0,
            )
        )
    rollout = {
        "configured_percent": 50, "effective_percent": 0, "config_file": "/etc/ws-gateway/gateway.yaml <b>x</b>",
        "config_loaded_at": "2026-11-26T10:00:00Z", "draining": True,
        "guard": {
            "enabled": True, "state": "tripped", "since": "2026-11-26T10:04:18Z", "step": None, "trips": 1,
            "retries_at": "2026-11-26T10:05:18Z", "retries_in_seconds": 42.0,
        },
    }
    return status_json(history, history.samples[-1], rollout)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
async def test_browser_draws_every_chart_and_the_tiles_from_status_json() -> None:
    dom = await status_page_dom(eventful_status())
    assert dom.count("<figure>") == 8
    for series in ("sessions_per_s_old", "sessions_per_s_new", "active_new", "upstream_failures_per_s_new",
                   "reply_p95_new", "reply_avg_new", "effective_percent", "configured_percent", "success_percent"):
        assert f'data-series="{series}"' in dom, series
    assert 'fill="#fecaca"' in dom  # the guard's open minutes are shaded
    assert "guard TRIPPED since 10:04:18 UTC \u00b7 retries at 10:05:18 UTC (in 42 s) \u00b7 1 trip<" in dom
    assert 'class="tile bad"' in dom
    assert "Draining: this gateway is shutting down" in dom
    assert "gateway.yaml &lt;b&gt;x&lt;/b&gt;" in dom  # data is text, never markup
    assert '<section id="ramp" aria-label="the automatic ramp" hidden="">' in dom  # no ramp in /rollout
    assert "configured 50 %" in dom
    assert "ramp_step_percent" not in dom and "ramp step" not in dom  # the chart's ramp line only while there is one


def stepped_back_ramp() -> dict[str, Any]:
    """/rollout's `ramp` as ramp_shape.md documents it, just after a failed gate stepped it back."""
    return {
        "enabled": True, "state": "stepped_back", "step_percent": 5.0, "step_index": 1, "steps": [1, 5, 25, 50, 100],
        "reason": "success_rate 0.62 < 0.95 (31 of 50 opened), over 50 new-backend sessions: stepped back from 25% to 5% <b>",
        "since": "2026-12-07T07:00:00Z", "next_step_in_seconds": 412.5, "waiting_for": "38 of 100 new-backend sessions",
        "sessions": 38, "min_sessions": 100, "hold_minutes": 30.0, "on_failure": "step_back", "paused": False,
        "gates": [
            {"name": "success_rate", "value": 0.8421, "threshold": 0.95, "bound": "min", "ok": False, "detail": "32 of 38 opened"},
            {"name": "auth_failure_rate", "value": 0.0, "threshold": 0.05, "bound": "max", "ok": True,
             "detail": "0 of 38 tokens refused by the new backend"},
            {"name": "reply_seconds_avg", "value": None, "threshold": 2.0, "bound": "max", "ok": True, "detail": "over 0 new-backend replies"},
            {"name": "reply_ratio", "value": None, "threshold": 1.5, "bound": "max", "ok": True, "detail": "new ÷ old average reply"},
        ],
        "store_available": True,
    }


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
async def test_browser_shows_the_ramps_plan_state_reason_gates_and_next_step() -> None:
    history = History(every=5, window=60)
    history.add(Sample(at=0.0, ramp_step_percent=25.0))
    history.add(Sample(at=5.0, ramp_step_percent=5.0))
    rollout = {"configured_percent": 30, "effective_percent": 5, "ramp": stepped_back_ramp(),
               "guard": {"enabled": True, "state": "healthy", "trips": 0}}
    dom = await status_page_dom(status_json(history, Sample(at=10.0, ramp_step_percent=5.0), rollout))
    assert '<section id="ramp" aria-label="the automatic ramp" class="bad">' in dom
    assert "Ramp: step 2 of 5 (5 %) · stepped back</h2>" in dom
    assert '<li class="passed">1 %</li><li class="current" aria-current="step">5 %</li><li>25 %</li>' in dom
    assert ('<p id="ramp-state" class="bad">stepped back: success_rate 0.62 &lt; 0.95 (31 of 50 opened), over 50 '
            "new-backend sessions: stepped back from 25% to 5% &lt;b&gt;</p>") in dom
    assert "next step in 6:53 · waiting for 38 of 100 new-backend sessions</p>" in dom
    assert "38 new-backend sessions in this step's window since 07:00:00 UTC (every replica; judged from 100)" in dom
    assert ('<tr data-gate="success_rate"><td>success_rate</td><td>0.842</td><td>≥ 0.95</td><td class="bad">failing</td>'
            "<td>32 of 38 opened</td></tr>") in dom
    assert '<tr data-gate="auth_failure_rate"><td>auth_failure_rate</td><td>0</td><td>≤ 0.05</td><td>ok</td>' in dom
    assert '<td>reply_seconds_avg</td><td>no data</td><td>≤ 2 s</td><td>ok (no data yet)</td>' in dom
    assert dom.count("<tr data-gate=") == 4
    assert "ramp step 5 % · guard healthy" in dom and "configured 30 %" not in dom
    assert 'data-series="ramp_step_percent"' in dom and '<span class="c-ramp">ramp step: 5 %</span>' in dom


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
async def test_browser_shows_a_live_gateway(admin) -> None:
    _, base, stack = admin
    ws = await open_client(stack, "legacy", make_token("otto"), early=["hi"])
    assert await ws.recv() == "hi"  # relaying: counted as open
    try:
        dom = await dump_dom(base + "/")
    finally:
        await ws.close()
    assert "old 1 · new 0" in dom
    assert "legacy app 1 · current app 0" in dom
    assert "configured 30 %" in dom


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
async def test_browser_route_form_answers_like_the_route_command(servers: Servers, tmp_path: Path) -> None:
    stack = await servers.stack(rollout=ROUTE_ROLLOUT)
    assert await route_form_answer(stack.gateway, "user-5") == f"user-5: {cli_route('user-5', tmp_path)}"
    stack.gateway.guard.trip(stack.gateway.clock(), "tripped by the test")
    assert await route_form_answer(stack.gateway, "nina") == (
        "nina: new (forced by rollout.force_new) · right now: old (held back by the rollback guard)"
    )


def success_window_status() -> dict[str, Any]:
    """Five minutes at 20 upgrades a minute: 100 % success for four, 50 % in the last one (90 % in all)."""
    history = History(every=60, window=3600)
    attempts = opened = 0.0
    for minute in range(6):
        history.add(Sample(at=60.0 * minute, attempts=attempts, opened={"old": opened}))
        attempts += 20
        opened += 20 if minute < 4 else 10
    return status_json(history, history.samples[-1], {"guard": {"enabled": True, "state": "closed", "trips": 0}})


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
async def test_browser_success_tile_and_its_chart_legend_show_the_same_number() -> None:
    status = success_window_status()
    assert status["recent"]["success_percent"] == 90.0 and status["series"]["success_percent"][-1] == 50.0
    dom = await status_page_dom(status)
    assert '<h2>Connection success</h2><div class="value">90 %</div><div class="detail">last 5 min' in dom
    assert '<span class="c-message">success: 90 %</span>' in dom
    assert "success: 50 %" not in dom
