from ipaddress import ip_network

import pytest

from gateway.core.clientip import client_ip, forwarded_proto, parse_ip, share_key

PROXIES = (ip_network("10.0.0.0/8"), ip_network("fd00::/8"))
LB = "10.0.0.5"


def test_untrusted_peer_is_the_client_whatever_x_forwarded_for_says():
    assert client_ip("203.0.113.7", "198.51.100.1", PROXIES) == "203.0.113.7"


def test_no_trusted_proxies_means_the_header_is_never_read():
    assert client_ip(LB, "198.51.100.1", ()) == LB


def test_trusted_peer_without_header_is_the_client():
    assert client_ip(LB, None, PROXIES) == LB
    assert client_ip(LB, "", PROXIES) == LB


def test_trusted_peer_gives_the_rightmost_entry():
    assert client_ip(LB, "198.51.100.1", PROXIES) == "198.51.100.1"


def test_entries_a_client_prepended_are_ignored():
    assert client_ip(LB, "1.1.1.1, 2.2.2.2, 198.51.100.1", PROXIES) == "198.51.100.1"


def test_walk_skips_every_trusted_hop_from_the_right():
    assert client_ip(LB, "1.1.1.1, 198.51.100.1, 10.1.1.1, 10.2.2.2", PROXIES) == "198.51.100.1"


def test_all_hops_trusted_gives_the_leftmost():
    assert client_ip(LB, "10.9.9.9, 10.1.1.1", PROXIES) == "10.9.9.9"


@pytest.mark.parametrize("junk", ["unknown", "_hidden", "not-an-ip", "", "  ", "1.2.3.4.5", "[::1", "[::1]x"])
def test_garbage_rightmost_entry_stops_at_the_trusted_peer(junk):
    assert client_ip(LB, f"198.51.100.1, {junk}", PROXIES) == LB


def test_garbage_behind_a_trusted_hop_gives_that_hop():
    assert client_ip(LB, "1.1.1.1, unknown, 10.3.3.3", PROXIES) == "10.3.3.3"


def test_garbage_left_of_the_client_does_not_matter():
    assert client_ip(LB, "garbage, 198.51.100.1", PROXIES) == "198.51.100.1"


def test_ports_are_stripped():
    assert client_ip(LB, "198.51.100.1:5555", PROXIES) == "198.51.100.1"
    assert client_ip(LB, "[2001:db8::1]:443", PROXIES) == "2001:db8::1"


def test_ipv6_client_and_proxy():
    assert client_ip("fd00::1", "2001:db8::7, fd00::2", PROXIES) == "2001:db8::7"


def test_ipv4_mapped_peer_matches_an_ipv4_trusted_network():
    assert client_ip("::ffff:10.0.0.5", "198.51.100.1", PROXIES) == "198.51.100.1"
    assert client_ip("::ffff:203.0.113.7", None, PROXIES) == "203.0.113.7"


def test_quoted_and_padded_entries_are_read():
    assert client_ip(LB, '  "198.51.100.1"  ', PROXIES) == "198.51.100.1"


def test_peer_that_is_not_an_ip_is_returned_as_is_or_unknown():
    assert client_ip(None, "198.51.100.1", PROXIES) == "unknown"
    assert client_ip("", "198.51.100.1", PROXIES) == "unknown"
    assert client_ip("/run/gw.sock", "198.51.100.1", PROXIES) == "/run/gw.sock"


def test_addresses_are_returned_in_canonical_form():
    assert client_ip("2001:DB8:0:0::1", None, ()) == "2001:db8::1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1.2.3.4", "1.2.3.4"), ("1.2.3.4:80", "1.2.3.4"), ("::1", "::1"), ("[::1]:80", "::1"), ("[::1]", "::1")],
)
def test_parse_ip_accepts_addresses_with_optional_ports(text, expected):
    assert str(parse_ip(text)) == expected


@pytest.mark.parametrize("text", [None, "", "host.example", "1.2.3", "1.2.3.4:80:90", "[1.2.3.4"])
def test_parse_ip_refuses_garbage(text):
    assert parse_ip(text) is None


def test_the_pending_share_is_keyed_on_an_ipv4_peer_itself():
    assert share_key("203.0.113.9", []) == "203.0.113.9"
    assert share_key("::ffff:203.0.113.9", []) == "203.0.113.9"


def test_the_pending_share_is_keyed_on_an_ipv6_peers_64():
    assert share_key("2001:db8:1:2:aaaa::1", []) == share_key("2001:db8:1:2:bbbb::2", []) == "2001:db8:1:2::/64"
    assert share_key("2001:db8:1:3::1", []) == "2001:db8:1:3::/64"


def test_a_trusted_proxy_or_a_peer_that_is_not_an_ip_has_no_pending_share():
    assert share_key("10.0.0.5", [ip_network("10.0.0.0/8")]) is None
    assert share_key("", []) is None


@pytest.mark.parametrize(
    ("value", "expected"), [("https", "https"), ("HTTP", "http"), (" https ", "https"), ("ftp", "http"), ("https, http", "http"), (None, "http")]
)
def test_a_trusted_proxys_x_forwarded_proto_is_passed_on_when_it_is_http_or_https(value, expected):
    assert forwarded_proto("10.0.0.5", value, [ip_network("10.0.0.0/8")]) == expected


def test_an_untrusted_peers_x_forwarded_proto_is_ignored():
    assert forwarded_proto("203.0.113.9", "https", [ip_network("10.0.0.0/8")]) == "http"
    assert forwarded_proto("203.0.113.9", "https", []) == "http"
