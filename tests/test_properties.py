"""Property-based tests over the pure modules: what holds for every input, not just the examples."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import closecodes
from gateway.core.auth import MAX_AUTH_FRAME_BYTES, AuthError, parse_authenticate_frame
from gateway.core.closecodes import SENDABLE, Side
from gateway.core.config import ConfigError, RolloutConfig
from gateway.core.configparse import parse_config
from gateway.core.routing import choose_backend, held_back

from .helpers import raw_config

settings.register_profile("ci", max_examples=300, deadline=None)
settings.load_profile("ci")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


# -- the client's first frame ----------------------------------------------------------------------


@given(st.text(max_size=300) | st.binary(max_size=300))
def test_any_first_frame_is_a_token_or_an_auth_error(data: str | bytes):
    try:
        token, message = parse_authenticate_frame(data)
    except AuthError as exc:
        assert exc.close_reason
        return
    assert isinstance(data, str) and token and message["type"] == "authenticate"


@given(json_values)
def test_any_json_first_frame_is_accepted_only_as_an_authenticate_object_with_a_token(value: Any):
    text = json.dumps(value)
    try:
        token, _ = parse_authenticate_frame(text)
    except AuthError as exc:
        assert exc.reason in ("not_authenticate", "missing_token", "token_too_large", "bad_frame")
        return
    assert isinstance(value, dict) and value["type"] == "authenticate" and value["token"] == token
    assert len(text) <= MAX_AUTH_FRAME_BYTES


@given(st.integers(min_value=1, max_value=50))
def test_deep_nesting_is_a_bad_frame_not_a_crash(depth: int):
    try:
        parse_authenticate_frame("[" * depth * 1000)
    except AuthError as exc:
        assert exc.reason in ("bad_frame", "token_too_large")


# -- close codes ------------------------------------------------------------------------------------


@given(st.none() | st.integers(min_value=-(2**16), max_value=2**16), st.text(max_size=300), st.sampled_from(list(Side)))
def test_every_forwarded_close_is_legal_on_the_wire(code: int | None, reason: str, to: Side):
    sent, sent_reason = closecodes.forward(code, reason, to)
    assert sent in SENDABLE
    assert len(sent_reason.encode("utf-8")) <= closecodes.MAX_REASON_BYTES
    if code in SENDABLE:
        assert sent == code and reason.startswith(sent_reason)


@given(st.none() | st.integers(min_value=-(2**16), max_value=2**16))
def test_every_echo_is_legal_on_the_wire(code: int | None):
    assert closecodes.echo(code) in SENDABLE


@given(st.integers(min_value=-(2**16), max_value=2**16), st.text(max_size=300))
def test_every_close_the_gateway_originates_is_legal(code: int, reason: str):
    sent, sent_reason = closecodes.sendable(code, reason)
    assert sent in SENDABLE and len(sent_reason.encode("utf-8")) <= closecodes.MAX_REASON_BYTES


# -- routing ----------------------------------------------------------------------------------------

percent = st.floats(min_value=0, max_value=100, allow_nan=False)
user_ids = st.text(min_size=1, max_size=40)


@given(user_ids, percent, percent, st.text(max_size=20))
def test_routing_is_monotonic_in_the_percentage(user: str, low: float, high: float, salt: str):
    low, high = sorted((low, high))
    at_low = choose_backend(user, RolloutConfig(new_percent=low, salt=salt))
    at_high = choose_backend(user, RolloutConfig(new_percent=high, salt=salt))
    if at_low.backend == "new":
        assert at_high.backend == "new"


@given(user_ids, percent, st.text(max_size=20))
def test_routing_is_a_pure_function_of_the_rollout(user: str, new_percent: float, salt: str):
    rollout = RolloutConfig(new_percent=new_percent, salt=salt)
    assert choose_backend(user, rollout) == choose_backend(user, replace(rollout))


@given(user_ids, percent, st.floats(min_value=0, max_value=1), st.booleans())
def test_the_guard_only_ever_moves_users_to_old(user: str, new_percent: float, share: float, blocks_forced: bool):
    rollout = RolloutConfig(new_percent=new_percent)
    chosen = choose_backend(user, rollout)
    held = held_back(chosen, rollout, share, blocks_forced)
    assert held == chosen or held.backend == "old"


@given(user_ids)
def test_forced_users_go_where_they_are_forced(user: str):
    assert choose_backend(user, RolloutConfig(new_percent=0, force_new=frozenset({user}))).backend == "new"
    assert choose_backend(user, RolloutConfig(new_percent=100, force_old=frozenset({user}))).backend == "old"


# -- config -----------------------------------------------------------------------------------------

SECTIONS = ("listen", "auth", "backends", "rollout", "limits", "admin", "drain", "usage", "path", "log_level")


@given(st.sampled_from(SECTIONS), json_values)
def test_any_section_value_is_a_config_or_a_config_error(section: str, value: Any):
    raw = raw_config()
    raw[section] = value
    try:
        parse_config(raw)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(problem, str) and problem for problem in exc.problems)


@given(st.sampled_from(("auth", "rollout", "limits", "drain", "listen")), st.text(max_size=30), json_values)
def test_any_key_in_a_section_is_a_config_or_an_error_naming_it(section: str, key: str, value: Any):
    raw = raw_config()
    raw[section] = {**raw.get(section, {}), key: value}
    try:
        parse_config(raw)
    except ConfigError as exc:
        assert any(section in problem for problem in exc.problems)


@given(json_values)
def test_any_document_is_a_config_or_a_config_error(value: Any):
    try:
        parse_config(value)
    except ConfigError as exc:
        assert exc.problems
