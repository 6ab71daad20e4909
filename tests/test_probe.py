"""`ws-gateway probe`: how each wait is judged (pure, one rule per test), then the probe against
a gateway with stub backends on loopback — healthy, with a broken new backend, with a wrong
secret — and the command as QA runs it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import jwt
import pytest
import yaml
from aiohttp import web

from gateway.service.admin import create_admin_app
from gateway.core.config import AuthConfig
from gateway.staging.probe import (
    BAD_TOKEN,
    Check,
    Options,
    Placed,
    ProbeReport,
    Seen,
    forged_token,
    judge_backend,
    judge_connected,
    judge_held,
    judge_refused,
    judge_reply,
    run_probe,
    unreachable,
)
from gateway.service.server import start_site

from .helpers import (
    SECRET,
    TIMEOUT,
    Servers,
    Stack,
    make_token,
    raw_config,
    refused_port,
)

CONNECTED = '{"type":"connected","message":"hi"}'
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJ1c2VyX2lkIjoicWEifQ.c2lnbmF0dXJl"


# -- message style: connected ------------------------------------------------------------------


def test_connected_as_the_first_frame_passes() -> None:
    assert judge_connected(Seen(0.012, frames=(CONNECTED,))) == ("PASS", 'first frame {"type":"connected"}')


def test_another_first_frame_fails_and_is_named_by_its_type_only() -> None:
    echoed = json.dumps({"type": "authenticate", "token": TOKEN})  # what a plain echo server sends back
    result, detail = judge_connected(Seen(0.01, frames=(echoed,)))
    assert (result, detail) == ("FAIL", 'first frame is a {"type":"authenticate"} frame, not connected')


def test_a_first_frame_that_is_not_json_is_named_by_its_size() -> None:
    assert judge_connected(Seen(0.01, frames=(b"\x00\x01",)))[1] == "first frame is a binary frame of 2 bytes, not connected"


def test_a_close_before_connected_fails_and_says_what_the_code_means() -> None:
    seen = Seen(0.2, close_code=1014, close_reason="backend unavailable")
    assert judge_connected(seen) == (
        "FAIL", "closed 1014 'backend unavailable' (bad gateway: the backend is unreachable or failed its handshake) before connected"
    )


def test_nothing_before_the_timeout_fails() -> None:
    assert judge_connected(Seen(10.0)) == ("FAIL", "nothing within 10.0 s before connected")


def test_a_failed_upgrade_fails() -> None:
    assert judge_connected(Seen(0.01, upgrade_error="HTTP 503")) == ("FAIL", "upgrade failed: HTTP 503")


# -- legacy style: held open ------------------------------------------------------------------


def test_a_legacy_socket_open_and_silent_for_the_hold_passes() -> None:
    assert judge_held(Seen(2.0), 2.0) == ("PASS", "open for 2 s, no gateway-made frame")


def test_frames_from_the_backend_itself_are_allowed() -> None:
    result, detail = judge_held(Seen(2.0, frames=('{"type":"welcome"}',)), 2.0)
    assert result == "PASS" and detail.endswith("; 1 frame(s) from the backend")


def test_a_connected_frame_on_the_legacy_style_fails() -> None:
    result, detail = judge_held(Seen(2.0, frames=(CONNECTED,)), 2.0)
    assert result == "FAIL" and detail.startswith('received {"type":"connected"}')


def test_a_close_during_the_hold_fails() -> None:
    seen = Seen(0.25, close_code=1008, close_reason="token-in-URL auth is no longer supported")
    assert judge_held(seen, 2.0) == (
        "FAIL", "closed 1008 'token-in-URL auth is no longer supported' (authentication refused) after 0.2 s, before 2 s"
    )


def test_a_connection_lost_during_the_hold_fails() -> None:
    assert judge_held(Seen(1.0, lost=True), 2.0) == ("FAIL", "connection lost without a close frame after 1.0 s, before 2 s")


# -- --send: a reply ---------------------------------------------------------------------------


def test_any_frame_back_is_a_reply() -> None:
    assert judge_reply(Seen(0.003, frames=("hello",))) == ("PASS", "a text frame of 5 characters came back")


def test_no_reply_in_time_fails() -> None:
    assert judge_reply(Seen(5.0)) == ("FAIL", "nothing within 5.0 s before a reply")


def test_no_session_to_send_on_is_skipped() -> None:
    assert judge_reply(None) == ("SKIP", "no open session to send on")


# -- a bad token: refused -----------------------------------------------------------------------


def test_a_bad_token_closed_with_1008_passes() -> None:
    seen = Seen(0.004, close_code=1008, close_reason="invalid token signature")
    assert judge_refused(seen, TOKEN) == ("PASS", "closed 1008 'invalid token signature' (authentication refused)")


def test_a_bad_token_that_gets_frames_or_another_code_fails() -> None:
    assert judge_refused(Seen(0.01, frames=("x",), close_code=1008), TOKEN)[0] == "FAIL"
    assert judge_refused(Seen(0.01, close_code=1014), TOKEN)[0] == "FAIL"
    assert judge_refused(Seen(10.0), TOKEN)[1] == "expected a close with 1008 and no frame; got 0 frame(s), then nothing within 10.0 s"


def test_a_bad_token_refused_at_the_upgrade_fails() -> None:
    result, detail = judge_refused(Seen(0.01, upgrade_error="HTTP 401"), TOKEN)
    assert result == "FAIL" and detail.endswith("(expected the socket accepted, then closed with 1008)")


def test_a_bad_token_echoed_in_the_close_reason_fails() -> None:
    assert judge_refused(Seen(0.01, close_code=1008, close_reason=f"bad {TOKEN}"), TOKEN) == (
        "FAIL", "the close reason contains the token"
    )


def test_the_forged_token_has_the_configs_claims_and_another_signature() -> None:
    forged = forged_token(AuthConfig(secret=SECRET, user_id_claim="sub"))
    assert jwt.decode(forged, options={"verify_signature": False})["sub"] == "probe-bad-token"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, SECRET, algorithms=["HS256"])


# -- the report ----------------------------------------------------------------------------------


def test_report_prints_one_line_per_check_with_its_time_and_ends_with_the_counts() -> None:
    report = ProbeReport("ws://gw/ws/chat", [
        Check("qa-1", "message", "connected", "PASS", 12.4, 'first frame {"type":"connected"}'),
        Check("qa-1", "legacy", "held open", "FAIL", 250.0, "closed 1014 after 0.2 s, before 2 s"),
        Check("qa-1", "legacy", "reply", "SKIP", None, "no open session to send on"),
    ])
    assert report.text().splitlines() == [
        "probe ws://gw/ws/chat",
        "",
        'PASS  qa-1, message style: connected     12 ms  first frame {"type":"connected"}',
        "FAIL  qa-1, legacy style: held open     250 ms  closed 1014 after 0.2 s, before 2 s",
        "SKIP  qa-1, legacy style: reply                 no open session to send on",
        "",
        "1 passed, 1 failed, 1 skipped",
    ]
    assert not report.passed
    assert report.as_dict()["checks"][1] == {
        "name": "qa-1, legacy style: held open", "who": "qa-1", "style": "legacy", "what": "held open",
        "result": "FAIL", "ms": 250.0, "detail": "closed 1014 after 0.2 s, before 2 s", "backend": None, "why": None,
    }


def test_report_with_the_admin_port_names_each_sessions_backend_and_why() -> None:
    report = ProbeReport("ws://gw/ws/chat", [
        Check("qa-1", "message", "connected", "PASS", 12.4, 'first frame {"type":"connected"}', "new", "forced"),
        Check("qa-1", "legacy", "held open", "PASS", 200.0, "open for 0.2 s, no gateway-made frame"),
        Check(BAD_TOKEN, "legacy", "refused", "PASS", 3.0, "closed 1008"),
    ], located=True)
    assert report.text().splitlines()[2:5] == [
        'PASS  qa-1, message style: connected       12 ms  backend new (forced)  first frame {"type":"connected"}',
        "PASS  qa-1, legacy style: held open       200 ms  backend ?             open for 0.2 s, no gateway-made frame",
        "PASS  bad token, legacy style: refused      3 ms                        closed 1008",
    ]
    assert report.as_dict()["checks"][0]["backend"] == "new" and report.as_dict()["checks"][0]["why"] == "forced"


# -- --expect-backend -----------------------------------------------------------------------------

PASSED = ("PASS", 'first frame {"type":"connected"}')


def test_a_session_on_the_expected_backend_keeps_its_verdict() -> None:
    assert judge_backend(PASSED, Placed("new", "route"), "new") == PASSED


def test_a_session_the_guard_moved_fails_the_expectation_and_says_why() -> None:
    assert judge_backend(PASSED, Placed("old", "guard"), "new") == ("FAIL", "landed on backend old (guard), expected new")


def test_a_session_nobody_could_place_fails_the_expectation_with_the_problem() -> None:
    verdict = judge_backend(PASSED, Placed(problem="admin port: connection refused to 127.0.0.1:9"), "old")
    assert verdict == ("FAIL", "expected backend old, but where it landed is unknown: admin port: connection refused to 127.0.0.1:9")


def test_without_an_expectation_or_after_a_failure_the_backend_changes_nothing() -> None:
    assert judge_backend(PASSED, Placed("old", "guard"), None) == PASSED
    assert judge_backend(("FAIL", "closed 1014"), Placed(problem="gone"), "new") == ("FAIL", "closed 1014")


# -- an unreachable gateway, in the OS's words ---------------------------------------------------


def test_a_refused_connection_names_host_and_port() -> None:
    assert unreachable("127.0.0.1", 8080, ConnectionRefusedError(111, "Connect call failed")) == "connection refused to 127.0.0.1:8080"
    assert unreachable("::1", 8080, ConnectionRefusedError(111, "x")) == "connection refused to [::1]:8080"


def test_an_unknown_host_is_named_with_the_resolvers_message() -> None:
    error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert unreachable("chat.staging.example", 443, error) == "unknown host chat.staging.example (Name or service not known)"


def test_another_connect_error_gives_the_os_message() -> None:
    assert unreachable("10.0.0.9", 80, OSError(113, "Connect call failed")) == f"cannot connect to 10.0.0.9:80: {os.strerror(113)}"


# -- against a gateway with stub backends ------------------------------------------------------------

# The demo's stack with a QA user pinned to each backend. Fallback off: with it on, a broken new
# backend is hidden from the apps (and so from the probe), which is its job.
FORCED = {"force_new": ["qa-new-1"], "force_old": ["qa-old-1"], "fallback_to_old": False, "guard": {"enabled": False}}
QUICK = Options(hold=0.2, timeout=TIMEOUT, reply_timeout=TIMEOUT)


async def demo_stack(servers: Servers) -> tuple[Stack, int]:
    """A gateway and both stubs; the new stub's port, to break it. A missing connected fails fast."""
    new_port = await servers.stub("new")
    new = {"url": f"ws://127.0.0.1:{new_port}/ws/chat", "auth": "message", "handshake_timeout_seconds": 0.2}
    return await servers.stack(new_port=new_port, rollout=FORCED, backends={"new": new}), new_port


