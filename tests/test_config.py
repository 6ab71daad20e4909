"""The config parser's rules, one test per rule.

`parse_config` is pure, so nearly every test builds the one valid raw mapping from
`tests/helpers.py` (`raw_config`), changes one thing and parses it. The file-level rules
(reading, UTF-8, YAML, duplicate keys, the public key file, `os.environ`) go through
`load_config`, the only function that touches the filesystem.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import date, datetime, timezone
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.core.config import (
    DEFAULT_CONNECTED_MESSAGE,
    AdminConfig,
    AuthConfig,
    BackendConfig,
    Config,
    ConfigError,
    LimitsConfig,
    RedisConfig,
    config_warnings,
    keep_restart_keys,
    restart_required,
)
from gateway.service.configfile import load_config
from gateway.core.configparse import parse_config

from .helpers import SECRET, raw_config

MiB = 1024 * 1024
PUBLIC_PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
ES256 = {"algorithms": ["ES256"], "secret": None, "public_key_file": "keys/jwt.pub"}


def parse(raw: Any = None, *, env: dict[str, str] | None = None, **sections: Any) -> Config:
    """The valid config (or `raw`), changed by `sections`, parsed."""
    return parse_config(raw if raw is not None else raw_config(**sections), env=env or {})


def problems_of(raw: Any, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, **{"env": {}, **kwargs})
    assert caught.value.source is None  # parse_config knows no file
    return caught.value.problems


def problems(**sections: Any) -> list[str]:
    """Every problem of the valid config changed by `sections`."""
    return problems_of(raw_config(**sections))


def problem(**sections: Any) -> str:
    """The one problem of the valid config changed by `sections`."""
    found = problems(**sections)
    assert len(found) == 1, found
    return found[0]


def backends(**changes: dict[str, Any]) -> dict[str, Any]:
    """The base config's backends section, each backend named changed by its mapping."""
    section: dict[str, Any] = raw_config()["backends"]
    for name, change in changes.items():
        section[name].update(change)
    return section


def without(raw: dict[str, Any], *path: str) -> dict[str, Any]:
    """`raw` with the key at `path` removed."""
    holder = raw
    for part in path[:-1]:
        holder = holder[part]
    del holder[path[-1]]
    return raw


# -- the valid base and the defaults ---------------------------------------------------------


def test_the_base_config_of_these_tests_is_valid() -> None:
    config = parse()
    assert config.auth.secret == SECRET
    assert set(config.backends) == {"old", "new"}


def test_a_minimal_config_takes_every_default_from_the_dataclasses() -> None:
    raw = {
        "auth": {"secret": SECRET},
        "backends": {"old": {"url": "ws://a/x", "auth": "query"}, "new": {"url": "ws://b/x", "auth": "message"}},
    }
    assert parse(raw) == Config(
        auth=AuthConfig(secret=SECRET),
        backends={"old": BackendConfig(url="ws://a/x", auth="query"), "new": BackendConfig(url="ws://b/x", auth="message")},
    )


def test_changing_a_dataclass_default_changes_what_the_parser_fills_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AuthConfig.__dataclass_fields__["timeout_seconds"], "default", 12.5)
    monkeypatch.setattr(LimitsConfig.__dataclass_fields__["hold_buffer_frames"], "default", 7)
    config = parse(raw_config(auth={"timeout_seconds": None}))
    assert config.auth.timeout_seconds == 12.5
    assert config.limits.hold_buffer_frames == 7


def test_a_key_set_to_null_takes_its_default() -> None:
    config = parse(auth={"user_id_claim": None}, limits={"max_message_bytes": None})
    assert config.auth.user_id_claim == "user_id"
    assert config.limits.max_message_bytes == MiB


def test_an_admin_section_without_keys_gets_the_admin_defaults() -> None:
    assert parse(admin={}).admin == AdminConfig(host="127.0.0.1", port=9090)


def test_optional_sections_left_out_are_off() -> None:
    config = parse()
    assert (config.admin, config.redis, config.trusted_proxies) == (None, None, ())


# -- structure: mappings and unknown keys ----------------------------------------------------


def test_an_empty_config_is_refused_with_the_required_sections_named() -> None:
    assert problems_of(None) == [
        "<top level>: the config is empty",
        "auth: missing: the gateway cannot verify tokens without it",
        "auth.secret: required (non-empty) for HMAC algorithms",
        "backends: missing: both backends.old and backends.new are required",
    ]


def test_a_top_level_that_is_not_a_mapping_is_refused() -> None:
    assert problems_of(["listen"])[0] == "<top level>: expected a mapping, got ['listen']"


def test_unknown_top_level_key_names_itself_and_lists_the_allowed_keys() -> None:
    assert problem(listne={"port": 1}) == (
        "listne: unknown key (allowed: admin, auth, backends, drain, limits, listen, log_level, path, redis,"
        " rollout, trusted_proxies, usage)"
    )


@pytest.mark.parametrize(
    "section",
    ["listen", "auth", "backends", "backends.old", "rollout", "rollout.guard", "limits", "admin", "drain", "redis", "usage"],
)
def test_unknown_key_in_a_section_names_its_dotted_path(section: str) -> None:
    raw = raw_config(redis={"url": "redis://localhost"}, admin={"port": 9999})
    holder = raw
    for part in section.split("."):
        holder = holder.setdefault(part, {})
    holder["colour"] = "blue"
    found = problems_of(raw)
    assert len(found) == 1 and found[0].startswith(f"{section}.colour: unknown key (allowed: "), found


@pytest.mark.parametrize("section", ["listen", "auth", "rollout", "limits", "drain", "usage", "admin", "redis"])
def test_a_section_that_is_not_a_mapping_is_refused(section: str) -> None:
    assert f"{section}: expected a mapping, got 'on'" in problems(**{section: "on"})


def test_a_nested_section_that_is_not_a_mapping_names_its_dotted_path() -> None:
    assert problem(rollout={"guard": [1]}) == "rollout.guard: expected a mapping, got [1]"


