"""The HTTP upgrade without sockets: a valid request built once and changed one thing at a time,
the status each mistake gets, the head limits, and the client side the gateway uses towards
backends — checked against `websockets`' own sans-I/O handshake both ways."""

from __future__ import annotations

import base64

import pytest
from websockets.client import ClientProtocol
from websockets.http11 import Request as WsRequest
from websockets.http11 import Response as WsResponse
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from gateway.handshake import (
    HttpError,
    UpgradeRefused,
    accept_value,
    check_response,
    check_upgrade,
    error_response,
    head_end,
    new_key,
    parse_request,
    switching_protocols,
    upgrade_request,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3's example
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
VALID = [
    ("Host", "gw.example"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", KEY),
    ("Sec-WebSocket-Version", "13"),
]


def head(
    *,
    line: str = "GET /ws/chat?room=1 HTTP/1.1",
    drop: tuple[str, ...] = (),
    replace: dict[str, str] | None = None,
    add: list[tuple[str, str]] | None = None,
) -> bytes:
    """The valid request head, changed as asked; ends like the listener passes it (one CRLF)."""
    replace = replace or {}
    fields = [(name, replace.get(name, value)) for name, value in VALID if name not in drop]
    fields += add or []
    return (line + "\r\n" + "".join(f"{name}: {value}\r\n" for name, value in fields)).encode("latin-1")


def status_of(data: bytes) -> HttpError:
    with pytest.raises(HttpError) as caught:
        check_upgrade(parse_request(data))
    return caught.value


# -- a valid request -----------------------------------------------------------------------------------


def test_a_valid_upgrade_gives_its_key_path_and_raw_query() -> None:
    request = parse_request(head(line="GET /ws/chat?token=a%20b&room=1 HTTP/1.1"))
    assert check_upgrade(request) == KEY
    assert (request.method, request.path, request.query) == ("GET", "/ws/chat", "token=a%20b&room=1")
    assert request.headers.get("sec-websocket-version") == "13"  # names are case-insensitive
    assert list(request.headers) == VALID and len(request.headers) == len(VALID)  # in arrival order
    assert "upgrade" in request.headers and "Origin" not in request.headers


def test_header_values_of_several_lines_are_joined_and_tokens_are_case_insensitive() -> None:
    request = parse_request(head(replace={"Connection": "keep-alive"}, add=[("connection", "UPGRADE")]))
    assert request.headers.get("Connection") == "keep-alive, UPGRADE"
    assert request.headers.getall("CONNECTION") == ["keep-alive", "UPGRADE"]
    assert check_upgrade(request) == KEY
    assert check_upgrade(parse_request(head(replace={"Upgrade": "WebSocket", "Connection": "keep-alive, Upgrade"}))) == KEY


def test_accept_value_is_the_one_rfc_6455_gives_for_its_example_key() -> None:
    assert accept_value(KEY) == ACCEPT


# -- wrong requests: the status says what is wrong ----------------------------------------------------


@pytest.mark.parametrize("method", ["HEAD", "POST", "PUT", "OPTIONS"])
def test_a_method_other_than_get_is_405_allowing_get(method: str) -> None:
    error = status_of(head(line=f"{method} /ws/chat HTTP/1.1"))
    assert error.status == 405 and ("Allow", "GET") in error.headers


def test_a_request_without_upgrade_is_426_asking_for_websocket() -> None:
    error = status_of(head(drop=("Upgrade",)))
    assert error.status == 426 and ("Upgrade", "websocket") in error.headers


@pytest.mark.parametrize(
    "change",
    [{"Upgrade": "h2c"}, {"Connection": "keep-alive"}, {"Connection": "upgrades"}],
    ids=["upgrade-h2c", "connection-without-upgrade", "connection-upgrades"],
)
def test_an_upgrade_to_something_else_is_400(change: dict[str, str]) -> None:
    assert status_of(head(replace=change)).status == 400


def test_a_missing_connection_header_is_400() -> None:
    assert status_of(head(drop=("Connection",))).status == 400


@pytest.mark.parametrize("version", ["7", "8", "12", "14", "13, 8", ""])
def test_an_unsupported_websocket_version_is_426_naming_13(version: str) -> None:
    error = status_of(head(replace={"Sec-WebSocket-Version": version}))
    assert error.status == 426 and ("Sec-WebSocket-Version", "13") in error.headers


def test_a_missing_or_repeated_version_is_426_naming_13() -> None:
    for data in (head(drop=("Sec-WebSocket-Version",)), head(add=[("Sec-WebSocket-Version", "13")])):
        error = status_of(data)
        assert error.status == 426 and ("Sec-WebSocket-Version", "13") in error.headers


@pytest.mark.parametrize(
    "key",
    ["not base64!", base64.b64encode(b"x" * 15).decode(), base64.b64encode(b"x" * 17).decode(), "dGhlIHNhbXBsZSBub25jZQ", ""],
    ids=["not-base64", "15-bytes", "17-bytes", "unpadded", "empty"],
)
def test_a_bad_key_is_400(key: str) -> None:
    assert status_of(head(replace={"Sec-WebSocket-Key": key})).status == 400


def test_a_missing_or_repeated_key_is_400() -> None:
    assert status_of(head(drop=("Sec-WebSocket-Key",))).status == 400
    assert status_of(head(add=[("Sec-WebSocket-Key", KEY)])).status == 400


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (head(line="GET /ws/chat HTTP/1.0"), 400),
        (head(line="GET /ws/chat HTTP/2.0"), 505),
        (head(line="GET http://gw.example/ws/chat HTTP/1.1"), 400),
        (head(line="get /ws/chat HTTP/1.1"), 400),
        (head(line="GET /ws/chat  HTTP/1.1"), 400),
        (head(line="GET /ws/ch\u00e4t HTTP/1.1"), 400),
        (head(drop=("Host",)), 400),
        (head(add=[("Host", "other.example")]), 400),
        (head(add=[("Content-Length", "5")]), 400),
        (head(add=[("Transfer-Encoding", "chunked")]), 400),
        (head(add=[("X-Folded", "a"), (" continued", "b")]), 400),
        (head(add=[("X-Space ", "before the colon")]), 400),
        (head(add=[("X-Ctl", "bell\x07")]), 400),
        (head() + b"No-Colon-Here\r\n", 400),
        (head().replace(b"Host: gw.example\r\n", b"Host: gw.example\rX: y\r\n"), 400),
    ],
    ids=[
        "http-1.0", "http-2", "absolute-form", "lowercase-method", "two-spaces", "non-ascii-target", "no-host",
        "two-hosts", "body", "chunked", "folded-line", "space-before-colon", "control-character", "line-without-colon",
        "bare-cr",
    ],
)
def test_a_malformed_request_head_is_refused_before_any_upgrade_check(data: bytes, status: int) -> None:
    with pytest.raises(HttpError) as caught:
        parse_request(data)
    assert caught.value.status == status