def qa_tokens(secret: str = SECRET) -> dict[str, str]:
    return {user: make_token(user, secret=secret) for user in ("qa-old-1", "qa-new-1")}


async def break_backend(port: int) -> None:
    url = f"http://127.0.0.1:{port}/stub/faults"
    async with aiohttp.ClientSession() as http, http.post(url, json={"fail_handshake": 100}) as response:
        assert response.status == 200


def results(report: ProbeReport) -> list[tuple[str, str]]:
    return [(check.name, check.result) for check in report.checks]


async def test_healthy_gateway_passes_every_check_in_both_styles(servers: Servers) -> None:
    stack, _ = await demo_stack(servers)
    report = await run_probe(stack.url(), qa_tokens(), forged_token(AuthConfig(secret=SECRET)), QUICK)
    assert results(report) == [
        ("qa-old-1, message style: connected", "PASS"),
        ("qa-old-1, legacy style: held open", "PASS"),
        ("qa-new-1, message style: connected", "PASS"),
        ("qa-new-1, legacy style: held open", "PASS"),
        ("bad token, legacy style: refused", "PASS"),
        ("bad token, message style: refused", "PASS"),
    ], report.text()


async def test_send_expects_a_reply_in_every_session(servers: Servers) -> None:
    stack, _ = await demo_stack(servers)
    options = Options(hold=0.2, send="ping from QA", timeout=TIMEOUT, reply_timeout=TIMEOUT)
    report = await run_probe(stack.url(), qa_tokens(), forged_token(AuthConfig(secret=SECRET)), options)
    replies = [check for check in report.checks if check.what == "reply"]
    assert [(c.who, c.style, c.result) for c in replies] == [
        ("qa-old-1", "message", "PASS"), ("qa-old-1", "legacy", "PASS"), ("qa-new-1", "message", "PASS"), ("qa-new-1", "legacy", "PASS"),
    ], report.text()


