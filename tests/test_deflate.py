"""permessage-deflate (RFC 7692) without sockets: what the gateway accepts from clients, what it
offers and accepts from backends, when compressed frames may pass unchanged, and inflation
that never produces more than the size limit."""

from __future__ import annotations

import tracemalloc
import zlib

import pytest

from gateway.wire.deflate import (
    Deflate,
    InflateError,
    Inflater,
    NegotiationError,
    accept_answer,
    accept_offer,
    parse_extensions,
    passes_through,
    upstream_offer,
)


def deflated(data: bytes, compressor: zlib._Compress | None = None) -> bytes:
    """One message as a permessage-deflate sender frames it: raw deflate, sync flush, no tail."""
    compressor = compressor or zlib.compressobj(wbits=-15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


# -- parsing the header ----------------------------------------------------------------------------


def test_extensions_are_parsed_in_order_with_their_parameters() -> None:
    header = 'permessage-deflate; client_max_window_bits; server_max_window_bits="10", x-other, Permessage-Deflate'
    assert parse_extensions(header) == [
        ("permessage-deflate", {"client_max_window_bits": None, "server_max_window_bits": "10"}),
        ("x-other", {}),
        ("permessage-deflate", {}),
    ]


@pytest.mark.parametrize("header", ["permessage-deflate; =1", "permessage-deflate; a; a", "permessage-deflate; a=1; a=2"])
def test_malformed_extension_headers_are_an_error(header: str) -> None:
    with pytest.raises(ValueError):
        parse_extensions(header)


# -- a client's offer --------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "x-webkit-deflate-frame"])
def test_no_offer_means_no_compression(header: str | None) -> None:
    assert accept_offer(header) is None


def test_a_plain_offer_is_accepted_with_the_defaults() -> None:
    assert accept_offer("permessage-deflate") == (Deflate(), "permessage-deflate")


def test_a_browsers_offer_with_an_empty_client_max_window_bits_is_accepted() -> None:
    assert accept_offer("permessage-deflate; client_max_window_bits") == (Deflate(), "permessage-deflate")


def test_no_context_takeover_asked_for_is_agreed_and_answered() -> None:
    agreed, answer = accept_offer("permessage-deflate; server_no_context_takeover; client_no_context_takeover") or (None, "")
    assert agreed == Deflate(server_no_context_takeover=True, client_no_context_takeover=True)
    assert answer == "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def test_a_smaller_server_window_is_agreed_and_answered() -> None:
    agreed, answer = accept_offer("permessage-deflate; server_max_window_bits=10") or (None, "")
    assert agreed == Deflate(server_max_window_bits=10)
    assert answer == "permessage-deflate; server_max_window_bits=10"


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=ten",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; client_max_window_bits=20",
        "permessage-deflate; server_no_context_takeover=yes",
        "permessage-deflate; unknown_parameter",
    ],
)
def test_an_offer_the_gateway_cannot_honour_is_declined_and_the_next_one_is_taken(offer: str) -> None:
    assert accept_offer(offer) is None
    assert accept_offer(f"{offer}, permessage-deflate; client_no_context_takeover") == (
        Deflate(client_no_context_takeover=True),
        "permessage-deflate; client_no_context_takeover",
    )


def test_a_malformed_offer_header_is_declined_as_a_whole() -> None:
    assert accept_offer("permessage-deflate; =1, permessage-deflate") is None


# -- towards a backend -------------------------------------------------------------------------------


def test_upstream_offer_asks_for_per_message_compression_within_the_clients_window() -> None:
    assert upstream_offer(Deflate()) == "permessage-deflate; server_no_context_takeover; client_max_window_bits"
    assert upstream_offer(Deflate(server_max_window_bits=9)).endswith("; server_max_window_bits=9")


def test_backend_answer_gives_the_agreed_parameters_and_none_when_it_declined() -> None:
    assert accept_answer(None) is None
    assert accept_answer("") is None
    assert accept_answer("permessage-deflate; server_no_context_takeover; client_max_window_bits=12") == Deflate(
        server_no_context_takeover=True, client_max_window_bits=12
    )


@pytest.mark.parametrize(
    "answer",
    [
        "x-other",
        "permessage-deflate, permessage-deflate",
        "permessage-deflate; unknown",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; client_max_window_bits",
        "permessage-deflate; server_max_window_bits=99",
        "permessage-deflate; =1",
    ],
)
def test_backend_answer_with_anything_not_offered_fails_the_upstream(answer: str) -> None:
    with pytest.raises(NegotiationError):
        accept_answer(answer)


def test_backend_frames_pass_to_the_client_unchanged_only_when_the_client_can_read_them() -> None:
    per_message = Deflate(server_no_context_takeover=True)
    assert passes_through(None, None)  # the backend compresses nothing
    assert passes_through(None, Deflate())
    assert passes_through(per_message, Deflate())
    assert not passes_through(per_message, None)  # the client did not negotiate deflate
    assert not passes_through(Deflate(), Deflate())  # the backend keeps its window across messages
    assert not passes_through(Deflate(server_no_context_takeover=True, server_max_window_bits=15), Deflate(server_max_window_bits=10))
    assert passes_through(Deflate(server_no_context_takeover=True, server_max_window_bits=9), Deflate(server_max_window_bits=10))


# -- inflating -----------------------------------------------------------------------------------------


def test_inflate_round_trips_messages_compressed_with_a_shared_window() -> None:
    compressor = zlib.compressobj(wbits=-15)
    inflater = Inflater()
    first = b"the quick brown fox jumps over the lazy dog " * 20
    second = first[:400]  # compresses to a back-reference into the first message
    assert inflater.inflate(deflated(first, compressor), 10_000) == first
    packed = deflated(second, compressor)
    assert len(packed) < 20
    assert inflater.inflate(packed, 10_000) == second


def test_no_context_takeover_resets_the_window_after_each_message() -> None:
    message = b"repeat after me " * 30
    inflater = Inflater(no_context_takeover=True)
    for _ in range(3):  # a sender that resets too: each message stands alone
        assert inflater.inflate(deflated(message), 10_000) == message
    shared = zlib.compressobj(wbits=-15)
    assert inflater.inflate(deflated(message, shared), 10_000) == message
    with pytest.raises(InflateError) as caught:  # refers to a window the inflater has dropped
        inflater.inflate(deflated(message, shared), 10_000)
    assert caught.value.code == 1007


def test_empty_message_inflates_to_nothing() -> None:
    assert Inflater().inflate(deflated(b""), 10) == b""


def test_message_of_exactly_the_limit_inflates_and_one_byte_more_is_too_big() -> None:
    assert Inflater().inflate(deflated(b"a" * 1000), 1000) == b"a" * 1000
    with pytest.raises(InflateError) as caught:
        Inflater().inflate(deflated(b"a" * 1001), 1000)
    assert caught.value.code == 1009


def test_a_deflate_bomb_is_refused_without_inflating_it() -> None:
    bomb = deflated(b"\x00" * (64 * 1024 * 1024))  # 64 MiB of zeros in about 64 KiB
    assert len(bomb) < 100 * 1024
    inflater = Inflater()
    tracemalloc.start()
    try:
        with pytest.raises(InflateError) as caught:
            inflater.inflate(bomb, 1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.code == 1009
    assert peak < 8 * 1024 * 1024  # bounded by the limit, not by what the bomb would become


def test_data_that_is_not_deflate_is_invalid_payload() -> None:
    with pytest.raises(InflateError) as caught:
        Inflater().inflate(b"\xff\xff\xff\xff", 1000)
    assert caught.value.code == 1007
