"""Token extraction and verification, with one error type and a closed set of reasons.

The gateway verifies every JWT itself so that nothing unauthenticated reaches a backend.
Algorithms come from the config, never from the token header. `AuthError` carries a
reason code (for metrics and logs) and a short close reason (for the client); neither
ever contains the token.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

import warnings

import jwt
from jwt.warnings import InsecureKeyLengthWarning

# PyJWT warns (multi-line, on stderr) on every use of a short HMAC key; the gateway
# cannot choose the secret the old backend uses, so it says so once in its own log instead.
warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)
from .config import AuthConfig

MAX_TOKEN_BYTES = 8 * 1024
# An authenticate frame is a token plus a little JSON; anything much larger is not one.
MAX_AUTH_FRAME_BYTES = MAX_TOKEN_BYTES + 4 * 1024
MAX_USER_ID_CHARS = 256

# reason code -> close reason sent to the client
REASONS: dict[str, str] = {
    "missing_token": "authentication required",
    "token_too_large": "token too large",
    "malformed_token": "malformed token",
    "bad_signature": "invalid token signature",
    "unknown_key": "token signed by an unknown key",
    "bad_algorithm": "token algorithm not allowed",
    "expired": "token expired",
    "not_yet_valid": "token not yet valid",
    "bad_audience": "token audience not accepted",
    "bad_issuer": "token issuer not accepted",
    "missing_claim": "token lacks a required claim",
    "bad_user_id": "token has no valid user id",
    "invalid_token": "invalid token",
    "binary_frame": "first frame must be a text authenticate message",
    "bad_frame": "first frame must be JSON",
    "not_authenticate": 'first frame must be {"type":"authenticate","token":...}',
    "timeout": "authentication timed out",
    "upstream_rejected": "token rejected by backend",
    "legacy_denied": "token-in-URL auth is no longer supported: please update the app",
    "rate_limited": "too many failed authentication attempts, retry later",
    "too_many_sessions": "too many open sessions for this user",
}


class AuthError(Exception):
    """Authentication failed; `reason` is one of `REASONS`."""

    def __init__(self, reason: str) -> None:
        assert reason in REASONS, reason
        self.reason = reason
        super().__init__(reason)

    @property
    def close_reason(self) -> str:
        return REASONS[self.reason]


@dataclass(frozen=True)
class Identity:
    user_id: str
    expires_at: float | None


def parse_authenticate_frame(data: str | bytes) -> tuple[str, dict[str, Any]]:
    """The token and the whole object from a client's first frame."""
    if isinstance(data, bytes):
        raise AuthError("binary_frame")
    if len(data) > MAX_AUTH_FRAME_BYTES:
        raise AuthError("token_too_large")
    try:
        message = json.loads(data)
    except (ValueError, RecursionError):  # deep nesting ("[[[[…") raises RecursionError
        raise AuthError("bad_frame") from None
    if not isinstance(message, dict) or message.get("type") != "authenticate":
        raise AuthError("not_authenticate")
    token = message.get("token")
    if not isinstance(token, str) or not token:
        raise AuthError("missing_token")
    return token, message


def might_be_authenticate(data: str) -> bool:
    """The test an in-band refresh costs a relayed text frame before any JSON parse."""
    return len(data) <= MAX_AUTH_FRAME_BYTES and '"authenticate"' in data


def authenticate_message(token: str) -> str:
    """The frame that authenticates to a message-style backend on a legacy client's behalf."""
    return json.dumps({"type": "authenticate", "token": token}, separators=(",", ":"))


TIME_CLAIMS = ("exp", "nbf", "iat")

_PYJWT_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "bad_audience"),
    (jwt.InvalidIssuerError, "bad_issuer"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidAlgorithmError, "bad_algorithm"),
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.DecodeError, "malformed_token"),
    (jwt.InvalidKeyError, "bad_algorithm"),
)


class Keys(Protocol):
    """Where a verifier finds a JWKS key by kid (`jwks.KeySet`)."""

    def key_for(self, kid: str) -> Any | None: ...


class Verifier:
    """Verifies tokens against one `AuthConfig`; built once per config (re)load.

    With ``auth.jwks_url`` the key is the one `keys` holds under the token's ``kid``; a kid
    it lacks is `AuthError("unknown_key")`, which the session answers by asking the shell to
    refresh the set once before it gives up.
    """

    def __init__(self, config: AuthConfig, keys: Keys | None = None) -> None:
        self._config = config
        self._key = config.secret if config.secret is not None else config.public_key
        self._keys = keys if config.jwks_url is not None else None

    def verify(self, token: str | None) -> Identity:
        if not token:
            raise AuthError("missing_token")
        if len(token) > MAX_TOKEN_BYTES or len(token.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES:
            raise AuthError("token_too_large")
        cfg = self._config
        key: Any = self._key if cfg.jwks_url is None else self._key_by_kid(token)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(cfg.algorithms),
                audience=list(cfg.audience) or None,
                issuer=cfg.issuer,
                leeway=cfg.leeway_seconds,
                options={"verify_aud": bool(cfg.audience)},
            )
        except jwt.PyJWTError as exc:
            for kind, reason in _PYJWT_REASONS:
                if isinstance(exc, kind):
                    raise AuthError(reason) from None
            raise AuthError("invalid_token") from None
        except (ValueError, TypeError, OverflowError):
            raise AuthError("malformed_token") from None
        for claim in TIME_CLAIMS:  # RFC 7519 §2 NumericDate; PyJWT would take "123" for 123
            value = claims.get(claim, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AuthError("malformed_token")
        user_id = claims.get(cfg.user_id_claim)
        if isinstance(user_id, bool) or not isinstance(user_id, (str, int)):
            raise AuthError("bad_user_id")
        user_id = str(user_id)
        if not user_id or len(user_id) > MAX_USER_ID_CHARS or not user_id.isprintable():
            raise AuthError("bad_user_id")
        exp = claims.get("exp")
        return Identity(user_id, float(exp) if isinstance(exp, (int, float)) else None)

    def _key_by_kid(self, token: str) -> Any:
        kid = _kid(token)
        key = self._keys.key_for(kid) if self._keys is not None and kid is not None else None
        if key is None:
            raise AuthError("unknown_key")
        return key


def _kid(token: str) -> str | None:
    try:
        header = jwt.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise AuthError("malformed_token") from None
    kid = header.get("kid")
    return kid if isinstance(kid, str) else None


def mint_token(config: AuthConfig, user_id: str, ttl_seconds: float, *, now: float | None = None) -> str:
    """A token the gateway accepts, for staging and demos; needs an HMAC secret."""
    if config.secret is None:
        raise ValueError("minting needs an HMAC secret (auth.secret); this config verifies with a public key")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {config.user_id_claim: user_id, "iat": issued, "exp": issued + int(ttl_seconds)}
    if config.audience:
        claims["aud"] = config.audience[0]
    if config.issuer:
        claims["iss"] = config.issuer
    return jwt.encode(claims, config.secret, algorithm=config.algorithms[0])
