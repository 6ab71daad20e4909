"""Stub backend faults: what `POST /stub/faults` accepts, which connections it hits, and
what a client of the gateway sees for each fault (real gateway, real stubs, loopback)."""

from __future__ import annotations

import json
import time

import aiohttp
import pytest
import websockets

from gateway.stub_backend import Faults, FaultsError, FaultSwitch, parse_faults

from .helpers import Servers, Stack, closed, make_token, open_client

NO_FALLBACK = {"new_percent": 100, "fallback_to_old": False, "guard": {"enabled": False}}


# -- parsing: one rule per test --------------------------------------------------------------


def test_empty_object_is_a_healthy_backend():
    assert parse_faults({}) == Faults()


def test_every_fault_is_read_with_its_type():
    faults = parse_faults(
        {
            "ratio": 0.5, "refuse_status": 503, "upgrade_delay_seconds": 1, "reject_token": True,
            "drop_after_seconds": 2, "reply_delay_seconds": 0.25,
        }
    )
    assert faults == Faults(0.5, 503, 1.0, True, 2.0, 0.25)


def test_null_means_the_default():
    assert parse_faults({"refuse_status": None, "ratio": None}) == Faults()


def test_unknown_key_is_named():
    with pytest.raises(FaultsError) as error:
        parse_faults({"refuse": 503})
    assert error.value.problems[0].startswith("refuse: unknown key (allowed: ratio, refuse_status")


def test_wrong_type_names_key_and_value():
    with pytest.raises(FaultsError) as error:
        parse_faults({"reply_delay_seconds": "slow"})
    assert error.value.problems == ["reply_delay_seconds: expected a number, got 'slow'"]


def test_status_must_be_an_integer():
    with pytest.raises(FaultsError) as error:
        parse_faults({"refuse_status": 503.5})
    assert error.value.problems == ["refuse_status: expected an integer, got 503.5"]


def test_boolean_is_not_a_number_and_a_number_is_not_a_boolean():
    with pytest.raises(FaultsError) as error:
        parse_faults({"ratio": True, "reject_token": 1})
    assert error.value.problems == ["ratio: expected a number, got True", "reject_token: expected true or false, got 1"]


def test_out_of_range_values_are_refused():
    with pytest.raises(FaultsError) as error:
        parse_faults({"ratio": 1.5, "refuse_status": 200, "drop_after_seconds": -1})
    assert error.value.problems == [
        "ratio: 1.5 is out of range [0, 1]",
        "refuse_status: 200 is out of range [400, 599]",
        "drop_after_seconds: -1 is out of range [0, 3600]",
    ]


def test_body_must_be_an_object():
    with pytest.raises(FaultsError, match="expected a JSON object, got list"):
        parse_faults([])


# -- which connections a fault hits ---------------------------------------------------------------


def test_healthy_switch_spares_every_connection():
    switch = FaultSwitch()
    assert [switch.next() for _ in range(3)] == [None, None, None]


def test_ratio_one_hits_every_connection():
    switch = FaultSwitch()
    switch.set(Faults(refuse_status=503))
    assert all(switch.next() is not None for _ in range(5))


def test_ratio_spreads_hits_evenly_and_deterministically():
    switch = FaultSwitch()
    switch.set(Faults(ratio=0.25, refuse_status=503))
    assert [switch.next() is not None for _ in range(8)] == [False, False, False, True] * 2


def test_ratio_zero_spares_every_connection():
    switch = FaultSwitch()
    switch.set(Faults(ratio=0.0, refuse_status=503))
    assert not any(switch.next() for _ in range(5))


def test_setting_faults_restarts_the_count():
    switch = FaultSwitch()
    switch.set(Faults(ratio=0.5, refuse_status=503))
    switch.next()
    switch.set(Faults(ratio=0.5, refuse_status=500))
    assert switch.as_dict()["upgrades"] == 0
    assert [switch.next() is not None for _ in range(2)] == [False, True]


# -- the control endpoint --------------------------------------------------------------------------


async def post_faults(port: int, body: object) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/stub/faults", json=body) as response:
            return response.status, await response.json()


async def test_control_endpoint_sets_and_shows_faults(servers: Servers) -> None:
    port = await servers.stub("new")
    status, body = await post_faults(port, {"refuse_status": 503, "ratio": 0.5})
    assert status == 200
    assert body["faults"]["refuse_status"] == 503 and body["upgrades"] == 0
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/stub/faults") as response:
        assert (await response.json())["faults"] == body["faults"]