def test_an_empty_body_length_is_fine() -> None:
    assert check_upgrade(parse_request(head(add=[("Content-Length", "0")]))) == KEY


# -- head limits -------------------------------------------------------------------------------------------


def test_head_end_is_none_until_the_blank_line_and_then_just_past_it() -> None:
    data = head() + b"\r\n"
    for cut in range(len(data)):
        assert head_end(data[:cut], 8192) is None
    assert head_end(data + b"early frame bytes", 8192) == len(data)


def test_a_head_that_reaches_the_limit_without_ending_is_431() -> None:
    data = head(add=[("X-Pad", "p" * 9000)])
    with pytest.raises(HttpError) as caught:
        head_end(data, 8192)
    assert caught.value.status == 431


def test_a_request_line_that_reaches_the_limit_is_414() -> None:
    with pytest.raises(HttpError) as caught:
        head_end(b"GET /ws/chat?token=" + b"t" * 9000, 8192)
    assert caught.value.status == 414


def test_a_head_of_exactly_the_limit_before_its_blank_line_is_accepted() -> None:
    pad = 200 - len(head()) - len("X-Pad: \r\n") + 2
    data = head(add=[("X-Pad", "p" * pad)]) + b"\r\n"
    assert len(data) == 200 + 4  # 200 bytes, then CRLF CRLF
    assert head_end(data, 200) == 204
    with pytest.raises(HttpError) as caught:
        head_end(data, 199)
    assert caught.value.status == 431


# -- what the listener writes -------------------------------------------------------------------------


def test_switching_protocols_answers_with_the_accept_value_and_the_extra_headers() -> None:
    response = switching_protocols(KEY, [("X-Request-ID", "r1")])
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and response.endswith(b"\r\n\r\n")
    assert f"Sec-WebSocket-Accept: {ACCEPT}\r\n".encode() in response
    assert b"\r\nX-Request-ID: r1\r\n" in response