# -- types -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"listen": {"host": True}}, "listen.host: expected a string, got True"),
        ({"path": ["/ws"]}, "path: expected a string, got ['/ws']"),
        ({"auth": {"user_id_claim": {"a": 1}}}, "auth.user_id_claim: expected a string, got {'a': 1}"),
    ],
)
def test_a_string_key_refuses_other_types(sections: dict[str, Any], expected: str) -> None:
    assert problem(**sections) == expected


def test_a_string_key_takes_a_number_as_its_text() -> None:
    assert parse(auth={"issuer": 42}).auth.issuer == "42"


@pytest.mark.parametrize("value", [True, [5], {"s": 5}, "soon"])
def test_a_number_key_refuses_what_is_not_a_number(value: Any) -> None:
    assert problem(drain={"grace_seconds": value}) == f"drain.grace_seconds: expected a number, got {value!r}"


def test_a_number_key_takes_a_number_written_as_a_string() -> None:
    assert parse(drain={"grace_seconds": "2.5"}).drain.grace_seconds == 2.5


@pytest.mark.parametrize("value", [1.5, "1.5", "many", False])
def test_an_integer_key_refuses_what_is_not_an_integer(value: Any) -> None:
    assert problem(limits={"hold_buffer_frames": value}) == f"limits.hold_buffer_frames: expected an integer, got {value!r}"


def test_an_integer_key_takes_a_whole_float_as_an_integer() -> None:
    frames = parse(limits={"hold_buffer_frames": 20.0}).limits.hold_buffer_frames
    assert frames == 20 and isinstance(frames, int)


@pytest.mark.parametrize("value", ["yes", 1, "true"])
def test_a_boolean_key_takes_only_true_or_false(value: Any) -> None:
    assert problem(rollout={"fallback_to_old": value}) == f"rollout.fallback_to_old: expected true or false, got {value!r}"


def test_a_list_key_refuses_a_mapping() -> None:
    assert problem(auth={"audience": {"a": 1}}) == "auth.audience: expected a list of strings, got {'a': 1}"


def test_a_list_item_that_is_not_a_string_names_its_index() -> None:
    assert problem(rollout={"force_new": ["alice", True]}) == "rollout.force_new[1]: expected a string, got True"


def test_a_list_key_takes_one_string_as_a_list_of_one() -> None:
    assert parse(auth={"audience": "chat"}).auth.audience == ("chat",)


def test_a_list_key_takes_integer_user_ids_as_strings() -> None:
    assert parse(rollout={"force_new": [42]}).rollout.force_new == frozenset({"42"})


# -- ranges ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-0.5, 100.5, math.inf])
def test_a_number_outside_its_range_names_the_range(value: float) -> None:
    assert problem(rollout={"new_percent": value}) == f"rollout.new_percent: {value!r} is out of range [0, 100]"


@pytest.mark.parametrize("value", [0, 100, 12.5])
def test_a_range_includes_its_bounds(value: float) -> None:
    assert parse(rollout={"new_percent": value}).rollout.new_percent == value


@pytest.mark.parametrize("value", [math.nan, "nan"])
def test_nan_is_out_of_every_range(value: Any) -> None:
    assert problem(rollout={"new_percent": value}) == "rollout.new_percent: nan is out of range [0, 100]"


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"auth": {"timeout_seconds": 0}}, "auth.timeout_seconds: 0 is out of range (0, 3600]"),
        ({"redis": {"url": "redis://h", "timeout_seconds": 0}}, "redis.timeout_seconds: 0 is out of range (0, 30]"),
        (
            {"backends": backends(old={"connect_timeout_seconds": 0})},
            "backends.old.connect_timeout_seconds: 0 is out of range (0, 300]",
        ),
        (
            {"backends": backends(new={"handshake_timeout_seconds": 0})},
            "backends.new.handshake_timeout_seconds: 0 is out of range (0, 300]",
        ),
        ({"rollout": {"guard": {"window_seconds": 0}}}, "rollout.guard.window_seconds: 0 is out of range (0, 86400]"),
    ],
)
def test_a_timeout_of_zero_is_refused_where_the_lower_bound_is_exclusive(sections: dict[str, Any], expected: str) -> None:
    assert problem(**sections) == expected


def test_zero_is_allowed_where_the_lower_bound_is_inclusive() -> None:
    config = parse(limits={"ping_interval_seconds": 0}, drain={"grace_seconds": 0}, rollout={"guard": {"cooldown_seconds": 0}})
    assert (config.limits.ping_interval_seconds, config.drain.grace_seconds, config.rollout.guard.cooldown_seconds) == (0, 0, 0)


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"listen": {"port": 65536}}, "listen.port: 65536 is out of range [0, 65535]"),
        (
            {"limits": {"auth_failures_per_ip_per_minute": 0}},
            "limits.auth_failures_per_ip_per_minute: 0 is out of range [1, 1e+09]",
        ),
        ({"usage": {"retention_days": 3651}}, "usage.retention_days: 3651 is out of range [1, 3650]"),
        ({"rollout": {"guard": {"max_failure_ratio": 1.5}}}, "rollout.guard.max_failure_ratio: 1.5 is out of range [0, 1]"),
    ],
)
def test_range_errors_name_the_key_the_value_and_the_range(sections: dict[str, Any], expected: str) -> None:
    assert problem(**sections) == expected


# -- ${VAR} expansion ------------------------------------------------------------------------


def test_a_variable_is_expanded_from_the_environment_given() -> None:
    assert parse(auth={"secret": "${JWT_SECRET}"}, env={"JWT_SECRET": "from-env"}).auth.secret == "from-env"


def test_a_variable_is_expanded_inside_a_longer_string() -> None:
    assert parse(auth={"issuer": "https://${HOST}/auth"}, env={"HOST": "id.example"}).auth.issuer == "https://id.example/auth"


def test_a_variable_default_is_used_only_when_the_variable_is_unset() -> None:
    assert parse(auth={"issuer": "${ISSUER:-fallback}"}).auth.issuer == "fallback"
    assert parse(auth={"issuer": "${ISSUER:-fallback}"}, env={"ISSUER": "set"}).auth.issuer == "set"


