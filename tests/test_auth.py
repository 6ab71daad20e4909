"""Auth: the gateway verifies every token itself, with algorithms from config, and fails with one closed set of reasons."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import traceback
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.core.auth import (
    MAX_AUTH_FRAME_BYTES,
    MAX_TOKEN_BYTES,
    REASONS,
    AuthError,
    Verifier,
    authenticate_message,
    mint_token,
    parse_authenticate_frame,
)
from gateway.core.config import AuthConfig
from gateway.core.configparse import parse_config

from .helpers import SECRET, make_config, make_token, raw_config


def _rsa_pair() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return private, public


PRIVATE_PEM, PUBLIC_PEM = _rsa_pair()
OTHER_PRIVATE_PEM, _ = _rsa_pair()


def auth_config(**auth: Any) -> AuthConfig:
    """The one valid HS256 config from the helpers, changed one key at a time."""
    return make_config(auth=auth).auth


def rs256_config(**auth: Any) -> AuthConfig:
    raw = raw_config(auth={"algorithms": ["RS256"], "secret": None, "public_key_file": "/keys/jwt.pub", **auth})
    return parse_config(raw, env={}, read_public_key=lambda name: PUBLIC_PEM).auth


def verify(token: str | None, config: AuthConfig | None = None) -> str:
    return Verifier(config or auth_config()).verify(token).user_id


def reason_of(token: str | None, config: AuthConfig | None = None) -> str:
    with pytest.raises(AuthError) as caught:
        verify(token, config)
    return caught.value.reason


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed_hs256(payload: dict[str, Any], key: bytes) -> str:
    """HS256 by hand, for keys pyjwt itself refuses to sign with (a PEM public key)."""
    signing_input = _b64(b'{"alg":"HS256","typ":"JWT"}') + "." + _b64(json.dumps(payload).encode())
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)


def padded_token(length: int) -> str:
    """A valid token of exactly `length` characters."""
    start = max(0, (length - len(make_token("alice", pad=""))) * 3 // 4 - 8)
    for pad in range(start, length):
        token = make_token("alice", pad="p" * pad)
        if len(token) == length:
            return token
        if len(token) > length:
            break
    raise AssertionError(f"no token of length {length}")


# -- the valid case ----------------------------------------------------------------------------


def test_valid_hs256_token_yields_its_user_id_and_expiry() -> None:
    now = int(time.time())
    token = jwt.encode({"user_id": "alice", "exp": now + 60}, SECRET, algorithm="HS256")
    identity = Verifier(auth_config()).verify(token)
    assert identity.user_id == "alice"
    assert identity.expires_at == now + 60


def test_token_without_exp_has_no_expiry() -> None:
    token = jwt.encode({"user_id": "alice"}, SECRET, algorithm="HS256")
    assert Verifier(auth_config()).verify(token).expires_at is None


def test_integer_user_id_is_accepted_as_its_decimal_string() -> None:
    assert verify(make_token(42)) == "42"


def test_user_id_claim_name_comes_from_config() -> None:
    config = auth_config(user_id_claim="sub")
    assert verify(make_token(None, sub="alice"), config) == "alice"
    assert reason_of(make_token("alice"), config) == "bad_user_id"


# -- signature and algorithm ---------------------------------------------------------------------


def test_token_signed_with_another_secret_is_a_bad_signature() -> None:
    assert reason_of(make_token(secret="another-secret-0123456789-abcdefghij")) == "bad_signature"


def test_token_with_a_tampered_signature_is_a_bad_signature() -> None:
    head, payload, signature = make_token().split(".")
    tampered = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    assert reason_of(f"{head}.{payload}.{tampered}") == "bad_signature"


def test_token_with_a_tampered_payload_is_a_bad_signature() -> None:
    head, _, signature = make_token("alice").split(".")
    forged = _b64(json.dumps({"user_id": "admin", "exp": int(time.time()) + 60}).encode())
    assert reason_of(f"{head}.{forged}.{signature}") == "bad_signature"


def test_alg_none_token_is_refused() -> None:
    token = jwt.encode({"user_id": "alice"}, None, algorithm="none")
    assert reason_of(token) == "bad_algorithm"


def test_alg_none_token_is_refused_even_with_a_signature_part() -> None:
    head = _b64(b'{"alg":"none","typ":"JWT"}')
    payload = _b64(b'{"user_id":"alice"}')
    assert reason_of(f"{head}.{payload}.c2ln") == "bad_algorithm"


def test_hs512_token_is_refused_when_only_hs256_is_configured() -> None:
    long_secret = "k" * 64
    token = make_token(secret=long_secret, algorithm="HS512")
    assert reason_of(token, auth_config(secret=long_secret)) == "bad_algorithm"
    assert verify(token, auth_config(secret=long_secret, algorithms=["HS512"])) == "alice"


def test_rs256_token_verifies_with_the_configured_public_key() -> None:
    assert verify(make_token(secret=PRIVATE_PEM, algorithm="RS256"), rs256_config()) == "alice"


def test_rs256_token_signed_by_another_key_is_a_bad_signature() -> None:
    assert reason_of(make_token(secret=OTHER_PRIVATE_PEM, algorithm="RS256"), rs256_config()) == "bad_signature"


def test_hs256_token_signed_with_the_public_key_as_secret_is_refused() -> None:
    token = hand_signed_hs256({"user_id": "admin", "exp": int(time.time()) + 60}, PUBLIC_PEM.encode())
    assert reason_of(token, rs256_config()) == "bad_algorithm"


def test_hs256_token_is_refused_by_a_public_key_config() -> None:
    assert reason_of(make_token(), rs256_config()) == "bad_algorithm"


@pytest.mark.parametrize("token", ["abc", "not.a.jwt", "a.b", "....", "eyJhbGciOiJIUzI1NiJ9.e30"])
def test_garbage_is_a_malformed_token(token: str) -> None:
    assert reason_of(token) == "malformed_token"


def test_token_whose_payload_is_not_an_object_is_malformed() -> None:
    token = jwt.api_jws.encode(b'["alice"]', SECRET, algorithm="HS256")
    assert reason_of(token) == "malformed_token"


@pytest.mark.parametrize("token", [None, ""])
def test_absent_token_is_missing(token: str | None) -> None:
    assert reason_of(token) == "missing_token"


# -- time claims -----------------------------------------------------------------------------------


def test_expired_token_is_refused() -> None:
    assert reason_of(make_token(ttl=-10)) == "expired"


def test_token_not_yet_valid_is_refused() -> None:
    assert reason_of(make_token(nbf=int(time.time()) + 60)) == "not_yet_valid"


def test_token_issued_in_the_future_is_refused() -> None:
    assert reason_of(make_token(iat=int(time.time()) + 60)) == "not_yet_valid"


def test_leeway_accepts_a_token_expired_within_it() -> None:
    assert verify(make_token(ttl=-10), auth_config(leeway_seconds=60)) == "alice"


def test_leeway_accepts_a_token_valid_within_it() -> None:
    assert verify(make_token(nbf=int(time.time()) + 10), auth_config(leeway_seconds=60)) == "alice"


def test_leeway_does_not_accept_a_token_expired_beyond_it() -> None:
    assert reason_of(make_token(ttl=-120), auth_config(leeway_seconds=60)) == "expired"


# -- audience and issuer ---------------------------------------------------------------------------


def test_configured_audience_accepts_a_matching_token() -> None:
    assert verify(make_token(aud="chat"), auth_config(audience=["chat"])) == "alice"
    assert verify(make_token(aud=["other", "chat"]), auth_config(audience=["chat"])) == "alice"


def test_configured_audience_refuses_another_audience() -> None:
    assert reason_of(make_token(aud="billing"), auth_config(audience=["chat"])) == "bad_audience"


def test_configured_audience_requires_the_claim() -> None:
    assert reason_of(make_token(), auth_config(audience=["chat"])) == "missing_claim"


def test_unconfigured_audience_ignores_the_claim() -> None:
    assert verify(make_token(aud="anything")) == "alice"


def test_configured_issuer_accepts_a_matching_token() -> None:
    assert verify(make_token(iss="https://auth.example"), auth_config(issuer="https://auth.example")) == "alice"


def test_configured_issuer_refuses_another_issuer() -> None:
    assert reason_of(make_token(iss="https://evil.example"), auth_config(issuer="https://auth.example")) == "bad_issuer"


def test_configured_issuer_requires_the_claim() -> None:
    assert reason_of(make_token(), auth_config(issuer="https://auth.example")) == "missing_claim"


# -- the user id claim -------------------------------------------------------------------------------


def test_token_without_the_user_id_claim_is_refused() -> None:
    assert reason_of(make_token(None)) == "bad_user_id"


@pytest.mark.parametrize("user_id", [True, False, 1.5, 0.0, ["alice"], {"id": "alice"}])
def test_user_id_of_a_non_string_non_integer_type_is_refused(user_id: Any) -> None:
    assert reason_of(make_token(user_id)) == "bad_user_id"


@pytest.mark.parametrize("user_id", ["", "x" * 257, "ali\nce", "ali\x00ce", "\u2028"])
def test_empty_overlong_or_unprintable_user_id_is_refused(user_id: str) -> None:
    assert reason_of(make_token(user_id)) == "bad_user_id"


def test_user_id_of_256_characters_is_accepted() -> None:
    assert verify(make_token("x" * 256)) == "x" * 256


# -- size ------------------------------------------------------------------------------------------


def test_token_of_exactly_8_kib_is_accepted() -> None:
    assert verify(padded_token(MAX_TOKEN_BYTES)) == "alice"


def test_token_over_8_kib_is_refused_before_decoding() -> None:
    assert reason_of(padded_token(MAX_TOKEN_BYTES + 1)) == "token_too_large"
    assert reason_of("x" * 100_000) == "token_too_large"


def test_token_over_8_kib_in_utf8_bytes_is_too_large_even_when_under_8192_characters() -> None:
    assert reason_of("é" * 5000) == "token_too_large"


# -- errors never carry the token ------------------------------------------------------------------

FAILING: dict[str, Callable[[], tuple[str, AuthConfig]]] = {
    "bad_signature": lambda: (make_token(secret="another-secret-0123456789-abcdefghij"), auth_config()),
    "expired": lambda: (make_token(ttl=-10), auth_config()),
    "not_yet_valid": lambda: (make_token(nbf=int(time.time()) + 60), auth_config()),
    "bad_algorithm": lambda: (jwt.encode({"user_id": "alice"}, None, algorithm="none"), auth_config()),
    "bad_audience": lambda: (make_token(aud="billing"), auth_config(audience=["chat"])),
    "bad_issuer": lambda: (make_token(iss="evil"), auth_config(issuer="good")),
    "missing_claim": lambda: (make_token(), auth_config(issuer="good")),
    "bad_user_id": lambda: (make_token(1.5), auth_config()),
    "malformed_token": lambda: ("not-a-jwt-but-secret-looking", auth_config()),
    "token_too_large": lambda: (padded_token(MAX_TOKEN_BYTES + 1), auth_config()),
}


@pytest.mark.parametrize("expected", sorted(FAILING))
def test_auth_error_never_contains_the_token(expected: str) -> None:
    token, config = FAILING[expected]()
    with pytest.raises(AuthError) as caught:
        Verifier(config).verify(token)
    error = caught.value
    assert error.reason == expected
    logged = "".join(traceback.format_exception(error))
    for text in (str(error), repr(error), error.close_reason, logged, *map(str, error.args)):
        assert token not in text
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_every_close_reason_fits_a_close_frame() -> None:
    assert all(0 < len(reason.encode("utf-8")) <= 123 for reason in REASONS.values())


def test_close_reason_is_the_documented_text_for_the_reason() -> None:
    assert AuthError("expired").close_reason == "token expired"
    assert str(AuthError("expired")) == "expired"


# -- the authenticate frame ---------------------------------------------------------------------------


def test_authenticate_frame_yields_its_token_and_whole_object() -> None:
    frame = json.dumps({"type": "authenticate", "token": "T", "client": "ios"})
    assert parse_authenticate_frame(frame) == ("T", {"type": "authenticate", "token": "T", "client": "ios"})


def test_binary_first_frame_is_refused() -> None:
    with pytest.raises(AuthError, match="binary_frame"):
        parse_authenticate_frame(json.dumps({"type": "authenticate", "token": "T"}).encode())


@pytest.mark.parametrize("frame", ["", "hello", "{", "{'type': 'authenticate'}", '{"type":"authenticate","token":"T"} x'])
def test_first_frame_that_is_not_json_is_refused(frame: str) -> None:
    with pytest.raises(AuthError, match="bad_frame"):
        parse_authenticate_frame(frame)


@pytest.mark.parametrize("frame", ["[" * 6_000 + "]" * 6_000, '{"a":' * 2_000 + "1" + "}" * 2_000, "[" * 12_000])
def test_deeply_nested_json_first_frame_is_a_bad_frame_not_a_crash(frame: str) -> None:
    assert len(frame) <= MAX_AUTH_FRAME_BYTES
    with pytest.raises(AuthError, match="bad_frame"):
        parse_authenticate_frame(frame)


@pytest.mark.parametrize("frame", ["[]", '["authenticate"]', '"authenticate"', "null", "42", "true"])
def test_first_frame_that_is_json_but_not_an_object_is_refused(frame: str) -> None:
    with pytest.raises(AuthError, match="not_authenticate"):
        parse_authenticate_frame(frame)


@pytest.mark.parametrize("kind", [None, "auth", "Authenticate", "connected", 1])
def test_first_frame_with_the_wrong_type_is_refused(kind: Any) -> None:
    message: dict[str, Any] = {"token": "T"} if kind is None else {"type": kind, "token": "T"}
    with pytest.raises(AuthError, match="not_authenticate"):
        parse_authenticate_frame(json.dumps(message))


@pytest.mark.parametrize("token", ["absent", "", None, 123, ["T"], {"jwt": "T"}, True])
def test_authenticate_frame_without_a_non_empty_string_token_is_refused(token: Any) -> None:
    message: dict[str, Any] = {"type": "authenticate"}
    if token != "absent":
        message["token"] = token
    with pytest.raises(AuthError, match="missing_token"):
        parse_authenticate_frame(json.dumps(message))


def test_oversized_authenticate_frame_is_refused_before_parsing() -> None:
    frame = json.dumps({"type": "authenticate", "token": "x" * MAX_AUTH_FRAME_BYTES})
    with pytest.raises(AuthError, match="token_too_large"):
        parse_authenticate_frame(frame)


def test_authenticate_message_round_trips_through_the_parser() -> None:
    frame = authenticate_message("a.b.c")
    assert parse_authenticate_frame(frame) == ("a.b.c", {"type": "authenticate", "token": "a.b.c"})
    assert frame == '{"type":"authenticate","token":"a.b.c"}'


# -- minting -------------------------------------------------------------------------------------------


def test_minted_token_is_accepted_by_the_verifier() -> None:
    config = auth_config()
    identity = Verifier(config).verify(mint_token(config, "alice", 60))
    assert identity.user_id == "alice"


def test_minted_token_expires_after_its_ttl() -> None:
    token = mint_token(auth_config(), "alice", 60, now=1_000_000)
    assert jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})["exp"] == 1_000_060
    assert reason_of(token) == "expired"


def test_minted_token_uses_the_configured_claim_audience_issuer_and_algorithm() -> None:
    config = auth_config(algorithms=["HS512"], secret="k" * 64, user_id_claim="sub", audience=["chat"], issuer="gw")
    token = mint_token(config, "alice", 60)
    assert jwt.get_unverified_header(token)["alg"] == "HS512"
    assert verify(token, config) == "alice"


def test_minting_refuses_a_public_key_config() -> None:
    with pytest.raises(ValueError, match="HMAC secret"):
        mint_token(rs256_config(), "alice", 60)
