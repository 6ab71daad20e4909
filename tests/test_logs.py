"""The token never reaches a log line: not the gateway's, not a library's, not the access log.

Sessions of every kind run against real stacks while two things listen: pytest's caplog
(raw records, before any redaction) and the gateway's own JSON formatter on a StringIO.
An upgrade is logged once, in its session's "connection closed" line (method, path,
status 101, remote address, never the query string).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest
import websockets

from gateway.service.logs import JsonFormatter

from .helpers import TIMEOUT, Servers, authenticate_frame, closed, make_token, open_client, refused_port


class Counter(logging.Handler):
    """Sets `reached` once `wanted` records matching `match` have been emitted."""

    def __init__(self, match: Callable[[logging.LogRecord], bool], wanted: int) -> None:
        super().__init__(logging.DEBUG)
        self.match, self.wanted, self.seen = match, wanted, 0
        self.reached = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.match(record):
            self.seen += 1
            if self.seen >= self.wanted:
                self.reached.set()


def _session_line(record: logging.LogRecord) -> bool:
    return record.name == "gateway" and record.getMessage() == "connection closed"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("token"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


def _record_text(record: logging.LogRecord) -> str:
    """Everything a handler could print from `record`: message, args, extras, exception."""
    text = [record.getMessage(), repr(vars(record))]
    if record.exc_info and record.exc_info[1] is not None:
        text.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(text)


def _secrets(token: str) -> list[str]:
    """The token and its payload and signature (a JWT header is the same for every token)."""
    return [token] + [part for part in token.split(".")[1:] if len(part) >= 8]


def _fragments(token: str, size: int = 16) -> set[str]:
    """Every `size`-character piece of what identifies the token (not the constant JWT header)."""
    parts = token.split(".")[1:] if token.count(".") == 2 else [token]
    return {part[i : i + size] for part in parts for i in range(0, max(1, len(part) - size + 1), 4)}


def assert_not_logged(token: str, kind: str, raw: list[str], lines: str) -> None:
    """Raw records (what any handler could print) never hold the token or its signature; the
    gateway's formatted log lines hold no recognisable piece of it at all."""
    for secret in _secrets(token):
        for text in raw:
            assert secret not in text, f"the {kind} token is in a log record"
    for fragment in _fragments(token):
        assert fragment not in lines, f"a piece of the {kind} token is in the JSON log: {fragment!r}"


async def test_no_token_in_any_log_output_and_the_upgrade_is_in_the_session_line(servers: Servers, caplog, json_log):
    # The test's own client logs its request line; set_level also sets caplog's handler
    # level, so the root logger goes last.
    caplog.set_level(logging.WARNING, logger="websockets")
    caplog.set_level(logging.DEBUG)
    access = Counter(_session_line, wanted=7)
    logging.getLogger().addHandler(access)
    stack = await servers.stack(auth={"timeout_seconds": 0.5})
    other = "the-backends-own-secret-0123456789-abcdef"
    rejecting = await servers.stack(old_port=await servers.stub("old", secret=other), rollout={"fallback_to_old": False})

    tokens = {
        "legacy": make_token("lena"),
        "message": make_token("mo"),
        "bad_signature": make_token("eve", secret="not-the-secret-0123456789-abcdefghij"),
        "opaque": "opaque-bearer-value-0123456789",
        "in_bad_frame": make_token("frank"),
        "upstream_down": make_token("uma"),
        "upstream_rejects": make_token("rita"),
    }
    try:
        async with asyncio.timeout(TIMEOUT):
            # 1. legacy, routed old, token between other parameters
            async with websockets.connect(stack.url(f"room=1&token={tokens['legacy']}&lang=en")) as ws:
                await ws.send("hi")
                assert await ws.recv() == "hi"
            # 2. message, routed new
            stack.route_to("new")
            async with websockets.connect(stack.url("room=2")) as ws:
                await ws.send(authenticate_frame(tokens["message"]))
                assert json.loads(await ws.recv())["type"] == "connected"
            # 3. a bad signature in the URL, 4. a token that is no JWT at all
            for kind in ("bad_signature", "opaque"):
                ws = await open_client(stack, "legacy", tokens[kind])
                assert (await closed(ws))[0] == 1008
            # 5. a valid token inside a first frame of the wrong type
            ws = await websockets.connect(stack.url())
            await ws.send(json.dumps({"type": "auth", "token": tokens["in_bad_frame"]}))
            assert (await closed(ws))[0] == 1008
            # 6. upstream unreachable
            async with refused_port() as port:
                down = await servers.stack(old_port=port)
                ws = await open_client(down, "legacy", tokens["upstream_down"])
                assert (await closed(ws))[0] == 1014
            # 7. the upstream rejects the token itself
            ws = await open_client(rejecting, "legacy", tokens["upstream_rejects"])
            assert (await closed(ws))[0] == 1008
            await access.reached.wait()  # every session has ended
    finally:
        logging.getLogger().removeHandler(access)

    records = caplog.records
    assert records, "nothing was captured"
    raw = [caplog.text, json_log.getvalue()] + [_record_text(r) for r in records]
    for kind, token in tokens.items():
        assert_not_logged(token, kind, raw, json_log.getvalue())

    access_lines = [r for r in records if _session_line(r)]
    assert {(r.path, r.method) for r in access_lines} == {("/ws/chat", "GET")}
    assert [r.status for r in access_lines].count(101) == 7
    assert all(r.remote == "127.0.0.1" for r in access_lines)
    assert not [r for r in records if r.name == "aiohttp.access"], "aiohttp's default access log is in use"
    # The stub backends log their own requests to gateway.access; the gateway's upgrades are not there.
    assert not [r for r in records if r.name == "gateway.access" and r.status == 101 and r.remote == "127.0.0.1"
                and r.path == "/ws/chat" and getattr(r, "request_id", None)], "an upgrade got a second line"
    json_access = [json.loads(line) for line in json_log.getvalue().splitlines() if '"connection closed"' in line]
    assert len(json_access) == 7
    assert all(line["path"] == "/ws/chat" and line["status"] == 101 and line["request_id"] for line in json_access)


@pytest.mark.parametrize("pad", [9000, 40000], ids=["closed-1008", "refused-by-http-parser"])
async def test_oversized_url_token_refused_before_the_upgrade_is_not_logged(servers: Servers, caplog, json_log, pad):
    caplog.set_level(logging.WARNING, logger="websockets")
    caplog.set_level(logging.DEBUG)
    stack = await servers.stack()
    token = make_token("oscar", pad="z" * pad)
    async with asyncio.timeout(TIMEOUT):
        try:
            ws = await websockets.connect(stack.url(f"token={token}"))
        except (websockets.InvalidStatus, websockets.InvalidMessage):
            assert pad > 30000  # only a request line past the server's limit is refused outright
        else:
            assert (await closed(ws)) == (1008, "token too large")
        # the refusal is written before the response; a valid session after it proves the
        # server has moved on
        ws = await open_client(stack, "legacy", make_token(), early=["x"])
        assert await ws.recv() == "x"
        await ws.close()
    raw = [caplog.text, json_log.getvalue()] + [_record_text(r) for r in caplog.records]
    assert_not_logged(token, "oversized", raw, json_log.getvalue())