def test_a_variable_is_expanded_in_numbers_and_list_items() -> None:
    config = parse(rollout={"new_percent": "${PCT}", "force_new": ["${VIP}"]}, env={"PCT": "25", "VIP": "carol"})
    assert (config.rollout.new_percent, config.rollout.force_new) == (25.0, frozenset({"carol"}))


def test_an_unset_variable_without_a_default_is_an_error_naming_it() -> None:
    assert problem(auth={"issuer": "${ISSUER}"}) == "auth.issuer: environment variable ISSUER is not set"


def test_a_list_item_with_an_unset_variable_names_its_index() -> None:
    assert problem(auth={"audience": ["chat", "${AUD}"]}) == "auth.audience[1]: environment variable AUD is not set"


def test_parse_config_never_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_TEST_ISSUER", "from-process")
    with pytest.raises(ConfigError) as caught:
        parse_config(raw_config(auth={"issuer": "${GATEWAY_TEST_ISSUER}"}))
    assert caught.value.problems == ["auth.issuer: environment variable GATEWAY_TEST_ISSUER is not set"]


# -- top-level keys --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["ws/chat", "/ws/chat?v=1", ""])
def test_path_must_start_with_a_slash_and_carry_no_query(path: str) -> None:
    assert problem(path=path) == f"path: {path!r} must start with / and carry no query string"


def test_the_admin_port_may_not_be_the_public_port() -> None:
    assert problem(listen={"port": 8080}, admin={"port": 8080}) == (
        "admin.port: 8080 is the public port; the admin listener needs its own"
    )


def test_admin_and_listen_may_both_ask_for_an_ephemeral_port() -> None:
    config = parse(listen={"port": 0}, admin={"port": 0})
    assert config.admin is not None and (config.listen.port, config.admin.port) == (0, 0)


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://user:pw@cache.internal:6380", "unix:///run/redis.sock"])
def test_redis_takes_a_redis_rediss_or_unix_url(url: str) -> None:
    redis = parse(redis={"url": url}).redis
    assert redis == RedisConfig(url=url)


@pytest.mark.parametrize("redis", [{"url": "http://cache:6379"}, {"url": "redis://"}, {"url": ""}])
def test_redis_refuses_any_other_url(redis: dict[str, Any]) -> None:
    assert problem(redis=redis) == "redis.url: expected a redis://, rediss:// or unix:// URL"


def test_redis_needs_a_url_or_a_sentinel() -> None:
    assert problem(redis={"timeout_seconds": 1}) == "redis: set exactly one of redis.url and redis.sentinel"


def test_a_bad_redis_url_is_not_echoed_since_it_may_carry_a_password() -> None:
    assert "hunter2" not in problem(redis={"url": "http://:hunter2@cache"})


def test_trusted_proxies_take_addresses_and_networks() -> None:
    proxies = parse(trusted_proxies=["10.0.0.0/8", "192.168.1.5", "::1", "172.16.0.1/12"]).trusted_proxies
    assert proxies == tuple(ip_network(n) for n in ("10.0.0.0/8", "192.168.1.5/32", "::1/128", "172.16.0.0/12"))


def test_a_trusted_proxy_that_is_not_an_address_names_its_index() -> None:
    assert problem(trusted_proxies=["10.0.0.0/8", "lb.internal"]) == (
        "trusted_proxies[1]: expected an IP address or CIDR network, got 'lb.internal'"
    )


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR"])
def test_log_level_takes_the_four_levels(level: str) -> None:
    assert parse(log_level=level).log_level == level


@pytest.mark.parametrize("level", ["debug", "TRACE", "CRITICAL"])
def test_log_level_refuses_anything_else_case_sensitively(level: str) -> None:
    assert problem(log_level=level) == f"log_level: {level!r} is not one of DEBUG, INFO, WARNING, ERROR"


# -- auth: algorithms and keys ---------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["none", "HS1", "hs256"])
def test_an_unknown_algorithm_is_refused_with_the_supported_list(algorithm: str) -> None:
    assert problem(auth={"algorithms": [algorithm]}) == (
        f"auth.algorithms: {algorithm!r} is not supported (use ES256, ES384, ES512, EdDSA, HS256, HS384, HS512,"
        " PS256, PS384, PS512, RS256, RS384, RS512)"
    )


def test_an_empty_algorithm_list_means_hs256() -> None:
    assert parse(auth={"algorithms": []}).auth.algorithms == ("HS256",)


def test_hmac_and_public_key_algorithms_cannot_be_mixed() -> None:
    assert problem(auth={"algorithms": ["HS256", "RS256"]}) == (
        "auth.algorithms: mixing HMAC and public-key algorithms is not supported"
    )


@pytest.mark.parametrize("secret", [None, "", "${EMPTY:-}"])
def test_hmac_algorithms_need_a_non_empty_secret(secret: str | None) -> None:
    assert problem(auth={"secret": secret}) == "auth.secret: required (non-empty) for HMAC algorithms"


def test_hmac_algorithms_refuse_a_public_key_file() -> None:
    assert problem(auth={"public_key_file": "jwt.pub"}) == "auth.public_key_file: not used with HMAC algorithms; set auth.secret"


def test_public_key_algorithms_refuse_a_secret() -> None:
    found = problems_of(raw_config(auth={**ES256, "secret": SECRET}), read_public_key=lambda name: PUBLIC_PEM)
    assert found == ["auth.secret: not used with public-key algorithms; set auth.public_key_file or auth.jwks_url"]


def test_public_key_algorithms_need_a_public_key_file() -> None:
    assert problem(auth={**ES256, "public_key_file": None}) == "auth.public_key_file: required for public-key algorithms (or auth.jwks_url)"


def test_the_key_reader_gets_the_expanded_file_name_and_its_text_is_the_key() -> None:
    asked = []

    def read(name: str) -> str:
        asked.append(name)
        return PUBLIC_PEM

    raw = raw_config(auth={**ES256, "public_key_file": "${KEYS}/jwt.pub"})
    auth = parse_config(raw, env={"KEYS": "/etc/keys"}, read_public_key=read).auth
    assert asked == ["/etc/keys/jwt.pub"]
    assert (auth.public_key_file, auth.public_key) == ("/etc/keys/jwt.pub", PUBLIC_PEM)


