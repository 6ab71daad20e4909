"""A real browser (headless Chromium) through all four paths: what the web app and QA use.

Browsers negotiate permessage-deflate with their own parameters and report close codes
their own way; this is the client no other test is. Skipped only when Chromium is not
installed (`.ci/run` installs it).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest
from aiohttp import web

from gateway.service.admin import create_admin_app
from gateway.service.server import start_site

from .helpers import CHROMIUM, TIMEOUT, Servers, Stack, dump_dom, eventually, headless_chromium, make_token

pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed"), pytest.mark.relays("byte", "frame")]

PAGE = """<!doctype html><html><body><script>
const runs = %s;
function run(c) { return new Promise(resolve => {
  const seen = []; const ws = new WebSocket(c.url); ws.binaryType = 'arraybuffer';
  ws.onopen = () => {
    if (c.token) ws.send(JSON.stringify({type: 'authenticate', token: c.token}));
    ws.send('hello'); ws.send(new Uint8Array([0, 1, 255]).buffer); ws.send('x'.repeat(300000));
  };
  ws.onmessage = e => {
    seen.push(typeof e.data === 'string' ? e.data.slice(0, 200) + '|' + e.data.length : 'binary:' + Array.from(new Uint8Array(e.data)).join(','));
    if (seen.length === c.expect) ws.close(4001, 'bye');
  };
  ws.onclose = e => resolve({name: c.name, seen, code: e.code, reason: e.reason, extensions: ws.extensions});
});}
(async () => {
  const results = [];
  for (const c of runs) results.push(await run(c));
  await fetch('/result', {method: 'POST', body: JSON.stringify(results)});
})();
</script></body></html>"""


async def run_page(runs: list[dict]) -> list[dict]:
    done: asyncio.Future[list[dict]] = asyncio.get_running_loop().create_future()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PAGE % json.dumps(runs), content_type="text/html")

    async def result(request: web.Request) -> web.Response:
        done.set_result(json.loads(await request.text()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_post("/result", result)
    runner, port = await start_site(app, "127.0.0.1", 0)
    assert CHROMIUM is not None
    try:
        async with headless_chromium(CHROMIUM, f"http://127.0.0.1:{port}/"), asyncio.timeout(3 * TIMEOUT):
            return await done
    finally:
        await runner.cleanup()


async def test_browser_client_chats_through_every_path_and_sees_close_codes(stack: Stack) -> None:
    config = stack.gateway.config
    rollout = replace(config.rollout, force_new=frozenset({"nina"}), force_old=frozenset({"otto"}))
    stack.gateway.apply(replace(config, rollout=rollout))
    runs = [
        {"name": "legacy-new", "url": stack.url(f"token={make_token('nina')}"), "token": None, "expect": 3},
        {"name": "message-new", "url": stack.url(), "token": make_token("nina"), "expect": 4},
        {"name": "legacy-old", "url": stack.url(f"token={make_token('otto')}"), "token": None, "expect": 3},
        {"name": "message-old", "url": stack.url(), "token": make_token("otto"), "expect": 4},
        {"name": "bad-token", "url": stack.url(), "token": "not-a-jwt", "expect": 99},
    ]
    results = {r["name"]: r for r in await run_page(runs)}
    echo = ["hello|5", "binary:0,1,255", "x" * 200 + "|300000"]
    for name in ("legacy-new", "legacy-old"):
        assert results[name]["seen"] == echo, name
    assert json.loads(results["message-new"]["seen"][0].split("|")[0])["user_id"] == "nina"
    assert results["message-old"]["seen"][0].startswith('{"type":"connected"')
    for name in ("message-new", "message-old"):
        assert results[name]["seen"][1:] == echo, name
    for name in ("legacy-new", "message-new", "legacy-old", "message-old"):
        assert results[name]["code"] == 4001, name
        assert results[name]["extensions"].startswith("permessage-deflate"), name
    assert (results["bad-token"]["code"], results["bad-token"]["reason"]) == (1008, "malformed token")
    assert results["bad-token"]["seen"] == []


@pytest.mark.relays("byte")
async def test_status_page_shows_a_live_ramps_first_step_and_its_four_gates(servers: Servers) -> None:
    stack = await servers.stack(rollout={"new_percent": 30, "ramp": {"enabled": True, "hold_minutes": 600}})
    gateway = stack.gateway

    async def started() -> bool:
        return gateway.rollout_status()["ramp"]["state"] is not None

    assert await eventually(started)
    runner, port = await start_site(create_admin_app(gateway), "127.0.0.1", 0)
    servers.closing(runner.cleanup)
    dom = await dump_dom(f"http://127.0.0.1:{port}/")
    assert "Ramp: step 1 of 5 (1 %) · advancing</h2>" in dom
    assert '<li class="current" aria-current="step">1 %</li><li>5 %</li><li>25 %</li><li>50 %</li><li>100 %</li>' in dom
    assert "advancing: started at step 1 of 5 (1%)" in dom
    assert "waiting for 0 of 100 new-backend sessions" in dom
    for gate, threshold in (("success_rate", "≥ 0.95"), ("auth_failure_rate", "≤ 0.05"),
                            ("reply_seconds_avg", "≤ 2 s"), ("reply_ratio", "≤ 1.5")):
        assert f'<tr data-gate="{gate}"><td>{gate}</td><td>no data</td><td>{threshold}</td><td>ok (no data yet)</td>' in dom, gate
    assert "ramp step 1 % · guard healthy" in dom and "configured 30 %" not in dom
    assert '<span class="c-ramp">ramp step: 1 %</span>' in dom  # ws_gateway_ramp_step_percent, sampled
