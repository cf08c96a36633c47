"""Destination checks in process: config sections, the resolver and its cache (against real DNS
servers on loopback), pinning in mitmproxy's server connection hooks, and failing closed."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.dns import start_dnsmasq
from helpers.proxy import base_config
from helpers.rebind_dns import RebindingDns
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.addons.tlsconfig import TlsConfig
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.test import taddons, tflow

from secretless_proxy.addon import Secretless
from secretless_proxy.config.parse import load_config
from secretless_proxy.destinations.resolver import DnsError, Resolver, ResolverConfig
from secretless_proxy.errors import ConfigError
from secretless_proxy.policy import Decision
from secretless_proxy.refusal import Refusal

CLI = Path(sys.executable).parent / "secretless-proxy"
BILLING = "spiffe://example.org/ns/prod/sa/billing"


def write(tmp_path: Path, pki, *, to: dict | None = None, upstream: dict | None = None) -> Path:
    rule = {"name": "r", "workloads": [BILLING], "to": to or {"host": "api.example.com"}, "action": "allow"}
    cfg = base_config(pki, rules=[rule])
    if upstream is not None:
        cfg["upstream"] = {"ca_bundle": str(pki.upstream_ca_file), **upstream}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class TestConfig:
    def test_private_true_and_cidr_list(self, tmp_path, pki):
        """to.private takes true or a list of CIDRs."""
        cfg = load_config(write(tmp_path, pki, to={"host": "db.example.com", "private": True}), resolve_secrets=False)
        assert cfg.rules[0].to.private.everything
        cfg = load_config(write(tmp_path, pki, to={"host": "db.example.com", "private": ["10.20.0.0/16"]}),
                          resolve_secrets=False)
        assert [str(n) for n in cfg.rules[0].to.private.networks] == ["10.20.0.0/16"]

    def test_bad_cidr_located(self, tmp_path, pki):
        """A wrong CIDR in to.private names file, line, key path and the network it probably meant."""
        path = write(tmp_path, pki, to={"host": "db.example.com", "private": ["10.20.0.1/16"]})
        with pytest.raises(ConfigError, match=r"c\.yaml:\d+ rules\[0\]\.to\.private\[0\]: '10\.20\.0\.1/16' has host bits set: did you mean 10\.20\.0\.0/16\?"):
            load_config(path, resolve_secrets=False)

    def test_allow_private_must_be_a_list(self, tmp_path, pki):
        """upstream.allow_private is a list of networks, never a blanket true."""
        with pytest.raises(ConfigError, match=r"upstream\.allow_private: must be a list of CIDR networks"):
            load_config(write(tmp_path, pki, upstream={"allow_private": True}), resolve_secrets=False)

    def test_resolver_section(self, tmp_path, pki):
        """Nameservers take an optional port; timeouts and cache bounds are read."""
        cfg = load_config(write(tmp_path, pki, upstream={"resolver": {
            "nameservers": ["10.0.0.2", "127.0.0.1:5353", "[fd00::53]:53"], "timeout_seconds": 1,
            "cache_size": 10, "max_ttl_seconds": 60}}), resolve_secrets=False)
        assert cfg.resolver == ResolverConfig(nameservers=(("10.0.0.2", 53), ("127.0.0.1", 5353), ("fd00::53", 53)),
                                              timeout=1.0, cache_size=10, max_ttl=60.0)

    def test_bad_nameserver_and_misspelled_key(self, tmp_path, pki):
        """A nameserver that is not an IP, and a misspelled key, are both reported."""
        path = write(tmp_path, pki, upstream={"resolver": {"nameservers": ["dns.example.com"], "timout_seconds": 1}})
        with pytest.raises(ConfigError) as exc:
            load_config(path, resolve_secrets=False)
        text = str(exc.value)
        assert "upstream.resolver.nameservers[0]: must be an IP address with an optional port" in text
        assert "unknown key 'timout_seconds' (did you mean 'timeout_seconds'?" in text

    @pytest.mark.slow  # runs the CLI in a subprocess (an interpreter start and mitmproxy's imports each)
    def test_check_warns_on_wildcard_with_private_true(self, tmp_path, pki):
        """check accepts a wildcard host with private: true but warns about it (exit 0)."""
        path = write(tmp_path, pki, to={"host": "*.partner.example", "private": True})
        r = subprocess.run([str(CLI), "check", str(path)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "TEST_STRIPE_KEY": "x"})
        assert r.returncode == 0
        assert "warning: c.yaml:" in r.stderr and "rules[0].to.private: 'private: true' with the wildcard host *.partner.example" in r.stderr

    @pytest.mark.slow  # runs the CLI in a subprocess (an interpreter start and mitmproxy's imports each)
    def test_check_warns_on_private_literal_without_opt_in(self, tmp_path, pki):
        """A rule for a private IP literal that no allowance covers would refuse every request: check says so."""
        path = write(tmp_path, pki, to={"host": "10.1.2.3"})
        r = subprocess.run([str(CLI), "check", str(path)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "TEST_STRIPE_KEY": "x"})
        assert r.returncode == 0 and "rules[0].to.host: 10.1.2.3 is a private address" in r.stderr


class TestResolver:
    async def test_ttl_respected_by_the_cache(self, dnsmasq):
        """A second lookup within the TTL is served from the cache: the DNS server sees one query."""
        r = Resolver(ResolverConfig(nameservers=(("127.0.0.1", dnsmasq.port),)))
        before = dnsmasq.queries("api.example.com")
        first = await r.resolve("api.example.com")
        await r.resolve("api.example.com")
        assert [str(a) for a in first.addresses] == ["127.0.0.1"]
        await asyncio.sleep(0.2)  # dnsmasq writes its log asynchronously
        assert dnsmasq.queries("api.example.com") - before == 2  # one A and one AAAA

    async def test_ttl_zero_is_never_cached(self):
        """An answer with TTL 0 is used once: the next request asks again (and may get another answer)."""
        with RebindingDns({"n.dest.test": [("127.0.0.1",), ("127.0.0.2",)]}) as d:
            r = Resolver(ResolverConfig(nameservers=(("127.0.0.1", d.port),)))
            assert str((await r.resolve("n.dest.test")).addresses[0]) == "127.0.0.1"
            assert str((await r.resolve("n.dest.test")).addresses[0]) == "127.0.0.2"

    @pytest.mark.e2e  # starts its own dnsmasq
    async def test_cache_is_bounded(self, tmp_path):
        """With cache_size 1 the least recently used name is dropped."""
        dns = start_dnsmasq({"a.dest.test": ("127.0.0.1",), "b.dest.test": ("127.0.0.2",)}, log_path=tmp_path / "d.log")
        try:
            r = Resolver(ResolverConfig(nameservers=(("127.0.0.1", dns.port),), cache_size=1))
            await r.resolve("a.dest.test")
            await r.resolve("b.dest.test")
            await r.resolve("a.dest.test")
            await asyncio.sleep(0.2)
            assert dns.queries("a.dest.test") == 4 and len(r._cache) == 1
        finally:
            dns.proc.terminate()
            dns.proc.wait(timeout=10)

    async def test_concurrent_lookups_share_one_query(self):
        """Many requests for one uncached name make one DNS lookup."""
        with RebindingDns({"n.dest.test": [("127.0.0.1",)]}) as d:
            r = Resolver(ResolverConfig(nameservers=(("127.0.0.1", d.port),)))
            answers = await asyncio.gather(*(r.resolve("n.dest.test") for _ in range(20)))
            assert {a.addresses for a in answers} == {answers[0].addresses}
            assert d.queries[("n.dest.test", "A")] == 1

    async def test_nxdomain_is_a_dns_error(self, dnsmasq):
        """A name the server does not know fails with a sentence naming it."""
        r = Resolver(ResolverConfig(nameservers=(("127.0.0.1", dnsmasq.port),)))
        with pytest.raises(DnsError, match="nope.example.com does not resolve"):
            await r.resolve("nope.example.com")


@pytest.fixture
async def addon(tmp_path, pki, monkeypatch, dnsmasq):
    monkeypatch.setenv("TEST_STRIPE_KEY", "x")
    path = write(tmp_path, pki, upstream={"allow_private": ["127.0.0.0/8"],
                                          "resolver": {"nameservers": [dnsmasq.nameserver]}})
    a = Secretless()
    with taddons.context(Proxyserver(), TlsConfig(), a) as tctx:
        tctx.configure(a, secretless_config=str(path))
        yield a


def hook_data(flow, address=("api.example.com", 443)) -> ServerConnectionHookData:
    server = flow.server_conn
    server.address = address
    return ServerConnectionHookData(server=server, client=flow.client_conn)


class TestPinning:
    async def test_connect_goes_to_the_checked_address_and_gets_its_name_back(self, addon):
        """server_connect replaces the name with the admitted address; once open, the name returns
        (keep-alive reuse matches on it) and the peer stays the checked address."""
        f = tflow.tflow()
        f.request.host, f.request.port = "api.example.com", 443
        await addon.destinations.admit(f, Decision(addon.runtime.policy.rules[0]))
        data = hook_data(f)
        data.server.sni = "api.example.com"
        addon.server_connect(data)
        assert data.server.error is None and data.server.address == ("127.0.0.1", 443)
        assert data.server.sni == "api.example.com"
        data.server.state, data.server.peername = ConnectionState.OPEN, ("127.0.0.1", 443)
        addon.server_connected(data)
        assert data.server.address == ("api.example.com", 443) and data.server.error is None

    async def test_connection_nobody_admitted_is_refused(self, addon):
        """No admitted request for this client and host: the connection is killed before connect."""
        f = tflow.tflow()
        data = hook_data(f, ("elsewhere.example.com", 443))
        addon.server_connect(data)
        assert data.server.error and "no checked address" in data.server.error
        assert data.server.address == ("elsewhere.example.com", 443)

    async def test_peer_other_than_the_pin_is_never_reused(self, addon):
        """If the socket reached another address than the checked one, the connection is marked failed."""
        f = tflow.tflow()
        f.request.host, f.request.port = "api.example.com", 443
        await addon.destinations.admit(f, Decision(addon.runtime.policy.rules[0]))
        data = hook_data(f)
        addon.server_connect(data)
        data.server.state, data.server.peername = ConnectionState.OPEN, ("127.0.0.9", 443)
        addon.server_connected(data)
        assert data.server.error and "unchecked address" in data.server.error

    async def test_hook_error_fails_closed(self, addon, monkeypatch):
        """A bug in the destination check kills the connection instead of letting it go by name."""
        def boom(data):
            raise RuntimeError("bug")
        monkeypatch.setattr(addon.destinations, "server_connect", boom)
        data = hook_data(tflow.tflow())
        addon.server_connect(data)
        assert data.server.error == "secretless-proxy: the destination check failed"

    async def test_admit_refuses_before_pinning(self, addon):
        """A refused destination leaves no pin behind: a connection attempt for it is killed too."""
        f = tflow.tflow()
        f.request.host, f.request.port = "10.9.9.9", 443
        with pytest.raises(Refusal) as exc:
            await addon.destinations.admit(f, Decision(addon.runtime.policy.rules[0]))
        assert (exc.value.status, exc.value.reason) == (403, "destination_private")
        data = hook_data(f, ("10.9.9.9", 443))
        addon.server_connect(data)
        assert data.server.error


class TestJudge:
    def test_mixed_answer_refused_unless_private_allowed(self):
        """One private address in an answer refuses it; a rule allowing private lets the whole answer pass."""
        from secretless_proxy.destinations.addresses import NOTHING, Allowance
        from secretless_proxy.destinations.pinning import judge

        addrs = (ipaddress.ip_address("8.8.8.8"), ipaddress.ip_address("10.0.0.1"))
        refused = judge(addrs, 443, NOTHING, ()).refused
        assert refused is not None and str(refused.address) == "10.0.0.1" and refused.refused == "private"
        assert judge(addrs, 443, Allowance(everything=True), ()).refused is None

    def test_own_listener_refused_by_address_and_port(self):
        """The proxy's port is refused on loopback and on its bound address, not on other hosts or ports."""
        from secretless_proxy.destinations.addresses import Allowance
        from secretless_proxy.destinations.pinning import PROXY_LISTENER, judge

        everything = Allowance(everything=True)
        own = (("10.1.2.3", 8080), ("0.0.0.0", 9464))

        def why(addr: str, port: int):
            r = judge((ipaddress.ip_address(addr),), port, everything, own).refused
            return r.refused if r else None
        assert why("127.0.0.1", 8080) == PROXY_LISTENER  # loopback reaches any listener
        assert why("::ffff:127.0.0.1", 9464) == PROXY_LISTENER
        assert why("10.1.2.3", 8080) == PROXY_LISTENER
        assert why("10.1.2.4", 8080) is None  # another machine's 8080
        assert why("10.1.2.3", 8081) is None
        assert why("8.8.8.8", 9464) is None  # bound to every interface: only this machine's addresses


