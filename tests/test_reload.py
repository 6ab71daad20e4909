"""Hot reload: in-place edits, write-then-rename, ConfigMap symlink swaps, invalid edits."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import websockets
import yaml

from gateway.core.config import ConfigError
from gateway.service.reload import Reloader
from gateway.service.runtime import Gateway

from .helpers import SECRET, TIMEOUT, make_config, make_token, raw_config, start_stack


def write(path: Path, **sections) -> None:
    path.write_text(yaml.safe_dump(raw_config(**sections)))


def watch(path: Path, gateway: Gateway) -> tuple[Reloader, list[ConfigError]]:
    refused: list[ConfigError] = []

    def refuse(error: ConfigError) -> None:
        refused.append(error)
        gateway.reload_failed(error)

    return Reloader(str(path), gateway.reload, refuse), refused


def test_in_place_edit_changes_the_percentage(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, rollout={"new_percent": 5})
    gateway = Gateway(make_config(rollout={"new_percent": 5}), config_path=str(path))
    reloader, _ = watch(path, gateway)
    with path.open("r+") as f:  # same inode, new content
        content = f.read().replace("new_percent: 5", "new_percent: 25")
        f.seek(0)
        f.write(content)
        f.truncate()
    reloader.check()
    assert gateway.config.rollout.new_percent == 25


def test_write_then_rename_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, rollout={"new_percent": 5})
    gateway = Gateway(make_config(), config_path=str(path))
    reloader, _ = watch(path, gateway)
    staged = tmp_path / ".gateway.yaml.tmp"
    write(staged, rollout={"new_percent": 50})
    os.replace(staged, path)
    reloader.check()
    assert gateway.config.rollout.new_percent == 50


def test_kubernetes_configmap_symlink_swap_is_picked_up(tmp_path: Path) -> None:
    """kubelet layout: gateway.yaml -> ..data/gateway.yaml, ..data -> ..<timestamp>, swapped by rename."""
    first, second = tmp_path / "..2026_11_26_1", tmp_path / "..2026_11_26_2"
    first.mkdir()
    second.mkdir()
    write(first / "gateway.yaml", rollout={"new_percent": 5})
    write(second / "gateway.yaml", rollout={"new_percent": 75})
    (tmp_path / "..data").symlink_to(first.name)
    path = tmp_path / "gateway.yaml"
    path.symlink_to("..data/gateway.yaml")
    gateway = Gateway(make_config(), config_path=str(path))
    reloader, _ = watch(path, gateway)
    (tmp_path / "..data_tmp").symlink_to(second.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    reloader.check()
    assert gateway.config.rollout.new_percent == 75


def test_unchanged_file_is_not_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(path)
    gateway = Gateway(make_config(), config_path=str(path))
    reloader, _ = watch(path, gateway)
    reloader.check()
    assert gateway.metrics.reloads.labels("success")._value.get() == 0


def test_invalid_edit_keeps_the_previous_config_and_logs_file_and_key_path(tmp_path: Path, caplog) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, rollout={"new_percent": 5})
    gateway = Gateway(make_config(rollout={"new_percent": 5}), config_path=str(path))
    reloader, refused = watch(path, gateway)
    for bad in (
        {"rollout": {"new_percent": 150}},
        {"rollout": {"force_new": ["u1"], "force_old": ["u1"]}},
        {"rollout": {"new_percnt": 10}},
    ):
        write(path, **bad)
        with caplog.at_level(logging.ERROR, logger="gateway"):
            reloader.check()
        assert gateway.config.rollout.new_percent == 5
    path.write_text("rollout: [unclosed\n")
    reloader.check()
    assert gateway.config.rollout.new_percent == 5
    problems = [p for error in refused for p in error.problems]
    assert any(p.startswith("rollout.new_percent:") for p in problems)
    assert any(p.startswith("rollout.force_new:") and "u1" in p for p in problems)
    assert any(p.startswith("rollout.new_percnt:") for p in problems)
    assert any("line " in p and "column " in p for p in problems)
    records = [r for r in caplog.records if r.getMessage().startswith("config reload refused")]
    assert records and all(r.file == str(path) for r in records)
    assert gateway.metrics.reloads.labels("invalid")._value.get() == 4
    assert SECRET not in caplog.text


def test_listen_change_is_reported_as_needing_a_restart_and_the_rest_applies(tmp_path: Path, caplog) -> None:
    path = tmp_path / "gateway.yaml"
    write(path)
    gateway = Gateway(make_config(), config_path=str(path))
    reloader, _ = watch(path, gateway)
    write(path, listen={"host": "127.0.0.1", "port": 9999}, rollout={"new_percent": 40})
    with caplog.at_level(logging.WARNING, logger="gateway"):
        reloader.check()
    assert gateway.config.listen.port == 0
    assert gateway.config.rollout.new_percent == 40
    [record] = [r for r in caplog.records if "restart" in r.getMessage()]
    assert record.keys == ["listen"]
    assert gateway.metrics.reloads.labels("restart_required")._value.get() == 1


async def test_secret_rotation_applies_to_new_connections(tmp_path: Path) -> None:
    stack = await start_stack()
    try:
        rotated = "rotated-secret-abcdefghijklmnopqrstuvwxyz"
        config = stack.gateway.config
        path = tmp_path / "gateway.yaml"
        write(path, old_port=stack.old_port, new_port=stack.new_port, auth={"secret": rotated}, rollout={"new_percent": 100})
        reloader, _ = watch(path, stack.gateway)
        assert reloader.reload()
        # The stub backends still verify with the old secret, so a token the gateway
        # accepts reaches the new backend and is rejected in its handshake; one the gateway
        # refuses never gets that far.
        async with websockets.connect(stack.url(f"token={make_token('alice', secret=rotated)}")) as ws:
            await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
            assert (ws.close_code, ws.close_reason) == (1008, "token rejected by backend")
        async with websockets.connect(stack.url(f"token={make_token('alice')}")) as ws:
            await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
            assert (ws.close_code, ws.close_reason) == (1008, "invalid token signature")
        assert config.auth.secret == SECRET  # the config object itself is never mutated
    finally:
        await stack.close()


async def test_watcher_applies_a_change_to_new_connections_while_an_open_session_keeps_working(tmp_path: Path) -> None:
    stack = await start_stack()
    try:
        path = tmp_path / "gateway.yaml"
        write(path, old_port=stack.old_port, new_port=stack.new_port, rollout={"new_percent": 0})
        applied = asyncio.Event()

        def apply(config):
            stack.gateway.reload(config)
            applied.set()

        reloader = Reloader(str(path), apply, stack.gateway.reload_failed)
        reloader.start()
        try:
            async with websockets.connect(stack.url(f"token={make_token('alice')}")) as before:
                await before.send('{"type":"stub.info"}')
                assert json.loads(await asyncio.wait_for(before.recv(), TIMEOUT))["style"] == "old"
                write(path, old_port=stack.old_port, new_port=stack.new_port, rollout={"new_percent": 100})
                await asyncio.wait_for(applied.wait(), 5.0)
                async with websockets.connect(stack.url(f"token={make_token('alice')}")) as after:
                    await after.send('{"type":"stub.info"}')
                    assert json.loads(await asyncio.wait_for(after.recv(), TIMEOUT))["style"] == "new"
                await before.send("still here")
                assert await asyncio.wait_for(before.recv(), TIMEOUT) == "still here"
        finally:
            await reloader.stop()
    finally:
        await stack.close()


def test_every_restart_only_key_keeps_its_start_up_value_when_a_reload_changes_it(tmp_path: Path, caplog) -> None:
    path = tmp_path / "gateway.yaml"
    write(path)
    gateway = Gateway(make_config(), config_path=str(path))
    reloader, _ = watch(path, gateway)
    raw = raw_config(
        admin={"host": "127.0.0.1", "port": 9999},
        redis={"url": "redis://127.0.0.1:1/0"},
        limits={"max_upstream_connections": 7, "max_message_bytes": 2048},
    )
    path.write_text(yaml.safe_dump({**raw, "path": "/ws/other"}))
    with caplog.at_level(logging.WARNING, logger="gateway"):
        reloader.check()
    config = gateway.config
    assert (config.path, config.admin, config.redis, config.limits.max_upstream_connections) == ("/ws/chat", None, None, 10000)
    assert config.limits.max_message_bytes == 2048  # live keys beside them still apply
    [record] = [r for r in caplog.records if "restart" in r.getMessage()]
    assert record.keys == ["path", "admin", "redis", "limits.max_upstream_connections"]