async def test_broken_new_backend_fails_the_checks_of_the_user_pinned_there(servers: Servers) -> None:
    stack, new_port = await demo_stack(servers)
    await break_backend(new_port)
    options = Options(send="hi", timeout=TIMEOUT, reply_timeout=TIMEOUT)
    report = await run_probe(stack.url(), qa_tokens(), forged_token(AuthConfig(secret=SECRET)), options)
    failed = {check.name: check.detail for check in report.checks if check.result == "FAIL"}
    assert list(failed) == ["qa-new-1, message style: connected", "qa-new-1, legacy style: held open"], report.text()
    assert all(detail.startswith("closed 1014") for detail in failed.values())
    skipped = [check.name for check in report.checks if check.result == "SKIP"]
    assert skipped == ["qa-new-1, message style: reply", "qa-new-1, legacy style: reply"]


async def test_wrong_secret_fails_every_session_with_the_1008_seen(servers: Servers) -> None:
    stack, _ = await demo_stack(servers)
    wrong = "not-the-gateways-secret-0123456789abcdef"
    report = await run_probe(stack.url(), qa_tokens(wrong), forged_token(AuthConfig(secret=wrong)), QUICK)
    failed = [check for check in report.checks if check.result == "FAIL"]
    assert [check.who for check in failed] == ["qa-old-1", "qa-old-1", "qa-new-1", "qa-new-1"], report.text()
    assert all("closed 1008 'invalid token signature'" in check.detail for check in failed)


