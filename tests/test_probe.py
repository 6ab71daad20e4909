"""`ws-gateway probe`: how one session's transcript is judged (pure, one rule per test), and
the probe against a real gateway with stub backends, healthy and broken."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
import yaml

from gateway.config import Config
from gateway.probe import ProbeReport, Transcript, judge, judge_bad_token, pick_user, run_probe

from .helpers import SECRET, TIMEOUT, Servers, Stack, make_config, raw_config, refused_port

CONNECTED = '{"type":"connected","message":"hi"}'


def info(style: str = "new", user: str = "qa-new-1") -> str:
    return json.dumps({"type": "stub.info", "style": style, "user_id": user})


GOOD_CURRENT = Transcript(upgrade_seconds=0.01, frames=(CONNECTED, info()), reply_seconds=0.002, close_code=1000)
GOOD_LEGACY = replace(GOOD_CURRENT, frames=(info(),))


# -- judging one session ------------------------------------------------------------------------------


def test_current_app_that_gets_connected_then_its_reply_passes() -> None:
    check = judge("message", "new", "qa-new-1", GOOD_CURRENT)
    assert (check.result, check.name) == ("PASS", "current app (authenticate) -> new")
    assert check.detail == "upgrade 10 ms, reply 2 ms, stub new backend saw qa-new-1, closed 1000"
    assert (check.upgrade_ms, check.reply_ms) == (10.0, 2.0)


def test_legacy_app_that_gets_its_reply_passes() -> None:
    assert judge("legacy", "new", "qa-new-1", GOOD_LEGACY).result == "PASS"


def test_failed_upgrade_fails() -> None:
    check = judge("legacy", "old", "u", Transcript(upgrade_error="HTTP 503"))
    assert (check.result, check.detail) == ("FAIL", "upgrade failed: HTTP 503")


def test_current_app_whose_first_frame_is_not_connected_fails() -> None:
    check = judge("message", "new", "qa-new-1", replace(GOOD_CURRENT, frames=(info(),)))
    assert check.result == "FAIL" and check.detail.startswith('first frame is not {"type":"connected"}')


def test_legacy_app_that_sees_a_connected_frame_fails() -> None:
    check = judge("legacy", "new", "qa-new-1", replace(GOOD_LEGACY, frames=(CONNECTED, info())))
    assert check.result == "FAIL" and "legacy app received a connected frame" in check.detail


def test_close_instead_of_a_reply_fails_and_says_what_the_code_means() -> None:
    closed = Transcript(upgrade_seconds=0.01, close_code=1014, close_reason="backend unavailable", closed_first=True)
    check = judge("legacy", "new", "u", closed)
    assert check.result == "FAIL"
    assert check.detail == "closed 1014 'backend unavailable' (bad gateway: the backend is unreachable or failed its handshake) before a reply"


def test_no_reply_in_time_fails() -> None:
    check = judge("message", "old", "u", Transcript(upgrade_seconds=0.01, frames=(CONNECTED,), timed_out="waiting for a reply"))
    assert (check.result, check.detail) == ("FAIL", "no answer within the timeout (waiting for a reply)")


def test_served_by_the_other_backend_fails_and_points_at_the_guard() -> None:
    check = judge("message", "new", "qa-new-1", replace(GOOD_CURRENT, frames=(CONNECTED, info(style="old"))))
    assert check.result == "FAIL" and check.detail.startswith("served by the old backend, expected new")


def test_backend_seeing_another_user_fails() -> None:
    check = judge("legacy", "new", "qa-new-1", replace(GOOD_LEGACY, frames=(info(user="someone"),)))
    assert check.result == "FAIL" and "saw user 'someone'" in check.detail


def test_a_real_backends_reply_passes_without_identifying_it() -> None:
    check = judge("legacy", "old", "u", replace(GOOD_LEGACY, frames=("hello from the chat",)))
    assert check.result == "PASS" and "not a stub" in check.detail


def test_close_answered_with_another_code_fails() -> None:
    check = judge("legacy", "new", "qa-new-1", replace(GOOD_LEGACY, close_code=1011))
    assert check.result == "FAIL" and check.detail.endswith("then closed 1011 (backend error)")


def test_gateway_closing_right_after_the_reply_fails() -> None:
    check = judge("legacy", "new", "qa-new-1", replace(GOOD_LEGACY, close_code=1012, closed_first=True))
    assert check.result == "FAIL"


def test_legacy_app_refused_with_1008_passes_when_legacy_auth_is_denied() -> None:
    refused = Transcript(upgrade_seconds=0.01, close_code=1008, close_reason="token-in-URL auth is no longer supported")
    assert judge("legacy", "old", "u", refused, legacy_denied=True).result == "PASS"
    assert judge("legacy", "old", "u", GOOD_LEGACY, legacy_denied=True).result == "FAIL"


def test_bad_token_closed_with_1008_passes() -> None:
    check = judge_bad_token("message", "eyJ.bad.tok", Transcript(close_code=1008, close_reason="invalid token signature"))
    assert (check.result, check.detail) == ("PASS", "closed 1008 'invalid token signature' (authentication refused)")


def test_bad_token_that_gets_frames_or_another_code_fails() -> None:
    assert judge_bad_token("legacy", "eyJ.bad.tok", Transcript(frames=("x",), close_code=1008)).result == "FAIL"
    assert judge_bad_token("legacy", "eyJ.bad.tok", Transcript(close_code=1014)).result == "FAIL"
    assert judge_bad_token("legacy", "eyJ.bad.tok", Transcript(upgrade_error="HTTP 401")).result == "FAIL"


def test_bad_token_echoed_in_the_close_reason_fails() -> None:
    check = judge_bad_token("legacy", "eyJ.bad.tok", Transcript(close_code=1008, close_reason="bad eyJ.bad.tok"))
    assert (check.result, check.detail) == ("FAIL", "the close reason contains the token")


# -- which users ------------------------------------------------------------------------------------


def test_forced_users_are_probed_first() -> None:
    config = make_config(rollout={"new_percent": 10, "force_new": ["qa-new-2", "qa-new-1"], "force_old": ["qa-old-1"]})
    assert pick_user(config, "new").user_id == "qa-new-1"
    assert pick_user(config, "old").why == "forced by rollout.force_old"


def test_without_forced_users_a_bucketed_user_is_found() -> None:
    user = pick_user(make_config(rollout={"new_percent": 5}), "new")
    assert user.user_id is not None and user.user_id.startswith("probe-") and user.why.startswith("bucket ")


def test_nobody_routes_new_at_zero_percent() -> None:
    user = pick_user(make_config(rollout={"new_percent": 0}), "new")
    assert user.user_id is None and "no user routes here" in user.why


# -- against a real gateway ----------------------------------------------------------------------------


FORCED = {"force_new": ["qa-new-1"], "force_old": ["qa-old-1"], "fallback_to_old": False, "guard": {"enabled": False}}


async def probed(stack: Stack, users: dict[str, str | None] | None = None) -> ProbeReport:
    return await run_probe(stack.gateway.config, stack.url(), users=users, timeout=TIMEOUT)


async def set_faults(port: int, faults: dict) -> None:
    async with aiohttp.ClientSession() as http, http.post(f"http://127.0.0.1:{port}/stub/faults", json=faults) as r:
        assert r.status == 200


async def test_healthy_gateway_passes_every_check(servers: Servers) -> None:
    stack = await servers.stack(rollout=FORCED)
    report = await probed(stack)
    assert [(c.name, c.result) for c in report.checks] == [
        ("legacy app (token in URL) -> old", "PASS"),
        ("current app (authenticate) -> old", "PASS"),
        ("legacy app (token in URL) -> new", "PASS"),
        ("current app (authenticate) -> new", "PASS"),
        ("bad token, legacy app (token in URL)", "PASS"),
        ("bad token, current app (authenticate)", "PASS"),
    ], report.text()
    assert report.passed
    assert "stub new backend saw qa-new-1" in report.checks[3].detail


async def test_broken_new_backend_fails_only_its_paths(servers: Servers) -> None:
    new_port = await servers.stub("new")
    stack = await servers.stack(new_port=new_port, rollout=FORCED)
    await set_faults(new_port, {"refuse_status": 503})
    report = await probed(stack)
    results = {c.name: c for c in report.checks}
    assert not report.passed
    for app in ("legacy app (token in URL)", "current app (authenticate)"):
        assert results[f"{app} -> old"].result == "PASS"
        assert results[f"{app} -> new"].result == "FAIL"
        assert "closed 1014" in results[f"{app} -> new"].detail


async def test_fallback_to_old_is_caught_with_stub_backends(servers: Servers) -> None:
    new_port = await servers.stub("new")
    stack = await servers.stack(new_port=new_port, rollout={**FORCED, "fallback_to_old": True})
    await set_faults(new_port, {"refuse_status": 503})
    report = await probed(stack)
    new_checks = [c for c in report.checks if c.backend == "new"]
    assert all(c.result == "FAIL" and c.detail.startswith("served by the old backend") for c in new_checks)


async def test_users_given_on_the_command_line_are_used(servers: Servers) -> None:
    stack = await servers.stack(rollout=FORCED)
    report = await probed(stack, users={"old": "someone-else", "new": None})
    assert report.users[0].user_id == "someone-else" and report.users[1].user_id == "qa-new-1"
    assert report.passed


async def test_denied_legacy_auth_is_expected(servers: Servers) -> None:
    stack = await servers.stack(rollout=FORCED, auth={"legacy": "deny"})
    report = await probed(stack)
    assert report.passed, report.text()
    assert "refused as configured" in report.checks[0].detail


async def test_backend_nobody_routes_to_is_skipped(servers: Servers) -> None:
    stack = await servers.stack(rollout={"new_percent": 0})
    report = await probed(stack)
    assert [c.result for c in report.checks if c.backend == "new"] == ["SKIP", "SKIP"]
    assert report.passed
    assert report.text().endswith("4 passed, 0 failed, 2 skipped\n")


async def test_unreachable_gateway_fails_every_check() -> None:
    async with refused_port() as port:
        config: Config = make_config(rollout=FORCED)
        report = await run_probe(config, f"ws://127.0.0.1:{port}/ws/chat", timeout=TIMEOUT)
    assert [c.result for c in report.checks] == ["FAIL"] * 6
    assert report.checks[0].detail.startswith("upgrade failed: ")


# -- the command --------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, capture_output=True, text=True, timeout=3 * TIMEOUT)


async def test_command_prints_the_checks_and_never_a_token(servers: Servers, tmp_path: Path) -> None:
    stack = await servers.stack(rollout=FORCED)
    config_file = tmp_path / "staging.yaml"
    config_file.write_text(yaml.safe_dump(raw_config(rollout=FORCED)))
    text = await asyncio.to_thread(run_cli, "probe", stack.url(), "--config", str(config_file), cwd=tmp_path)
    assert text.returncode == 0, text.stdout + text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"probe {stack.url()}"
    assert lines[1] == "  old backend: user qa-old-1 (forced by rollout.force_old)"
    assert lines[-1] == "6 passed, 0 failed, 0 skipped"
    assert "eyJ" not in text.stdout + text.stderr and SECRET not in text.stdout + text.stderr
    as_json = await asyncio.to_thread(run_cli, "probe", stack.url(), "--config", str(config_file), "--json", cwd=tmp_path)
    data = json.loads(as_json.stdout)
    assert data["passed"] is True and len(data["checks"]) == 6 and "eyJ" not in as_json.stdout


async def test_command_exits_1_when_a_check_fails(tmp_path: Path) -> None:
    config_file = tmp_path / "staging.yaml"
    config_file.write_text(yaml.safe_dump(raw_config(rollout=FORCED)))
    async with refused_port() as port:
        url = f"ws://127.0.0.1:{port}/ws/chat"
        result = await asyncio.to_thread(run_cli, "probe", url, "--config", str(config_file), "--timeout", "2", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout.splitlines()[-1] == "0 passed, 6 failed, 0 skipped"


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/ws/chat", "127.0.0.1:1", "ws:///ws/chat"])
def test_command_refuses_a_url_that_is_not_websocket(tmp_path: Path, url: str) -> None:
    config_file = tmp_path / "staging.yaml"
    config_file.write_text(yaml.safe_dump(raw_config()))
    result = run_cli("probe", url, "--config", str(config_file), cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"error: {url!r} is not a ws:// or wss:// URL\n"