async def test_control_endpoint_refuses_bad_faults_and_keeps_the_old_ones(servers: Servers) -> None:
    port = await servers.stub("old")
    await post_faults(port, {"reply_delay_seconds": 0.5})
    status, body = await post_faults(port, {"ratio": 2, "nope": 1})
    assert status == 400
    assert body["errors"] == ["nope: unknown key (allowed: ratio, refuse_status, upgrade_delay_seconds, reject_token, "
                              "drop_after_seconds, reply_delay_seconds)", "ratio: 2 is out of range [0, 1]"]
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/stub/faults") as response:
        assert (await response.json())["faults"]["reply_delay_seconds"] == 0.5


async def test_control_endpoint_refuses_a_body_that_is_not_json(servers: Servers) -> None:
    port = await servers.stub("old")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/stub/faults", data=b"{") as response:
            assert response.status == 400
            assert (await response.json())["errors"] == ["the body is not JSON"]


# -- what a gateway client sees --------------------------------------------------------------------


async def new_stack(servers: Servers, **rollout: object) -> tuple[Stack, int]:
    new_port = await servers.stub("new")
    stack = await servers.stack(new_port=new_port, rollout={**NO_FALLBACK, **rollout})
    return stack, new_port


def failures(stack: Stack, reason: str) -> float | None:
    labels = {"backend": "new", "reason": reason}
    return stack.gateway.metrics.registry.get_sample_value("ws_gateway_upstream_failures_total", labels)


@pytest.mark.parametrize("style", ["legacy", "message"])
async def test_refused_upgrade_gives_the_client_1014(servers: Servers, style: str) -> None:
    stack, port = await new_stack(servers)
    await post_faults(port, {"refuse_status": 503})
    ws = await open_client(stack, style, make_token())
    assert (await closed(ws))[0] == 1014
    assert failures(stack, "connect") == 1


@pytest.mark.parametrize("style", ["legacy", "message"])
async def test_rejected_token_gives_the_client_1008(servers: Servers, style: str) -> None:
    stack, port = await new_stack(servers)
    await post_faults(port, {"reject_token": True})
    ws = await open_client(stack, style, make_token())
    assert (await closed(ws))[0] == 1008


async def test_slow_upgrade_past_the_connect_timeout_gives_1014(servers: Servers) -> None:
    new_port = await servers.stub("new")
    stack = await servers.stack(
        new_port=new_port, rollout=NO_FALLBACK,
        backends={"new": {"url": f"ws://127.0.0.1:{new_port}/ws/chat", "auth": "message", "connect_timeout_seconds": 0.1}},
    )
    await post_faults(new_port, {"upgrade_delay_seconds": 1})
    ws = await open_client(stack, "message", make_token())
    assert (await closed(ws))[0] == 1014


async def test_dropped_session_gives_the_client_1014_after_it_relayed(servers: Servers) -> None:
    stack, port = await new_stack(servers)
    await post_faults(port, {"drop_after_seconds": 0.05})
    ws = await open_client(stack, "message", make_token())
    assert json.loads(await ws.recv())["type"] == "connected"
    assert (await closed(ws))[0] == 1014
    assert failures(stack, "dropped") == 1


async def test_slow_replies_still_arrive_in_order(servers: Servers) -> None:
    stack, port = await new_stack(servers)
    await post_faults(port, {"reply_delay_seconds": 0.1})
    ws = await open_client(stack, "message", make_token())
    await ws.recv()  # connected: sent at authentication, not a reply
    started = time.monotonic()
    await ws.send("one")
    await ws.send("two")
    assert [await ws.recv(), await ws.recv()] == ["one", "two"]
    # A lower bound only: the injected delay cannot be skipped, however fast the machine.
    assert time.monotonic() - started >= 0.2
    await ws.close()


async def test_ratio_hits_only_the_picked_connections(servers: Servers) -> None:
    stack, port = await new_stack(servers)
    await post_faults(port, {"refuse_status": 503, "ratio": 0.5})
    served = []
    for _ in range(4):
        ws = await open_client(stack, "message", make_token())
        try:
            served.append(json.loads(await ws.recv())["type"] == "connected")
            await ws.close()
        except websockets.ConnectionClosed:
            served.append(False)
    assert served == [True, False, True, False]


async def test_healing_restores_the_backend(servers: Servers) -> None:
    stack, port = await new_stack(servers)
    await post_faults(port, {"refuse_status": 503})
    assert (await closed(await open_client(stack, "legacy", make_token())))[0] == 1014
    await post_faults(port, {})
    ws = await open_client(stack, "legacy", make_token())
    await ws.send("back")
    assert await ws.recv() == "back"
    await ws.close()
