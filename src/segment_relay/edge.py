"""The client's address behind trusted proxies, and the calls that get it as `context.ip`
(docs/deployment.md, "Client addresses"). Pure: the request's peer and headers are passed in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multidict import MultiMapping

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# `context.library.name` of Segment's client-side libraries: their calls come from the user's
# device, so the request's address is the user's (Segment fills context.ip for them).
CLIENT_LIBRARIES = frozenset(
    {
        "analytics.js",  # analytics.js and analytics-next in the browser
        "analytics-next",
        "analytics-ios",
        "analytics-swift",
        "analytics-android",
        "analytics-kotlin",
        "analytics-react-native",
        "@segment/analytics-react-native",
    }
)


def _address(text: str) -> Address | None:
    """An address as proxies write it: `203.0.113.7`, `203.0.113.7:4711`, `2001:db8::1`,
    `[2001:db8::1]:4711`, optionally in double quotes; None for anything else."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # An IPv4 client of a socket listening on "::" arrives as ::ffff:a.b.c.d.
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def _forwarded_for(values: Iterable[str]) -> list[str]:
    """The `for=` of each element of Forwarded headers (RFC 7239), in order."""
    found = []
    for value in values:
        for element in value.split(","):
            for pair in element.split(";"):
                name, _, given = pair.partition("=")
                if name.strip().lower() == "for":
                    found.append(given)
    return found


class Proxies:
    """`server.trusted_proxies`: whose forwarding header names the client."""

    def __init__(self, networks: Iterable[str], header: str = "x-forwarded-for") -> None:
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in networks
        )
        self.header = header

    def trusted(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def client(self, peer: str | None, headers: MultiMapping[str]) -> str | None:
        """The client's address: the peer's, unless the peer is a trusted proxy; then the
        right-most address of the forwarding header that is not a trusted proxy. A header
        from an untrusted peer is ignored (anyone can write one)."""
        if not self.networks and (not peer or not peer.startswith("::ffff:")):
            return peer  # nothing trusted, nothing to normalise: no parse on every request
        found = _address(peer) if peer else None
        if found is None:
            return peer
        if not self.networks or not self.trusted(found):
            return str(found)
        if self.header == "forwarded":
            hops = _forwarded_for(headers.getall("Forwarded", ()))
        else:
            hops = ",".join(headers.getall("X-Forwarded-For", ())).split(",")
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                break  # not an address: nothing left of it can be trusted
            found = address
            if not self.trusted(address):
                break
        return str(found)


def fills_ip(context: Any) -> bool:
    """Whether a call with this context gets the client's address as `context.ip`: not when
    it has one; yes for client-side libraries and for `context.direct: true`."""
    if not isinstance(context, dict):
        return False
    if context.get("ip"):
        return False
    if context.get("direct") is True:
        return True
    library = context.get("library")
    return isinstance(library, dict) and library.get("name") in CLIENT_LIBRARIES
