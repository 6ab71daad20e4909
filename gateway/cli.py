"""``ws-gateway``: serve, demo, and the tools ops and QA use around a rollout.

`main(argv)` returns an exit code and never lets a traceback out, so tests call it in
process and scripts can trust the exit status: 0 ok, 1 runtime failure, 2 bad config or
usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import secrets
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from importlib import metadata
from typing import Any

from .wire import frames
from .core.auth import mint_token
from .core.config import BACKEND_NAMES, AuthConfig, Config, ConfigError, config_warnings
from .service.configfile import load_config
from .wire.connector import Connector, HeadReader, target_of
from .wire.handshake import UpgradeRefused
from .staging.demo import demo
from .staging.drill import run_drill
from .staging.drill_plan import Plan, parse_steps
from .service.logs import setup_logging
from .staging.probe import Options as ProbeOptions
from .staging.probe import forged_token, run_probe
from .service.reload import fingerprint
from .service.report import collect_report, collect_versions, format_report, report_json
from .service.store import RedisStore, SqliteStore, Store, StoreUnavailable
from .core.routing import choose_backend
from .service.server import Signals, run, serve, start_site
from .staging.stub_backend import FAULT_RANGES, Faults, create_stub_app
from .service.workers import run_worker, supervise

log = logging.getLogger("gateway")
DEFAULT_CONFIG = "config/gateway.yaml"
PROBE_TOKEN_TTL = 300  # seconds: long enough for any probe, short if one leaks


def _config_path(given: str | None) -> str:
    """Absolute, so logs, `/rollout` and the status page say which file whatever the working
    directory; not resolved through symlinks, which a ConfigMap swap replaces."""
    return os.path.abspath(given or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG)


def _bounded(convert: Callable[[str], Any], low: float, high: float, what: str) -> Callable[[str], Any]:
    """An argparse type: `convert`, then check low <= value <= high (which also refuses nan)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range [{low:g}, {high:g}]")
        return value

    return parse


# uvloop would silently bind port 70000 as 70000 % 65536.
_port = _bounded(int, 0, 65535, "a port number")
_percent = _bounded(float, 0, 100, "a number")
_days = _bounded(int, 1, 3650, "a whole number of days")
_workers = _bounded(int, 1, 256, "a whole number of workers")
_fd = _bounded(int, 0, 2**31 - 1, "a file descriptor")
_timeout = _bounded(float, 0.1, 600, "a number of seconds")
_hold = _bounded(float, 0, 600, "a number of seconds")
_duration = _bounded(float, 6, 3600, "a number of seconds")


