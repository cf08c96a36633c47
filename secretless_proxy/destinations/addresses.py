"""Address classes: is this IP address somewhere a rule may send a request?

Every address the proxy would connect to gets a class. ``public`` passes; every other class is
refused unless the rule opts in (``to.private``), or an operator allowance (``upstream.allow_private``)
covers it. The table follows the IANA special-purpose registries (RFC 6890 and successors);
IPv6 forms that carry an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo) are
judged by the IPv4 address they reach — smokescreen #277 was ``::ffff:169.254.169.254``.

``unspecified`` and ``multicast`` are never allowed, not even by ``private: true``: a TCP
connection to 0.0.0.0 or :: reaches the local host, and a multicast address is no TCP peer.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PUBLIC = "public"
LOOPBACK = "loopback"
PRIVATE = "private"  # RFC 1918 and other site-local ranges
LINK_LOCAL = "link_local"  # incl. cloud metadata 169.254.169.254
CGNAT = "cgnat"  # RFC 6598 shared address space
UNIQUE_LOCAL = "unique_local"  # fc00::/7, incl. AWS metadata fd00:ec2::254
MULTICAST = "multicast"
UNSPECIFIED = "unspecified"
RESERVED = "reserved"
DOCUMENTATION = "documentation"
NEVER_ALLOWED = frozenset({UNSPECIFIED, MULTICAST})

_N = ipaddress.ip_network

# Order matters only where ranges nest: the first match wins.
_V4: tuple[tuple[IPNetwork, str], ...] = (
    (_N("0.0.0.0/8"), UNSPECIFIED),  # "this network": connect() to 0.x reaches the local host
    (_N("10.0.0.0/8"), PRIVATE),
    (_N("100.64.0.0/10"), CGNAT),
    (_N("127.0.0.0/8"), LOOPBACK),
    (_N("169.254.0.0/16"), LINK_LOCAL),
    (_N("172.16.0.0/12"), PRIVATE),
    (_N("192.0.0.0/24"), RESERVED),  # IETF protocol assignments
    (_N("192.0.2.0/24"), DOCUMENTATION),  # TEST-NET-1
    (_N("192.88.99.0/24"), RESERVED),  # deprecated 6to4 relay anycast
    (_N("192.168.0.0/16"), PRIVATE),
    (_N("198.18.0.0/15"), RESERVED),  # benchmarking
    (_N("198.51.100.0/24"), DOCUMENTATION),  # TEST-NET-2
    (_N("203.0.113.0/24"), DOCUMENTATION),  # TEST-NET-3
    (_N("224.0.0.0/4"), MULTICAST),
    (_N("240.0.0.0/4"), RESERVED),  # incl. 255.255.255.255
)
_V6: tuple[tuple[IPNetwork, str], ...] = (
    (_N("::/128"), UNSPECIFIED),
    (_N("::1/128"), LOOPBACK),
    (_N("64:ff9b:1::/48"), PRIVATE),  # local-use NAT64 (RFC 8215)
    (_N("100::/64"), RESERVED),  # discard-only
    (_N("2001:db8::/32"), DOCUMENTATION),
    (_N("2001::/23"), RESERVED),  # IETF protocol assignments (Teredo is unwrapped before this)
    (_N("3fff::/20"), DOCUMENTATION),  # RFC 9637
    (_N("5f00::/16"), RESERVED),  # SRv6 SIDs
    (_N("fc00::/7"), UNIQUE_LOCAL),
    (_N("fe80::/10"), LINK_LOCAL),
    (_N("fec0::/10"), PRIVATE),  # deprecated site-local
    (_N("ff00::/8"), MULTICAST),
)
_GLOBAL_UNICAST_V6 = _N("2000::/3")
_NAT64 = _N("64:ff9b::/96")
_COMPAT = _N("::/96")


@dataclass(frozen=True, slots=True)
class AddressClass:
    """The class of one address; ``via`` names the embedding when an IPv6 address carries IPv4."""

    address: IPAddress
    kind: str
    via: str | None = None  # "ipv4-mapped", "ipv4-compatible", "nat64", "6to4", "teredo"
    embedded: ipaddress.IPv4Address | None = None

    @property
    def public(self) -> bool:
        return self.kind == PUBLIC

    def describe(self) -> str:
        return self.kind if self.via is None else f"{self.kind} ({self.via} {self.embedded})"

    @property
    def effective(self) -> IPAddress:
        """The address a connection really reaches (the IPv4 one for mapped/compatible forms)."""
        return self.embedded if self.via in ("ipv4-mapped", "ipv4-compatible") and self.embedded else self.address


def _table(addr: IPAddress) -> str:
    for net, kind in _V4 if addr.version == 4 else _V6:
        if addr in net:
            return kind
    if addr.version == 6 and addr not in _GLOBAL_UNICAST_V6:
        return RESERVED  # everything outside 2000::/3 is unassigned or special
    return PUBLIC


def _embedded(addr: ipaddress.IPv6Address) -> tuple[str, tuple[ipaddress.IPv4Address, ...]] | None:
    if addr.ipv4_mapped is not None:
        return "ipv4-mapped", (addr.ipv4_mapped,)
    if addr in _NAT64:
        return "nat64", (ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF),)
    if addr.sixtofour is not None:
        return "6to4", (addr.sixtofour,)
    if addr.teredo is not None:
        return "teredo", addr.teredo  # (server, client): both are reached through it
    if addr in _COMPAT and int(addr) > 1:
        return "ipv4-compatible", (ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF),)
    return None


@lru_cache(maxsize=4096)  # per request on the hot path; a handful of distinct upstream addresses
def classify(address: IPAddress | str) -> AddressClass:
    """The class of ``address``; an IPv6 address with an IPv4 inside gets the worst class of either."""
    addr = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
        addr = ipaddress.IPv6Address(int(addr))  # fe80::1%eth0 is still fe80::1
    if addr.version == 6 and (emb := _embedded(addr)) is not None:  # type: ignore[arg-type]
        via, inner = emb
        for v4 in inner:
            kind = _table(v4)
            if kind != PUBLIC:
                return AddressClass(address=addr, kind=kind, via=via, embedded=v4)
        return AddressClass(address=addr, kind=PUBLIC, via=via, embedded=inner[-1])
    return AddressClass(address=addr, kind=_table(addr))


@dataclass(frozen=True, slots=True)
class Allowance:
    """Which non-public addresses a request may reach: everything special, or these networks."""

    everything: bool = False  # to.private: true
    networks: tuple[IPNetwork, ...] = ()  # to.private: [CIDR, ...] plus upstream.allow_private

    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.everything, self.networks)))

    def __hash__(self) -> int:  # a cache key on every request: hashed once, not per lookup
        return self._hash

    def __bool__(self) -> bool:
        return self.everything or bool(self.networks)

    def covers(self, cls: AddressClass) -> bool:
        if cls.kind in NEVER_ALLOWED:
            return False
        if self.everything:
            return True
        candidates = [cls.address] + ([cls.embedded] if cls.embedded is not None else [])
        return any(a in net for a in candidates for net in self.networks if a.version == net.version)

    def union(self, other: Allowance) -> Allowance:
        if not other:
            return self
        return Allowance(everything=self.everything or other.everything, networks=self.networks + other.networks)


NOTHING = Allowance()


def verdict(cls: AddressClass, allowance: Allowance) -> str | None:
    """None when the address may be reached, else the class that refuses it."""
    return None if cls.public or allowance.covers(cls) else cls.kind


def parse_network(text: str) -> IPNetwork:
    """A CIDR (or a bare address, meaning /32 or /128); raises ValueError with a clear sentence."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            raise ValueError(f"{text!r} has host bits set: did you mean {ipaddress.ip_network(text, strict=False)}?") from None
        raise ValueError(f"{text!r} is not an IP address or CIDR network (e.g. 10.0.0.0/8, fd00::/8)") from None


@lru_cache(maxsize=4096)  # per request: a name fails both parsers, which is slow
def ip_literal(host: str) -> IPAddress | None:
    """``host`` as an IP address if it is one (normalised hosts have no brackets)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