def test_a_key_reader_error_is_reported_under_public_key_file() -> None:
    def read(name: str) -> str:
        raise ValueError(f"{name!r} is on holiday")

    found = problems_of(raw_config(auth=ES256), read_public_key=read)
    assert found == ["auth.public_key_file: 'keys/jwt.pub' is on holiday"]


def test_a_public_key_config_without_a_key_reader_is_reported_not_read() -> None:
    assert problem(auth=ES256) == "auth.public_key_file: 'keys/jwt.pub' was not read: no public key reader was given"


def test_an_hmac_config_never_calls_the_key_reader() -> None:
    def read(name: str) -> str:
        raise AssertionError("read for an HMAC config")

    assert parse_config(raw_config(), env={}, read_public_key=read).auth.public_key is None


@pytest.mark.parametrize("secret", [{"v": "s3cr3t-value"}, ["s3cr3t-value"], True])
def test_a_secrets_value_is_never_echoed_in_an_error(secret: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw_config(auth={"secret": secret}), env={})
    assert caught.value.problems[0] == "auth.secret: expected a string, got <hidden>"
    assert "s3cr3t" not in str(caught.value) and "True" not in str(caught.value)


def test_the_repr_of_a_config_never_shows_the_secret_or_the_redis_url() -> None:
    shown = repr(parse(auth={"secret": "s3cr3t-value"}, redis={"url": "redis://:hunter2@cache"}))
    assert "s3cr3t" not in shown and "hunter2" not in shown


# -- auth: messages, legacy mode, timestamps, parameter names ---------------------------------


@pytest.mark.parametrize("message", ["{not json", '["connected"]', '{"type":"hello"}', '"connected"'])
def test_connected_message_must_be_a_json_object_of_type_connected(message: str) -> None:
    assert problem(auth={"connected_message": message}) == (
        'auth.connected_message: must be a JSON object with "type": "connected"'
    )


def test_connected_message_defaults_to_the_one_old_clients_know() -> None:
    custom = '{"type":"connected","message":"hi"}'
    assert parse().auth.connected_message == DEFAULT_CONNECTED_MESSAGE
    assert parse(auth={"connected_message": custom}).auth.connected_message == custom


def test_legacy_takes_only_the_three_modes() -> None:
    assert problem(auth={"legacy": "sometimes"}) == "auth.legacy: 'sometimes' is not one of allow, deprecate, deny"


def test_legacy_deprecate_needs_the_deprecation_date() -> None:
    assert problem(auth={"legacy": "deprecate"}) == (
        "auth.legacy_deprecated_at: required when auth.legacy is deprecate (the date legacy auth was deprecated)"
    )


@pytest.mark.parametrize("mode", ["allow", "deny"])
def test_legacy_allow_and_deny_need_no_date(mode: str) -> None:
    assert parse(auth={"legacy": mode}).auth.legacy == mode


MARCH_1 = int(datetime(2027, 3, 1, tzinfo=timezone.utc).timestamp())


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (date(2027, 3, 1), MARCH_1),  # YAML's own date
        ("2027-03-01", MARCH_1),
        (datetime(2027, 3, 1, 12, 0), MARCH_1 + 12 * 3600),  # YAML's date-time without a zone: UTC
        ("2027-03-01T12:00:00Z", MARCH_1 + 12 * 3600),
        ("2027-03-01T12:00:00+02:00", MARCH_1 + 10 * 3600),
        (MARCH_1, MARCH_1),
        (0, 0),
    ],
)
def test_a_legacy_timestamp_is_a_date_an_iso_date_time_or_unix_seconds(value: Any, seconds: int) -> None:
    auth = parse(auth={"legacy": "deprecate", "legacy_deprecated_at": value, "legacy_sunset": value}).auth
    assert (auth.legacy_deprecated_at, auth.legacy_sunset) == (seconds, seconds)


@pytest.fixture
def local_zone_far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "EST+5")  # POSIX form: UTC-5, no zone database needed
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_zone_far_from_utc")
@pytest.mark.parametrize("value", [datetime(2027, 3, 1, 12, 0), "2027-03-01T12:00:00", "2027-03-01"])
def test_a_legacy_timestamp_without_a_zone_is_utc_whatever_the_local_zone(value: Any) -> None:
    assert time.localtime(MARCH_1).tm_gmtoff != 0  # the fixture really moved the local zone
    expected = MARCH_1 + (12 * 3600 if value != "2027-03-01" else 0)
    assert parse(auth={"legacy_sunset": value}).auth.legacy_sunset == expected


@pytest.mark.parametrize("value", ["next spring", -1, 1.5, True, ["2027-03-01"]])
def test_a_legacy_timestamp_refuses_anything_else(value: Any) -> None:
    assert problem(auth={"legacy_sunset": value}) == (
        f"auth.legacy_sunset: expected a date (2027-03-01), a date-time or unix seconds, got {value!r}"
    )


@pytest.mark.parametrize("name", ["to ken", "", "a&b", "tök", "${EMPTY:-}"])
def test_query_param_must_be_a_plain_url_parameter_name(name: str) -> None:
    shown = "" if name == "${EMPTY:-}" else name
    assert problem(auth={"query_param": name}) == f"auth.query_param: {shown!r} is not a plain URL parameter name"


def test_a_backends_query_param_follows_the_same_rule() -> None:
    assert problem(backends=backends(old={"query_param": "jwt token"})) == (
        "backends.old.query_param: 'jwt token' is not a plain URL parameter name"
    )


@pytest.mark.parametrize("name", ["access_token", "t", "jwt.v2", "a-b~c"])
def test_query_param_takes_unreserved_url_characters(name: str) -> None:
    assert parse(auth={"query_param": name}).auth.query_param == name


# -- backends --------------------------------------------------------------------------------


