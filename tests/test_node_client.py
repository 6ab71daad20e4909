"""Node's `ws` library as the client: the WebSocket stack most mobile and web backends test with.

The `ws` package is installed once per machine into `.node-test-deps/` (npm registry); the
test is skipped only where Node or npm is missing or the install fails.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from .helpers import TIMEOUT, Stack, make_token

pytestmark = pytest.mark.relays("byte", "frame")

NODE, NPM = shutil.which("node"), shutil.which("npm")
DEPS = Path(__file__).resolve().parent.parent / ".node-test-deps"

SCRIPT = r"""
const WebSocket = require('ws');
const runs = JSON.parse(process.argv[2]);
function run(c) { return new Promise(resolve => {
  const seen = []; const ws = new WebSocket(c.url, {perMessageDeflate: c.deflate});
  ws.on('open', () => {
    if (c.token) ws.send(JSON.stringify({type: 'authenticate', token: c.token}));
    ws.send('hello'); ws.send(Buffer.from([0, 1, 255]));
  });
  ws.on('message', (data, isBinary) => {
    seen.push(isBinary ? 'binary:' + Array.from(data).join(',') : data.toString());
    if (seen.length === c.expect) ws.close(4002, 'node bye');
  });
  ws.on('close', (code, reason) => resolve({name: c.name, seen, code, reason: reason.toString()}));
  ws.on('error', e => seen.push('error:' + e.message));
});}
(async () => {
  const results = [];
  for (const c of runs) results.push(await run(c));
  console.log(JSON.stringify(results));
})();
"""


@pytest.fixture(scope="session")
def node_ws() -> Path:
    if NODE is None or NPM is None:
        pytest.skip("node and npm are not installed")
    if not (DEPS / "node_modules" / "ws").is_dir():
        DEPS.mkdir(exist_ok=True)
        done = subprocess.run(
            [NPM, "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(DEPS), "ws@8"],
            capture_output=True, timeout=180,
        )
        if done.returncode != 0:
            pytest.skip("npm could not install ws")
    return DEPS / "node_modules"


async def test_node_ws_client_chats_through_every_path_with_and_without_deflate(stack: Stack, node_ws: Path) -> None:
    config = stack.gateway.config
    rollout = replace(config.rollout, force_new=frozenset({"nina"}), force_old=frozenset({"otto"}))
    stack.gateway.apply(replace(config, rollout=rollout))
    runs = []
    for deflate in (False, True):
        for user, backend in (("nina", "new"), ("otto", "old")):
            runs += [
                {"name": f"legacy-{backend}-{deflate}", "url": stack.url(f"token={make_token(user)}"), "token": None,
                 "expect": 2, "deflate": deflate},
                {"name": f"message-{backend}-{deflate}", "url": stack.url(), "token": make_token(user),
                 "expect": 3, "deflate": deflate},
            ]
    runs.append({"name": "expired", "url": stack.url(), "token": make_token("nina", ttl=-60), "expect": 99, "deflate": True})
    script = node_ws.parent / "gateway_client.js"
    script.write_text(SCRIPT)
    node = await asyncio.create_subprocess_exec(
        NODE, str(script), json.dumps(runs), stdout=asyncio.subprocess.PIPE, env={"NODE_PATH": str(node_ws)},
    )
    async with asyncio.timeout(3 * TIMEOUT):
        out, _ = await node.communicate()
    assert node.returncode == 0
    results = {r["name"]: r for r in json.loads(out)}
    for deflate in (False, True):
        for backend in ("new", "old"):
            legacy, message = results[f"legacy-{backend}-{deflate}"], results[f"message-{backend}-{deflate}"]
            assert legacy["seen"] == ["hello", "binary:0,1,255"], legacy
            assert json.loads(message["seen"][0])["type"] == "connected", message
            assert message["seen"][1:] == ["hello", "binary:0,1,255"], message
            assert legacy["code"] == message["code"] == 4002
    assert (results["expired"]["code"], results["expired"]["reason"], results["expired"]["seen"]) == (1008, "token expired", [])
