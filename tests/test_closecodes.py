"""Close codes: what one leg's close becomes on the other; nothing illegal ever reaches the wire."""

from __future__ import annotations

import pytest

from gateway.core.closecodes import MAX_REASON_BYTES, SENDABLE, Side, cut_reason, echo, forward, passed_on, sendable

RESERVED = {0, 1004, 1005, 1006, 1015}
LEGAL = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]


def test_sendable_codes_are_exactly_the_rfc_6455_and_iana_ones() -> None:
    expected = {1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)}
    assert SENDABLE == expected


@pytest.mark.parametrize("to", list(Side))
@pytest.mark.parametrize("code", LEGAL)
def test_legal_code_and_reason_pass_through_unchanged(code: int, to: Side) -> None:
    assert forward(code, "bye", to) == (code, "bye")


@pytest.mark.parametrize("to", list(Side))
@pytest.mark.parametrize("code", [None, 0, 1005])
def test_close_without_a_code_becomes_a_plain_1000(code: int | None, to: Side) -> None:
    assert forward(code, "ignored", to) == (1000, "")


@pytest.mark.parametrize("code", [1006, 1015])
def test_vanished_upstream_reads_as_bad_gateway_to_the_client(code: int) -> None:
    assert forward(code, "", Side.CLIENT)[0] == 1014


@pytest.mark.parametrize("code", [1006, 1015])
def test_vanished_client_reads_as_going_away_to_the_backend(code: int) -> None:
    assert forward(code, "", Side.UPSTREAM)[0] == 1001


@pytest.mark.parametrize("code", [1, 999, 1004, 1016, 2000, 2999, 5000])
def test_code_outside_the_registry_becomes_a_protocol_error(code: int) -> None:
    assert forward(code, "whatever", Side.CLIENT) == (1002, "invalid close code")


@pytest.mark.parametrize("to", list(Side))
def test_no_input_code_ever_produces_a_reserved_or_unsendable_code(to: Side) -> None:
    for code in range(0, 5001):
        out, reason = forward(code, "r" * 200, to)
        assert out in SENDABLE and out not in RESERVED, (code, out)
        assert len(reason.encode("utf-8")) <= MAX_REASON_BYTES


def test_gateway_made_close_with_an_unsendable_code_becomes_internal_error() -> None:
    for code in range(0, 5001):
        out, _ = sendable(code, "x")
        assert out == (code if code in SENDABLE else 1011), code


def test_gateway_made_close_keeps_a_legal_code_and_cuts_its_reason() -> None:
    assert sendable(1013, "é" * 100) == (1013, "é" * 61)


def test_forwarded_reason_is_cut_to_123_bytes() -> None:
    assert forward(4000, "x" * 500, Side.CLIENT) == (4000, "x" * 123)


# -- reasons -------------------------------------------------------------------------------


def test_reason_of_exactly_123_bytes_is_kept() -> None:
    assert cut_reason("x" * 123) == "x" * 123
    assert cut_reason("x" + "é" * 61) == "x" + "é" * 61  # 1 + 122 bytes


def test_reason_of_124_ascii_bytes_loses_its_last_character() -> None:
    assert cut_reason("x" * 124) == "x" * 123


def test_empty_reason_stays_empty() -> None:
    assert cut_reason("") == ""


@pytest.mark.parametrize("char", ["é", "€", "😀"])  # 2, 3 and 4 UTF-8 bytes
@pytest.mark.parametrize("prefix", range(4))
def test_reason_is_cut_on_a_character_boundary_as_long_as_possible(char: str, prefix: int) -> None:
    reason = "a" * prefix + char * 100
    cut = cut_reason(reason)
    size = len(cut.encode("utf-8"))
    assert reason.startswith(cut)
    assert MAX_REASON_BYTES - len(char.encode("utf-8")) < size <= MAX_REASON_BYTES
    assert cut.encode("utf-8").decode("utf-8") == cut


def test_multibyte_character_straddling_byte_123_is_dropped_whole() -> None:
    reason = "a" * 122 + "€" + "tail"  # "€" occupies bytes 123..125
    assert cut_reason(reason) == "a" * 122


@pytest.mark.parametrize(("code", "answer"), [(1000, 1000), (4000, 4000), (None, 1000), (1005, 1000), (1006, 1000)])
def test_a_peers_close_is_answered_with_its_own_code_when_legal_on_the_wire(code: int | None, answer: int) -> None:
    assert echo(code) == answer


@pytest.mark.parametrize(("code", "to", "expected"), [
    (1002, Side.CLIENT, (1014, "upstream connection lost")),
    (1007, Side.UPSTREAM, (1001, "client connection lost")),
    (1009, Side.CLIENT, (1014, "backend sent a message over the size limit")),
    (1009, Side.UPSTREAM, (1001, "client sent a message over the size limit")),
])
def test_a_leg_that_broke_the_protocol_reads_as_lost_to_the_other_and_an_oversize_says_so(code, to, expected) -> None:
    assert passed_on(code, to) == expected
