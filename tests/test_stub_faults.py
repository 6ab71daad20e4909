"""Stub backend faults: what `POST /stub/faults` and the `stub-backend` flags accept, which
handshakes fail, and what a client of the gateway sees for each fault (real gateway, real
stubs, loopback)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import websockets
import yaml

from gateway.staging.stub_backend import Faults, FaultsError, FaultSwitch, parse_faults, picked

from .helpers import Servers, Stack, closed, make_token, open_client
from .test_cli import SECRET, TIMEOUT, Proc, base_config, cli_env, run_cli

NO_FALLBACK = {"new_percent": 100, "fallback_to_old": False, "guard": {"enabled": False}}


# -- parsing: one rule per test --------------------------------------------------------------


def test_empty_object_is_a_healthy_backend():
    assert parse_faults({}) == Faults()


def test_every_fault_is_read_with_its_type():
    faults = parse_faults(
        {
            "fail_handshake": 30, "reply_delay": 0.25, "drop_after": 2, "refuse_status": 503, "upgrade_delay": 1,
            "reject_token": True,
        }
    )
    assert faults == Faults(30.0, 0.25, 2.0, 503, 1.0, True)


def test_null_means_the_default():
    assert parse_faults({"refuse_status": None, "fail_handshake": None}) == Faults()


def test_unknown_key_is_named():
    with pytest.raises(FaultsError) as error:
        parse_faults({"ratio": 0.5})
    assert error.value.problems[0].startswith("ratio: unknown key (allowed: fail_handshake, reply_delay, drop_after")


def test_wrong_type_names_key_and_value():
    with pytest.raises(FaultsError) as error:
        parse_faults({"reply_delay": "slow"})
    assert error.value.problems == ["reply_delay: expected a number, got 'slow'"]


def test_status_must_be_an_integer():
    with pytest.raises(FaultsError) as error:
        parse_faults({"refuse_status": 503.5})
    assert error.value.problems == ["refuse_status: expected an integer, got 503.5"]


def test_boolean_is_not_a_number_and_a_number_is_not_a_boolean():
    with pytest.raises(FaultsError) as error:
        parse_faults({"fail_handshake": True, "reject_token": 1})
    assert error.value.problems == ["fail_handshake: expected a number, got True", "reject_token: expected true or false, got 1"]


def test_out_of_range_values_are_refused():
    with pytest.raises(FaultsError) as error:
        parse_faults({"fail_handshake": 101, "refuse_status": 200, "drop_after": -1})
    assert error.value.problems == [
        "fail_handshake: 101 is out of range [0, 100]",
        "drop_after: -1 is out of range [0, 3600]",
        "refuse_status: 200 is out of range [400, 599]",
    ]


def test_body_must_be_an_object():
    with pytest.raises(FaultsError, match="expected a JSON object, got list"):
        parse_faults([])


# -- which handshakes fail ------------------------------------------------------------------------


def test_a_percentage_picks_exactly_that_share_spread_evenly():
    assert [n for n in range(10) if picked(n, 30)] == [3, 6, 9]
    assert sum(picked(n, 30) for n in range(1000)) == 300


def test_zero_and_a_hundred_percent_pick_none_and_all():
    assert not any(picked(n, 0) for n in range(100))
    assert all(picked(n, 100) for n in range(100))


def test_healthy_switch_fails_no_handshake():
    switch = FaultSwitch()
    assert [switch.next() for _ in range(3)] == [(Faults(), False)] * 3


def test_switch_fails_the_picked_handshakes_and_keeps_the_other_faults_for_all():
    faults = Faults(fail_handshake=50, reply_delay=0.5)
    switch = FaultSwitch(faults)
    assert [switch.next() for _ in range(4)] == [(faults, False), (faults, True), (faults, False), (faults, True)]


def test_setting_faults_restarts_the_count():
    switch = FaultSwitch(Faults(fail_handshake=50))
    switch.next()
    switch.set(Faults(fail_handshake=50))
    assert switch.as_dict()["upgrades"] == 0
    assert [failed for _, failed in (switch.next(), switch.next())] == [False, True]


# -- the control endpoint --------------------------------------------------------------------------


async def post_faults(port: int, body: object) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/stub/faults", json=body) as response:
            return response.status, await response.json()


async def test_control_endpoint_sets_and_shows_faults(servers: Servers) -> None:
    port = await servers.stub("new")
    status, body = await post_faults(port, {"fail_handshake": 30, "reply_delay": 0.5, "drop_after": 60})
    assert status == 200
    assert (body["faults"]["fail_handshake"], body["faults"]["reply_delay"], body["faults"]["drop_after"]) == (30, 0.5, 60)
    assert body["upgrades"] == 0
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/stub/faults") as response:
        assert (await response.json())["faults"] == body["faults"]


async def test_control_endpoint_refuses_bad_faults_and_keeps_the_old_ones(servers: Servers) -> None:
    port = await servers.stub("old")
    await post_faults(port, {"reply_delay": 0.5})
    status, body = await post_faults(port, {"fail_handshake": 200, "nope": 1})
    assert status == 400
    assert body["errors"] == ["nope: unknown key (allowed: fail_handshake, reply_delay, drop_after, refuse_status, "
                              "upgrade_delay, reject_token)", "fail_handshake: 200 is out of range [0, 100]"]
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/stub/faults") as response:
        assert (await response.json())["faults"]["reply_delay"] == 0.5


async def test_control_endpoint_refuses_a_body_that_is_not_json(servers: Servers) -> None:
    port = await servers.stub("old")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/stub/faults", data=b"{") as response:
            assert response.status == 400
            assert (await response.json())["errors"] == ["the body is not JSON"]


# -- what a gateway client sees --------------------------------------------------------------------


async def new_stack(servers: Servers) -> tuple[Stack, int]:
    """Every user on a new stub, no fallback, no guard; a missing connected fails fast."""
    new_port = await servers.stub("new")
    stack = await servers.stack(
        new_port=new_port, rollout=NO_FALLBACK,
        backends={"new": {"url": f"ws://127.0.0.1:{new_port}/ws/chat", "auth": "message", "handshake_timeout_seconds": 0.2}},
    )
    return stack, new_port


def failures(stack: Stack, backend: str, reason: str) -> float | None:
    labels = {"backend": backend, "reason": reason}
    return stack.gateway.metrics.registry.get_sample_value("ws_gateway_upstream_failures_total", labels)


@pytest.mark.parametrize("style", ["legacy", "message"])
async def test_failed_handshake_on_the_new_style_is_a_connected_that_never_comes(servers: Servers, style: str) -> None:
    stack, port = await new_stack(servers)
    await post_faults(port, {"fail_handshake": 100})
    ws = await open_client(stack, style, make_token())
    assert (await closed(ws))[0] == 1014
    assert failures(stack, "new", "handshake") == 1


async def test_failed_handshake_on_the_old_style_is_a_refused_upgrade(servers: Servers) -> None:
    old_port = await servers.stub("old")
    stack = await servers.stack(old_port=old_port)
    await post_faults(old_port, {"fail_handshake": 100})
    ws = await open_client(stack, "legacy", make_token())
    assert (await closed(ws))[0] == 1014
    assert failures(stack, "old", "connect") == 1


async def test_fail_handshake_fails_only_that_share(servers: Servers) -> None:
    stack, port = await new_stack(servers)
    await post_faults(port, {"fail_handshake": 50})
    served = []
    for _ in range(4):
        ws = await open_client(stack, "message", make_token())
        try:
            served.append(json.loads(await ws.recv())["type"] == "connected")
            await ws.close()
        except websockets.ConnectionClosed:
            served.append(False)
    assert served == [True, False, True, False]


@pytest.mark.parametrize("style", ["legacy", "message"])
async def test_refused_upgrade_gives_the_client_1014(servers: Servers, style: str) -> None:
    stack, port = await new_stack(servers)
    await post_faults(port, {"refuse_status": 503})
    ws = await open_client(stack, style, make_token())
    assert (await closed(ws))[0] == 1014
    assert failures(stack, "new", "connect") == 1


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
    await post_faults(new_port, {"upgrade_delay": 1})
    ws = await open_client(stack, "message", make_token())
    assert (await closed(ws))[0] == 1014


async def test_dropped_session_gives_the_client_1014_after_it_relayed(servers: Servers) -> None:
    stack, port = await new_stack(servers)
    await post_faults(port, {"drop_after": 0.05})
    ws = await open_client(stack, "message", make_token())
    assert json.loads(await ws.recv())["type"] == "connected"
    assert (await closed(ws))[0] == 1014
    assert failures(stack, "new", "dropped") == 1


async def test_slow_replies_still_arrive_in_order(servers: Servers) -> None:
    stack, port = await new_stack(servers)
    await post_faults(port, {"reply_delay": 0.1})
    ws = await open_client(stack, "message", make_token())
    await ws.recv()  # connected: sent at authentication, not a reply
    started = time.monotonic()
    await ws.send("one")
    await ws.send("two")
    assert [await ws.recv(), await ws.recv()] == ["one", "two"]
    # A lower bound only: the injected delay cannot be skipped, however fast the machine.
    assert time.monotonic() - started >= 0.2
    await ws.close()


async def test_healing_a_slow_backend_speeds_up_the_sessions_already_open(servers: Servers) -> None:
    stack, port = await new_stack(servers)
    await post_faults(port, {"reply_delay": 300})
    ws = await open_client(stack, "message", make_token())
    assert json.loads(await ws.recv())["type"] == "connected"
    await ws.send("stuck")  # held by the stub for 300 s, unless the fault heals meanwhile
    status, body = await post_faults(port, {"reply_delay": 0})
    assert (status, body["open_sessions"]) == (200, 1)
    async with asyncio.timeout(TIMEOUT):
        assert await ws.recv() == "stuck"
        await ws.send("quick")
        assert await ws.recv() == "quick"
    await ws.close()


async def test_drop_after_set_live_drops_a_session_already_open(servers: Servers) -> None:
    stack, port = await new_stack(servers)
    ws = await open_client(stack, "message", make_token())
    assert json.loads(await ws.recv())["type"] == "connected"
    await post_faults(port, {"drop_after": 0})  # its upgrade was longer ago than that: dropped at once
    async with asyncio.timeout(TIMEOUT):
        assert (await closed(ws))[0] == 1014
    assert failures(stack, "new", "dropped") == 1


async def test_healing_restores_the_backend(servers: Servers) -> None:
    stack, port = await new_stack(servers)
    await post_faults(port, {"fail_handshake": 100})
    assert (await closed(await open_client(stack, "legacy", make_token())))[0] == 1014
    await post_faults(port, {})
    ws = await open_client(stack, "legacy", make_token())
    await ws.send("back")
    assert await ws.recv() == "back"
    await ws.close()


# -- the command line ------------------------------------------------------------------------------


def test_stub_backend_starts_with_the_faults_its_flags_give(tmp_path: Path) -> None:
    config = tmp_path / "stub.yaml"
    config.write_text(yaml.safe_dump(base_config()))
    flags = ("--fail-handshake", "30", "--reply-delay", "0.5", "--drop-after", "60")
    with Proc("stub-backend", "--style", "new", "--port", "0", "--config", str(config), *flags, cwd=tmp_path,
              env=cli_env(JWT_SECRET=SECRET)) as stub:
        port = stub.wait_for_log("stub backend listening")["port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stub/faults", timeout=TIMEOUT) as response:
            shown = json.load(response)["faults"]
    assert (shown["fail_handshake"], shown["reply_delay"], shown["drop_after"]) == (30, 0.5, 60)


def test_stub_backend_refuses_a_fault_flag_out_of_range(tmp_path: Path) -> None:
    result = run_cli("stub-backend", "--style", "old", "--port", "0", "--fail-handshake", "150", cwd=tmp_path)
    assert result.returncode == 2
    assert "argument --fail-handshake: 150 is out of range [0, 100]" in result.stderr
