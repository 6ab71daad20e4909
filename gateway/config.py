"""The gateway's configuration: a frozen model, parsed and validated once.

Every default is written once, as a dataclass field default; the parser reads them from
there (`_default`).

`parse_config` is pure: it takes the mapping YAML produced, the environment `${VAR}`
expands from (an argument, empty unless given: it never reads `os.environ`) and, for
public-key algorithms, a function that returns the key named by `auth.public_key_file`.
It returns a `Config` or raises `ConfigError` listing *every* problem, each with its
dotted key path and the offending value (secrets are never echoed).

`load_config` is the I/O boundary and the only function that touches the filesystem: it
reads the YAML file (refusing duplicate keys), reads `auth.public_key_file` relative to
the config file's directory and checks it is a PEM public key, and hands `os.environ` to
the parser unless given another environment. Hot reload and `check-config` both go
through it, so what ops validate by hand is exactly what the gateway accepts.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from datetime import date, datetime, timezone
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
BACKEND_NAMES = ("old", "new")
UPSTREAM_STYLES = ("query", "message")
DEFAULT_CONNECTED_MESSAGE = '{"type":"connected","message":"Connected to Wealth Coach AI"}'
SECRET_KEYS = frozenset({"secret"})
LEGACY_MODES = ("allow", "deprecate", "deny")
SESSION_EXPIRY_MODES = ("ignore", "close")


class ConfigError(Exception):
    """A config that cannot be served. `problems` holds one line per bad key."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(prefix + "; ".join(problems))


@dataclass(frozen=True)
class ListenConfig:
    host: str = "0.0.0.0"
    port: int = 8080


@dataclass(frozen=True)
class AuthConfig:
    algorithms: tuple[str, ...] = ("HS256",)
    secret: str | None = field(default=None, repr=False)
    public_key_file: str | None = None
    public_key: str | None = field(default=None, repr=False)
    jwks_url: str | None = None
    jwks_refresh_seconds: float = 300.0
    user_id_claim: str = "user_id"
    query_param: str = "token"
    timeout_seconds: float = 30.0
    audience: tuple[str, ...] = ()
    issuer: str | None = None
    leeway_seconds: float = 0.0
    connected_message: str = DEFAULT_CONNECTED_MESSAGE
    legacy: str = "allow"
    legacy_deprecated_at: int | None = None
    legacy_sunset: int | None = None
    session_expiry: str = "ignore"


@dataclass(frozen=True)
class BackendConfig:
    url: str
    auth: str
    query_param: str = "token"
    connect_timeout_seconds: float = 10.0
    handshake_timeout_seconds: float = 10.0
    compress: bool = False


@dataclass(frozen=True)
class GuardConfig:
    enabled: bool = True
    window_seconds: float = 60.0
    max_failure_ratio: float = 0.05
    min_samples: int = 20
    cooldown_seconds: float = 60.0
    step_seconds: float = 30.0
    recovery_steps: tuple[float, ...] = (10.0, 25.0, 50.0, 100.0)
    spare_forced: bool = False


@dataclass(frozen=True)
class RebalanceConfig:
    enabled: bool = False
    window_seconds: float = 60.0
    idle_seconds: float = 5.0
    on_guard_trip: bool = False


@dataclass(frozen=True)
class RolloutConfig:
    new_percent: float = 0.0
    salt: str = "chat-auth-migration"
    force_new: frozenset[str] = frozenset()
    force_old: frozenset[str] = frozenset()
    fallback_to_old: bool = True
    guard: GuardConfig = GuardConfig()
    rebalance: RebalanceConfig = RebalanceConfig()


# One address's default share of `limits.max_pending_handshakes`: a flood needs this many
# addresses to fill the bound.
PENDING_SHARE_DIVISOR = 50


@dataclass(frozen=True)
class LimitsConfig:
    max_message_bytes: int = 1024 * 1024
    store_and_forward_bytes: int = 64 * 1024
    hold_buffer_bytes: int = 4 * 1024 * 1024
    hold_buffer_frames: int = 1000
    ping_interval_seconds: float = 20.0
    max_upstream_connections: int = 10000
    handshake_timeout_seconds: float = 10.0
    max_request_header_bytes: int = 16 * 1024
    max_pending_handshakes: int = 10000
    max_pending_handshakes_per_ip: int = 10000 // PENDING_SHARE_DIVISOR
    auth_failures_per_ip_per_minute: int | None = None
    max_sessions_per_user: int | None = None


@dataclass(frozen=True)
class SentinelConfig:
    """Redis behind Sentinel: the sentinels to ask, and the name of the master they watch."""

    hosts: tuple[tuple[str, int], ...]
    service_name: str
    password: str | None = field(default=None, repr=False)  # the master's (and replicas') password


@dataclass(frozen=True)
class RedisConfig:
    """Exactly one of `url` (a single endpoint) and `sentinel`."""

    url: str | None = field(default=None, repr=False)
    sentinel: SentinelConfig | None = None
    timeout_seconds: float = 0.25


