"""Every `ws-gateway` command, run the way ops run it: a real process, a real config file.

Each test starts `python -m gateway ...` in a temporary directory (so no config from the
checkout leaks in) and reads its output through pipes with a deadline. Long-running
commands (`serve`, `stub-backend`, `demo`) listen on port 0 and announce the port they
got; the tests wait for that line, never for a fixed time, and kill whatever is still
running when a test ends.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gateway.cli import build_parser
from gateway.service.configfile import load_config
from gateway.core.routing import choose_backend

TIMEOUT = 10.0  # the one bound on every wait in this file
SECRET = "cli-test-secret-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
COMMANDS = ("serve", "demo", "check-config", "route", "token", "report", "probe", "drill", "stub-backend")


# -- building blocks ---------------------------------------------------------------------


def base_config(old_port: int = 1, new_port: int = 2) -> dict[str, Any]:
    """A valid config whose secret comes from $JWT_SECRET, as in production."""
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "path": "/ws/chat",
        "auth": {"algorithms": ["HS256"], "secret": "${JWT_SECRET}"},
        "backends": {
            "old": {"url": f"ws://127.0.0.1:{old_port}/ws/chat", "auth": "query"},
            "new": {"url": f"ws://127.0.0.1:{new_port}/ws/chat", "auth": "message"},
        },
        "rollout": {"new_percent": 50, "salt": "cli-test"},
        "limits": {"ping_interval_seconds": 0},
    }


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JWT_SECRET", "GATEWAY_CONFIG")}
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        env=cli_env(JWT_SECRET=SECRET) if env is None else env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def make_token(user_id: str, ttl: int = 300) -> str:
    now = int(time.time())
    return jwt.encode({"user_id": user_id, "iat": now, "exp": now + ttl}, SECRET, algorithm="HS256")


def assert_clean_failure(result: subprocess.CompletedProcess[str], code: int = 2) -> list[str]:
    """Exit `code`, nothing on stdout, only `error: ...` lines on stderr; returns them."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    return lines


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a config (a mapping, or YAML text as-is) to a fresh file and return its path."""
    count = 0

    def write(content: dict[str, Any] | str, name: str | None = None) -> Path:
        nonlocal count
        count += 1
        path = tmp_path / (name or f"gateway-{count}.yaml")
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content), encoding="utf-8")
        return path

    return write


class Proc:
    """A long-running CLI process whose output lines are read with a deadline."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.seen: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._queues: dict[str, queue.Queue[str | None]] = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self._threads = [
            threading.Thread(target=self._pump, args=(name, getattr(self.popen, name)), daemon=True)
            for name in ("stdout", "stderr")
        ]
        for thread in self._threads:
            thread.start()

    def _pump(self, name: str, pipe: Any) -> None:
        for line in pipe:
            self._queues[name].put(line.rstrip("\n"))
        self._queues[name].put(None)

    def wait_for(self, stream: str, predicate: Callable[[str], bool], timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queues[stream].get(timeout=max(remaining, 0))
            except queue.Empty:
                raise AssertionError(f"no expected line on {stream} within {timeout}s; saw {self.seen[stream]}") from None
            if line is None:
                self._queues[stream].put(None)
                raise AssertionError(f"{stream} closed (exit {self.popen.poll()}) before the expected line; saw {self.seen}")
            self.seen[stream].append(line)
            if predicate(line):
                return line

    def wait_for_log(self, msg: str) -> dict[str, Any]:
        return json.loads(self.wait_for("stderr", lambda line: _log_msg(line) == msg))

    def stop(self, sig: signal.Signals) -> int:
        self.popen.send_signal(sig)
        return self.popen.wait(timeout=TIMEOUT)

    def output(self) -> str:
        """Everything the process wrote, once it has exited."""
        assert self.popen.poll() is not None, "still running"
        for name, thread in zip(("stdout", "stderr"), self._threads):
            thread.join(timeout=TIMEOUT)
            while (line := self._queues[name].get(timeout=TIMEOUT)) is not None:
                self.seen[name].append(line)
            self._queues[name].put(None)
        return "\n".join(self.seen["stdout"] + self.seen["stderr"])

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=TIMEOUT)