async def test_against_the_old_backend_directly_only_the_message_style_fails(servers: Servers) -> None:
    old_port = await servers.stub("old")
    url = f"ws://127.0.0.1:{old_port}/ws/chat"
    report = await run_probe(url, qa_tokens(), forged_token(AuthConfig(secret=SECRET)), QUICK)
    assert [c.name for c in report.checks if c.result == "FAIL"] == [
        "qa-old-1, message style: connected", "qa-new-1, message style: connected"
    ], report.text()


async def test_unreachable_gateway_fails_every_check_at_the_upgrade() -> None:
    async with refused_port() as port:
        report = await run_probe(f"ws://127.0.0.1:{port}/ws/chat", qa_tokens(), forged_token(AuthConfig(secret=SECRET)), QUICK)
    assert [c.result for c in report.checks] == ["FAIL"] * 6
    assert all(c.detail.startswith(f"upgrade failed: connection refused to 127.0.0.1:{port}") for c in report.checks)


# -- which backend served each session: the admin port, asked while the probe holds it ----------------

# Pinned users as above, the guard on but never tripped by chance (it trips only when a test says so).
GUARDED = {**FORCED, "guard": {"enabled": True, "min_samples": 1000}}
HELD = Options(hold=0.2, timeout=TIMEOUT, reply_timeout=TIMEOUT)


