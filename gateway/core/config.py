"""The gateway's configuration model: frozen dataclasses, one field per key.

Each key is written once, as its field: the default, and in the field's metadata (`rules`)
the rules the parser (`configparse`) checks — bounds, allowed values, a pattern. What a
field's type is says how it is read (a number, a string, a list, a nested section); rules
that join two keys are the parser's hand-written part. The model itself does no I/O and
validates nothing (`config_warnings` judges a valid one), so every module may import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network
from typing import Any

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
BACKEND_NAMES = ("old", "new")
UPSTREAM_STYLES = ("query", "message")
DEFAULT_CONNECTED_MESSAGE = '{"type":"connected","message":"Connected to Wealth Coach AI"}'
LEGACY_MODES = ("allow", "deprecate", "deny")
SESSION_EXPIRY_MODES = ("ignore", "close")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# A URL query parameter the gateway reads or writes: nothing that needs escaping.
PARAMETER_NAME = r"[A-Za-z0-9_.~-]+"


class ConfigError(Exception):
    """A config that cannot be served. `problems` holds one line per bad key."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(prefix + "; ".join(problems))


def rules(
    *,
    low: float | None = None,
    high: float = math.inf,
    open_low: bool = False,
    choices: tuple[str, ...] | None = None,
    pattern: str | None = None,
    says: str = "",
    placeholder: Any = None,
    read: str = "",
) -> dict[str, Any]:
    """A key's rules, kept in its field's metadata for `configparse` to check.

    `low`/`high` bound a number (`open_low`: the low bound itself is refused; a number
    without `low` has no reader); `choices` are a string's allowed values; `pattern` must
    match the whole string, else `says` is the error (`{value!r}` in it is the value).
    `placeholder` stands in for a required key that is missing, so one mistake gives one
    error. `read` is "custom" for a key the parser reads by hand (`configparse._CUSTOM`),
    "timestamp" for a date, "none" for a field that is no key at all.
    """
    given: dict[str, Any] = {"high": high, "open_low": open_low, "says": says, "placeholder": placeholder, "read": read}
    if low is not None:
        given["low"] = low
    if choices is not None:
        given["choices"] = choices
    if pattern is not None:
        given["pattern"] = pattern
    return given


def key(default: Any, *, secret: bool = False, **given: Any) -> Any:
    """A key with a default: the field, its `rules` in the metadata; `secret` keeps it out of the repr.

    A required key is a plain `field(metadata=rules(...))`, which mypy knows has no default.
    """
    return field(default=default, repr=not secret, metadata=rules(**given))


@dataclass(frozen=True)
class ListenConfig:
    host: str = "0.0.0.0"
    port: int = key(8080, low=0, high=65535)


@dataclass(frozen=True)
class AuthConfig:
    algorithms: tuple[str, ...] = key(("HS256",), read="custom")
    secret: str | None = key(None, read="custom", secret=True)
    public_key_file: str | None = None
    # The PEM text of `public_key_file`, read by load_config: no key of the file.
    public_key: str | None = key(None, read="none", secret=True)
    jwks_url: str | None = key(None, pattern=r"https?://\S+", says="expected an http:// or https:// URL")
    jwks_refresh_seconds: float = key(300.0, low=10, high=86400)
    user_id_claim: str = "user_id"
    query_param: str = key("token", pattern=PARAMETER_NAME, says="{value!r} is not a plain URL parameter name")
    timeout_seconds: float = key(30.0, low=0, high=3600, open_low=True)
    audience: tuple[str, ...] = ()
    issuer: str | None = None
    leeway_seconds: float = key(0.0, low=0, high=3600)
    connected_message: str = key(DEFAULT_CONNECTED_MESSAGE, read="custom")
    legacy: str = key("allow", choices=LEGACY_MODES)
    legacy_deprecated_at: int | None = key(None, read="timestamp")
    legacy_sunset: int | None = key(None, read="timestamp")
    session_expiry: str = key("ignore", choices=SESSION_EXPIRY_MODES)


