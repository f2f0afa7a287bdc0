"""The client's address behind proxies, and which calls get it as context.ip."""

from __future__ import annotations

from typing import Any

import pytest
from multidict import CIMultiDict

from segment_relay.edge import CLIENT_LIBRARIES, Proxies, fills_ip


def headers(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


PROXIES = Proxies(["10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("peer", "sent", "client"),
    [
        # An untrusted peer's header is a spoof: ignored.
        ("198.51.100.9", [("X-Forwarded-For", "1.2.3.4")], "198.51.100.9"),
        # One trusted proxy: the address it appended.
        ("10.0.0.2", [("X-Forwarded-For", "203.0.113.7")], "203.0.113.7"),
        # The client wrote its own header first: the right-most untrusted entry wins.
        ("10.0.0.2", [("X-Forwarded-For", "1.2.3.4, 203.0.113.7")], "203.0.113.7"),
        # Two trusted hops, then the client.
        ("10.0.0.2", [("X-Forwarded-For", "1.2.3.4, 203.0.113.7, 10.1.1.1")], "203.0.113.7"),
        # Several headers read as one list, in order.
        (
            "10.0.0.2",
            [("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-For", "203.0.113.7, 10.9.9.9")],
            "203.0.113.7",
        ),
        # A trusted proxy with no header: the proxy is the client.
        ("10.0.0.2", [], "10.0.0.2"),
        # Garbage where an address should be: nothing left of it is trusted.
        ("10.0.0.2", [("X-Forwarded-For", "203.0.113.7, not-an-ip")], "10.0.0.2"),
        ("10.0.0.2", [("X-Forwarded-For", "not-an-ip, 10.3.3.3")], "10.3.3.3"),
        # Ports and IPv6, bracketed or not.
        ("10.0.0.2", [("X-Forwarded-For", "203.0.113.7:4711")], "203.0.113.7"),
        ("fd00::1", [("X-Forwarded-For", "2001:db8::7")], "2001:db8::7"),
        ("fd00::1", [("X-Forwarded-For", "[2001:db8::7]:4711, fd00::2")], "2001:db8::7"),
        ("::1", [("X-Forwarded-For", "2001:db8::7")], "::1"),
        # Only the configured header counts: Forwarded is ignored by default.
        ("10.0.0.2", [("Forwarded", "for=203.0.113.7")], "10.0.0.2"),
    ],
)
def test_the_client_is_the_right_most_address_not_a_trusted_proxy(
    peer: str, sent: list[tuple[str, str]], client: str
) -> None:
    assert PROXIES.client(peer, headers(*sent)) == client


def test_without_trusted_proxies_every_forwarding_header_is_ignored() -> None:
    sent = headers(("X-Forwarded-For", "198.51.100.1"), ("Forwarded", "for=198.51.100.2"))
    assert Proxies([]).client("10.0.0.2", sent) == "10.0.0.2"


def test_the_forwarded_header_when_it_is_the_one_configured() -> None:
    proxies = Proxies(["10.0.0.0/8"], "forwarded")
    sent = headers(
        ("Forwarded", 'for=1.2.3.4, for="[2001:db8::7]:4711";proto=https'),
        ("Forwarded", "for=10.0.0.9;by=10.0.0.2"),
        ("X-Forwarded-For", "198.51.100.1"),
    )
    assert proxies.client("10.0.0.2", sent) == "2001:db8::7"
    assert proxies.client("10.0.0.2", headers(("Forwarded", "for=unknown"))) == "10.0.0.2"


def test_a_peer_that_is_not_an_address_is_kept_as_it_is() -> None:
    assert PROXIES.client(None, headers()) is None
    assert PROXIES.client("unix-socket", headers()) == "unix-socket"


def library(name: str, **context: Any) -> dict[str, Any]:
    return {"library": {"name": name, "version": "1"}, **context}


@pytest.mark.parametrize("name", sorted(CLIENT_LIBRARIES))
def test_client_side_libraries_get_the_address(name: str) -> None:
    assert fills_ip(library(name))


@pytest.mark.parametrize(
    ("context", "fills"),
    [
        (library("analytics-python"), False),
        (library("@segment/analytics-node"), False),
        (library("analytics-python", direct=True), True),
        (library("analytics-python", direct="true"), False),  # only the JSON true
        ({"direct": True}, True),
        (library("analytics.js", ip="192.0.2.5"), False),  # its own ip is kept
        (library("analytics.js", ip=""), True),
        (None, False),
        ({}, False),
        ("not an object", False),
        ({"library": "analytics.js"}, False),
    ],
)
def test_which_calls_get_the_address(context: Any, fills: bool) -> None:
    assert fills_ip(context) is fills


def test_an_ipv4_client_of_an_ipv6_socket_is_read_as_ipv4() -> None:
    assert Proxies([]).client("::ffff:203.0.113.7", headers()) == "203.0.113.7"
    sent = headers(("X-Forwarded-For", "::ffff:203.0.113.9"))
    assert PROXIES.client("::ffff:10.0.0.2", sent) == "203.0.113.9"