@pytest.fixture
async def guarded(servers: Servers) -> AsyncIterator[tuple[Stack, str]]:
    """A gateway with a QA user pinned to each backend, and its admin URL."""
    stack = await servers.stack(rollout=GUARDED)
    runner, port = await start_site(create_admin_app(stack.gateway), "127.0.0.1", 0)
    try:
        yield stack, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def placements(report: ProbeReport) -> list[tuple[str, str | None, str | None, str]]:
    return [(check.name, check.backend, check.why, check.result) for check in report.checks]


async def test_each_session_is_placed_on_its_backend_with_the_reason(guarded) -> None:
    stack, admin = guarded
    tokens = {**qa_tokens(), "someone": make_token("someone")}  # not pinned: the bucket decides (new_percent 0)
    options = replace(HELD, admin=admin, send="hi")
    report = await run_probe(stack.url(), tokens, forged_token(AuthConfig(secret=SECRET)), options)
    assert placements(report) == [
        ("qa-old-1, message style: connected", "old", "forced", "PASS"),
        ("qa-old-1, message style: reply", "old", "forced", "PASS"),
        ("qa-old-1, legacy style: held open", "old", "forced", "PASS"),
        ("qa-old-1, legacy style: reply", "old", "forced", "PASS"),
        ("qa-new-1, message style: connected", "new", "forced", "PASS"),
        ("qa-new-1, message style: reply", "new", "forced", "PASS"),
        ("qa-new-1, legacy style: held open", "new", "forced", "PASS"),
        ("qa-new-1, legacy style: reply", "new", "forced", "PASS"),
        ("someone, message style: connected", "old", "route", "PASS"),
        ("someone, message style: reply", "old", "route", "PASS"),
        ("someone, legacy style: held open", "old", "route", "PASS"),
        ("someone, legacy style: reply", "old", "route", "PASS"),
        ("bad token, legacy style: refused", None, None, "PASS"),
        ("bad token, message style: refused", None, None, "PASS"),
    ], report.text()


async def test_a_user_pinned_new_that_the_guard_moved_fails_the_expected_backend(guarded) -> None:
    stack, admin = guarded
    stack.gateway.guard.trip(stack.gateway.clock(), "tripped by the test")
    options = replace(HELD, admin=admin, expect_backend="new")
    report = await run_probe(stack.url(), {"qa-new-1": make_token("qa-new-1")}, forged_token(AuthConfig(secret=SECRET)), options)
    assert placements(report)[:2] == [
        ("qa-new-1, message style: connected", "old", "guard", "FAIL"),
        ("qa-new-1, legacy style: held open", "old", "guard", "FAIL"),
    ], report.text()
    assert {check.detail for check in report.checks[:2]} == {"landed on backend old (guard), expected new"}


async def test_a_fallback_is_named_as_the_reason(servers: Servers) -> None:
    new_port = await servers.stub("new")
    await break_backend(new_port)
    new = {"url": f"ws://127.0.0.1:{new_port}/ws/chat", "auth": "message", "handshake_timeout_seconds": 0.2}
    stack = await servers.stack(new_port=new_port, rollout={**FORCED, "fallback_to_old": True}, backends={"new": new})
    runner, port = await start_site(create_admin_app(stack.gateway), "127.0.0.1", 0)
    servers.closing(runner.cleanup)
    options = replace(HELD, admin=f"http://127.0.0.1:{port}")
    report = await run_probe(stack.url(), {"qa-new-1": make_token("qa-new-1")}, forged_token(AuthConfig(secret=SECRET)), options)
    assert placements(report)[:2] == [
        ("qa-new-1, message style: connected", "old", "fallback", "PASS"),
        ("qa-new-1, legacy style: held open", "old", "fallback", "PASS"),
    ], report.text()


async def test_an_admin_port_that_does_not_answer_leaves_the_backend_unknown_and_fails_an_expectation(servers: Servers) -> None:
    stack, _ = await demo_stack(servers)
    async with refused_port() as port:
        options = replace(HELD, admin=f"http://127.0.0.1:{port}", expect_backend="old")
        report = await run_probe(stack.url(), {"qa-old-1": make_token("qa-old-1")}, forged_token(AuthConfig(secret=SECRET)), options)
    first = report.checks[0]
    assert (first.result, first.backend) == ("FAIL", None)
    assert first.detail == f"expected backend old, but where it landed is unknown: admin port: connection refused to 127.0.0.1:{port}"


