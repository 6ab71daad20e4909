"""Structured logging that cannot leak a token.

Every line is one JSON object. As a last line of defence the formatter also masks
anything shaped like a JWT and any value of the token query parameter, so a token that
slips into a message (an exception text, a URL) is still never written.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def redact(text: str, query_param: str = "token") -> str:
    """Mask JWTs and values of `query_param`; a substring test first, so a clean line costs no regex."""
    if "eyJ" in text:
        text = _JWT.sub("<redacted>", text)
    if query_param + "=" in text:
        text = _param_value(query_param).sub(r"\1<redacted>", text)
    return text


@functools.lru_cache(maxsize=8)
def _param_value(query_param: str) -> re.Pattern[str]:
    return re.compile(rf"(\b{re.escape(query_param)}=)[^&\s\"']+")


class RedactFilter(logging.Filter):
    """Masks tokens in records of loggers we do not control (aiohttp quotes request lines).

    Applied at the source logger, so every handler (ours, a test's, a library's) gets the
    masked record, not just our formatter's output. `query_param` is the configured
    ``auth.query_param``, set by `install_redaction`.
    """

    query_param = "token"

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage(), self.query_param)
        record.args = None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info), self.query_param)
            record.exc_info = None
        return True


_REDACT = RedactFilter()
FOREIGN_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.client", "aiohttp.websocket", "asyncio")


def install_redaction(query_param: str = "token") -> None:
    """Idempotent: mask tokens (JWTs, and values of `query_param`) in what aiohttp and asyncio log."""
    _REDACT.query_param = query_param
    for name in FOREIGN_LOGGERS:
        logger = logging.getLogger(name)
        if _REDACT not in logger.filters:
            logger.addFilter(_REDACT)


class JsonFormatter(logging.Formatter):
    def __init__(self, query_param: str = "token") -> None:
        super().__init__()
        self.query_param = query_param

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            line["error"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["error"] = record.exc_text
        return redact(json.dumps(line, default=str, ensure_ascii=False), self.query_param)


def setup_logging(level: str = "INFO", query_param: str = "token", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(query_param))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # No line carries the caller's file, thread or process: do not compute them per record
    # (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    install_redaction(query_param)


class AccessLogger(AbstractAccessLogger):
    """An access log without the query string, where the legacy token lives."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "request",
            extra={
                "remote": request.remote,
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_s": round(time, 3),
                "request_id": response.headers.get("X-Request-ID"),
            },
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