def test_error_response_is_complete_and_closes_the_connection() -> None:
    response = error_response(426, "WebSocket upgrade required", [("Upgrade", "websocket")])
    head_part, _, body = response.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"\r\nConnection: close" in head_part and b"\r\nUpgrade: websocket" in head_part
    assert f"\r\nContent-Length: {len(body)}".encode() in head_part and body == b"WebSocket upgrade required\n"
    assert error_response(405, "no", head_only=True).endswith(b"\r\n\r\n")  # HEAD: no body


# -- the client side: towards a backend --------------------------------------------------------------


def backend_answer(key: str, *, status: str = "101 Switching Protocols", drop: tuple[str, ...] = ()) -> bytes:
    fields = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept_value(key))]
    lines = [f"HTTP/1.1 {status}"] + [f"{name}: {value}" for name, value in fields if name not in drop]
    return "\r\n".join(lines).encode()  # as the connector passes it: without the blank line


def test_the_gateways_upgrade_request_passes_its_own_server_checks() -> None:
    key = new_key(bytes(range(16)))
    data = upgrade_request("backend:9000", "/ws/chat?room=1", key, [("X-Request-ID", "r1")])
    assert data.endswith(b"\r\n\r\n")
    request = parse_request(data[:-2])
    assert check_upgrade(request) == key
    assert (request.target, request.headers.get("Host"), request.headers.get("X-Request-ID")) == ("/ws/chat?room=1", "backend:9000", "r1")


def test_a_101_with_the_right_accept_value_is_the_backends_consent() -> None:
    response = check_response(backend_answer(KEY), KEY)
    assert response.status == 101 and response.headers.get("sec-websocket-accept") == ACCEPT


def test_a_101_with_another_keys_accept_value_is_refused() -> None:
    with pytest.raises(UpgradeRefused) as caught:
        check_response(backend_answer(new_key(b"\x01" * 16)), KEY)
    assert caught.value.status == 101


@pytest.mark.parametrize("drop", ["Upgrade", "Connection", "Sec-WebSocket-Accept"])
def test_a_101_without_the_upgrade_headers_is_refused(drop: str) -> None:
    with pytest.raises(UpgradeRefused):
        check_response(backend_answer(KEY, drop=(drop,)), KEY)


@pytest.mark.parametrize(("status", "expected"), [("401 Unauthorized", 401), ("403 Forbidden", 403), ("503 Service Unavailable", 503), ("200 OK", 200)])
def test_any_other_status_is_refused_with_that_status(status: str, expected: int) -> None:
    with pytest.raises(UpgradeRefused) as caught:
        check_response(backend_answer(KEY, status=status), KEY)
    assert caught.value.status == expected


@pytest.mark.parametrize("data", [b"SSH-2.0-OpenSSH_9.6", b"HTTP/1.1 101 Switching\rProtocols", b"HTTP/1.1 101 OK\r\n folded: line"])
def test_an_answer_that_is_not_http_is_refused_with_status_0(data: bytes) -> None:
    with pytest.raises(UpgradeRefused) as caught:
        check_response(data, KEY)
    assert caught.value.status == 0


# -- interoperability with an independent implementation ----------------------------------------------


def test_websockets_client_request_passes_the_gateways_checks_and_accepts_its_answer() -> None:
    client = ClientProtocol(parse_uri("ws://gw.example/ws/chat?room=1"))
    client.send_request(client.connect())
    data = b"".join(client.data_to_send())
    request = parse_request(data[: head_end(data, 8192)][:-2])  # type: ignore[index]
    key = check_upgrade(request)
    client.receive_data(switching_protocols(key))
    [response] = client.events_received()
    assert isinstance(response, WsResponse) and response.status_code == 101
    assert client.handshake_exc is None


def test_websockets_server_accepts_the_gateways_request_and_the_gateway_accepts_its_answer() -> None:
    key = new_key(b"\xaa" * 16)
    server = ServerProtocol()
    server.receive_data(upgrade_request("backend:9000", "/ws/chat", key, []))
    [request] = server.events_received()
    assert isinstance(request, WsRequest)
    response = server.accept(request)
    assert response.status_code == 101
    server.send_response(response)
    answer = b"".join(server.data_to_send())
    assert check_response(answer[: answer.index(b"\r\n\r\n")], key).status == 101