def test_the_backends_section_is_required() -> None:
    assert problems_of(without(raw_config(), "backends")) == [
        "backends: missing: both backends.old and backends.new are required"
    ]


@pytest.mark.parametrize("name", ["old", "new"])
def test_both_backends_are_required(name: str) -> None:
    assert problems_of(without(raw_config(), "backends", name)) == [f"backends.{name}: missing"]


@pytest.mark.parametrize("url", ["http://h/x", "ws://", "ws://h/x#top", "ws://h /x", "ws:/h/x", ""])
def test_a_backend_url_must_be_ws_or_wss(url: str) -> None:
    assert problem(backends=backends(new={"url": url})) == f"backends.new.url: {url!r} is not a ws:// or wss:// URL"


def test_a_backend_without_a_url_is_refused() -> None:
    assert problems_of(without(raw_config(), "backends", "old", "url")) == ["backends.old.url: '' is not a ws:// or wss:// URL"]


@pytest.mark.parametrize("url", ["wss://chat.example", "ws://10.0.0.5:8000/ws/chat?v=2"])
def test_a_backend_url_may_carry_a_port_path_and_query(url: str) -> None:
    assert parse(backends=backends(new={"url": url})).backends["new"].url == url


def test_a_backend_must_say_which_auth_style_it_speaks() -> None:
    assert problems_of(without(raw_config(), "backends", "new", "auth")) == [
        "backends.new.auth: missing: say which auth style this backend speaks (query or message)"
    ]


def test_a_backend_auth_style_is_query_or_message() -> None:
    assert problem(backends=backends(old={"auth": "cookie"})) == "backends.old.auth: 'cookie' is not one of query, message"


# -- rollout and the guard -------------------------------------------------------------------


def test_a_user_cannot_be_forced_to_both_backends() -> None:
    assert problem(rollout={"force_new": ["bob", "alice", "carol"], "force_old": ["carol", "bob"]}) == (
        "rollout.force_new: users in both force_new and force_old: bob, carol"
    )


def test_the_both_lists_error_names_at_most_ten_users() -> None:
    users = [f"u{i:02}" for i in range(12)]
    found = problem(rollout={"force_new": users, "force_old": users})
    assert found.endswith(", ".join(users[:10]))


def test_the_salt_must_not_be_empty() -> None:
    assert problem(rollout={"salt": ""}) == "rollout.salt: must not be empty"


@pytest.mark.parametrize("steps", [[], "10", [0, 100], [10, 101], [True, 100], ["10", 100]])
def test_recovery_steps_are_a_non_empty_list_of_percentages(steps: Any) -> None:
    assert problem(rollout={"guard": {"recovery_steps": steps}}) == (
        f"rollout.guard.recovery_steps: expected a non-empty list of percentages in (0, 100], got {steps!r}"
    )


@pytest.mark.parametrize("steps", [[50, 10, 100], [10, 50], [100, 50]])
def test_recovery_steps_must_rise_and_end_at_100(steps: list[int]) -> None:
    assert problem(rollout={"guard": {"recovery_steps": steps}}) == (
        f"rollout.guard.recovery_steps: {steps!r} must rise and end at 100"
    )


def test_recovery_steps_take_fractions_and_a_single_full_step() -> None:
    assert parse(rollout={"guard": {"recovery_steps": [2.5, 100]}}).rollout.guard.recovery_steps == (2.5, 100.0)
    assert parse(rollout={"guard": {"recovery_steps": [100]}}).rollout.guard.recovery_steps == (100.0,)


# -- limits ----------------------------------------------------------------------------------


def test_the_hold_buffer_must_hold_one_largest_message() -> None:
    assert problem(limits={"max_message_bytes": 200, "hold_buffer_bytes": 100}) == (
        "limits.hold_buffer_bytes: 100 is smaller than limits.max_message_bytes (200)"
    )


def test_the_default_hold_buffer_grows_to_the_largest_message() -> None:
    assert parse(limits={"max_message_bytes": 8 * MiB}).limits.hold_buffer_bytes == 8 * MiB
    assert parse(limits={"max_message_bytes": 1024}).limits.hold_buffer_bytes == 4 * MiB


# -- every problem at once -------------------------------------------------------------------


def test_every_problem_is_reported_at_once_in_file_order() -> None:
    raw = raw_config(path="chat", auth={"legacy": "never"}, rollout={"new_percent": 101}, log_level="LOUD")
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, env={})
    assert caught.value.problems == [
        "path: 'chat' must start with / and carry no query string",
        "auth.legacy: 'never' is not one of allow, deprecate, deny",
        "rollout.new_percent: 101 is out of range [0, 100]",
        "log_level: 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR",
    ]
    assert str(caught.value) == "; ".join(caught.value.problems)


# -- reload: restart-only keys ---------------------------------------------------------------


def test_restart_required_names_only_the_restart_only_keys_that_changed() -> None:
    old = parse()
    new = parse(
        listen={"port": 8081},
        path="/ws/v2",
        redis={"url": "redis://cache"},
        limits={"max_upstream_connections": 5},
        rollout={"new_percent": 50},
    )
    assert restart_required(old, new) == ["listen", "path", "redis", "limits.max_upstream_connections"]
    assert restart_required(old, parse()) == []


def test_adding_an_admin_listener_is_restart_required() -> None:
    assert restart_required(parse(), parse(admin={"port": 9999})) == ["admin"]


def test_keep_restart_keys_puts_back_the_bound_values_and_keeps_the_rest() -> None:
    old = parse()
    new = parse(
        listen={"port": 8081},
        limits={"max_upstream_connections": 5, "max_message_bytes": 2048},
        rollout={"new_percent": 50},
    )
    kept = keep_restart_keys(old, new)
    assert restart_required(old, kept) == []
    assert kept.listen == old.listen
    assert kept.limits.max_upstream_connections == old.limits.max_upstream_connections
    assert (kept.limits.max_message_bytes, kept.rollout.new_percent) == (2048, 50.0)
    bound = old.limits.max_upstream_connections
    assert kept == replace(new, listen=old.listen, limits=replace(new.limits, max_upstream_connections=bound))


