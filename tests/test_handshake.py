"""The HTTP upgrade without sockets: a valid request built once and changed one thing at a time,
the status each mistake gets (one rule per test), the head limits, reading a head in pieces,
and the client side the gateway uses towards backends — checked against `websockets`' own
sans-I/O handshake both ways."""

from __future__ import annotations

import base64

import pytest
from websockets.client import ClientProtocol
from websockets.http11 import Request as WsRequest
from websockets.http11 import Response as WsResponse
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from gateway.wire.handshake import (
    HttpError,
    Request,
    RequestReader,
    UpgradeRefused,
    accept_value,
    check_response,
    check_upgrade,
    error_response,
    head_end,
    new_key,
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
    """The valid request head (up to and including its blank line), changed as asked."""
    replace = replace or {}
    fields = [(name, replace.get(name, value)) for name, value in VALID if name not in drop]
    fields += add or []
    return (line + "\r\n" + "".join(f"{name}: {value}\r\n" for name, value in fields) + "\r\n").encode("latin-1")


def parse_request(data: bytes, limit: int = 16384) -> Request:
    """The request in `data`, fed in one piece, which must hold the whole head."""
    read = RequestReader(limit).feed(data)
    assert read is not None, "the head is incomplete"
    return read[0]


def refusal(data: bytes, limit: int = 16384) -> HttpError:
    """The error reading `data` raises (fed in one piece)."""
    with pytest.raises(HttpError) as caught:
        RequestReader(limit).feed(data)
    return caught.value


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


# -- malformed heads: refused while reading, before any upgrade check -----------------------------------

SECRET_TARGET = "GET /ws/chat?token=eyJ.secret.sig&x=a{} HTTP/1.1"


def test_http_1_0_is_400_because_websocket_needs_1_1() -> None:
    assert refusal(head(line="GET /ws/chat HTTP/1.0")).status == 400


@pytest.mark.parametrize("version", ["2.0", "3.0"])
def test_http_2_and_later_is_505(version: str) -> None:
    assert refusal(head(line=f"GET /ws/chat HTTP/{version}")).status == 505


def test_a_lowercase_method_is_400() -> None:
    assert refusal(head(line="get /ws/chat HTTP/1.1")).status == 400


def test_two_spaces_in_the_request_line_are_400() -> None:
    assert refusal(head(line="GET /ws/chat  HTTP/1.1")).status == 400


def test_a_non_ascii_target_is_400() -> None:
    assert refusal(head(line="GET /ws/ch\u00e4t HTTP/1.1")).status == 400


@pytest.mark.parametrize("byte", ["\x00", "\x01", "\x1f", "\x7f", "\t"], ids=["nul", "soh", "us", "del", "tab"])
def test_a_control_byte_in_the_target_is_400(byte: str) -> None:
    assert refusal(head(line=SECRET_TARGET.format(byte + "b"))).status == 400


@pytest.mark.parametrize("scheme", ["http", "https", "ws", "wss"])
def test_the_absolute_form_is_accepted_with_its_path_and_query(scheme: str) -> None:
    request = parse_request(head(line=f"GET {scheme}://gw.example:8080/ws/chat?token=a%20b&room=1 HTTP/1.1"))
    assert (request.path, request.query, request.target) == ("/ws/chat", "token=a%20b&room=1", "/ws/chat?token=a%20b&room=1")
    assert check_upgrade(request) == KEY


def test_the_absolute_form_without_a_path_means_the_root() -> None:
    assert parse_request(head(line="GET ws://gw.example?room=1 HTTP/1.1")).target == "/?room=1"


@pytest.mark.parametrize(
    "target",
    ["ftp://gw.example/ws/chat", "http://user:pw@gw.example/ws/chat", "gw.example:80", "*"],
    ids=["other-scheme", "userinfo", "authority-form", "asterisk"],
)
def test_a_target_that_is_neither_a_path_nor_an_http_or_ws_url_is_400(target: str) -> None:
    assert refusal(head(line=f"GET {target} HTTP/1.1")).status == 400


def test_a_fragment_is_not_part_of_the_query() -> None:
    assert parse_request(head(line="GET /ws/chat?room=1#top HTTP/1.1")).query == "room=1"


def test_a_missing_host_is_400() -> None:
    assert refusal(head(drop=("Host",))).status == 400


def test_a_second_host_is_400() -> None:
    assert refusal(head(add=[("Host", "other.example")])).status == 400


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1/evil", "user@gw.example", "gw example", "gw.example:80x", "[not-v6]", "gw.example%4", "gw.example?x"],
    ids=["path", "userinfo", "space", "bad-port", "bad-ip-literal", "bad-percent", "query"],
)
def test_a_host_value_that_is_not_a_host_is_400(host: str) -> None:
    assert refusal(head(replace={"Host": host})).status == 400


@pytest.mark.parametrize(
    "host", ["gw.example", "gw.example:8080", "127.0.0.1:80", "[::1]:443", "xn--bcher-kva.example", ""],
    ids=["name", "name-port", "ipv4-port", "ipv6-port", "punycode", "empty"],
)
def test_a_host_value_that_is_a_host_is_accepted(host: str) -> None:
    assert parse_request(head(replace={"Host": host})).headers.get("Host") == host


def test_a_body_length_on_an_upgrade_is_400() -> None:
    assert refusal(head(add=[("Content-Length", "5")])).status == 400


def test_a_chunked_body_on_an_upgrade_is_400() -> None:
    assert refusal(head(add=[("Transfer-Encoding", "chunked")])).status == 400