def _steps(text: str) -> tuple[float, ...]:
    try:
        return parse_steps(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fault(key: str) -> Callable[[str], Any]:
    """An argparse type for the stub fault `key`, in the range POST /stub/faults accepts."""
    bounds = FAULT_RANGES[key]
    assert bounds is not None
    return _bounded(float, bounds[0], bounds[1], "a number")


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's default at the end of its help, unless the help already says it or
    there is nothing to show (no default, an off switch, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and "default" not in text
            and default is not None
            and default is not False
            and default != []
            and default is not argparse.SUPPRESS
        ):
            shown = ",".join(f"{v:g}" for v in default) if isinstance(default, tuple) else "%(default)s"
            text += f" (default {shown})"
        return text


def _version() -> str:
    try:
        return metadata.version("ws-gateway")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ws-gateway",
        description="WebSocket gateway for migrating chat clients from URL-token auth to message auth.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = f"config file (default: $GATEWAY_CONFIG, else {DEFAULT_CONFIG})"

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".", formatter_class=_HelpFormatter)

    p = command("serve", "run the gateway")
    p.add_argument("--config", help=config_help)
    p.add_argument(
        "--workers", type=_workers, default=1,
        help="gateway processes sharing the port (SO_REUSEPORT) under one supervisor (default 1: no supervisor)",
    )
    p.add_argument("--worker-fd", type=_fd, help=argparse.SUPPRESS)  # set by the supervisor for its workers

    p = command(
        "demo",
        "run the gateway with stub backends on 127.0.0.1, from a config file it writes: a rehearsal of the runbook",
    )
    p.add_argument("--port", type=_port, default=8080, help="gateway port")
    p.add_argument("--new-percent", type=_percent, default=50.0, help="share of users routed to the new backend, 0-100")

    p = command(
        "check-config", "validate a config file: OK and its warnings (exit 0), or every problem (exit 2)"
    )
    p.add_argument("path", nargs="?", metavar="PATH", help="config file; the same as --config")
    p.add_argument("--config", help=config_help)
    p.add_argument(
        "--connect", action="store_true",
        help="also open each backend (DNS, TCP, WebSocket upgrade without a token); exit 1 if one fails",
    )

    p = command("route", "which backend a user goes to, and why (needs no secret)")
    p.add_argument("user_id", metavar="USER_ID", help="the user id, as the token's claim carries it")
    p.add_argument("--config", help=config_help)

    p = command("token", "mint a token with the configured HMAC secret (staging tests)")
    p.add_argument("user_id", metavar="USER_ID", help="the user id to put in the configured claim")
    p.add_argument("--config", help=config_help)
    p.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")

    p = command("report", "legacy vs message auth usage per UTC day and per app version (Redis or usage.path), and a verdict")
    p.add_argument("--config", help=config_help)
    p.add_argument("--days", type=_days, default=14, help="days to show, newest last (7 or more for a verdict)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("probe", "smoke-test a running gateway in both auth styles, over WebSocket only (QA)")
    p.add_argument("url", metavar="URL", help="the gateway's public URL, e.g. wss://chat.staging.example.com/ws/chat")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--token", help="probe with this token; else one is minted per --user")
    source.add_argument("--config", help=config_help + "; its auth section mints the tokens")
    source.add_argument("--secret", help="mint HS256 tokens (claim user_id) with this secret instead of a config's")
    p.add_argument(
        "--user", action="append", default=[], metavar="ID",
        help="a user to mint a token for; repeat it (e.g. a QA user pinned old and one pinned new)",
    )
    p.add_argument("--hold", type=_hold, default=2.0, help="seconds a legacy-style socket must stay open")
    p.add_argument("--send", metavar="TEXT", help="also send TEXT in every session and expect a reply")
    p.add_argument("--reply-timeout", type=_timeout, default=5.0, help="seconds to wait for that reply")
    p.add_argument("--timeout", type=_timeout, default=10.0, help="seconds to wait for the upgrade, connected, or a refusal")
    p.add_argument(
        "--admin", metavar="URL",
        help="the gateway's admin URL (e.g. http://127.0.0.1:9090): each check then says which backend served it, and why",
    )
    p.add_argument(
        "--expect-backend", choices=("old", "new"),
        help="fail a user's check whose session landed on the other backend (needs --admin)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command(
        "drill", "rehearse the migration on loopback: simulated apps, new_percent ramped, the new backend broken and healed"
    )
    p.add_argument("--duration", type=_duration, default=Plan.duration, help="seconds, split evenly between the steps")
    p.add_argument(
        "--steps", type=_steps, default=Plan.steps, metavar="P,P,...", help="the new_percent values to ramp through",
    )
    p.add_argument(
        "--legacy-share", type=_percent, default=Plan.legacy_share, metavar="PERCENT",
        help="share of the apps that put the token in the URL",
    )
    p.add_argument(
        "--fail-percent", type=_percent, default=Plan.fail_percent, metavar="PERCENT",
        help="share of the new backend's handshakes that fail during the middle step",
    )

    p = command("stub-backend", "run a reference backend for one auth style (verifies tokens when the secret is set)")
    p.add_argument("--style", choices=("old", "new"), required=True, help="old: token in the URL; new: authenticate frame")
    p.add_argument("--port", type=_port, required=True, help="port to listen on (0: a free one, logged)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--config", help=config_help + "; its auth section verifies tokens")
    # The faults at start; POST /stub/faults on the stub's port changes them while it runs.
    p.add_argument(
        "--fail-handshake", type=_fault("fail_handshake"), default=0.0, metavar="PERCENT",
        help="fail this share of handshakes, spread evenly: old refuses the upgrade (503), new never answers connected",
    )
    p.add_argument(
        "--reply-delay", type=_fault("reply_delay"), default=0.0, metavar="SECONDS", help="wait this long before every reply"
    )
    p.add_argument(
        "--drop-after", type=_fault("drop_after"), metavar="SECONDS",
        help="vanish without a close frame this long after each upgrade (default: never)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        if args.command == "check-config":
            if args.path is not None and args.config is not None:
                return _usage("give the config file once: PATH or --config PATH")
            return check_config(_config_path(args.path or args.config), args.connect)
        if args.command == "route":
            config = load_config(_config_path(args.config), need_secret=False)
            route = choose_backend(args.user_id, config.rollout)
            print(f"{route.backend} ({route.explain()})")
            if config.rollout.ramp.enabled:
                print(
                    "note: rollout.ramp is on: the running gateway routes by the ramp's current step, not"
                    " rollout.new_percent; ask its admin port: GET /route?user=ID",
                    file=sys.stderr,
                )
            return 0
        if args.command == "token":
            config = load_config(_config_path(args.config))
            # exp is whole seconds: a TTL under 1 s would mint an already-expired token,
            # and inf / nan would escape as a traceback from int().
            if not math.isfinite(args.ttl) or args.ttl < 1:
                print("error: --ttl must be a finite number of seconds, at least 1", file=sys.stderr)
                return 2
            print(mint_token(config.auth, args.user_id, args.ttl))
            return 0
        if args.command == "report":
            config = load_config(_config_path(args.config))
            if config.redis is None and config.usage.path is None:
                print("error: the usage report reads Redis or the usage.path file; this config has neither", file=sys.stderr)
                return 2
            setup_logging("CRITICAL")  # the store logs the outage too; the one error line says it
            return run(lambda: print_report(config, args.days, args.json))
        if args.command == "serve":
            path = _config_path(args.config)
            if args.worker_fd is not None:
                return run_worker(args.worker_fd, path, lambda config: setup_logging(config.log_level, config.auth.query_param))
            seen = fingerprint(path)
            config = load_config(path)
            setup_logging(config.log_level, config.auth.query_param)
            for warning in config_warnings(config):  # here, once: not on every reload, not per worker
                log.warning("config warning", extra={"file": path, "warning": warning})
            if args.workers > 1:
                return run(lambda: supervise(config, path, seen, args.workers))
            return run(lambda: serve(config, path, seen))
        if args.command == "stub-backend":
            config = load_config(_config_path(args.config), need_secret=False)
            setup_logging(config.log_level, config.auth.query_param)
            faults = Faults(fail_handshake=args.fail_handshake, reply_delay=args.reply_delay, drop_after=args.drop_after)
            return run(lambda: serve_stub(args.style, config, args.host, args.port, faults))
        if args.command == "demo":
            setup_logging("INFO")
            return run(lambda: demo(args.port, args.new_percent))
        if args.command == "probe":
            return probe(args)
        if args.command == "drill":
            setup_logging("CRITICAL")  # hundreds of expected failures; the drill narrates what matters
            plan = Plan(args.duration, args.steps, args.legacy_share, args.fail_percent)
            return run(lambda: drill(plan))
    except ConfigError as exc:
        # One self-contained line per problem, so a single problem is a single line and
        # each line survives grep and log shippers: "error: FILE: key.path: what is wrong".
        where = f"{exc.source}: " if exc.source else ""
        for problem in exc.problems:
            print(f"error: {where}{problem}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)


def check_config(path: str, connect: bool) -> int:
    """OK and the warnings (exit 0); with `connect`, then each backend's answer (exit 1 if one fails)."""
    config = load_config(path)
    print("OK", flush=True)
    for warning in config_warnings(config):
        print(f"warning: {path}: {warning}", file=sys.stderr, flush=True)
    if not connect:
        return 0
    return run(lambda: check_backends(config))


async def check_backends(config: Config) -> int:
    """Open each backend as the gateway would, minus the token, and say what happened."""
    connector = Connector()
    failed = False
    try:
        for name in BACKEND_NAMES:
            backend = config.backends[name]
            target = target_of(backend.url)
            problem = await upgrade_problem(connector, backend.url, backend.connect_timeout_seconds)
            where = f"backends.{name}: {backend.url} ({target.host}:{target.port})"
            if problem is None:
                print(f"{where}: connected", flush=True)
            else:
                failed = True
                print(f"error: {where}: {problem}", file=sys.stderr, flush=True)
    finally:
        await connector.close()
    return 1 if failed else 0


async def upgrade_problem(connector: Connector, url: str, timeout: float) -> str | None:
    """None when `url` upgraded, or answered the token-less upgrade as a live backend does
    (400, 401, 403: it wants the token); else what went wrong, in the OS's words."""
    try:
        transport, reader, _ = await asyncio.wait_for(connector.open(url, [], HeadReader), timeout)
    except TimeoutError:
        return f"no answer within {timeout:g} s (connect_timeout_seconds)"
    except UpgradeRefused as exc:
        return None if exc.status in (400, 401, 403) else f"the upgrade was refused: {exc}"
    except socket.gaierror as exc:
        return exc.strerror or str(exc)
    except OSError as exc:
        return os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
    transport.write(frames.encode_close(1000, "check-config", mask=True))
    transport.close()
    reader.forget()
    return None


async def print_report(config: Config, days: int, as_json: bool) -> int:
    store: Store
    if config.redis is not None:
        store = RedisStore.from_config(config)
    else:
        assert config.usage.path is not None
        store = SqliteStore(config.usage.path)  # not started: it only reads the file, never creates it
    try:
        usage = await collect_report(store, days)
        versions = await collect_versions(store, days, usage[-1].day)
    finally:
        await store.close()
    threshold = config.usage.legacy_threshold_percent
    deprecated_at = config.auth.legacy_deprecated_at
    print(
        report_json(usage, threshold, versions, deprecated_at)
        if as_json
        else format_report(usage, threshold, versions, deprecated_at)
    )
    return 0


def probe(args: argparse.Namespace) -> int:
    """The probe's tokens from --token, or minted per --user from --secret or the config; 2 on a usage error."""
    if not re.fullmatch(r"wss?://[^/?#\s]+(/[^#\s]*)?", args.url):
        return _usage(f"{args.url!r} is not a ws:// or wss:// URL")
    if args.admin is not None and not re.fullmatch(r"https?://[^/?#\s]+/?", args.admin):
        return _usage(f"--admin {args.admin!r} is not an http:// or https:// URL of the admin port, e.g. http://127.0.0.1:9090")
    if args.expect_backend is not None and args.admin is None:
        return _usage("--expect-backend asks the admin port where each session landed: give --admin URL too")
    if args.token is not None:
        if args.user:
            return _usage("--user mints a token; --token brings its own: give one or the other")
        auth, tokens = AuthConfig(), {"given token": args.token}
    else:
        if not args.user:
            return _usage("give --token, or --user (once per user) with --config or --secret to mint tokens")
        auth = AuthConfig(secret=args.secret) if args.secret is not None else load_config(_config_path(args.config)).auth
        if auth.secret is None:
            return _usage("the probe mints tokens with auth.secret; this config verifies with public keys: use --token")
        tokens = {user: mint_token(auth, user, PROBE_TOKEN_TTL) for user in args.user}
    options = ProbeOptions(
        hold=args.hold, send=args.send, timeout=args.timeout, reply_timeout=args.reply_timeout, query_param=auth.query_param,
        admin=args.admin, expect_backend=args.expect_backend,
    )
    return run(lambda: print_probe(args.url, tokens, forged_token(auth), options, args.json))


def _usage(problem: str) -> int:
    print(f"error: {problem}", file=sys.stderr)
    return 2


async def print_probe(url: str, tokens: dict[str, str], bad_token: str, options: ProbeOptions, as_json: bool) -> int:
    report = await run_probe(url, tokens, bad_token, options)
    print(json.dumps(report.as_dict(), indent=2) if as_json else report.text(), end="\n" if as_json else "")
    return 0 if report.passed else 1


async def serve_stub(style: str, config: Config, host: str, port: int, faults: Faults) -> int:
    auth = config.auth
    if auth.secret is None and auth.public_key is None and auth.jwks_url is None:
        # Nothing to verify the gateway's tokens with: refuse them all, as a backend with
        # another secret would, rather than refuse to start (the faults work regardless).
        auth = replace(auth, secret=secrets.token_urlsafe(32))
        log.warning("auth.secret is not set: every token is refused with 1008; set JWT_SECRET to the gateway's secret")
    app = create_stub_app(style, auth, path=config.path, max_message_bytes=config.limits.max_message_bytes, faults=faults)
    with Signals() as signals:
        runner, bound = await start_site(app, host, port)
        log.info(
            "stub backend listening", extra={"style": style, "host": host, "port": bound, "path": config.path, **asdict(faults)}
        )
        try:
            await signals.stop.wait()
        finally:
            await runner.cleanup()
    return 0


async def drill(plan: Plan) -> int:
    with Signals() as signals:
        passed = await run_drill(plan, lambda line: print(line, flush=True), stop=signals.stop)
    if passed is None:
        return 130
    return 0 if passed else 1