# -- load_config: the file -------------------------------------------------------------------

BASE_YAML = """\
listen: {host: 127.0.0.1, port: 0}
auth:
  secret: ${JWT_SECRET}
backends:
  old: {url: "ws://127.0.0.1:1/ws/chat", auth: query}
  new: {url: "ws://127.0.0.1:2/ws/chat", auth: message}
"""


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    def write(text: str | bytes, name: str = "gateway.yaml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    return write


def load_problems(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"JWT_SECRET": SECRET} if env is None else env)
    assert caught.value.source == str(path)
    assert str(caught.value).startswith(f"{path}: ")
    return caught.value.problems


def test_load_config_reads_a_valid_file(write: Callable[..., Path]) -> None:
    assert load_config(write(BASE_YAML), env={"JWT_SECRET": SECRET}).auth.secret == SECRET


def test_a_missing_file_is_one_problem_naming_the_file(tmp_path: Path) -> None:
    assert load_problems(tmp_path / "nope.yaml") == ["cannot read the file: No such file or directory"]


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    assert load_problems(tmp_path) == ["cannot read the file: Is a directory"]


def test_a_file_that_is_not_utf8_is_refused(write: Callable[..., Path]) -> None:
    assert load_problems(write(BASE_YAML.encode() + b"# caf\xe9\n")) == ["the file is not UTF-8 text"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # PyYAML notices these a line (or the whole file) later than the mistake.
        ("path: /ws\nlisten: {port: 1\nlog_level: INFO\n",
         "listen: line 2, column 9: expected ',' or '}', but got ':' (while parsing a flow mapping)"),
        ("listen:\n  host: 0.0.0.0\n  port 8080\nrollout:\n  new_percent: 10\n",
         "listen: line 3, column 3: could not find expected ':' (while scanning a simple key)"),
        ("rollout:\n  new_percent 10\n  salt: x\n",
         "rollout: line 2, column 3: could not find expected ':' (a key without its colon)"),
        ("rollout:\n  salt: \"abc\n  new_percent: 5\nlog_level: INFO\n",
         "rollout.salt: line 2, column 9: found unexpected end of stream (while scanning a quoted scalar)"),
        ("rollout:\n  guard:\n    enabled: true\n    min_samples 5\n  salt: x\n",
         "rollout.guard: line 4, column 5: could not find expected ':' (while scanning a simple key)"),
        # Where PyYAML's own line is right, it stays.
        ("rollout:\n  new_percent: 10\n guard: x\n",
         "rollout.guard: line 3, column 2: expected <block end>, but found '<block mapping start>'"),
        ("rollout:\n\tnew_percent: 5\n", "rollout: line 2, column 1: found character '\\t' that cannot start any token"),
    ],
    ids=["unclosed_brace", "key_without_colon_before_a_section", "key_without_colon", "unclosed_quote", "nested", "dedent", "tab"],
)
def test_bad_yaml_names_the_key_path_and_the_line_of_the_mistake(
    write: Callable[..., Path], text: str, expected: str
) -> None:
    assert load_problems(write(text)) == [expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("path: /a\nlisten: {port: 1}\npath: /b\n", "path: line 3, column 1: duplicate key 'path'"),
        ("listen:\n  port: 1\n  port: 2\n", "listen.port: line 3, column 3: duplicate key 'port'"),
    ],
)
def test_a_duplicate_key_is_refused_not_silently_overwritten(write: Callable[..., Path], text: str, expected: str) -> None:
    assert load_problems(write(text)) == [expected]


def test_an_empty_file_is_an_empty_config(write: Callable[..., Path]) -> None:
    assert load_problems(write(""))[0] == "<top level>: the config is empty"


def test_parser_problems_carry_the_file_name(write: Callable[..., Path]) -> None:
    assert load_problems(write(BASE_YAML + "log_level: LOUD\n")) == [
        "log_level: 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR"
    ]