@dataclass(frozen=True)
class BackendConfig:
    url: str = field(
        metadata=rules(pattern=r"wss?://[^/?#\s]+(/[^#\s]*)?", says="{value!r} is not a ws:// or wss:// URL", placeholder="")
    )
    # required: the parser reports a missing auth; the placeholder only avoids a second error
    auth: str = field(metadata=rules(choices=UPSTREAM_STYLES, placeholder=UPSTREAM_STYLES[0], read="custom"))
    query_param: str = key("token", pattern=PARAMETER_NAME, says="{value!r} is not a plain URL parameter name")
    connect_timeout_seconds: float = key(10.0, low=0, high=300, open_low=True)
    handshake_timeout_seconds: float = key(10.0, low=0, high=300, open_low=True)
    compress: bool = False


@dataclass(frozen=True)
class GuardConfig:
    enabled: bool = True
    window_seconds: float = key(60.0, low=0, high=86400, open_low=True)
    max_failure_ratio: float = key(0.05, low=0, high=1)
    min_samples: int = key(20, low=1, high=10**6)
    cooldown_seconds: float = key(60.0, low=0, high=86400)
    step_seconds: float = key(30.0, low=0, high=86400)
    recovery_steps: tuple[float, ...] = key((10.0, 25.0, 50.0, 100.0), read="custom")
    spare_forced: bool = False


@dataclass(frozen=True)
class RebalanceConfig:
    enabled: bool = False
    window_seconds: float = key(60.0, low=0, high=86400)
    idle_seconds: float = key(5.0, low=0, high=3600)
    on_guard_trip: bool = False


RAMP_FAILURE_ACTIONS = ("step_back", "hold")


@dataclass(frozen=True)
class GatesConfig:
    """The migration plan's alerts, judged over a ramp step's window of new-backend sessions."""

    success_rate_min: float = key(0.95, low=0, high=1)  # upstream sessions opened / attempted
    auth_failure_rate_max: float = key(0.05, low=0, high=1)  # tokens the new backend refused / attempted
    reply_seconds_avg_max: float = key(2.0, low=0, high=3600, open_low=True)
    reply_ratio_max: float = key(1.5, low=0, high=1000, open_low=True)  # new backend's average reply ÷ old's


@dataclass(frozen=True)
class RampConfig:
    enabled: bool = False
    steps: tuple[float, ...] = key((1.0, 5.0, 25.0, 50.0, 100.0), read="custom")
    hold_minutes: float = key(30.0, low=0, high=7 * 24 * 60)
    min_sessions: int = key(100, low=0, high=10**9)
    on_failure: str = key("step_back", choices=RAMP_FAILURE_ACTIONS)
    paused: bool = False
    gates: GatesConfig = GatesConfig()


@dataclass(frozen=True)
class RolloutConfig:
    new_percent: float = key(0.0, low=0, high=100)
    salt: str = key("chat-auth-migration", pattern=r"(?s).+", says="must not be empty")
    force_new: frozenset[str] = frozenset()
    force_old: frozenset[str] = frozenset()
    fallback_to_old: bool = True
    guard: GuardConfig = GuardConfig()
    rebalance: RebalanceConfig = RebalanceConfig()
    ramp: RampConfig = RampConfig()


# One address's default share of `limits.max_pending_handshakes`: a flood needs this many
# addresses to fill the bound.
PENDING_SHARE_DIVISOR = 50


