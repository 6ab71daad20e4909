import json

import pytest
import websockets

from .helpers import make_token

pytestmark = pytest.mark.relays("byte", "frame")


async def test_legacy_client_reaches_old_backend_and_gets_echo(stack):
    async with websockets.connect(stack.url(f"token={make_token('alice')}")) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"


async def test_message_client_routed_new_gets_backends_connected_first(stack):
    stack.route_to("new")
    async with websockets.connect(stack.url()) as ws:
        await ws.send(json.dumps({"type": "authenticate", "token": make_token("bob")}))
        first = json.loads(await ws.recv())
        assert first["type"] == "connected" and first["user_id"] == "bob"