def test_load_config_expands_from_the_environment_it_is_given(
    write: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JWT_SECRET", "from-process")
    path = write(BASE_YAML)
    assert load_config(path, env={"JWT_SECRET": "given"}).auth.secret == "given"
    assert load_problems(path, env={}) == [
        "auth.secret: environment variable JWT_SECRET is not set",
        "auth.secret: required (non-empty) for HMAC algorithms",
    ]


def test_load_config_reads_the_process_environment_by_default(
    write: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JWT_SECRET", "from-process")
    assert load_config(write(BASE_YAML)).auth.secret == "from-process"


# -- load_config: the public key file --------------------------------------------------------

ES256_YAML = BASE_YAML.replace("  secret: ${JWT_SECRET}\n", "  algorithms: [ES256]\n  public_key_file: KEY_FILE\n")


def test_a_relative_public_key_file_is_read_next_to_the_config_not_the_cwd(
    tmp_path: Path, write: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    write(PUBLIC_PEM, "conf/keys/jwt.pub")
    config_path = write(ES256_YAML.replace("KEY_FILE", "keys/jwt.pub"), "conf/gateway.yaml")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    auth = load_config(config_path, env={}).auth
    assert (auth.public_key, auth.public_key_file) == (PUBLIC_PEM, "keys/jwt.pub")


def test_an_absolute_public_key_file_is_read_as_is(tmp_path: Path, write: Callable[..., Path]) -> None:
    key = write(PUBLIC_PEM, "keys/jwt.pub")
    assert load_config(write(ES256_YAML.replace("KEY_FILE", str(key)), "conf/gateway.yaml"), env={}).auth.public_key == PUBLIC_PEM


def test_the_public_key_file_name_is_expanded_before_it_is_read(tmp_path: Path, write: Callable[..., Path]) -> None:
    write(PUBLIC_PEM, "keys/jwt.pub")
    path = write(ES256_YAML.replace("KEY_FILE", "${KEY_DIR}/jwt.pub"))
    assert load_config(path, env={"KEY_DIR": str(tmp_path / "keys")}).auth.public_key == PUBLIC_PEM


def test_a_missing_public_key_file_names_the_resolved_path(tmp_path: Path, write: Callable[..., Path]) -> None:
    path = write(ES256_YAML.replace("KEY_FILE", "missing.pub"))
    assert load_problems(path, env={}) == [
        f"auth.public_key_file: cannot read {str(tmp_path / 'missing.pub')!r}: No such file or directory"
    ]


@pytest.mark.parametrize(
    "content",
    [
        "not a key\n",
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n-----END PRIVATE KEY-----\n",
        b"\x30\x82\x01\x22\x30\x0d\x06\x09\xff",  # a DER key: binary, not UTF-8
    ],
)
def test_a_public_key_file_that_is_not_a_pem_public_key_is_refused(
    tmp_path: Path, write: Callable[..., Path], content: str | bytes
) -> None:
    write(content, "jwt.pub")
    path = write(ES256_YAML.replace("KEY_FILE", "jwt.pub"))
    assert load_problems(path, env={}) == [f"auth.public_key_file: {str(tmp_path / 'jwt.pub')!r} is not a PEM public key"]


def test_a_public_key_problem_is_reported_with_every_other_problem(tmp_path: Path, write: Callable[..., Path]) -> None:
    path = write(ES256_YAML.replace("KEY_FILE", "missing.pub") + "log_level: LOUD\n")
    assert load_problems(path, env={}) == [
        f"auth.public_key_file: cannot read {str(tmp_path / 'missing.pub')!r}: No such file or directory",
        "log_level: 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR",
    ]


# -- usage.path ---------------------------------------------------------------------------------


def test_usage_path_is_off_by_default() -> None:
    assert parse().usage.path is None


def test_usage_path_is_kept_as_written_by_the_pure_parser() -> None:
    assert parse(usage={"path": "data/usage.db"}).usage.path == "data/usage.db"


def test_usage_path_expands_environment_variables() -> None:
    assert parse(usage={"path": "${DATA}/usage.db"}, env={"DATA": "/var/lib/wsgw"}).usage.path == "/var/lib/wsgw/usage.db"


def test_an_empty_usage_path_is_refused() -> None:
    assert problem(usage={"path": " "}) == "usage.path: must not be empty (omit it to keep usage in memory)"


def test_usage_path_with_redis_is_refused() -> None:
    assert problem(usage={"path": "usage.db"}, redis={"url": "redis://127.0.0.1:6379/0"}) == (
        "usage.path: not used with redis: usage is counted in Redis; remove one of them"
    )


def test_usage_path_of_the_wrong_type_is_refused() -> None:
    assert problem(usage={"path": ["a"]}) == "usage.path: expected a string, got ['a']"


def test_changing_usage_path_needs_a_restart() -> None:
    assert restart_required(parse(usage={"path": "a.db"}), parse(usage={"path": "b.db"})) == ["usage.path"]


def test_a_relative_usage_path_is_relative_to_the_config_file(tmp_path: Path, write: Callable[..., Path]) -> None:
    path = write(BASE_YAML + "usage: {path: usage.db}\n", "conf/gateway.yaml")
    assert load_config(path, env={"JWT_SECRET": SECRET}).usage.path == str(tmp_path / "conf" / "usage.db")


def test_an_absolute_usage_path_is_kept(write: Callable[..., Path]) -> None:
    path = write(BASE_YAML + "usage: {path: /var/lib/wsgw/usage.db}\n")
    assert load_config(path, env={"JWT_SECRET": SECRET}).usage.path == "/var/lib/wsgw/usage.db"


def test_the_pending_share_of_one_address_defaults_to_a_fiftieth_of_the_bound() -> None:
    assert parse().limits.max_pending_handshakes_per_ip == 10000 // 50
    assert parse(limits={"max_pending_handshakes": 1000}).limits.max_pending_handshakes_per_ip == 20
    assert parse(limits={"max_pending_handshakes": 10}).limits.max_pending_handshakes_per_ip == 1


def test_the_pending_share_of_one_address_can_be_set() -> None:
    limits = parse(limits={"max_pending_handshakes": 1000, "max_pending_handshakes_per_ip": 1000}).limits
    assert limits.max_pending_handshakes_per_ip == 1000


def test_a_pending_share_larger_than_the_bound_is_refused() -> None:
    assert problem(limits={"max_pending_handshakes": 100, "max_pending_handshakes_per_ip": 101}) == (
        "limits.max_pending_handshakes_per_ip: 101 is larger than limits.max_pending_handshakes (100)"
    )


@pytest.mark.parametrize("value", [0, -1, 1.5, "many"])
def test_a_pending_share_that_is_not_a_positive_integer_is_refused(value: Any) -> None:
    assert problem(limits={"max_pending_handshakes_per_ip": value}).startswith("limits.max_pending_handshakes_per_ip: ")


# -- what needs no secret, and the warnings check-config and serve give --------------------


@pytest.mark.parametrize("secret", [None, "${GW_TEST_SURELY_UNSET}"], ids=["missing", "unset_variable"])
def test_a_config_read_without_need_of_the_secret_has_none_and_no_problem(secret: str | None) -> None:
    raw = raw_config(auth={"secret": secret})
    with pytest.raises(ConfigError):
        parse_config(raw)
    config = parse_config(raw, need_secret=False)
    assert config.auth.secret is None and config.rollout.salt == "test-salt"


def test_a_config_read_without_need_of_the_secret_still_reports_every_other_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw_config(auth={"secret": None}, rollout={"new_percent": 150}), need_secret=False)
    assert caught.value.problems == ["rollout.new_percent: 150 is out of range [0, 100]"]


def test_a_safe_config_has_no_warning() -> None:
    assert config_warnings(parse_config(raw_config(admin={"host": "127.0.0.1", "port": 0}))) == []


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"limits": {"auth_failures_per_ip_per_minute": 20}}, "limits.auth_failures_per_ip_per_minute: 20 without trusted_proxies"),
        ({"auth": {"secret": "x" * 31}}, "auth.secret: shorter than 32 bytes"),
        ({"admin": {"host": "0.0.0.0", "port": 0}}, "admin.host: 0.0.0.0 listens on every interface"),
        ({"admin": {"host": "::", "port": 0}}, "admin.host: :: listens on every interface"),
        ({"rollout": {"ramp": {"enabled": True}}}, "rollout.ramp: its progress is kept in memory"),
    ],
    ids=["per_ip_limit_without_proxies", "short_secret", "admin_on_all_ipv4", "admin_on_all_ipv6", "ramp_in_memory"],
)
def test_each_combination_that_bites_is_one_warning_naming_its_key(sections: dict[str, Any], key: str) -> None:
    warnings = config_warnings(parse_config(raw_config(**sections)))
    assert len(warnings) == 1 and warnings[0].startswith(key), warnings


