"""Validating the raw YAML mapping into the `config` model.

`parse_config` is pure: it takes the mapping YAML produced, the environment `${VAR}`
expands from (an argument, empty unless given: it never reads `os.environ`) and, for
public-key algorithms, a function that returns the key named by `auth.public_key_file`.
It returns a `Config` or raises `ConfigError` listing *every* problem, each with its
dotted key path and the offending value (secrets are never echoed).

One reader (`Reader.walk`) reads every section: a field's type says how its key is read,
its metadata (`config.rules`) its bounds, allowed values and pattern, its default is the
dataclass default. Hand-written code is left for the rules that join keys (`_CHECKS`), the
defaults derived from another key, and the few keys with a shape of their own (`_CUSTOM`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, fields, is_dataclass
from datetime import date, datetime, timezone
from functools import cache
from ipaddress import ip_network
from types import MappingProxyType, NoneType, UnionType
from typing import Any, get_args, get_type_hints

from .config import (
    BACKEND_NAMES,
    HMAC_ALGORITHMS,
    PENDING_SHARE_DIVISOR,
    PUBLIC_KEY_ALGORITHMS,
    AppVersionConfig,
    AuthConfig,
    BackendConfig,
    Config,
    ConfigError,
    GuardConfig,
    LimitsConfig,
    RampConfig,
    RedisConfig,
    RolloutConfig,
    SentinelConfig,
)

SECRET_KEYS = frozenset({"secret"})

# Reads `auth.public_key_file` (as written, after ${VAR} expansion) and returns the PEM
# text, or raises ValueError saying what is wrong with the file.
PublicKeyReader = Callable[[str], str]

_NO_ENV: Mapping[str, str] = MappingProxyType({})
_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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
    r = Reader(env, read_public_key, need_secret)
    top = r.section(raw, "", Config)
    if raw is None:
        r.error("<top level>", "the config is empty")
    values = r.walk(Config, top, "")
    if r.problems:
        raise ConfigError(r.problems)
    return Config(**values)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _keys(cls: type) -> set[str]:
    """The keys a section of `cls` allows: its fields, but for those that are no key."""
    return {f.name for f in fields(cls) if f.metadata.get("read") != "none"}


def _section_type(hint: Any) -> tuple[type | None, bool]:
    """The dataclass a field's type names, if any, and whether the section may be left out (None)."""
    if isinstance(hint, UnionType):
        members = [arg for arg in get_args(hint) if arg is not NoneType]
        if len(members) == 1 and isinstance(members[0], type) and is_dataclass(members[0]):
            return members[0], True
    if isinstance(hint, type) and is_dataclass(hint):
        return hint, False
    return None, False


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Reader:
    """Walks the raw mapping, converting values and collecting errors by key path."""

    def __init__(self, env: Mapping[str, str], read_public_key: PublicKeyReader | None, need_secret: bool) -> None:
        self.env = env
        self.read_public_key = read_public_key
        self.need_secret = need_secret
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

    def section(self, raw: Any, path: str, allowed: type | set[str]) -> dict[str, Any]:
        """The mapping at `path`, each key not in `allowed` (a dataclass's keys, or a set) reported."""
        keys = _keys(allowed) if isinstance(allowed, type) else allowed
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            self.bad(path or "<top level>", raw, "a mapping")
            return {}
        for key in raw:
            if key not in keys:
                where = f"{path}.{key}" if path else str(key)
                self.error(where, f"unknown key (allowed: {', '.join(sorted(keys))})")
        return dict(raw)

    def read(self, cls: type, raw: Any, path: str) -> Any:
        """The section at `path` as a `cls`."""
        return cls(**self.walk(cls, self.section(raw, path, cls), path))

    def walk(self, cls: type, raw: Mapping[str, Any], path: str) -> dict[str, Any]:
        """Every key of `cls` read from the section `raw` in field order, then the rules that join them."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            read = f.metadata.get("read")
            if read == "custom":
                values[f.name] = _CUSTOM[cls, f.name](self, f, raw, path, values)
            elif read != "none":
                values[f.name] = self.value(cls, f, raw, path, _default(f))
        check = _CHECKS.get(cls)
        if check is not None:
            check(self, path, values)
        return values

    def value(self, cls: type, f: Field[Any], raw: Mapping[str, Any], path: str, default: Any) -> Any:
        """Key `f.name` of the section `raw` (a `cls`), read as its field's type says, checked by its rules."""
        hint, rules, key = _hints(cls)[f.name], f.metadata, f.name
        section, optional = _section_type(hint)
        if section is not None:
            return None if optional and raw.get(key) is None else self.read(section, raw.get(key), _join(path, key))
        if rules.get("read") == "timestamp":
            return self.timestamp(raw, path, key, default)
        if hint is bool:
            return self.boolean(raw, path, key, default)
        if hint in (int, float, int | None) and "low" in rules:
            return self.number(
                raw, path, key, default,
                low=rules["low"], high=rules["high"], integer=hint is not float, low_inclusive=not rules["open_low"],
            )
        if hint == tuple[str, ...]:
            return self.string_list(raw, path, key, default)
        if hint == frozenset[str]:
            return frozenset(self.string_list(raw, path, key, default))
        if hint not in (str, str | None):
            raise TypeError(f"{_join(path, key)}: no reader for {hint}: mark it rules(read='custom'), add it to _CUSTOM")
        value = self.string(raw, path, key, default)
        if value is None:
            return value
        if "choices" in rules and value not in rules["choices"]:
            self.error(_join(path, key), f"{value!r} is not one of {', '.join(rules['choices'])}")
            return default
        if "pattern" in rules and not re.fullmatch(rules["pattern"], value):
            self.error(_join(path, key), rules["says"].format(value=value))
        return value

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

    def timestamp(self, raw: Mapping[str, Any], path: str, key: str, default: int | None) -> int | None:
        """A date, an ISO 8601 date-time, or unix seconds, as unix seconds (UTC)."""
        value = raw.get(key)
        if value is None:
            return default
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                self.bad(_join(path, key), value, "a date (2027-03-01), a date-time or unix seconds")
                return default
        if isinstance(value, datetime):
            moment = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
            return int(moment.timestamp())
        if isinstance(value, date):
            return int(datetime(value.year, value.month, value.day, tzinfo=timezone.utc).timestamp())
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        self.bad(_join(path, key), value, "a date (2027-03-01), a date-time or unix seconds")
        return default


