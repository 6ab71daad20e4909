"""A session's limits are the ones it started with, also when it ends (`Gateway.connection_finished`)."""

from __future__ import annotations

from dataclasses import replace

from gateway.service.store import MemoryStore

from .helpers import Servers, eventually, make_token, open_client


async def test_a_slot_taken_under_a_limit_is_released_after_a_reload_turned_the_limit_off(servers: Servers) -> None:
    stack = await servers.stack(limits={"max_sessions_per_user": 1})
    store = stack.gateway.store
    assert isinstance(store, MemoryStore)
    ws = await open_client(stack, "legacy", make_token("u"))
    await ws.send("hi")
    assert await ws.recv() == "hi"
    assert [user for user, _ in store.held_sessions()] == ["u"]
    limited = stack.gateway.config
    stack.gateway.apply(replace(limited, limits=replace(limited.limits, max_sessions_per_user=None)))
    await ws.close()

    async def released() -> bool:
        return not store.held_sessions()

    assert await eventually(released)
    stack.gateway.apply(limited)  # the limit back: the user's one slot is free
    again = await open_client(stack, "legacy", make_token("u"))
    await again.send("hi")
    assert await again.recv() == "hi"
    await again.close()