@dataclass(frozen=True)
class LimitsConfig:
    max_message_bytes: int = key(1024 * 1024, low=1, high=2**31)
    store_and_forward_bytes: int = key(64 * 1024, low=0, high=2**31)
    # The parser grows this default to hold at least one largest message.
    hold_buffer_bytes: int = key(4 * 1024 * 1024, low=1, high=2**33, read="custom")
    hold_buffer_frames: int = key(1000, low=1, high=10**6)
    ping_interval_seconds: float = key(20.0, low=0, high=3600)
    max_upstream_connections: int = key(10000, low=1, high=10**6)
    handshake_timeout_seconds: float = key(10.0, low=0.1, high=600)
    max_request_header_bytes: int = key(16 * 1024, low=1024, high=1024 * 1024)
    max_pending_handshakes: int = key(10000, low=1, high=10**6)
    # The parser derives this default from the given max_pending_handshakes.
    max_pending_handshakes_per_ip: int = key(10000 // PENDING_SHARE_DIVISOR, low=1, high=10**6, read="custom")
    auth_failures_per_ip_per_minute: int | None = key(None, low=1, high=10**9)
    max_sessions_per_user: int | None = key(None, low=1, high=10**6)


@dataclass(frozen=True)
class SentinelConfig:
    """Redis behind Sentinel: the sentinels to ask, and the name of the master they watch."""

    hosts: tuple[tuple[str, int], ...] = field(metadata=rules(read="custom"))
    service_name: str = field(
        metadata=rules(pattern=r"(?s).+", says="required: the master's name the sentinels monitor", placeholder="")
    )
    password: str | None = key(None, secret=True)  # the master's (and replicas') password


@dataclass(frozen=True)
class RedisConfig:
    """Exactly one of `url` (a single endpoint) and `sentinel`."""

    url: str | None = key(None, secret=True)
    sentinel: SentinelConfig | None = None
    timeout_seconds: float = key(0.25, low=0, high=30, open_low=True)


@dataclass(frozen=True, kw_only=True)
class AppVersionConfig:
    """Which app version a session comes from: `pattern`'s group ``version`` in header `header`."""

    header: str = key("User-Agent", pattern=r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", says="{value!r} is not an HTTP header name")
    pattern: str = field(metadata=rules(read="custom"))
    max_versions: int = key(50, low=1, high=1000)  # per UTC day; versions past it count as "other"


@dataclass(frozen=True)
class UsageConfig:
    retention_days: int = key(120, low=1, high=3650)
    legacy_threshold_percent: float = key(1.0, low=0, high=100)
    # SQLite file for usage without Redis, so `ws-gateway report` has data to read; None
    # keeps usage in memory only. Relative to the config file's directory (load_config).
    path: str | None = None
    app_version: AppVersionConfig | None = None


@dataclass(frozen=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = key(9090, low=0, high=65535)


@dataclass(frozen=True)
class DrainConfig:
    grace_seconds: float = key(5.0, low=0, high=3600)
    window_seconds: float = key(30.0, low=0, high=3600)


# Keyword-only, as AppVersionConfig: its fields stand in the order they are read and reported.
@dataclass(frozen=True, kw_only=True)
class Config:
    listen: ListenConfig = ListenConfig()
    path: str = key("/ws/chat", pattern=r"/[^?]*", says="{value!r} must start with / and carry no query string")
    auth: AuthConfig = field(metadata=rules(read="custom"))
    backends: Mapping[str, BackendConfig] = field(metadata=rules(read="custom"))
    rollout: RolloutConfig = RolloutConfig()
    limits: LimitsConfig = LimitsConfig()
    admin: AdminConfig | None = None
    drain: DrainConfig = DrainConfig()
    redis: RedisConfig | None = None
    usage: UsageConfig = UsageConfig()
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = key((), read="custom")
    log_level: str = key("INFO", choices=LOG_LEVELS)


# Keys bound to sockets at start-up: a reload that changes them is reported, not applied.
RESTART_KEYS = (
    "listen", "path", "admin", "redis", "limits.max_upstream_connections", "auth.jwks_url", "auth.jwks_refresh_seconds",
    "usage.path",
)


def restart_required(old: Config, new: Config) -> list[str]:
    """The restart-only keys that differ between two configs."""
    return [name for name in RESTART_KEYS if _get(old, name.split(".")) != _get(new, name.split("."))]


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
    if config.rollout.ramp.enabled and config.redis is None and config.usage.path is None:
        warnings.append(
            "rollout.ramp: its progress is kept in memory (no redis, no usage.path): a restart starts the ramp"
            " again at its first step, and under serve --workers each worker ramps on its own; set usage.path"
            " (one host) or redis (replicas)"
        )
    return warnings


def keep_restart_keys(old: Config, new: Config) -> Config:
    """`new`, with every restart-only key put back to its value in `old` (the one bound at start-up)."""
    for name in RESTART_KEYS:
        new = _with(new, name.split("."), _get(old, name.split(".")))
    return new


def _get(obj: Any, path: list[str]) -> Any:
    for part in path:
        obj = getattr(obj, part)
    return obj


def _with(obj: Any, path: list[str], value: Any) -> Any:
    head, *rest = path
    return replace(obj, **{head: _with(getattr(obj, head), rest, value) if rest else value})