def test_an_empty_body_length_is_fine() -> None:
    assert check_upgrade(parse_request(head(add=[("Content-Length", "0")]))) == KEY


def test_a_folded_header_line_is_400() -> None:
    assert refusal(head(add=[("X-Folded", "a"), (" continued", "b")])).status == 400


def test_whitespace_before_a_colon_is_400() -> None:
    assert refusal(head(add=[("X-Space ", "before the colon")])).status == 400


@pytest.mark.parametrize("byte", ["\x00", "\x07", "\x7f"], ids=["nul", "bell", "del"])
def test_a_control_byte_in_a_header_value_is_400(byte: str) -> None:
    assert refusal(head(add=[("X-Ctl", f"a{byte}b")])).status == 400


def test_a_line_without_a_colon_is_400() -> None:
    assert refusal(head().replace(b"\r\n\r\n", b"\r\nNo-Colon-Here\r\n\r\n")).status == 400


def test_a_bare_cr_is_400() -> None:
    assert refusal(head().replace(b"Host: gw.example\r\n", b"Host: gw.example\rX: y\r\n")).status == 400


def test_bare_lf_line_ends_are_400_as_soon_as_the_first_arrives() -> None:
    assert refusal(b"GET /ws/chat HTTP/1.1\n").status == 400
    assert refusal(head().replace(b"\r\n", b"\n")).status == 400


def test_an_empty_line_before_the_request_line_is_400() -> None:
    assert refusal(b"\r\n" + head()).status == 400


def test_tls_on_the_plain_port_is_400() -> None:
    assert refusal(bytes.fromhex("160301020001000001fc0303")).status == 400


@pytest.mark.parametrize(
    "data",
    [
        head(line=SECRET_TARGET.format("\x00")),
        head(line=SECRET_TARGET.format("")).replace(b"\r\n\r\n", b"\r\nX-Bad : eyJ.secret.sig\r\n\r\n"),
        head(line=SECRET_TARGET.format("")).replace(b"\r\n\r\n", b"\r\nX-Ctl: eyJ.secret.sig\x01\r\n\r\n"),
        head(line=SECRET_TARGET.format("")).replace(b"Host: gw.example", b"Host: eyJ.secret.sig/x"),
        head(line=SECRET_TARGET.format("")).replace(b"\r\n\r\n", b"\r\nHost: eyJ.secret.sig\r\n\r\n"),
        b"GET /ws/chat?token=eyJ.secret.sig HTTP/7.1\r\n",
        b"GET /ws/chat?token=eyJ.secret.sig" + b"p" * 300,
    ],
    ids=["target", "header-name", "header-value", "host", "duplicate-host", "version", "too-long"],
)
def test_a_refusal_never_quotes_the_request(data: bytes) -> None:
    error = refusal(data, limit=256)
    assert "secret" not in error.message and "secret" not in str(error)
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


# -- reading a head in pieces, within its limit ----------------------------------------------------------


def test_a_head_fed_a_byte_at_a_time_is_read_once_complete_and_the_bytes_after_it_are_kept() -> None:
    reader = RequestReader(16384)
    data = head() + b"\x81\x85early"
    for index in range(len(head()) - 1):
        assert reader.feed(data[index : index + 1]) is None
    read = reader.feed(data[len(head()) - 1 :])
    assert read is not None
    request, rest = read
    assert (check_upgrade(request), rest) == (KEY, b"\x81\x85early")


def test_a_control_byte_in_the_target_is_refused_before_the_head_is_complete() -> None:
    reader = RequestReader(16384)
    with pytest.raises(HttpError) as caught:
        reader.feed(b"GET /ws/chat?x=\x00")
    assert caught.value.status == 400


def test_a_head_that_reaches_the_limit_without_ending_is_431() -> None:
    assert refusal(head(add=[("X-Pad", "p" * 9000)]), limit=8192).status == 431


def test_a_request_line_that_reaches_the_limit_is_414() -> None:
    assert refusal(b"GET /ws/chat?token=" + b"t" * 9000, limit=8192).status == 414


def test_a_request_line_that_reaches_the_limit_in_pieces_is_414() -> None:
    reader = RequestReader(8192)
    with pytest.raises(HttpError) as caught:
        for _ in range(100):  # 10 KiB, past the limit
            reader.feed(b"t" * 100 if _ else b"GET /ws/chat?token=")
    assert caught.value.status == 414


def test_a_head_of_exactly_the_limit_before_its_blank_line_is_accepted() -> None:
    pad = 200 - len(head()) - len("X-Pad: \r\n") + 4
    data = head(add=[("X-Pad", "p" * pad)])
    assert len(data) == 200 + 4  # 200 bytes, then CRLF CRLF
    assert check_upgrade(parse_request(data, limit=200)) == KEY
    assert refusal(data, limit=199).status == 431


def test_head_end_is_none_until_the_blank_line_and_then_just_past_it() -> None:
    data = head()
    for cut in range(len(data)):
        assert head_end(data[:cut], 8192) is None
    assert head_end(data + b"early frame bytes", 8192) == len(data)


def test_a_response_head_that_reaches_the_limit_without_ending_is_refused() -> None:
    with pytest.raises(HttpError):
        head_end(b"HTTP/1.1 101 Switching Protocols\r\nX-Pad: " + b"p" * 9000, 8192)


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
    request = parse_request(data)
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
    request = parse_request(data)
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