@dataclass(frozen=True)
class AppVersionConfig:
    """Which app version a session comes from: `pattern`'s group ``version`` in header `header`."""

    pattern: str
    header: str = "User-Agent"
    max_versions: int = 50  # per UTC day; versions past it count as "other"


@dataclass(frozen=True)
class UsageConfig:
    retention_days: int = 120
    legacy_threshold_percent: float = 1.0
    # SQLite file for usage without Redis, so `ws-gateway report` has data to read; None
    # keeps usage in memory only. Relative to the config file's directory (load_config).
    path: str | None = None
    app_version: AppVersionConfig | None = None


@dataclass(frozen=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 9090


@dataclass(frozen=True)
class DrainConfig:
    grace_seconds: float = 5.0
    window_seconds: float = 30.0


@dataclass(frozen=True)
class Config:
    auth: AuthConfig
    backends: Mapping[str, BackendConfig]
    listen: ListenConfig = ListenConfig()
    path: str = "/ws/chat"
    rollout: RolloutConfig = RolloutConfig()
    limits: LimitsConfig = LimitsConfig()
    admin: AdminConfig | None = None
    drain: DrainConfig = DrainConfig()
    redis: RedisConfig | None = None
    usage: UsageConfig = UsageConfig()
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    log_level: str = "INFO"


# Keys bound to sockets at start-up: a reload that changes them is reported, not applied.
RESTART_KEYS = (
    "listen", "path", "admin", "redis", "limits.max_upstream_connections", "auth.jwks_url", "auth.jwks_refresh_seconds",
    "usage.path",
)


def restart_required(old: Config, new: Config) -> list[str]:
    """The restart-only keys that differ between two configs."""
    return [key for key in RESTART_KEYS if _get(old, key.split(".")) != _get(new, key.split("."))]


ALL_INTERFACES = frozenset({"", "0.0.0.0", "::", "[::]"})
MIN_SECRET_BYTES = 32


def config_warnings(config: Config) -> list[str]:
    """Valid combinations that bite in production, one line each with its key path.

    Said once per process start (by `check-config`, `serve` or its supervisor), never per
    reload or per worker.
    """
    warnings = []
    limit = config.limits.auth_failures_per_ip_per_minute
    if limit is not None and not config.trusted_proxies:
        warnings.append(
            f"limits.auth_failures_per_ip_per_minute: {limit} without trusted_proxies: behind a load balancer"
            " every client has its address, so its failures lock every user out; list the balancers in"
            " trusted_proxies, or set null"
        )
    secret = config.auth.secret
    if secret is not None and len(secret.encode()) < MIN_SECRET_BYTES:
        warnings.append(
            f"auth.secret: shorter than {MIN_SECRET_BYTES} bytes: weak for HMAC; rotate it when the old backend allows"
        )
    if config.admin is not None and config.admin.host in ALL_INTERFACES:
        warnings.append(
            f"admin.host: {config.admin.host or '(empty)'} listens on every interface: /metrics, /rollout and the"
            " status page are open to whoever reaches this host; keep the port off the public load balancer"
        )
    return warnings


def keep_restart_keys(old: Config, new: Config) -> Config:
    """`new`, with every restart-only key put back to its value in `old` (the one bound at start-up)."""
    for key in RESTART_KEYS:
        new = _with(new, key.split("."), _get(old, key.split(".")))
    return new


def _default(cls: type, name: str) -> Any:
    """The default of field `name` of the dataclass `cls`: the one place each default is written."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise TypeError(f"{cls.__name__}.{name} is required: it has no default")
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


def _get(obj: Any, path: list[str]) -> Any:
    for part in path:
        obj = getattr(obj, part)
    return obj


def _with(obj: Any, path: list[str], value: Any) -> Any:
    head, *rest = path
    return replace(obj, **{head: _with(getattr(obj, head), rest, value) if rest else value})


_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Reader:
    """Walks the raw mapping, converting values and collecting errors by key path."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def bad(self, path: str, value: Any, expected: str) -> None:
        shown = "<hidden>" if path.rsplit(".", 1)[-1] in SECRET_KEYS else repr(value)
        self.error(path, f"expected {expected}, got {shown}")

    def expand(self, path: str, value: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in self.env:
                return self.env[name]
            if default is not None:
                return default
            self.error(path, f"environment variable {name} is not set")
            return ""

        return _ENV_PATTERN.sub(substitute, value)

    def section(self, raw: Any, path: str, allowed: set[str]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            self.bad(path or "<top level>", raw, "a mapping")
            return {}
        for key in raw:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                self.error(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return dict(raw)

    def string(self, raw: Mapping[str, Any], path: str, key: str, default: Any) -> Any:
        if key not in raw or raw[key] is None:
            return default
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.bad(_join(path, key), value, "a string")
            return default
        return self.expand(_join(path, key), str(value))

    def number(
        self,
        raw: Mapping[str, Any],
        path: str,
        key: str,
        default: float,
        *,
        low: float,
        high: float = math.inf,
        integer: bool = False,
        low_inclusive: bool = True,
    ) -> Any:
        if key not in raw or raw[key] is None:
            return default
        value = raw[key]
        where = _join(path, key)
        if isinstance(value, str):
            expanded = self.expand(where, value)
            try:
                value = int(expanded) if integer else float(expanded)
            except ValueError:
                self.bad(where, value, "an integer" if integer else "a number")
                return default
        kind = "an integer" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.bad(where, value, kind)
            return default
        if integer and not float(value).is_integer():
            self.bad(where, value, kind)
            return default
        if math.isnan(value) or value > high or value < low or (value == low and not low_inclusive):
            bound = "[" if low_inclusive else "("
            self.error(where, f"{value!r} is out of range {bound}{low:g}, {high:g}]")
            return default
        return int(value) if integer else float(value)

    def boolean(self, raw: Mapping[str, Any], path: str, key: str, default: bool) -> bool:
        if key not in raw or raw[key] is None:
            return default
        value = raw[key]
        if not isinstance(value, bool):
            self.bad(_join(path, key), value, "true or false")
            return default
        return value

    def string_list(self, raw: Mapping[str, Any], path: str, key: str, default: Any) -> Any:
        if key not in raw or raw[key] is None:
            return default
        value = raw[key]
        where = _join(path, key)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            self.bad(where, value, "a list of strings")
            return default
        items = []
        for index, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, (str, int)):
                self.bad(f"{where}[{index}]", item, "a string")
                continue
            items.append(self.expand(f"{where}[{index}]", str(item)))
        return tuple(items)

    def choice(self, raw: Mapping[str, Any], path: str, key: str, default: str, options: tuple[str, ...]) -> str:
        value: str = self.string(raw, path, key, default)
        if value not in options:
            self.error(_join(path, key), f"{value!r} is not one of {', '.join(options)}")
            return default
        return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# Reads `auth.public_key_file` (as written, after ${VAR} expansion) and returns the PEM
# text, or raises ValueError saying what is wrong with the file.
PublicKeyReader = Callable[[str], str]

_NO_ENV: Mapping[str, str] = MappingProxyType({})


def parse_config(
    raw: Any,
    *,
    env: Mapping[str, str] = _NO_ENV,
    read_public_key: PublicKeyReader | None = None,
    need_secret: bool = True,
) -> Config:
    """Validate the raw YAML mapping into a `Config`, or raise `ConfigError` with every problem.

    Pure: `env` is the only environment `${VAR}` sees (none by default, so a variable
    without a `:-default` is reported as unset), and the public key of RS*/PS*/ES*/EdDSA
    configs comes from `read_public_key`, called only when such a config names a file.
    `need_secret` False is for commands that never verify or mint a token (`route`): a
    missing or unset `auth.secret` is then no problem and stays None.
    """
    r = _Reader(env)
    top = r.section(
        raw,
        "",
        {
            "listen", "path", "auth", "backends", "rollout", "limits", "admin", "drain", "redis", "usage",
            "trusted_proxies", "log_level",
        },
    )
    if raw is None:
        r.error("<top level>", "the config is empty")

    listen_raw = r.section(top.get("listen"), "listen", {"host", "port"})
    listen = ListenConfig(
        host=r.string(listen_raw, "listen", "host", _default(ListenConfig, "host")),
        port=r.number(listen_raw, "listen", "port", _default(ListenConfig, "port"), low=0, high=65535, integer=True),
    )

    path = r.string(top, "", "path", _default(Config, "path"))
    if not path.startswith("/") or "?" in path:
        r.error("path", f"{path!r} must start with / and carry no query string")

    auth = _parse_auth(r, top.get("auth"), read_public_key, need_secret)
    backends = _parse_backends(r, top.get("backends"))
    rollout = _parse_rollout(r, top.get("rollout"))
    limits = _parse_limits(r, top.get("limits"))
    admin = _default(Config, "admin")
    if top.get("admin") is not None:
        admin_raw = r.section(top.get("admin"), "admin", {"host", "port"})
        admin = AdminConfig(
            host=r.string(admin_raw, "admin", "host", _default(AdminConfig, "host")),
            port=r.number(admin_raw, "admin", "port", _default(AdminConfig, "port"), low=0, high=65535, integer=True),
        )
        if admin.port and admin.port == listen.port:
            r.error("admin.port", f"{admin.port} is the public port; the admin listener needs its own")
    drain_raw = r.section(top.get("drain"), "drain", {"grace_seconds", "window_seconds"})
    drain = DrainConfig(
        grace_seconds=r.number(drain_raw, "drain", "grace_seconds", _default(DrainConfig, "grace_seconds"), low=0, high=3600),
        window_seconds=r.number(drain_raw, "drain", "window_seconds", _default(DrainConfig, "window_seconds"), low=0, high=3600),
    )
    redis = _default(Config, "redis")
    if top.get("redis") is not None:
        redis_raw = r.section(top.get("redis"), "redis", {"url", "sentinel", "timeout_seconds"})
        url = r.string(redis_raw, "redis", "url", None)
        sentinel = _parse_sentinel(r, redis_raw.get("sentinel"))
        if (url is None) == (redis_raw.get("sentinel") is None):
            r.error("redis", "set exactly one of redis.url and redis.sentinel")
        elif url is not None and not re.fullmatch(r"(redis|rediss|unix)://\S+", url):
            r.error("redis.url", "expected a redis://, rediss:// or unix:// URL")
        redis = RedisConfig(
            url=url,
            sentinel=sentinel,
            timeout_seconds=r.number(
                redis_raw, "redis", "timeout_seconds", _default(RedisConfig, "timeout_seconds"),
                low=0, high=30, low_inclusive=False,
            ),
        )
    usage_raw = r.section(top.get("usage"), "usage", {"retention_days", "legacy_threshold_percent", "path", "app_version"})
    usage_path = r.string(usage_raw, "usage", "path", _default(UsageConfig, "path"))
    if usage_path is not None and not usage_path.strip():
        r.error("usage.path", "must not be empty (omit it to keep usage in memory)")
    elif usage_path is not None and redis is not None:
        r.error("usage.path", "not used with redis: usage is counted in Redis; remove one of them")
    usage = UsageConfig(
        retention_days=r.number(
            usage_raw, "usage", "retention_days", _default(UsageConfig, "retention_days"), low=1, high=3650, integer=True
        ),
        legacy_threshold_percent=r.number(
            usage_raw, "usage", "legacy_threshold_percent", _default(UsageConfig, "legacy_threshold_percent"), low=0, high=100
        ),
        path=usage_path,
        app_version=_parse_app_version(r, usage_raw.get("app_version")),
    )
    proxies = _default(Config, "trusted_proxies")
    if top.get("trusted_proxies") is not None:
        networks = []
        for index, item in enumerate(r.string_list(top, "", "trusted_proxies", ())):
            try:
                networks.append(ip_network(item, strict=False))
            except ValueError:
                r.bad(f"trusted_proxies[{index}]", item, "an IP address or CIDR network")
        proxies = tuple(networks)
    log_level = r.choice(top, "", "log_level", _default(Config, "log_level"), ("DEBUG", "INFO", "WARNING", "ERROR"))

    if r.problems:
        raise ConfigError(r.problems)
    return Config(
        listen=listen,
        path=path,
        auth=auth,
        backends=backends,
        rollout=rollout,
        limits=limits,
        admin=admin,
        drain=drain,
        redis=redis,
        usage=usage,
        trusted_proxies=proxies,
        log_level=log_level,
    )


def _parse_auth(r: _Reader, raw: Any, read_public_key: PublicKeyReader | None, need_secret: bool) -> AuthConfig:
    p = "auth"
    a = r.section(
        raw,
        p,
        {
            "algorithms", "secret", "public_key_file", "jwks_url", "jwks_refresh_seconds", "user_id_claim", "query_param",
            "timeout_seconds", "audience", "issuer", "leeway_seconds", "connected_message",
            "legacy", "legacy_deprecated_at", "legacy_sunset", "session_expiry",
        },
    )
    if raw is None:
        r.error(p, "missing: the gateway cannot verify tokens without it")
    algorithms = r.string_list(a, p, "algorithms", ()) or _default(AuthConfig, "algorithms")  # [] too
    known = HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS
    for alg in algorithms:
        if alg not in known:
            r.error(f"{p}.algorithms", f"{alg!r} is not supported (use {', '.join(sorted(known))})")
    hmac = [alg for alg in algorithms if alg in HMAC_ALGORITHMS]
    public = [alg for alg in algorithms if alg in PUBLIC_KEY_ALGORITHMS]
    if hmac and public:
        r.error(f"{p}.algorithms", "mixing HMAC and public-key algorithms is not supported")

    known_problems = len(r.problems)
    secret = r.string(a, p, "secret", _default(AuthConfig, "secret"))
    if not need_secret and len(r.problems) > known_problems:  # e.g. ${JWT_SECRET} unset: unused here
        del r.problems[known_problems:]
        secret = None
    key_file = r.string(a, p, "public_key_file", _default(AuthConfig, "public_key_file"))
    public_key = _default(AuthConfig, "public_key")
    if hmac and not public:
        if not secret and need_secret:
            r.error(f"{p}.secret", "required (non-empty) for HMAC algorithms")
        if key_file:
            r.error(f"{p}.public_key_file", "not used with HMAC algorithms; set auth.secret")
    jwks_url = r.string(a, p, "jwks_url", _default(AuthConfig, "jwks_url"))
    if jwks_url is not None:
        if not re.fullmatch(r"https?://\S+", jwks_url):
            r.error(f"{p}.jwks_url", "expected an http:// or https:// URL")
        if hmac:
            r.error(f"{p}.jwks_url", "a JWKS holds public keys: use public-key algorithms (RS256, ES256, ...)")
        if key_file:
            r.error(f"{p}.public_key_file", "set one of auth.public_key_file and auth.jwks_url")
    if public and not hmac:
        if secret:
            r.error(f"{p}.secret", "not used with public-key algorithms; set auth.public_key_file or auth.jwks_url")
        if not key_file and jwks_url is None:
            r.error(f"{p}.public_key_file", "required for public-key algorithms (or auth.jwks_url)")
        elif key_file and read_public_key is None:
            r.error(f"{p}.public_key_file", f"{key_file!r} was not read: no public key reader was given")
        elif key_file and read_public_key is not None:
            try:
                public_key = read_public_key(key_file)
            except ValueError as exc:
                r.error(f"{p}.public_key_file", str(exc))

    connected = r.string(a, p, "connected_message", _default(AuthConfig, "connected_message"))
    try:
        decoded = json.loads(connected)
    except ValueError:
        decoded = None
    if not isinstance(decoded, dict) or decoded.get("type") != "connected":
        r.error(f"{p}.connected_message", 'must be a JSON object with "type": "connected"')

    legacy = r.choice(a, p, "legacy", _default(AuthConfig, "legacy"), LEGACY_MODES)
    deprecated_at = _timestamp(r, a, p, "legacy_deprecated_at", _default(AuthConfig, "legacy_deprecated_at"))
    sunset = _timestamp(r, a, p, "legacy_sunset", _default(AuthConfig, "legacy_sunset"))
    if legacy == "deprecate" and deprecated_at is None:
        r.error(f"{p}.legacy_deprecated_at", "required when auth.legacy is deprecate (the date legacy auth was deprecated)")

    return AuthConfig(
        algorithms=algorithms,
        secret=secret,
        public_key_file=key_file,
        public_key=public_key,
        jwks_url=jwks_url,
        jwks_refresh_seconds=r.number(
            a, p, "jwks_refresh_seconds", _default(AuthConfig, "jwks_refresh_seconds"), low=10, high=86400
        ),
        user_id_claim=r.string(a, p, "user_id_claim", _default(AuthConfig, "user_id_claim")),
        query_param=_parameter_name(r, a, p, "query_param", _default(AuthConfig, "query_param")),
        timeout_seconds=r.number(
            a, p, "timeout_seconds", _default(AuthConfig, "timeout_seconds"), low=0, high=3600, low_inclusive=False
        ),
        audience=r.string_list(a, p, "audience", _default(AuthConfig, "audience")),
        issuer=r.string(a, p, "issuer", _default(AuthConfig, "issuer")),
        leeway_seconds=r.number(a, p, "leeway_seconds", _default(AuthConfig, "leeway_seconds"), low=0, high=3600),
        connected_message=connected,
        legacy=legacy,
        legacy_deprecated_at=deprecated_at,
        legacy_sunset=sunset,
        session_expiry=r.choice(a, p, "session_expiry", _default(AuthConfig, "session_expiry"), SESSION_EXPIRY_MODES),
    )


def _timestamp(r: _Reader, raw: Mapping[str, Any], path: str, key: str, default: int | None) -> int | None:
    """A date, an ISO 8601 date-time, or unix seconds, as unix seconds (UTC)."""
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            r.bad(_join(path, key), value, "a date (2027-03-01), a date-time or unix seconds")
            return default
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return int(moment.timestamp())
    if isinstance(value, date):
        return int(datetime(value.year, value.month, value.day, tzinfo=timezone.utc).timestamp())
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    r.bad(_join(path, key), value, "a date (2027-03-01), a date-time or unix seconds")
    return default


def _parameter_name(r: _Reader, raw: Mapping[str, Any], path: str, key: str, default: str) -> str:
    name: str = r.string(raw, path, key, default)
    if not name or not re.fullmatch(r"[A-Za-z0-9_.~-]+", name):
        r.error(_join(path, key), f"{name!r} is not a plain URL parameter name")
        return default
    return name


def _parse_backends(r: _Reader, raw: Any) -> dict[str, BackendConfig]:
    section = r.section(raw, "backends", set(BACKEND_NAMES))
    if raw is None:
        r.error("backends", "missing: both backends.old and backends.new are required")
    backends = {}
    for name in BACKEND_NAMES:
        p = f"backends.{name}"
        if name not in section:
            if raw is not None:
                r.error(p, "missing")
            continue
        b = r.section(
            section[name],
            p,
            {"url", "auth", "query_param", "connect_timeout_seconds", "handshake_timeout_seconds", "compress"},
        )
        url = r.string(b, p, "url", "")  # required: "" fails the check below
        if not re.fullmatch(r"wss?://[^/?#\s]+(/[^#\s]*)?", url):
            r.error(f"{p}.url", f"{url!r} is not a ws:// or wss:// URL")
        if "auth" not in b:
            r.error(f"{p}.auth", "missing: say which auth style this backend speaks (query or message)")
        backends[name] = BackendConfig(
            url=url,
            # required: a missing auth is reported above; the placeholder only avoids a second error
            auth=r.choice(b, p, "auth", UPSTREAM_STYLES[0], UPSTREAM_STYLES),
            query_param=_parameter_name(r, b, p, "query_param", _default(BackendConfig, "query_param")),
            connect_timeout_seconds=r.number(
                b, p, "connect_timeout_seconds", _default(BackendConfig, "connect_timeout_seconds"),
                low=0, high=300, low_inclusive=False,
            ),
            handshake_timeout_seconds=r.number(
                b, p, "handshake_timeout_seconds", _default(BackendConfig, "handshake_timeout_seconds"),
                low=0, high=300, low_inclusive=False,
            ),
            compress=r.boolean(b, p, "compress", _default(BackendConfig, "compress")),
        )
    return backends


def _parse_rollout(r: _Reader, raw: Any) -> RolloutConfig:
    p = "rollout"
    s = r.section(raw, p, {"new_percent", "salt", "force_new", "force_old", "fallback_to_old", "guard", "rebalance"})
    force_new = frozenset(r.string_list(s, p, "force_new", _default(RolloutConfig, "force_new")))
    force_old = frozenset(r.string_list(s, p, "force_old", _default(RolloutConfig, "force_old")))
    both = sorted(force_new & force_old)
    if both:
        r.error(f"{p}.force_new", f"users in both force_new and force_old: {', '.join(both[:10])}")
    salt = r.string(s, p, "salt", _default(RolloutConfig, "salt"))
    if not salt:
        r.error(f"{p}.salt", "must not be empty")
    return RolloutConfig(
        new_percent=r.number(s, p, "new_percent", _default(RolloutConfig, "new_percent"), low=0, high=100),
        salt=salt,
        force_new=force_new,
        force_old=force_old,
        fallback_to_old=r.boolean(s, p, "fallback_to_old", _default(RolloutConfig, "fallback_to_old")),
        guard=_parse_guard(r, s.get("guard")),
        rebalance=_parse_rebalance(r, s.get("rebalance")),
    )


def _parse_rebalance(r: _Reader, raw: Any) -> RebalanceConfig:
    p = "rollout.rebalance"
    b = r.section(raw, p, {"enabled", "window_seconds", "idle_seconds", "on_guard_trip"})
    return RebalanceConfig(
        enabled=r.boolean(b, p, "enabled", _default(RebalanceConfig, "enabled")),
        window_seconds=r.number(b, p, "window_seconds", _default(RebalanceConfig, "window_seconds"), low=0, high=86400),
        idle_seconds=r.number(b, p, "idle_seconds", _default(RebalanceConfig, "idle_seconds"), low=0, high=3600),
        on_guard_trip=r.boolean(b, p, "on_guard_trip", _default(RebalanceConfig, "on_guard_trip")),
    )


def _parse_guard(r: _Reader, raw: Any) -> GuardConfig:
    p = "rollout.guard"
    g = r.section(
        raw,
        p,
        {
            "enabled", "window_seconds", "max_failure_ratio", "min_samples", "cooldown_seconds",
            "step_seconds", "recovery_steps", "spare_forced",
        },
    )
    steps: tuple[float, ...] = _default(GuardConfig, "recovery_steps")
    if g.get("recovery_steps") is not None:
        value = g["recovery_steps"]
        if not isinstance(value, list) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 100 for v in value
        ):
            r.bad(f"{p}.recovery_steps", value, "a non-empty list of percentages in (0, 100]")
        elif list(value) != sorted(value) or value[-1] != 100:
            r.error(f"{p}.recovery_steps", f"{value!r} must rise and end at 100")
        else:
            steps = tuple(float(v) for v in value)
    return GuardConfig(
        enabled=r.boolean(g, p, "enabled", _default(GuardConfig, "enabled")),
        window_seconds=r.number(
            g, p, "window_seconds", _default(GuardConfig, "window_seconds"), low=0, high=86400, low_inclusive=False
        ),
        max_failure_ratio=r.number(g, p, "max_failure_ratio", _default(GuardConfig, "max_failure_ratio"), low=0, high=1),
        min_samples=r.number(g, p, "min_samples", _default(GuardConfig, "min_samples"), low=1, high=10**6, integer=True),
        cooldown_seconds=r.number(g, p, "cooldown_seconds", _default(GuardConfig, "cooldown_seconds"), low=0, high=86400),
        step_seconds=r.number(g, p, "step_seconds", _default(GuardConfig, "step_seconds"), low=0, high=86400),
        recovery_steps=steps,
        spare_forced=r.boolean(g, p, "spare_forced", _default(GuardConfig, "spare_forced")),
    )


def _parse_app_version(r: _Reader, raw: Any) -> AppVersionConfig | None:
    off: AppVersionConfig | None = _default(UsageConfig, "app_version")
    if raw is None:
        return off
    p = "usage.app_version"
    a = r.section(raw, p, {"header", "pattern", "max_versions"})
    header = r.string(a, p, "header", _default(AppVersionConfig, "header"))
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", header):
        r.error(f"{p}.header", f"{header!r} is not an HTTP header name")
    pattern = r.string(a, p, "pattern", None)
    if pattern is None:
        r.error(f"{p}.pattern", "required: a regular expression with a group (?P<version>...)")
        pattern = ""
    else:
        try:
            groups = re.compile(pattern).groupindex
        except re.error as exc:
            r.error(f"{p}.pattern", f"{pattern!r} is not a regular expression: {exc}")
        else:
            if "version" not in groups:
                r.error(f"{p}.pattern", f"{pattern!r} has no group named version: write it as (?P<version>...)")
    max_versions = r.number(
        a, p, "max_versions", _default(AppVersionConfig, "max_versions"), low=1, high=1000, integer=True
    )
    return AppVersionConfig(pattern=pattern, header=header, max_versions=max_versions)


def _parse_sentinel(r: _Reader, raw: Any) -> SentinelConfig | None:
    if raw is None:
        return None
    p = "redis.sentinel"
    s = r.section(raw, p, {"hosts", "service_name", "password"})
    hosts = []
    for index, entry in enumerate(r.string_list(s, p, "hosts", ())):
        host, _, port = entry.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            r.error(f"{p}.hosts[{index}]", f"{entry!r} is not host:port")
            continue
        hosts.append((host.strip("[]"), int(port)))
    if not hosts and "hosts" not in s:
        r.error(f"{p}.hosts", "required: the sentinels as host:port")
    elif not hosts:
        r.error(f"{p}.hosts", "at least one sentinel (host:port) is needed")
    service_name = r.string(s, p, "service_name", "")
    if not service_name:
        r.error(f"{p}.service_name", "required: the master's name the sentinels monitor")
    return SentinelConfig(tuple(hosts), service_name, r.string(s, p, "password", None) or None)


def _parse_limits(r: _Reader, raw: Any) -> LimitsConfig:
    p = "limits"
    s = r.section(
        raw,
        p,
        {
            "max_message_bytes", "store_and_forward_bytes", "hold_buffer_bytes", "hold_buffer_frames", "ping_interval_seconds",
            "max_upstream_connections", "auth_failures_per_ip_per_minute", "max_sessions_per_user",
            "handshake_timeout_seconds", "max_request_header_bytes", "max_pending_handshakes",
            "max_pending_handshakes_per_ip",
        },
    )
    max_message = r.number(
        s, p, "max_message_bytes", _default(LimitsConfig, "max_message_bytes"), low=1, high=2**31, integer=True
    )
    # The default hold buffer grows to hold at least one largest frame.
    hold_default = max(_default(LimitsConfig, "hold_buffer_bytes"), max_message)
    hold_bytes = r.number(s, p, "hold_buffer_bytes", hold_default, low=1, high=2**33, integer=True)
    if hold_bytes < max_message:
        r.error(f"{p}.hold_buffer_bytes", f"{hold_bytes} is smaller than limits.max_message_bytes ({max_message})")
    max_pending = r.number(
        s, p, "max_pending_handshakes", _default(LimitsConfig, "max_pending_handshakes"), low=1, high=10**6, integer=True
    )
    pending_share = r.number(
        s, p, "max_pending_handshakes_per_ip", max(1, max_pending // PENDING_SHARE_DIVISOR), low=1, high=10**6, integer=True
    )
    if pending_share > max_pending:
        r.error(
            f"{p}.max_pending_handshakes_per_ip",
            f"{pending_share} is larger than limits.max_pending_handshakes ({max_pending})",
        )
    return LimitsConfig(
        max_message_bytes=max_message,
        store_and_forward_bytes=r.number(
            s, p, "store_and_forward_bytes", _default(LimitsConfig, "store_and_forward_bytes"),
            low=0, high=2**31, integer=True,
        ),
        hold_buffer_bytes=hold_bytes,
        hold_buffer_frames=r.number(
            s, p, "hold_buffer_frames", _default(LimitsConfig, "hold_buffer_frames"), low=1, high=10**6, integer=True
        ),
        ping_interval_seconds=r.number(
            s, p, "ping_interval_seconds", _default(LimitsConfig, "ping_interval_seconds"), low=0, high=3600
        ),
        max_upstream_connections=r.number(
            s, p, "max_upstream_connections", _default(LimitsConfig, "max_upstream_connections"),
            low=1, high=10**6, integer=True,
        ),
        auth_failures_per_ip_per_minute=r.number(
            s, p, "auth_failures_per_ip_per_minute", _default(LimitsConfig, "auth_failures_per_ip_per_minute"),
            low=1, high=10**9, integer=True,
        ),
        max_sessions_per_user=r.number(
            s, p, "max_sessions_per_user", _default(LimitsConfig, "max_sessions_per_user"), low=1, high=10**6, integer=True
        ),
        handshake_timeout_seconds=r.number(
            s, p, "handshake_timeout_seconds", _default(LimitsConfig, "handshake_timeout_seconds"), low=0.1, high=600
        ),
        max_request_header_bytes=r.number(
            s, p, "max_request_header_bytes", _default(LimitsConfig, "max_request_header_bytes"),
            low=1024, high=1024 * 1024, integer=True,
        ),
        max_pending_handshakes=max_pending,
        max_pending_handshakes_per_ip=pending_share,
    )


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of letting the last one win silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(
    path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None, need_secret: bool = True
) -> Config:
    """Read and validate the YAML file at `path`; every failure is a `ConfigError` naming it."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or exc}"], source) from None
    except UnicodeDecodeError:
        raise ConfigError(["the file is not UTF-8 text"], source) from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError([yaml_problem(text, exc)], source) from None
    base_dir = Path(path).resolve().parent
    read_key = _public_key_file_reader(base_dir)
    try:
        config = parse_config(
            raw, env=os.environ if env is None else env, read_public_key=read_key, need_secret=need_secret
        )
    except ConfigError as exc:
        raise ConfigError(exc.problems, source) from None
    if config.usage.path is None:
        return config
    # `serve` and `report` must find the same file whatever directory each is started in.
    return replace(config, usage=replace(config.usage, path=str(base_dir / config.usage.path)))


_KEY_LINE = re.compile(r" *(?:- +)?([^\s:#\-'\"{\[][^:#]*?|'[^']*'|\"[^\"]*\") *:(?:\s|$)")


def yaml_problem(text: str, exc: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: the key path, the line and column, what is wrong.

    PyYAML marks where it *noticed* the error. For an unclosed quote or bracket, or a key
    without its colon, that is the next line or the end of the file, while the mistake is
    where the construct started (its context mark): that is the line reported.
    """
    problem = getattr(exc, "problem", None) or "invalid YAML"
    mark = getattr(exc, "problem_mark", None)
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context_mark is not None and context and not context.startswith("while parsing a block"):
        mark = context_mark
        problem = f"{problem} ({context})"
    if mark is None:
        return problem
    lines = text.splitlines()
    line, column = mark.line, mark.column
    if line >= len(lines) or not lines[line].strip():  # the end of the file: the unclosed thing is on the last line written
        line = next((n for n in range(min(line, len(lines) - 1), -1, -1) if lines[n].strip()), 0)
        column = len(lines[line]) - 1 if lines else 0
    if problem == "mapping values are not allowed here":
        # "key value" then "key: value" reads as one plain scalar until that second colon:
        # the key without its colon is the line above, at the same indentation.
        above = next((n for n in range(line - 1, -1, -1) if lines[n].strip() and not lines[n].lstrip().startswith("#")), None)
        indent = len(lines[line]) - len(lines[line].lstrip())
        if above is not None and _KEY_LINE.match(lines[above]) is None and len(lines[above]) - len(lines[above].lstrip()) == indent:
            line, column, problem = above, indent, "could not find expected ':' (a key without its colon)"
    keys = yaml_key_path(lines, line)
    return f"{keys + ': ' if keys else ''}line {line + 1}, column {column + 1}: {problem}"


def yaml_key_path(lines: list[str], index: int) -> str:
    """The dotted key path of line `index` of a block-style YAML text, from indentation alone
    (the text does not parse, so this is all there is): its own key, under every key above
    it that is less indented."""
    path: list[tuple[int, str]] = []
    for number, line in enumerate(lines[: index + 1]):
        match = _KEY_LINE.match(line)
        if match is None and number < index:
            continue
        indent = match.start(1) if match else len(line) - len(line.lstrip())
        while path and path[-1][0] >= indent:
            path.pop()
        if match is not None:
            path.append((indent, match.group(1).strip("'\"")))
    return ".".join(key for _, key in path)


def _public_key_file_reader(base_dir: Path) -> PublicKeyReader:
    """Reads `auth.public_key_file` relative to `base_dir` (the config file's) and checks it is PEM."""

    def read(name: str) -> str:
        key_path = Path(name)
        if not key_path.is_absolute():
            key_path = base_dir / key_path
        try:
            text = key_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read {str(key_path)!r}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:  # DER or other binary: not PEM either
            raise ValueError(f"{str(key_path)!r} is not a PEM public key") from None
        if "PUBLIC KEY" not in text:
            raise ValueError(f"{str(key_path)!r} is not a PEM public key")
        return text

    return read
