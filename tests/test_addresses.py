"""Address classes and verdicts (secretless_proxy/destinations/addresses.py): the table the proxy refuses by."""

from __future__ import annotations

import ipaddress

import pytest

from secretless_proxy.destinations.addresses import NOTHING, Allowance, classify, parse_network, verdict

# address → (class, embedding or None). Everything but "public" is refused without an opt-in.
TABLE = [
    ("93.184.215.14", "public", None),
    ("8.8.8.8", "public", None),
    ("2606:4700:4700::1111", "public", None),
    ("127.0.0.1", "loopback", None),
    ("127.255.255.254", "loopback", None),
    ("::1", "loopback", None),
    ("10.0.0.1", "private", None),
    ("172.16.0.1", "private", None),
    ("172.31.255.255", "private", None),
    ("192.168.1.1", "private", None),
    ("fec0::1", "private", None),
    ("64:ff9b:1::a00:1", "private", None),
    ("169.254.169.254", "link_local", None),
    ("169.254.0.1", "link_local", None),
    ("fe80::1", "link_local", None),
    ("fe80::1%eth0", "link_local", None),
    ("100.64.0.1", "cgnat", None),
    ("100.127.255.255", "cgnat", None),
    ("fd00:ec2::254", "unique_local", None),
    ("fc00::1", "unique_local", None),
    ("224.0.0.1", "multicast", None),
    ("239.255.255.250", "multicast", None),
    ("ff02::1", "multicast", None),
    ("0.0.0.0", "unspecified", None),
    ("0.1.2.3", "unspecified", None),
    ("::", "unspecified", None),
    ("240.0.0.1", "reserved", None),
    ("255.255.255.255", "reserved", None),
    ("192.0.0.8", "reserved", None),
    ("198.18.0.1", "reserved", None),
    ("192.88.99.1", "reserved", None),
    ("100::1", "reserved", None),
    ("2001:10::1", "reserved", None),
    ("4000::1", "reserved", None),
    ("192.0.2.1", "documentation", None),
    ("198.51.100.1", "documentation", None),
    ("203.0.113.1", "documentation", None),
    ("2001:db8::1", "documentation", None),
    ("3fff::1", "documentation", None),
    # IPv6 forms that carry an IPv4 address are judged by the IPv4 address (smokescreen #277)
    ("::ffff:127.0.0.1", "loopback", "ipv4-mapped"),
    ("::ffff:169.254.169.254", "link_local", "ipv4-mapped"),
    ("::ffff:10.1.2.3", "private", "ipv4-mapped"),
    ("::ffff:8.8.8.8", "public", "ipv4-mapped"),
    ("::127.0.0.1", "loopback", "ipv4-compatible"),
    ("::a9fe:a9fe", "link_local", "ipv4-compatible"),
    ("64:ff9b::a9fe:a9fe", "link_local", "nat64"),
    ("64:ff9b::7f00:1", "loopback", "nat64"),
    ("64:ff9b::808:808", "public", "nat64"),
    ("2002:a9fe:a9fe::1", "link_local", "6to4"),
    ("2002:0a00:0001::1", "private", "6to4"),
    ("2002:0808:0808::1", "public", "6to4"),
    # Teredo: server 65.54.227.120 (public), client 192.0.2.45 (obfuscated: documentation)
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "documentation", "teredo"),
    # Teredo with the client 127.0.0.1 (~0x7f000001 = 0x80fffffe)
    ("2001:0:4136:e378:8000:0:80ff:fffe", "loopback", "teredo"),
]


class TestClassify:
    @pytest.mark.parametrize(("address", "kind", "via"), TABLE)
    def test_class(self, address, kind, via):
        """Each address gets its special-purpose class; IPv4 embeddings are judged by the IPv4 inside."""
        cls = classify(address)
        assert (cls.kind, cls.via) == (kind, via)

    @pytest.mark.parametrize(("address", "kind", "via"), [t for t in TABLE if t[1] != "public"])
    def test_refused_by_default(self, address, kind, via):
        """Without an opt-in, every non-public class is refused and the verdict names it."""
        assert verdict(classify(address), NOTHING) == kind

    @pytest.mark.parametrize("address", [t[0] for t in TABLE if t[1] == "public"])
    def test_public_passes(self, address):
        """Public addresses (also behind NAT64/6to4/mapping) need no opt-in."""
        assert verdict(classify(address), NOTHING) is None

    def test_mapped_address_connects_to_the_ipv4(self):
        """An IPv4-mapped address is reached as its IPv4 address (for listener checks)."""
        assert classify("::ffff:127.0.0.1").effective == ipaddress.ip_address("127.0.0.1")


class TestAllowance:
    def test_private_true_allows_special_classes(self):
        """private: true opens loopback, RFC 1918, link-local, CGNAT and ULA addresses."""
        everything = Allowance(everything=True)
        for a in ("127.0.0.1", "10.0.0.1", "169.254.169.254", "100.64.0.1", "fd00:ec2::254", "::ffff:10.0.0.1"):
            assert verdict(classify(a), everything) is None, a

    @pytest.mark.parametrize("address", ["0.0.0.0", "::", "224.0.0.1", "ff02::1"])
    def test_unspecified_and_multicast_never_allowed(self, address):
        """0.0.0.0/:: reach the local host and multicast is no TCP peer: not even private: true opens them."""
        assert verdict(classify(address), Allowance(everything=True)) is not None
        assert verdict(classify(address), Allowance(networks=(parse_network("0.0.0.0/0"), parse_network("::/0")))) is not None

    def test_cidr_list_allows_exactly_its_networks(self):
        """A CIDR list opens the addresses inside it and nothing else."""
        allow = Allowance(networks=(parse_network("10.20.0.0/16"),))
        assert verdict(classify("10.20.3.4"), allow) is None
        assert verdict(classify("10.21.0.1"), allow) == "private"
        assert verdict(classify("169.254.169.254"), allow) == "link_local"

    def test_cidr_list_covers_the_mapped_form(self):
        """An IPv4 CIDR covers the IPv4-mapped spelling of its addresses too (same destination)."""
        allow = Allowance(networks=(parse_network("127.0.0.0/8"),))
        assert verdict(classify("::ffff:127.0.0.1"), allow) is None

    def test_union_of_rule_and_operator_allowances(self):
        """The rule's networks and upstream.allow_private add up."""
        a = Allowance(networks=(parse_network("10.0.0.0/8"),)).union(Allowance(networks=(parse_network("127.0.0.0/8"),)))
        assert verdict(classify("10.1.1.1"), a) is None and verdict(classify("127.0.0.1"), a) is None


class TestParseNetwork:
    def test_host_bits_named(self):
        """A CIDR with host bits set is refused with the network it probably meant."""
        with pytest.raises(ValueError, match=r"has host bits set: did you mean 10\.0\.0\.0/8\?"):
            parse_network("10.0.0.1/8")

    def test_garbage_named(self):
        """Text that is no network gets a sentence with an example."""
        with pytest.raises(ValueError, match=r"'intranet' is not an IP address or CIDR network"):
            parse_network("intranet")