class TestFallback:
    async def test_next_checked_address_after_a_failed_connect(self, addon, monkeypatch):
        """When a connection to the first checked address fails, the next connection uses the
        answer's next checked address (never an unchecked one)."""
        import ipaddress as ip

        from secretless_proxy.destinations.pinning import Pin

        f = tflow.tflow()
        f.request.host, f.request.port = "api.example.com", 443
        await addon.destinations.admit(f, Decision(addon.runtime.policy.rules[0]))
        state = addon.destinations._clients[f.client_conn]
        (pin,) = state.pins[("api.example.com", 443)].values()
        state.remember(Pin(host=pin.host, port=pin.port, allowance=pin.allowance, rule=pin.rule,
                           addresses=(ip.ip_address("127.0.0.7"), ip.ip_address("127.0.0.1"))))
        first = hook_data(f)
        addon.server_connect(first)
        assert first.server.address == ("127.0.0.7", 443)
        first.server.error = "Connection refused"
        addon.server_connect_error(first)
        second = hook_data(tflow.tflow(client_conn=f.client_conn))
        addon.server_connect(second)
        assert second.server.address == ("127.0.0.1", 443) and second.server.error is None


def two_rule_config(tmp_path: Path, pki, nameserver: str):
    """Rules A (inject, may reach 127.0.0.2 only) and B (allow, 127.0.0.3 only) for one host."""
    rules = [{"name": "A", "workloads": [BILLING], "to": {"host": "api.partner.test", "paths": ["/a"],
              "private": ["127.0.0.2/32"]}, "inject": {"credential": "stripe", "header": "Authorization"}},
             {"name": "B", "workloads": [BILLING], "to": {"host": "api.partner.test", "paths": ["/b"],
              "private": ["127.0.0.3/32"]}, "action": "allow"}]
    cfg = base_config(pki, rules=rules)
    cfg["upstream"] = {"ca_bundle": str(pki.upstream_ca_file), "resolver": {"nameservers": [nameserver]}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return load_config(path, resolve_secrets=False)


class TestPinsPerFlow:
    async def test_another_rules_admission_never_moves_a_flows_connection(self, tmp_path, pki):
        """Two flows on one client connection, same host, two rules, a TTL-0 answer that changes:
        each flow's connection goes to its own checked address; a connection opened without a
        flow gets only an address every rule allows (here none); the other rule's open connection
        is neither reused for nor sent over by the first flow."""
        from mitmproxy.connection import Server

        from secretless_proxy.destinations.pinning import Destinations

        with RebindingDns({"api.partner.test": [("127.0.0.2",), ("127.0.0.3",)]}) as rdns:
            cfg = two_rule_config(tmp_path, pki, rdns.nameserver)
            dest = Destinations(config=lambda: cfg, listeners=lambda: [("127.0.0.1", 8080)])
            rules = {r.name: r for r in cfg.rules}
            client = tflow.tclient_conn()
            fa, fb = tflow.tflow(client_conn=client), tflow.tflow(client_conn=client)
            for f, path in ((fa, "/a"), (fb, "/b")):
                f.request.host, f.request.port, f.request.path = "api.partner.test", 443, path
            await dest.admit(fa, Decision(rule=rules["A"]))
            await dest.admit(fb, Decision(rule=rules["B"]))
        assert (fa.metadata["secretless.addresses"], fb.metadata["secretless.addresses"]) == (["127.0.0.2"], ["127.0.0.3"])

        untagged = Server(address=("api.partner.test", 443))
        dest.server_connect(ServerConnectionHookData(server=untagged, client=client))
        assert untagged.error == "secretless-proxy: the checked address is not allowed"

        conns = {}
        for f in (fb, fa):  # B connects first, as in the race
            srv = Server(address=("api.partner.test", 443))
            dest.opening(f, srv)
            dest.server_connect(ServerConnectionHookData(server=srv, client=client))
            assert srv.error is None
            conns[f.request.path] = srv
        assert conns["/a"].address == ("127.0.0.2", 443) and conns["/b"].address == ("127.0.0.3", 443)

        b_conn = conns["/b"]
        b_conn.state, b_conn.peername = ConnectionState.OPEN, ("127.0.0.3", 443)
        dest.server_connected(ServerConnectionHookData(server=b_conn, client=client))
        assert b_conn.address == ("api.partner.test", 443)  # its name back, as mitmproxy matches reuse on it
        assert not dest.reusable(fa, b_conn) and dest.reusable(fb, b_conn)
        refusal = dest.send_refusal(fa, b_conn)
        assert refusal is not None and (refusal.status, refusal.reason, refusal.rule) == (403, "destination_private", "A")
        assert "127.0.0.3" not in refusal.message
        assert dest.send_refusal(fb, b_conn) is None
        fb.request.host = "elsewhere.partner.test"  # changed after its admission (another addon)
        assert dest.send_refusal(fb, b_conn) is not None

    def test_client_pin_table_is_bounded(self):
        """One client connection naming many hosts (or one host under many rules) keeps a bounded table."""
        from secretless_proxy.destinations.addresses import NOTHING
        from secretless_proxy.destinations.pinning import (
            MAX_HOSTS_PER_CLIENT,
            MAX_PINS_PER_HOST,
            Pin,
            _ClientPins,
        )

        table = _ClientPins()
        for i in range(MAX_HOSTS_PER_CLIENT * 3):
            table.remember(Pin(host=f"h{i}.example.com", port=443, addresses=(), allowance=NOTHING, rule="r"))
        for i in range(MAX_PINS_PER_HOST * 3):
            table.remember(Pin(host="one.example.com", port=443, addresses=(), allowance=NOTHING, rule=f"r{i}"))
        assert len(table.pins) == MAX_HOSTS_PER_CLIENT
        assert len(table.pins[("one.example.com", 443)]) == MAX_PINS_PER_HOST
        assert ("h0.example.com", 443) not in table.pins  # the oldest went first


class TestUpstreamRefusal:
    @pytest.mark.parametrize(("error", "status", "reason"), [
        ("[Errno 111] Connect call failed ('10.1.2.3', 443)", 502, "upstream_unreachable"),
        ("[Errno 113] Connect call failed ('10.1.2.3', 443)", 502, "upstream_unreachable"),
        ("[Errno 110] Connect call failed ('10.1.2.3', 443)", 504, "upstream_timeout"),
        ("The remote server does not speak TLS.", 502, "upstream_tls_failed"),
        ("Certificate verify failed: unable to get local issuer certificate", 502, "upstream_tls_failed"),
        ("secretless-proxy: the checked address is not allowed", 403, "destination_private"),
        ("secretless-proxy: the destination check failed", 502, "internal_error"),
    ])
    def test_failures_map_to_the_contract_without_the_address(self, error, status, reason):
        """Each kind of failed upstream connection has its status and reason; the answer never quotes the address."""
        from secretless_proxy.destinations.pinning import upstream_refusal
        from secretless_proxy.metrics import DENY_REASONS

        r = upstream_refusal(error, host="internal.example.com", rule="r")
        assert (r.status, r.reason, r.rule) == (status, reason, "r") and reason in DENY_REASONS
        assert "10.1.2.3" not in r.message and "Errno" not in r.message