def _log_msg(line: str) -> str | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("msg") if isinstance(record, dict) else None


def start_stub(style: str, config_path: Path, cwd: Path) -> tuple[Proc, int]:
    proc = Proc("stub-backend", "--style", style, "--port", "0", "--config", str(config_path), cwd=cwd, env=cli_env(JWT_SECRET=SECRET))
    try:
        record = proc.wait_for_log("stub backend listening")
    except BaseException:
        proc.__exit__()
        raise
    assert record["style"] == style
    return proc, int(record["port"])


def users_by_backend(config_path: Path, count: int = 2) -> dict[str, list[str]]:
    """User ids the config's percentage (not a force list) sends to each backend."""
    rollout = load_config(config_path, env={"JWT_SECRET": SECRET}).rollout
    found: dict[str, list[str]] = {"old": [], "new": []}
    for n in range(10_000):
        if min(len(v) for v in found.values()) >= count:
            return found
        user = f"user-{n}"
        route = choose_backend(user, rollout)
        if route.reason == "bucket" and len(found[route.backend]) < count:
            found[route.backend].append(user)
    raise AssertionError(f"no {count} users per backend among 10,000 at {rollout.new_percent}%")


# -- --help ------------------------------------------------------------------------------


def test_help_lists_every_command(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\b", result.stdout, re.M), (command, result.stdout)


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_has_a_description_and_every_argument_a_help_and_its_default() -> None:
    commands = _commands()
    assert set(commands) == set(COMMANDS)
    for name, command in commands.items():
        assert command.description, name
        text = command.format_help()
        for action in command._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
            default = action.default
            if action.option_strings and default not in (None, False, []):
                shown = ",".join(f"{v:g}" for v in default) if isinstance(default, tuple) else f"{default:g}" if isinstance(default, float) else str(default)
                assert re.search(rf"default:? {re.escape(shown)}\b", " ".join(text.split())), (name, action.dest, shown)


def test_version_prints_the_installed_version(tmp_path: Path) -> None:
    result = run_cli("--version", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    assert re.fullmatch(rf"ws-gateway {re.escape(metadata.version('ws-gateway'))}\n", result.stdout), result.stdout


def test_console_script_is_installed_next_to_the_interpreter(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "ws-gateway"
    result = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "check-config" in result.stdout


def test_no_command_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "COMMAND" in result.stderr


# -- check-config ------------------------------------------------------------------------


def test_check_config_prints_ok_for_a_valid_file(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    result = run_cli("check-config", str(write_config(base_config())), cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "OK\n", "")


@pytest.mark.parametrize("name", ["gateway.yaml", "staging.yaml"])
def test_shipped_example_configs_pass_check_config(tmp_path: Path, name: str) -> None:
    path = Path(__file__).resolve().parent.parent / "config" / name
    result = run_cli("check-config", str(path), cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "OK\n", "")


def _set(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return raw


_DELETE = object()

# (case, change to the valid config, the line that must name the key path and the problem)
BAD_CONFIGS = [
    ("unknown_key", ("rollout.new_percnet", 5), r"rollout\.new_percnet: unknown key"),
    ("wrong_type", ("listen.port", "eighty"), r"listen\.port: expected an integer, got 'eighty'"),
    ("percent_out_of_range", ("rollout.new_percent", 150), r"rollout\.new_percent: 150 is out of range \[0, 100\]"),
    ("user_in_both_force_lists", ("rollout.force_old", ["qa-1"]), r"rollout\.force_new: users in both force_new and force_old: qa-1"),
    ("missing_env_var", ("auth.secret", "${GW_TEST_SURELY_UNSET}"), r"auth\.secret: environment variable GW_TEST_SURELY_UNSET is not set"),
    ("missing_secret", ("auth.secret", _DELETE), r"auth\.secret: required"),
    ("secret_of_wrong_type", ("auth.secret", [SECRET]), r"auth\.secret: expected a string, got <hidden>"),
]


@pytest.mark.parametrize(("change", "expected"), [case[1:] for case in BAD_CONFIGS], ids=[case[0] for case in BAD_CONFIGS])
def test_check_config_names_the_key_path_of_each_problem(
    tmp_path: Path, write_config: Callable[..., Path], change: tuple[str, Any], expected: str
) -> None:
    raw = base_config()
    raw["rollout"]["force_new"] = ["qa-1"]
    raw = _set(raw, *change)
    path = write_config(raw)
    lines = assert_clean_failure(run_cli("check-config", str(path), cwd=tmp_path))
    assert all(line.startswith(f"error: {path}: ") for line in lines), lines
    assert any(re.fullmatch(rf"error: {re.escape(str(path))}: {expected}.*", line) for line in lines), lines
    assert SECRET not in "\n".join(lines)


def test_check_config_reports_every_problem_one_line_each(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    raw = _set(_set(base_config(), "listen.port", "eighty"), "rollout.new_percent", 150)
    lines = assert_clean_failure(run_cli("check-config", str(write_config(raw)), cwd=tmp_path))
    assert len(lines) == 2
    assert "listen.port" in lines[0] and "rollout.new_percent" in lines[1]


def test_check_config_names_the_key_path_and_line_of_bad_yaml(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    path = write_config(f"auth:\n  secret: {SECRET}\nlisten: [\n")
    lines = assert_clean_failure(run_cli("check-config", str(path), cwd=tmp_path))
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {path}: listen: line 3, column 9: "), lines
    assert SECRET not in lines[0]


def test_check_config_on_a_missing_file_is_one_line(tmp_path: Path) -> None:
    lines = assert_clean_failure(run_cli("check-config", str(tmp_path / "nope.yaml"), cwd=tmp_path))
    assert len(lines) == 1 and "nope.yaml" in lines[0] and "cannot read" in lines[0]


@pytest.mark.parametrize("how", ["positional", "--config", "GATEWAY_CONFIG"])
def test_check_config_takes_the_file_like_every_other_command(tmp_path: Path, write_config: Callable[..., Path], how: str) -> None:
    path = str(write_config(base_config()))
    if how == "GATEWAY_CONFIG":
        result = run_cli("check-config", cwd=tmp_path, env=cli_env(JWT_SECRET=SECRET, GATEWAY_CONFIG=path))
    else:
        result = run_cli("check-config", *([path] if how == "positional" else ["--config", path]), cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "OK\n", "")


def test_check_config_refuses_a_file_given_twice(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    path = str(write_config(base_config()))
    lines = assert_clean_failure(run_cli("check-config", path, "--config", path, cwd=tmp_path))
    assert lines == ["error: give the config file once: PATH or --config PATH"]


def test_check_config_warns_after_ok_one_line_each_and_exits_0(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    raw = base_config()
    raw["limits"]["auth_failures_per_ip_per_minute"] = 20
    raw["admin"] = {"host": "0.0.0.0", "port": 9090}
    path = write_config(raw)
    short = "only-31-bytes-long-secret-value"
    assert len(short) == 31
    result = run_cli("check-config", str(path), cwd=tmp_path, env=cli_env(JWT_SECRET=short))
    assert (result.returncode, result.stdout) == (0, "OK\n"), result.stderr
    lines = result.stderr.splitlines()
    keys = ["limits.auth_failures_per_ip_per_minute", "auth.secret", "admin.host"]
    assert [line.split(": ")[2] for line in lines] == keys, lines
    assert all(line.startswith(f"warning: {path}: ") for line in lines), lines
    assert short not in result.stderr


def test_check_config_without_the_secret_in_the_environment_reports_it_as_a_problem(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    path = write_config(base_config())
    lines = assert_clean_failure(run_cli("check-config", str(path), cwd=tmp_path, env=cli_env()))
    assert f"error: {path}: auth.secret: environment variable JWT_SECRET is not set" in lines


def test_check_config_connect_names_host_port_and_the_os_message_of_each_failing_backend(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    stub, stub_port = start_stub("old", write_config(base_config(), "stub.yaml"), tmp_path)
    with stub, socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))  # bound, never listening: refuses connections
        refused = closed_port.getsockname()[1]
        raw = base_config(stub_port, refused)
        healthy = run_cli("check-config", "--connect", str(write_config(raw)), cwd=tmp_path)
        raw["backends"]["old"]["url"] = "ws://chat-backend.invalid:8001/ws/chat"
        raw["backends"]["new"]["url"] = f"ws://127.0.0.1:{stub_port}/ws/chat"
        unknown = run_cli("check-config", "--connect", str(write_config(raw)), cwd=tmp_path)
    with pytest.raises(socket.gaierror) as lookup:
        socket.getaddrinfo("chat-backend.invalid", 8001)

    assert healthy.returncode == 1 and healthy.stdout.splitlines() == [
        "OK", f"backends.old: ws://127.0.0.1:{stub_port}/ws/chat (127.0.0.1:{stub_port}): connected",
    ]
    assert healthy.stderr.splitlines() == [
        f"error: backends.new: ws://127.0.0.1:{refused}/ws/chat (127.0.0.1:{refused}): Connection refused"
    ]
    assert unknown.returncode == 1 and unknown.stderr.splitlines() == [
        f"error: backends.old: ws://chat-backend.invalid:8001/ws/chat (chat-backend.invalid:8001): {lookup.value.strerror}"
    ]
    assert unknown.stdout.splitlines()[-1].endswith(f"(127.0.0.1:{stub_port}): connected")


def test_check_config_connect_exits_0_when_every_backend_answers(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    stub_config = write_config(base_config(), "stub.yaml")
    old, old_port = start_stub("old", stub_config, tmp_path)
    with old:
        new, new_port = start_stub("new", stub_config, tmp_path)
        with new:
            result = run_cli("check-config", "--connect", str(write_config(base_config(old_port, new_port))), cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    assert [line.rsplit(": ", 1)[-1] for line in result.stdout.splitlines()] == ["OK", "connected", "connected"]


# -- route -------------------------------------------------------------------------------


def _route(tmp_path: Path, user: str, *args: str, env: dict[str, str] | None = None) -> list[str]:
    result = run_cli("route", user, *args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.split(maxsplit=1)


def test_route_prints_the_backend_first_then_the_bucket(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    path = write_config(base_config())
    rollout = load_config(path, env={"JWT_SECRET": SECRET}).rollout
    for backend, users in users_by_backend(path, count=1).items():
        user = users[0]
        expected = choose_backend(user, rollout)
        assert expected.backend == backend
        word, why = _route(tmp_path, user, "--config", str(path))
        assert word == backend
        assert f"{expected.bucket:.4f}" in why and "50" in why, why


def test_route_respects_force_lists_over_the_percentage(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    path = write_config(base_config())
    users = users_by_backend(path, count=1)
    raw = base_config()
    raw["rollout"].update(force_new=users["old"], force_old=users["new"])
    forced = write_config(raw)
    word, why = _route(tmp_path, users["old"][0], "--config", str(forced))
    assert (word, "force_new" in why) == ("new", True), why
    word, why = _route(tmp_path, users["new"][0], "--config", str(forced))
    assert (word, "force_old" in why) == ("old", True), why


def test_route_reads_gateway_config_from_the_environment(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    raw = base_config()
    raw["rollout"]["force_new"] = ["env-user"]
    path = write_config(raw)
    word, why = _route(tmp_path, "env-user", env=cli_env(JWT_SECRET=SECRET, GATEWAY_CONFIG=str(path)))
    assert (word, "force_new" in why) == ("new", True), why


def test_route_config_flag_wins_over_gateway_config(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    to_new, to_old = base_config(), base_config()
    to_new["rollout"]["force_new"] = ["u"]
    to_old["rollout"]["force_old"] = ["u"]
    env = cli_env(JWT_SECRET=SECRET, GATEWAY_CONFIG=str(write_config(to_new)))
    assert _route(tmp_path, "u", "--config", str(write_config(to_old)), env=env)[0] == "old"


def test_route_without_any_config_names_the_default_path(tmp_path: Path) -> None:
    lines = assert_clean_failure(run_cli("route", "u", cwd=tmp_path))
    assert len(lines) == 1 and "config/gateway.yaml" in lines[0]


def test_route_needs_no_secret_in_the_environment(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    path = write_config(base_config())
    with_secret = _route(tmp_path, "user-5", "--config", str(path))
    assert _route(tmp_path, "user-5", "--config", str(path), env=cli_env()) == with_secret


def test_stub_backend_starts_without_the_secret_refusing_every_token(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    path = write_config(base_config())
    args = ("stub-backend", "--style", "new", "--port", "0", "--config", str(path), "--reply-delay", "0.5")
    with Proc(*args, cwd=tmp_path, env=cli_env()) as stub:
        warning = stub.wait_for_log("auth.secret is not set: every token is refused with 1008; set JWT_SECRET to the gateway's secret")
        assert warning["level"] == "warning"
        listening = stub.wait_for_log("stub backend listening")
        assert listening["reply_delay"] == 0.5
        with connect(f"ws://127.0.0.1:{listening['port']}/ws/chat", open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
            ws.send(json.dumps({"type": "authenticate", "token": make_token("alice")}))
            with pytest.raises(ConnectionClosed) as refused:
                ws.recv(timeout=TIMEOUT)
        assert refused.value.rcvd is not None and refused.value.rcvd.code == 1008
        assert stub.stop(signal.SIGTERM) == 0


# -- token -------------------------------------------------------------------------------


def test_token_verifies_with_the_configs_secret_and_claim(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    raw = base_config()
    raw["auth"]["user_id_claim"] = "sub"
    path = write_config(raw)
    before = int(time.time())
    result = run_cli("token", "alice", "--ttl", "120", "--config", str(path), cwd=tmp_path)
    after = int(time.time())
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["exp"] - claims["iat"] == 120
    assert before <= claims["iat"] <= after
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("ttl", ["0", "-5", "0.5", "inf", "nan"])
def test_token_refuses_a_ttl_that_cannot_make_a_usable_token(tmp_path: Path, write_config: Callable[..., Path], ttl: str) -> None:
    path = write_config(base_config())
    lines = assert_clean_failure(run_cli("token", "alice", f"--ttl={ttl}", "--config", str(path), cwd=tmp_path))
    assert len(lines) == 1 and "--ttl" in lines[0]


def test_token_with_a_public_key_config_says_it_needs_a_secret(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    (tmp_path / "key.pem").write_bytes(
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    raw = base_config()
    raw["auth"] = {"algorithms": ["ES256"], "public_key_file": "key.pem"}
    lines = assert_clean_failure(run_cli("token", "alice", "--config", str(write_config(raw)), cwd=tmp_path))
    assert len(lines) == 1 and "auth.secret" in lines[0]


# -- serve -------------------------------------------------------------------------------


def test_serve_relays_a_legacy_client_to_a_stub_backend_and_stops_on_sigterm(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    stub_config = write_config(base_config(), "stub.yaml")
    old, old_port = start_stub("old", stub_config, tmp_path)
    with old:
        new, new_port = start_stub("new", stub_config, tmp_path)
        with new:
            raw = base_config(old_port, new_port)
            raw["rollout"].update(new_percent=0, force_new=["bob"])
            path = write_config(raw)
            with Proc("serve", "--config", str(path), cwd=tmp_path, env=cli_env(JWT_SECRET=SECRET)) as gateway:
                listening = gateway.wait_for_log("listening")
                assert (listening["host"], listening["path"]) == ("127.0.0.1", "/ws/chat")
                url = f"ws://127.0.0.1:{listening['port']}/ws/chat"

                alice_token = make_token("alice")
                with connect(f"{url}?token={alice_token}", open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
                    ws.send("hello from a legacy app")
                    assert ws.recv(timeout=TIMEOUT) == "hello from a legacy app"
                    ws.send('{"type":"stub.info"}')
                    info = json.loads(ws.recv(timeout=TIMEOUT))
                    assert (info["style"], info["user_id"]) == ("old", "alice")

                bob_token = make_token("bob")
                with connect(url, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
                    ws.send(json.dumps({"type": "authenticate", "token": bob_token}))
                    connected = json.loads(ws.recv(timeout=TIMEOUT))
                    assert (connected["type"], connected["user_id"]) == ("connected", "bob")
                    ws.send(b"\x00binary\xff")
                    assert ws.recv(timeout=TIMEOUT) == b"\x00binary\xff"

                # Both sessions are over once both have their line (the upgrade folded in); then stop.
                requests = [gateway.wait_for_log("connection closed") for _ in range(2)]
                assert [(r["path"], r["status"]) for r in requests] == [("/ws/chat", 101)] * 2
                assert gateway.stop(signal.SIGTERM) == 0
                output = gateway.output()
    closed = [json.loads(line) for line in gateway.seen["stderr"] if _log_msg(line) == "connection closed"]
    assert sorted(record["user_id"] for record in closed) == ["alice", "bob"]
    assert alice_token not in output and bob_token not in output
    assert SECRET not in output


def test_serve_exits_0_on_sigterm_sent_the_moment_it_says_it_listens(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    # Whoever waits for "listening" (a supervisor, a test) may signal at once: the
    # handler must already be installed, or the default action kills it with -15.
    path = write_config(base_config())
    with Proc("serve", "--config", str(path), cwd=tmp_path, env=cli_env(JWT_SECRET=SECRET)) as gateway:
        gateway.wait_for_log("listening")
        assert gateway.stop(signal.SIGTERM) == 0


def test_serve_with_a_missing_config_file_is_one_line_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "etc" / "gateway.yaml"
    lines = assert_clean_failure(run_cli("serve", "--config", str(missing), cwd=tmp_path))
    assert len(lines) == 1 and str(missing) in lines[0] and "cannot read" in lines[0]


def test_serve_on_a_port_in_use_is_one_line_and_fails(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        raw = base_config()
        raw["listen"]["port"] = port
        result = run_cli("serve", "--config", str(write_config(raw)), cwd=tmp_path)
    lines = assert_clean_failure(result, code=1)
    assert len(lines) == 1
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0].lower(), lines


# -- demo --------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_prints_tokens_that_let_both_client_styles_chat(tmp_path: Path, stop_signal: signal.Signals) -> None:
    with Proc("demo", "--port", "0", cwd=tmp_path, env=cli_env()) as demo:
        first = demo.wait_for("stdout", lambda line: line.startswith("ws-gateway demo: gateway on "))
        url = first.rsplit(" ", 1)[1]
        assert re.fullmatch(r"ws://127\.0\.0\.1:\d+/ws/chat", url), url
        tokens: dict[str, tuple[str, str]] = {}
        while len(tokens) < 2:
            line = demo.wait_for("stdout", lambda line: " is routed to the " in line)
            routed = re.match(r"(\S+) is routed to the (new|old) backend", line)
            assert routed, line
            user, backend = routed.groups()
            tokens[backend] = (user, demo.wait_for("stdout", lambda line: True).strip())
        demo.wait_for("stdout", lambda line: "Ctrl-C stops the demo" in line)

        legacy_user, legacy_token = tokens["old"]
        with connect(f"{url}?token={legacy_token}", open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
            ws.send("hi from a legacy app")
            assert ws.recv(timeout=TIMEOUT) == "hi from a legacy app"

        message_user, message_token = tokens["new"]
        with connect(url, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
            ws.send(json.dumps({"type": "authenticate", "token": message_token}))
            connected = json.loads(ws.recv(timeout=TIMEOUT))
            assert (connected["type"], connected["user_id"]) == ("connected", message_user)
            ws.send("hi from the current app")
            assert ws.recv(timeout=TIMEOUT) == "hi from the current app"

        assert demo.stop(stop_signal) == 0
        demo.output()
    logs = "\n".join(demo.seen["stderr"])
    assert legacy_token not in logs and message_token not in logs


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        return json.loads(response.read())


def test_demo_is_a_rehearsal_its_config_file_hot_reloads_and_probe_and_report_run_against_it(tmp_path: Path) -> None:
    with Proc("demo", "--port", "0", cwd=tmp_path, env=cli_env()) as demo:
        url = demo.wait_for("stdout", lambda line: line.startswith("ws-gateway demo: gateway on ")).rsplit(" ", 1)[1]
        admin = re.search(r"status page: (http://127\.0\.0\.1:\d+)/", demo.wait_for("stdout", lambda line: "status page:" in line))
        assert admin, demo.seen["stdout"]
        path = Path(demo.wait_for("stdout", lambda line: line.startswith("config: ")).removeprefix("config: "))
        assert path.is_absolute() and path.stat().st_mode & 0o077 == 0, "the file holds the demo's secret"
        demo.wait_for("stdout", lambda line: "Ctrl-C stops the demo" in line)
        commands = "\n".join(demo.seen["stdout"])
        assert "websocat" not in commands
        assert f"ws-gateway probe {url} --config {path} --user " in commands

        state = _get_json(admin.group(1) + "/rollout")
        assert (state["config_file"], state["configured_percent"]) == (str(path), 50)
        path.write_text(path.read_text(encoding="utf-8").replace("new_percent: 50.0", "new_percent: 20"), encoding="utf-8")
        deadline = time.monotonic() + TIMEOUT
        while _get_json(admin.group(1) + "/rollout")["configured_percent"] != 20:  # a bounded poll of the admin port
            assert time.monotonic() < deadline, f"no reload within {TIMEOUT}s: {demo.seen['stderr'][-5:]}"
            time.sleep(0.05)
        reloaded = json.loads(demo.wait_for("stderr", lambda line: _log_msg(line) == "config reloaded"))
        assert (reloaded["file"], reloaded["new_percent"]) == (str(path), 20)
        assert all(_log_msg(line) != "config change needs a restart to take effect" for line in demo.seen["stderr"])

        user = next(u for users in users_by_backend(path, count=1).values() for u in users)
        probe = run_cli("probe", url, "--config", str(path), "--user", user, "--hold", "0", cwd=tmp_path, env=cli_env())
        assert probe.returncode == 0, probe.stdout + probe.stderr
        report = run_cli("report", "--config", str(path), "--days", "1", cwd=tmp_path, env=cli_env())
        assert report.returncode == 0 and "Traceback" not in report.stderr, report.stdout + report.stderr
        assert demo.stop(signal.SIGTERM) == 0
    assert not path.exists(), "removed when the demo stops"


def test_serve_given_a_relative_config_path_shows_it_absolute_in_rollout_and_its_log(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    raw = base_config()
    raw["admin"] = {"host": "127.0.0.1", "port": 0}
    write_config(raw, "gateway.yaml")
    with Proc("serve", "--config", "gateway.yaml", cwd=tmp_path, env=cli_env(JWT_SECRET=SECRET)) as gateway:
        admin = gateway.wait_for_log("admin listening")
        assert _get_json(f"http://127.0.0.1:{admin['port']}/rollout")["config_file"] == str(tmp_path / "gateway.yaml")
        assert gateway.stop(signal.SIGTERM) == 0