def _default(f: Field[Any]) -> Any:
    """A field's default; a required key's placeholder, which stands in while its absence is reported."""
    return f.metadata.get("placeholder") if f.default is MISSING else f.default


# -- the keys with a shape of their own -------------------------------------------------------


def _algorithms(r: Reader, f: Field[Any], a: Mapping[str, Any], p: str, values: dict[str, Any]) -> tuple[str, ...]:
    algorithms: tuple[str, ...] = r.string_list(a, p, "algorithms", ()) or _default(f)  # [] too
    known = HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS
    for alg in algorithms:
        if alg not in known:
            r.error(f"{p}.algorithms", f"{alg!r} is not supported (use {', '.join(sorted(known))})")
    if any(alg in HMAC_ALGORITHMS for alg in algorithms) and any(alg in PUBLIC_KEY_ALGORITHMS for alg in algorithms):
        r.error(f"{p}.algorithms", "mixing HMAC and public-key algorithms is not supported")
    return algorithms


def _secret(r: Reader, f: Field[Any], a: Mapping[str, Any], p: str, values: dict[str, Any]) -> str | None:
    known_problems = len(r.problems)
    secret: str | None = r.string(a, p, "secret", _default(f))
    if not r.need_secret and len(r.problems) > known_problems:  # e.g. ${JWT_SECRET} unset: unused here
        del r.problems[known_problems:]
        secret = None
    return secret


def _connected_message(r: Reader, f: Field[Any], a: Mapping[str, Any], p: str, values: dict[str, Any]) -> str:
    connected: str = r.string(a, p, "connected_message", _default(f))
    try:
        decoded = json.loads(connected)
    except ValueError:
        decoded = None
    if not isinstance(decoded, dict) or decoded.get("type") != "connected":
        r.error(f"{p}.connected_message", 'must be a JSON object with "type": "connected"')
    return connected


def _recovery_steps(r: Reader, f: Field[Any], g: Mapping[str, Any], p: str, values: dict[str, Any]) -> tuple[float, ...]:
    steps: tuple[float, ...] = _default(f)
    value = g.get("recovery_steps")
    if value is None:
        return steps
    if not isinstance(value, list) or not value or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 100 for v in value
    ):
        r.bad(f"{p}.recovery_steps", value, "a non-empty list of percentages in (0, 100]")
    elif list(value) != sorted(value) or value[-1] != 100:
        r.error(f"{p}.recovery_steps", f"{value!r} must rise and end at 100")
    else:
        steps = tuple(float(v) for v in value)
    return steps