async def test_an_admin_port_without_sessions_is_named_as_such(servers: Servers) -> None:
    stack, _ = await demo_stack(servers)
    runner, port = await start_site(web.Application(), "127.0.0.1", 0)  # answers 404 to everything
    servers.closing(runner.cleanup)
    options = replace(HELD, admin=f"http://127.0.0.1:{port}", expect_backend="old")
    report = await run_probe(stack.url(), {"qa-old-1": make_token("qa-old-1")}, forged_token(AuthConfig(secret=SECRET)), options)
    assert report.checks[0].detail.endswith("unknown: the admin port does not answer /sessions (a gateway older than the probe?)")


async def test_admin_sessions_answers_404_for_a_request_id_it_does_not_hold(guarded) -> None:
    _, admin = guarded
    async with aiohttp.ClientSession() as http, http.get(f"{admin}/sessions/probe-unknown") as response:
        assert response.status == 404
        assert (await response.json())["error"] == "no open session with X-Request-ID 'probe-unknown' in this process"


# -- the command --------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=3 * TIMEOUT
    )


async def probe_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command in a process, while this test's event loop keeps serving the gateway."""
    return await asyncio.to_thread(run_cli, "probe", *args, cwd=cwd, env=env)


QA_USERS = ("--user", "qa-old-1", "--user", "qa-new-1")