def test_a_ramp_whose_progress_is_in_a_file_or_in_redis_is_fine() -> None:
    ramp = {"ramp": {"enabled": True}}
    assert config_warnings(parse_config(raw_config(rollout=ramp, usage={"path": "usage.sqlite"}))) == []
    assert config_warnings(parse_config(raw_config(rollout=ramp, redis={"url": "redis://127.0.0.1:6379/0"}))) == []


def test_the_ramps_plan_is_checked_key_by_key() -> None:
    raw = raw_config(rollout={"ramp": {
        "steps": [5, 1], "hold_minutes": -1, "on_failure": "panic", "gates": {"reply_ratio_max": 0, "colour": 1},
    }})
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert caught.value.problems == [
        "rollout.ramp.steps: [5, 1] must rise step by step (each percentage above the one before)",
        "rollout.ramp.hold_minutes: -1 is out of range [0, 10080]",
        "rollout.ramp.on_failure: 'panic' is not one of step_back, hold",
        "rollout.ramp.gates.colour: unknown key (allowed: auth_failure_rate_max, reply_ratio_max, reply_seconds_avg_max, success_rate_min)",
        "rollout.ramp.gates.reply_ratio_max: 0 is out of range (0, 1000]",
    ]
    with pytest.raises(ConfigError) as caught:
        parse_config(raw_config(rollout={"ramp": {"steps": [0, 50, 101]}}))
    assert caught.value.problems == ["rollout.ramp.steps: expected a non-empty list of percentages in (0, 100], got [0, 50, 101]"]


def test_the_ramps_defaults_are_the_plans_alerts() -> None:
    ramp = parse_config(raw_config()).rollout.ramp
    assert (ramp.enabled, ramp.steps, ramp.hold_minutes, ramp.min_sessions, ramp.on_failure, ramp.paused) == (
        False, (1.0, 5.0, 25.0, 50.0, 100.0), 30.0, 100, "step_back", False
    )
    gates = ramp.gates
    assert (gates.success_rate_min, gates.auth_failure_rate_max, gates.reply_seconds_avg_max, gates.reply_ratio_max) == (
        0.95, 0.05, 2.0, 1.5
    )
    assert parse_config(raw_config(rollout={"ramp": {"hold_minutes": 0.05}})).rollout.ramp.hold_minutes == 0.05


def test_a_per_ip_limit_behind_trusted_proxies_and_a_32_byte_secret_are_fine() -> None:
    raw = raw_config(limits={"auth_failures_per_ip_per_minute": 20}, trusted_proxies=["10.0.0.0/8"], auth={"secret": "x" * 32})
    assert config_warnings(parse_config(raw)) == []


def test_no_warning_ever_shows_the_secret() -> None:
    secret = "short-secret"
    assert secret not in " ".join(config_warnings(parse_config(raw_config(auth={"secret": secret}))))


# -- usage.app_version ---------------------------------------------------------------------------

APP_PATTERN = "WealthCoach/(?P<version>[0-9.]+)"


def test_usage_by_app_version_is_off_by_default() -> None:
    assert parse().usage.app_version is None


def test_usage_by_app_version_defaults_to_the_user_agent_and_50_versions() -> None:
    settings = parse(usage={"app_version": {"pattern": APP_PATTERN}}).usage.app_version
    assert settings is not None
    assert (settings.header, settings.pattern, settings.max_versions) == ("User-Agent", APP_PATTERN, 50)


def test_usage_by_app_version_takes_another_header_and_cap() -> None:
    settings = parse(usage={"app_version": {"pattern": APP_PATTERN, "header": "X-App-Version", "max_versions": 5}}).usage.app_version
    assert settings is not None and (settings.header, settings.max_versions) == ("X-App-Version", 5)


def test_usage_by_app_version_needs_a_pattern() -> None:
    assert problem(usage={"app_version": {}}) == (
        "usage.app_version.pattern: required: a regular expression with a group (?P<version>...)"
    )


def test_an_app_version_pattern_that_does_not_compile_is_refused() -> None:
    assert problem(usage={"app_version": {"pattern": "WealthCoach/(?P<version>[0-9."}}).startswith(
        "usage.app_version.pattern: 'WealthCoach/(?P<version>[0-9.' is not a regular expression: "
    )


def test_an_app_version_pattern_without_the_version_group_is_refused() -> None:
    assert problem(usage={"app_version": {"pattern": "WealthCoach/([0-9.]+)"}}) == (
        "usage.app_version.pattern: 'WealthCoach/([0-9.]+)' has no group named version: write it as (?P<version>...)"
    )


def test_an_app_version_header_must_be_a_header_name() -> None:
    assert problem(usage={"app_version": {"pattern": APP_PATTERN, "header": "User Agent"}}) == (
        "usage.app_version.header: 'User Agent' is not an HTTP header name"
    )


def test_app_version_max_versions_must_be_a_positive_integer() -> None:
    assert problem(usage={"app_version": {"pattern": APP_PATTERN, "max_versions": 0}}) == (
        "usage.app_version.max_versions: 0 is out of range [1, 1000]"
    )


def test_an_unknown_app_version_key_names_its_path() -> None:
    assert problem(usage={"app_version": {"pattern": APP_PATTERN, "cap": 3}}).startswith(
        "usage.app_version.cap: unknown key (allowed: header, max_versions, pattern)"
    )