def _ramp_steps(r: Reader, f: Field[Any], g: Mapping[str, Any], p: str, values: dict[str, Any]) -> tuple[float, ...]:
    steps: tuple[float, ...] = _default(f)
    value = g.get("steps")
    if value is None:
        return steps
    if not isinstance(value, list) or not value or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 100 for v in value
    ):
        r.bad(f"{p}.steps", value, "a non-empty list of percentages in (0, 100]")
    elif any(low >= high for low, high in zip(value, value[1:])):
        r.error(f"{p}.steps", f"{value!r} must rise step by step (each percentage above the one before)")
    else:
        steps = tuple(float(v) for v in value)
    return steps


def _hold_buffer_bytes(r: Reader, f: Field[Any], s: Mapping[str, Any], p: str, values: dict[str, Any]) -> int:
    # The default hold buffer grows to hold at least one largest frame.
    hold: int = r.value(LimitsConfig, f, s, p, max(_default(f), values["max_message_bytes"]))
    return hold


def _pending_share(r: Reader, f: Field[Any], s: Mapping[str, Any], p: str, values: dict[str, Any]) -> int:
    share: int = r.value(LimitsConfig, f, s, p, max(1, values["max_pending_handshakes"] // PENDING_SHARE_DIVISOR))
    return share


def _sentinel_hosts(
    r: Reader, f: Field[Any], s: Mapping[str, Any], p: str, values: dict[str, Any]
) -> tuple[tuple[str, int], ...]:
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
    return tuple(hosts)


def _version_pattern(r: Reader, f: Field[Any], a: Mapping[str, Any], p: str, values: dict[str, Any]) -> str:
    pattern: str | None = r.string(a, p, "pattern", None)
    if pattern is None:
        r.error(f"{p}.pattern", "required: a regular expression with a group (?P<version>...)")
        return ""
    try:
        groups = re.compile(pattern).groupindex
    except re.error as exc:
        r.error(f"{p}.pattern", f"{pattern!r} is not a regular expression: {exc}")
    else:
        if "version" not in groups:
            r.error(f"{p}.pattern", f"{pattern!r} has no group named version: write it as (?P<version>...)")
    return pattern


def _auth(r: Reader, f: Field[Any], top: Mapping[str, Any], p: str, values: dict[str, Any]) -> AuthConfig:
    raw = top.get("auth")
    section = r.section(raw, "auth", AuthConfig)
    if raw is None:
        r.error("auth", "missing: the gateway cannot verify tokens without it")
    return AuthConfig(**r.walk(AuthConfig, section, "auth"))


def _backends(r: Reader, f: Field[Any], top: Mapping[str, Any], p: str, values: dict[str, Any]) -> dict[str, BackendConfig]:
    raw = top.get("backends")
    section = r.section(raw, "backends", set(BACKEND_NAMES))
    if raw is None:
        r.error("backends", "missing: both backends.old and backends.new are required")
    backends = {}
    for name in BACKEND_NAMES:
        path = f"backends.{name}"
        if name not in section:
            if raw is not None:
                r.error(path, "missing")
            continue
        backend = r.section(section[name], path, BackendConfig)
        backends[name] = BackendConfig(**r.walk(BackendConfig, backend, path))
    return backends


def _backend_auth(r: Reader, f: Field[Any], b: Mapping[str, Any], p: str, values: dict[str, Any]) -> str:
    if "auth" not in b:
        r.error(f"{p}.auth", "missing: say which auth style this backend speaks (query or message)")
    style: str = r.value(BackendConfig, f, b, p, _default(f))
    return style


def _trusted_proxies(r: Reader, f: Field[Any], top: Mapping[str, Any], p: str, values: dict[str, Any]) -> Any:
    if top.get("trusted_proxies") is None:
        return _default(f)
    networks = []
    for index, item in enumerate(r.string_list(top, "", "trusted_proxies", ())):
        try:
            networks.append(ip_network(item, strict=False))
        except ValueError:
            r.bad(f"trusted_proxies[{index}]", item, "an IP address or CIDR network")
    return tuple(networks)


_CUSTOM: dict[tuple[type, str], Callable[[Reader, Field[Any], Mapping[str, Any], str, dict[str, Any]], Any]] = {
    (AuthConfig, "algorithms"): _algorithms,
    (AuthConfig, "secret"): _secret,
    (AuthConfig, "connected_message"): _connected_message,
    (GuardConfig, "recovery_steps"): _recovery_steps,
    (RampConfig, "steps"): _ramp_steps,
    (LimitsConfig, "hold_buffer_bytes"): _hold_buffer_bytes,
    (LimitsConfig, "max_pending_handshakes_per_ip"): _pending_share,
    (SentinelConfig, "hosts"): _sentinel_hosts,
    (AppVersionConfig, "pattern"): _version_pattern,
    (BackendConfig, "auth"): _backend_auth,
    (Config, "auth"): _auth,
    (Config, "backends"): _backends,
    (Config, "trusted_proxies"): _trusted_proxies,
}


# -- the rules that join keys -----------------------------------------------------------------


def _check_auth(r: Reader, p: str, v: dict[str, Any]) -> None:
    hmac = [alg for alg in v["algorithms"] if alg in HMAC_ALGORITHMS]
    public = [alg for alg in v["algorithms"] if alg in PUBLIC_KEY_ALGORITHMS]
    secret, key_file, jwks_url = v["secret"], v["public_key_file"], v["jwks_url"]
    if hmac and not public:
        if not secret and r.need_secret:
            r.error(f"{p}.secret", "required (non-empty) for HMAC algorithms")
        if key_file:
            r.error(f"{p}.public_key_file", "not used with HMAC algorithms; set auth.secret")
    if jwks_url is not None:
        if hmac:
            r.error(f"{p}.jwks_url", "a JWKS holds public keys: use public-key algorithms (RS256, ES256, ...)")
        if key_file:
            r.error(f"{p}.public_key_file", "set one of auth.public_key_file and auth.jwks_url")
    if public and not hmac:
        if secret:
            r.error(f"{p}.secret", "not used with public-key algorithms; set auth.public_key_file or auth.jwks_url")
        if not key_file and jwks_url is None:
            r.error(f"{p}.public_key_file", "required for public-key algorithms (or auth.jwks_url)")
        elif key_file and r.read_public_key is None:
            r.error(f"{p}.public_key_file", f"{key_file!r} was not read: no public key reader was given")
        elif key_file and r.read_public_key is not None:
            try:
                v["public_key"] = r.read_public_key(key_file)
            except ValueError as exc:
                r.error(f"{p}.public_key_file", str(exc))
    if v["legacy"] == "deprecate" and v["legacy_deprecated_at"] is None:
        r.error(f"{p}.legacy_deprecated_at", "required when auth.legacy is deprecate (the date legacy auth was deprecated)")


def _check_rollout(r: Reader, p: str, v: dict[str, Any]) -> None:
    both = sorted(v["force_new"] & v["force_old"])
    if both:
        r.error(f"{p}.force_new", f"users in both force_new and force_old: {', '.join(both[:10])}")


def _check_limits(r: Reader, p: str, v: dict[str, Any]) -> None:
    hold, largest = v["hold_buffer_bytes"], v["max_message_bytes"]
    if hold < largest:
        r.error(f"{p}.hold_buffer_bytes", f"{hold} is smaller than limits.max_message_bytes ({largest})")
    share, pending = v["max_pending_handshakes_per_ip"], v["max_pending_handshakes"]
    if share > pending:
        r.error(f"{p}.max_pending_handshakes_per_ip", f"{share} is larger than limits.max_pending_handshakes ({pending})")


def _check_sentinel(r: Reader, p: str, v: dict[str, Any]) -> None:
    v["password"] = v["password"] or None


def _check_redis(r: Reader, p: str, v: dict[str, Any]) -> None:
    url = v["url"]
    if (url is None) == (v["sentinel"] is None):
        r.error(p, "set exactly one of redis.url and redis.sentinel")
    elif url is not None and not re.fullmatch(r"(redis|rediss|unix)://\S+", url):
        r.error(f"{p}.url", "expected a redis://, rediss:// or unix:// URL")


def _check_config(r: Reader, p: str, v: dict[str, Any]) -> None:
    admin, listen = v["admin"], v["listen"]
    if admin is not None and admin.port and admin.port == listen.port:
        r.error("admin.port", f"{admin.port} is the public port; the admin listener needs its own")
    usage_path = v["usage"].path
    if usage_path is not None and not usage_path.strip():
        r.error("usage.path", "must not be empty (omit it to keep usage in memory)")
    elif usage_path is not None and v["redis"] is not None:
        r.error("usage.path", "not used with redis: usage is counted in Redis; remove one of them")


_CHECKS: dict[type, Callable[[Reader, str, dict[str, Any]], None]] = {
    AuthConfig: _check_auth,
    RolloutConfig: _check_rollout,
    LimitsConfig: _check_limits,
    SentinelConfig: _check_sentinel,
    RedisConfig: _check_redis,
    Config: _check_config,
}