async def test_command_all_green_prints_each_check_and_never_a_token_or_the_secret(servers: Servers, tmp_path: Path) -> None:
    stack, _ = await demo_stack(servers)
    result = await probe_cli(stack.url(), "--secret", SECRET, *QA_USERS, "--hold", "0.2", "--send", "hi", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"probe {stack.url()}"
    assert [line.split()[0] for line in lines[2:-2]] == ["PASS"] * 10
    assert lines[-1] == "10 passed, 0 failed, 0 skipped"
    assert "eyJ" not in result.stdout + result.stderr and SECRET not in result.stdout + result.stderr


async def test_command_json_is_one_document_for_ci(servers: Servers, tmp_path: Path) -> None:
    stack, _ = await demo_stack(servers)
    result = await probe_cli(stack.url(), "--secret", SECRET, *QA_USERS, "--hold", "0.2", "--json", cwd=tmp_path)
    data = json.loads(result.stdout)
    assert (result.returncode, data["passed"], data["counts"]) == (0, True, {"PASS": 6, "FAIL": 0, "SKIP": 0})
    assert {check["what"] for check in data["checks"]} == {"connected", "held open", "refused"}
    assert "eyJ" not in result.stdout


async def test_command_exits_1_naming_the_checks_a_broken_new_backend_fails(servers: Servers, tmp_path: Path) -> None:
    stack, new_port = await demo_stack(servers)
    await break_backend(new_port)
    result = await probe_cli(stack.url(), "--secret", SECRET, *QA_USERS, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 2
    assert "qa-new-1, message style: connected" in failed[0] and "closed 1014" in failed[0]
    assert "qa-new-1, legacy style: held open" in failed[1] and "closed 1014" in failed[1]


async def test_command_with_a_wrong_secret_exits_1_with_the_1008_seen(servers: Servers, tmp_path: Path) -> None:
    stack, _ = await demo_stack(servers)
    wrong = "not-the-gateways-secret-0123456789abcdef"
    result = await probe_cli(stack.url(), "--secret", wrong, *QA_USERS, "--hold", "0.2", cwd=tmp_path)
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 4 and all("closed 1008 'invalid token signature' (authentication refused)" in line for line in failed)
    assert result.stdout.splitlines()[-1] == "2 passed, 4 failed, 0 skipped"
    assert wrong not in result.stdout + result.stderr


async def test_command_expect_backend_exits_1_for_a_user_the_guard_moved(guarded, tmp_path: Path) -> None:
    stack, admin = guarded
    stack.gateway.guard.trip(stack.gateway.clock(), "tripped by the test")
    args = ("--secret", SECRET, "--user", "qa-new-1", "--hold", "0.2", "--admin", admin, "--expect-backend", "new")
    result = await probe_cli(stack.url(), *args, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 2 and all("backend old (guard)" in line and "landed on backend old (guard), expected new" in line for line in failed)
    data = json.loads((await probe_cli(stack.url(), *args, "--json", cwd=tmp_path)).stdout)
    assert [(c["backend"], c["why"], c["result"]) for c in data["checks"][:2]] == [("old", "guard", "FAIL")] * 2


async def test_command_expect_backend_passes_a_user_that_landed_there(guarded, tmp_path: Path) -> None:
    stack, admin = guarded
    args = ("--secret", SECRET, "--user", "qa-new-1", "--hold", "0.2", "--admin", admin, "--expect-backend", "new", "--json")
    result = await probe_cli(stack.url(), *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert [(c["backend"], c["why"], c["result"]) for c in data["checks"][:2]] == [("new", "forced", "PASS")] * 2


async def test_command_says_connection_refused_to_host_and_port(tmp_path: Path) -> None:
    async with refused_port() as port:
        result = await probe_cli(f"ws://127.0.0.1:{port}/ws/chat", "--secret", SECRET, "--user", "qa", "--hold", "0.2", cwd=tmp_path)
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 4 and all(f"  upgrade failed: connection refused to 127.0.0.1:{port}" in line for line in failed)
    assert "ClientConnectorError" not in result.stdout + result.stderr


async def test_command_mints_with_the_configs_auth_section(servers: Servers, tmp_path: Path) -> None:
    stack, _ = await demo_stack(servers)
    config = tmp_path / "staging.yaml"
    config.write_text(yaml.safe_dump(raw_config(auth={"secret": "${JWT_SECRET}"})))
    env = {**os.environ, "JWT_SECRET": SECRET}
    result = await probe_cli(stack.url(), "--config", str(config), "--user", "qa-new-1", "--hold", "0.2", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_command_probes_with_a_given_token(servers: Servers, tmp_path: Path) -> None:
    stack, _ = await demo_stack(servers)
    token = make_token("qa-old-1")
    result = await probe_cli(stack.url(), "--token", token, "--hold", "0.2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "given token, message style: connected" in result.stdout
    assert token not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--token", "t", "--user", "qa"), "error: --user mints a token; --token brings its own: give one or the other\n"),
        (("--secret", "s"), "error: give --token, or --user (once per user) with --config or --secret to mint tokens\n"),
        (
            ("--token", "t", "--expect-backend", "new"),
            "error: --expect-backend asks the admin port where each session landed: give --admin URL too\n",
        ),
        (
            ("--token", "t", "--admin", "127.0.0.1:9090"),
            "error: --admin '127.0.0.1:9090' is not an http:// or https:// URL of the admin port, e.g. http://127.0.0.1:9090\n",
        ),
    ],
    ids=["token-and-user", "no-user", "expect-without-admin", "admin-not-a-url"],
)
def test_command_refuses_token_sources_that_do_not_fit_together(tmp_path: Path, args: tuple[str, ...], error: str) -> None:
    result = run_cli("probe", "ws://127.0.0.1:1/ws/chat", *args, cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", error)


def test_command_takes_one_token_source_only(tmp_path: Path) -> None:
    result = run_cli("probe", "ws://127.0.0.1:1/ws/chat", "--token", "t", "--secret", "s", cwd=tmp_path)
    assert result.returncode == 2 and "argument --secret: not allowed with argument --token" in result.stderr


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/ws/chat", "127.0.0.1:1", "ws:///ws/chat"])
def test_command_refuses_a_url_that_is_not_websocket(tmp_path: Path, url: str) -> None:
    result = run_cli("probe", url, "--secret", SECRET, "--user", "qa", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"error: {url!r} is not a ws:// or wss:// URL\n"
