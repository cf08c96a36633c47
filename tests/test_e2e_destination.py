"""Destination checks end to end (issue 16): a real proxy, a real DNS server (dnsmasq, and a small
rebinding server), real TLS upstreams and raw TCP listeners on loopback, real curl.

Only loopback is ever connected to. For names resolving into other refused ranges the test asserts
the refusal and that the proxy made no upstream connection (its per-connection log line is absent);
for loopback the listener itself records every connection and byte it receives.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import urllib.request
from pathlib import Path

import pytest
from helpers.clients import curl, http_exchange, tunnel
from helpers.dns import start_dnsmasq
from helpers.net import free_port
from helpers.proxy import BIN, SECRET, Pki, base_config, start_proxy
from helpers.rebind_dns import RebindingDns
from helpers.upstream import EchoUpstream

from secretless_proxy.dev import certs

# a module-wide proxy process, dnsmasq and curl
pytestmark = pytest.mark.e2e

BILLING = "spiffe://example.org/ns/prod/sa/billing"
NAMES = ("ok.dest.test", "rebind.dest.test", "pool.dest.test", "mapped-ok.dest.test")

# name → addresses in dnsmasq; every name but the loopback ones would be refused.
REFUSED = {
    "ten.dest.test": ("10.0.0.1",),
    "rfc172.dest.test": ("172.16.5.4",),
    "rfc192.dest.test": ("192.168.1.1",),
    "metadata.dest.test": ("169.254.169.254",),
    "cgnat.dest.test": ("100.64.0.1",),
    "ula-metadata.dest.test": ("fd00:ec2::254",),
    "ll6.dest.test": ("fe80::1",),
    "multicast.dest.test": ("224.0.0.1",),
    "zero.dest.test": ("0.0.0.0",),
    "reserved.dest.test": ("240.0.0.1",),
    "doc.dest.test": ("192.0.2.1",),
    "doc6.dest.test": ("2001:db8::1",),
    # IPv6 embeddings of refused IPv4 addresses
    "mapped-meta.dest.test": ("::ffff:169.254.169.254",),
    "nat64-meta.dest.test": ("64:ff9b::a9fe:a9fe",),
    "6to4-private.dest.test": ("2002:a00:1::1",),
    "teredo-loop.dest.test": ("2001:0:4136:e378:8000:0:80ff:fffe",),
    "compat-meta.dest.test": ("::a9fe:a9fe",),
    # a mixed answer: one public address does not make the private one acceptable
    "mixed.dest.test": ("8.8.8.8", "10.0.0.1"),
}
LOOPBACK = {
    "ok.dest.test": ("127.0.0.1",),  # rule with private: [127.0.0.0/8] → echo upstream
    "loop.dest.test": ("127.0.0.1",),  # rule without private → refused
    "mapped-loop.dest.test": ("::ffff:127.0.0.1",),  # ditto, spelled as IPv4-mapped IPv6
    "open.dest.test": ("127.0.0.1",),  # rule with private: true → raw listener
    "self.dest.test": ("127.0.0.1",),  # the proxy's own ports, under private: true
}


class RawListener:
    """A loopback TCP listener that records every connection and the bytes it received."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.received = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.settimeout(2)
            try:
                while chunk := conn.recv(65536):
                    self.received += len(chunk)
                    break  # a ClientHello is proof enough; then hang up
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    server = start_dnsmasq({**REFUSED, **LOOPBACK}, log_path=tmp_path_factory.mktemp("dns") / "dnsmasq.log")
    yield server
    server.proc.terminate()
    server.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def echo(pki: Pki):
    cert = certs.make_server_cert(ca=pki.upstream_ca, hosts=(*NAMES, "localhost", "127.0.0.1"))
    with EchoUpstream(server_cert=cert) as up:
        yield up


@pytest.fixture(scope="module")
def raw():
    listener = RawListener()
    yield listener
    listener.close()


def dest_config(pki: Pki, rules: list[dict], *, nameserver: str, **extra) -> dict:
    """base_config without its loopback allowance: the product's defaults."""
    cfg = base_config(pki, rules=rules, **extra)
    cfg["upstream"] = {"ca_bundle": str(pki.upstream_ca_file), "resolver": {"nameservers": [nameserver]}}
    return cfg


@pytest.fixture(scope="module")
def proxy(pki: Pki, dns, echo, raw, tmp_path_factory):
    """One proxy on a port known in advance, so a rule can name the proxy's own ports."""
    d = tmp_path_factory.mktemp("destproxy")
    port, admin = free_port(), free_port()
    rules = [
        {"name": "echo", "workloads": [BILLING], "to": {"host": "ok.dest.test", "port": echo.port, "private": ["127.0.0.0/8"]},
         "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}},
        {"name": "open", "workloads": [BILLING], "to": {"host": "open.dest.test", "port": raw.port, "private": True},
         "action": "allow"},
        {"name": "self", "workloads": [BILLING], "to": {"host": ["self.dest.test", "127.0.0.1"], "port": [port, admin],
                                                         "private": True}, "action": "allow"},
        {"name": "zone", "workloads": [BILLING], "to": {"host": ["*.dest.test", "127.0.0.1", "10.0.0.1", "[::ffff:169.254.169.254]"],
                                                         "port": [443, raw.port, echo.port]},
         "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}},
    ]
    cfg = dest_config(pki, rules, nameserver=dns.nameserver, admin={"listen": f"127.0.0.1:{admin}"})
    path = d / "config.yaml"
    path.write_text(json.dumps(cfg))
    p = start_proxy([str(BIN / "secretless-proxy"), "run", "--config", str(path), "--listen", f"127.0.0.1:{port}"],
                    log_path=d / "proxy.log", env={**os.environ, "TEST_STRIPE_KEY": SECRET})
    p.admin_port = admin  # type: ignore[attr-defined]
    yield p
    p.stop()
    out = p.output()
    assert SECRET not in out, "a secret appeared in the proxy's output"
    assert "Traceback" not in out, out


@pytest.fixture(scope="module")
def client(pki: Pki) -> tuple[str, str]:
    return pki.svid(BILLING)


def get(pki: Pki, client, url: str, proxy) -> tuple[int, dict | str]:
    r = curl("--cacert", pki.interception_ca_cert, "--cert", client[0], "--key", client[1], url, proxy=proxy.url)
    try:
        return r.status, json.loads(r.body)
    except ValueError:
        return r.status, r.body


def connected_to(proxy, name: str) -> bool:
    return f"upstream connection to {name}:" in proxy.output()


def denied_count(proxy, reason: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin_port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(f'secretless_denied_total{{reason="{reason}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no denied series for {reason}")


class TestRefusedRanges:
    @pytest.mark.parametrize("name", sorted(REFUSED))
    def test_refused_and_never_connected(self, pki, client, proxy, name):
        """A name resolving into a refused range (or an IPv6 embedding of one) is refused with 403
        destination_private, audited and counted, and the proxy opens no connection."""
        before = denied_count(proxy, "destination_private")
        status, body = get(pki, client, f"https://{name}/v1/x", proxy)
        assert status == 403, body
        assert body["reason"] == "destination_private" and body["rule"] == "zone"
        assert "to.private" in body["error"]
        assert not connected_to(proxy, name)
        assert denied_count(proxy, "destination_private") == before + 1
        audit = [json.loads(line) for line in proxy.output().splitlines() if line.startswith("{")]
        assert any(e["event"] == "request.denied" and e["reason"] == "destination_private" and e["host"] == name
                   for e in audit)

    @pytest.mark.parametrize("name", ["loop.dest.test", "mapped-loop.dest.test"])
    def test_loopback_refused_without_opt_in(self, pki, client, proxy, raw, name):
        """Loopback (also as ::ffff:127.0.0.1) is refused unless the rule says private: the listener
        there never sees a connection."""
        seen = raw.connections
        status, body = get(pki, client, f"https://{name}:{raw.port}/", proxy)
        assert (status, body["reason"]) == (403, "destination_private")
        assert raw.connections == seen and not connected_to(proxy, name)

    def test_private_true_reaches_loopback(self, pki, client, proxy, raw):
        """The same loopback listener is reached when the rule opts in (private: true): the
        listener records the connection and the bytes of a TLS ClientHello."""
        seen, got = raw.connections, raw.received
        status, _ = get(pki, client, f"https://open.dest.test:{raw.port}/", proxy)
        assert status == 502  # the listener speaks no TLS
        assert raw.connections == seen + 1 and raw.received > got
        assert connected_to(proxy, "open.dest.test")

    def test_ip_literal_judged_by_the_same_lists(self, pki, client, proxy, raw):
        """A rule whose host is an IP literal is refused when the literal is private and the rule
        does not allow it; no connection is made."""
        seen = raw.connections
        status, body = get(pki, client, f"https://127.0.0.1:{raw.port}/", proxy)
        assert (status, body["reason"]) == (403, "destination_private")
        assert "127.0.0.1 is a loopback address" in body["error"]
        assert raw.connections == seen

    @pytest.mark.parametrize("url", ["https://METADATA.Dest.Test./latest", "https://[::ffff:169.254.169.254]/latest",
                                     "https://[::ffff:a9fe:a9fe]/latest"])
    def test_spellings_of_the_metadata_address(self, pki, client, proxy, url):
        """Case, a trailing dot (CVE-2022-24825) and bracketed IPv6 forms (CVE-2022-29188, #277) of the
        metadata address are refused like the plain name, without a connection."""
        before = proxy.output().count("upstream connection to")
        status, body = get(pki, client, url, proxy)
        assert (status, body["reason"]) == (403, "destination_private"), body
        assert proxy.output().count("upstream connection to") == before

    def test_dns_failure_is_502(self, pki, client, proxy):
        """A name that does not resolve is refused with 502 dns_failed, before any credential."""
        status, body = get(pki, client, "https://nowhere.dest.test/", proxy)
        assert (status, body["reason"]) == (502, "dns_failed")


class TestAllowed:
    def test_opted_in_loopback_upstream_gets_the_request(self, pki, client, proxy, echo):
        """A rule with private: [127.0.0.0/8] reaches its loopback upstream, by name: SNI and Host
        stay ok.dest.test (the upstream's certificate is verified for that name)."""
        echo.requests.clear()
        status, body = get(pki, client, f"https://ok.dest.test:{echo.port}/v1/x", proxy)
        assert status == 200, body
        headers = dict(echo.requests[-1]["headers"])
        assert headers["Host"] == f"ok.dest.test:{echo.port}"
        assert headers["Authorization"] == f"Bearer {SECRET}"
        assert f"upstream connection to ok.dest.test:{echo.port} at 127.0.0.1" in proxy.output()

    def test_keep_alive_reuses_the_checked_connection(self, pki, client, proxy, echo):
        """Two requests on one tunnel share one upstream connection (the name is restored after connect)."""
        marker = proxy.output().count(f"upstream connection to ok.dest.test:{echo.port}")
        s = tunnel(proxy.port, ("ok.dest.test", echo.port), sni="ok.dest.test", ca=pki.interception_ca_cert, cert=client)
        req = f"GET /v1/a HTTP/1.1\r\nHost: ok.dest.test:{echo.port}\r\n\r\n"
        assert http_exchange(s, req)[0] == 200
        assert http_exchange(s, req)[0] == 200
        s.close()
        assert proxy.output().count(f"upstream connection to ok.dest.test:{echo.port}") == marker + 1


class TestProxyItself:
    @pytest.mark.parametrize("which", ["port", "admin_port"])
    def test_own_listeners_refused_even_with_private_true(self, pki, client, proxy, which):
        """The proxy's own proxy and admin ports are refused, whatever the rule allows."""
        port = getattr(proxy, which)
        for host in ("self.dest.test", "127.0.0.1"):
            status, body = get(pki, client, f"https://{host}:{port}/", proxy)
            assert (status, body["reason"]) == (403, "destination_private"), (host, body)
            assert "the proxy itself" in body["error"]


class TestOwnListenersOnPortZero:
    def test_admin_on_port_zero_is_refused_at_its_bound_port(self, pki, client, proxy_factory):
        """admin.listen with port 0: the port it actually bound is the proxy's own, refused even
        under a rule that allows loopback, and never connected to."""
        import re
        import time

        import yaml

        def config(port: int) -> dict:
            rule = {"name": "to-local", "workloads": [BILLING], "to": {"host": "127.0.0.2", "port": port,
                    "private": ["127.0.0.0/8"]}, "inject": {"credential": "stripe", "header": "Authorization"}}
            return dest_config(pki, [rule], nameserver="127.0.0.1:53", admin={"listen": "127.0.0.2:0"})
        p = proxy_factory(config(1))
        for _ in range(100):
            m = re.search(r"admin listener on 127\.0\.0\.2:(\d+)", p.output())
            if m:
                break
            time.sleep(0.1)
        assert m, p.output()
        admin = int(m.group(1))
        time.sleep(1.1)  # a new mtime for the watcher
        args = list(p.proc.args)  # type: ignore[arg-type]
        Path(args[args.index("--config") + 1]).write_text(yaml.safe_dump(config(admin), sort_keys=False))
        for _ in range(100):
            if "config reloaded" in p.output():
                break
            time.sleep(0.1)
        assert "config reloaded" in p.output()
        status, body = get(pki, client, f"https://127.0.0.2:{admin}/metrics", p)
        assert status == 403 and body["reason"] == "destination_private" and "proxy itself" in body["error"]
        assert f"upstream connection to 127.0.0.2:{admin}" not in p.output()


class TestRebinding:
    def test_connects_to_the_address_that_was_checked(self, pki, client, proxy_factory, echo):
        """A name that answers loopback once and the metadata address afterwards: the request goes
        to the checked loopback address (no second lookup at connect); the next lookup is refused."""
        with RebindingDns({"rebind.dest.test": [("127.0.0.1",), ("169.254.169.254",)]}) as rdns:
            rule = {"name": "rebind", "workloads": [BILLING],
                    "to": {"host": "rebind.dest.test", "port": echo.port, "private": ["127.0.0.0/8"]}, "action": "allow"}
            p = proxy_factory(dest_config(pki, [rule], nameserver=rdns.nameserver))
            echo.requests.clear()
            r = curl("--cacert", pki.interception_ca_cert, "--cert", client[0], "--key", client[1],
                     f"https://rebind.dest.test:{echo.port}/first", proxy=p.url)
            assert r.status == 200, r.body
            assert rdns.queries[("rebind.dest.test", "A")] == 1  # resolved once, for check and connect
            assert [q["path"] for q in echo.requests] == ["/first"]
            r = curl("--cacert", pki.interception_ca_cert, "--cert", client[0], "--key", client[1],
                     f"https://rebind.dest.test:{echo.port}/second", proxy=p.url)
            assert r.status == 403 and json.loads(r.body)["reason"] == "destination_private"
            assert [q["path"] for q in echo.requests] == ["/first"]

    def test_reused_connection_is_rechecked_for_each_rule(self, pki, client, proxy_factory, echo):
        """A pooled connection opened under one rule is not reused by a request whose rule does not
        allow its peer: that request gets its own connection, to an address its own rule allows."""
        with RebindingDns({"pool.dest.test": [("127.0.0.1",), ("127.0.0.2",)]}) as rdns:
            rules = [{"name": "internal", "workloads": [BILLING], "to": {"host": "pool.dest.test", "port": echo.port,
                      "paths": ["/internal/**"], "private": ["127.0.0.1/32"]}, "action": "allow"},
                     {"name": "other", "workloads": [BILLING], "to": {"host": "pool.dest.test", "port": echo.port,
                      "private": ["127.0.0.2/32"]}, "action": "allow"}]
            p = proxy_factory(dest_config(pki, rules, nameserver=rdns.nameserver))
            echo.requests.clear()
            s = tunnel(p.port, ("pool.dest.test", echo.port), sni="pool.dest.test", ca=pki.interception_ca_cert, cert=client)
            assert http_exchange(s, f"GET /internal/a HTTP/1.1\r\nHost: pool.dest.test:{echo.port}\r\n\r\n")[0] == 200
            status, body = http_exchange(s, f"GET /other HTTP/1.1\r\nHost: pool.dest.test:{echo.port}\r\n\r\n")
            s.close()
            # The echo upstream listens on 127.0.0.1 only: the new connection to 127.0.0.2 is refused.
            assert status == 502, body
            answer = json.loads(body)
            assert (answer["reason"], answer["rule"]) == ("upstream_unreachable", "other")
            assert "127.0.0.2" not in body.decode()
            assert [q["path"] for q in echo.requests] == ["/internal/a"]
            out = p.output()
            assert "at 127.0.0.1 (rule internal)" in out and "at 127.0.0.2 (rule other)" in out


class TestPinsPerRequest:
    def test_concurrent_streams_under_two_rules_reach_only_their_own_addresses(self, pki, client, proxy_factory,
                                                                              tmp_path):
        """Two HTTP/2 streams on one client connection, same host, two rules allowing different
        addresses, a TTL-0 answer that changes between their lookups: the injected stream (held back
        by a slow token) still goes to its own checked address, never over the other rule's connection;
        later streams reuse the connection of their own rule (two upstream connections in all)."""
        from helpers.h2_upstream import H2Upstream, SlowTokenEndpoint, h2_get_concurrently

        srv = certs.make_server_cert(ca=pki.upstream_ca, hosts=("race.dest.test",))
        certs.write_svid(srv, tmp_path / "srv", ca=pki.upstream_ca)
        up = H2Upstream(("127.0.0.2", "127.0.0.3"), cert_file=str(tmp_path / "srv/svid.pem"),
                        key_file=str(tmp_path / "srv/svid-key.pem"))
        token = SlowTokenEndpoint("RULE_A_TOKEN_x81", delay=1.5)
        try:
            answers = [("127.0.0.2",), ("127.0.0.3",)] * 2  # one lookup per stream, in stream order
            with RebindingDns({"race.dest.test": answers}) as rdns:
                rules = [{"name": "A", "workloads": [BILLING], "to": {"host": "race.dest.test", "port": up.port,
                          "paths": ["/a/**"], "private": ["127.0.0.2/32"]},
                          "inject": {"credential": "a-token", "header": "Authorization", "format": "Bearer {secret}"}},
                         {"name": "B", "workloads": [BILLING], "to": {"host": "race.dest.test", "port": up.port,
                          "paths": ["/b/**"], "private": ["127.0.0.3/32"]}, "action": "allow"}]
                cfg = dest_config(pki, rules, nameserver=rdns.nameserver)
                cfg["credentials"] = {"a-token": {"kind": "oauth2_client_credentials", "token_url": token.url,
                                                  "client_id": "a", "client_secret": "env:TEST_STRIPE_KEY"}}
                p = proxy_factory(cfg)
                p.secrets = (*p.secrets, "RULE_A_TOKEN_x81")
                sock = h2_tunnel(p.port, ("race.dest.test", up.port), ca=pki.interception_ca_cert, cert=client)
                status = h2_get_concurrently(sock, f"race.dest.test:{up.port}", ["/a/1", "/b/1", "/a/2", "/b/2"],
                                             gap=0.4)
                sock.close()
        finally:
            token.close()
            up.close()
        assert status == {"/a/1": 200, "/b/1": 200, "/a/2": 200, "/b/2": 200}
        bearer = "Bearer RULE_A_TOKEN_x81"
        assert sorted(up.seen) == [("127.0.0.2", "/a/1", bearer), ("127.0.0.2", "/a/2", bearer),
                                   ("127.0.0.3", "/b/1", None), ("127.0.0.3", "/b/2", None)]
        assert sorted(up.connections) == ["127.0.0.2", "127.0.0.3"]  # each rule's connection reused, no third
        out = p.output()
        assert "at 127.0.0.2 (rule A)" in out and "at 127.0.0.3 (rule B)" in out


def h2_tunnel(proxy_port: int, target: tuple[str, int], *, ca: str, cert: tuple[str, str]):
    """CONNECT through the proxy, then TLS offering only h2, with the client certificate."""
    import ssl

    raw = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    raw.sendall(f"CONNECT {target[0]}:{target[1]} HTTP/1.1\r\nHost: {target[0]}:{target[1]}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += raw.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(*cert)
    ctx.set_alpn_protocols(["h2"])
    sock = ctx.wrap_socket(raw, server_hostname=target[0])
    assert sock.selected_alpn_protocol() == "h2"
    return sock


class TestUpstreamFailures:
    def test_failed_connections_answer_the_error_contract(self, pki, client, proxy_factory, tmp_path):
        """A refused connection and a non-TLS upstream answer JSON 502 upstream_unreachable /
        upstream_tls_failed, counted, without the resolved address (HTTP/1 and HTTP/2 clients); the
        proxy log has it."""
        from helpers.h2_upstream import h2_get_concurrently

        closed = free_port()
        plain = socket.create_server(("127.0.0.1", 0))
        pport = plain.getsockname()[1]

        def answer() -> None:
            while True:
                try:
                    c, _ = plain.accept()
                except OSError:
                    return
                c.recv(1024)
                c.sendall(b"HTTP/1.0 400 no\r\n\r\n")
                c.close()
        threading.Thread(target=answer, daemon=True).start()
        admin = free_port()
        try:
            with RebindingDns({"internal.dest.test": [("127.0.0.1",)]}) as rdns:
                rule = {"name": "local", "workloads": [BILLING], "to": {"host": "internal.dest.test", "port": [closed, pport],
                        "private": ["127.0.0.1/32"]},
                        "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}}
                p = proxy_factory(dest_config(pki, [rule], nameserver=rdns.nameserver,
                                              admin={"listen": f"127.0.0.1:{admin}"}))
                p.admin_port = admin  # type: ignore[attr-defined]
                seen = {}
                for port in (closed, pport):
                    r = curl("--cacert", pki.interception_ca_cert, "--cert", client[0], "--key", client[1],
                             f"https://internal.dest.test:{port}/", proxy=p.url)
                    assert "127.0.0.1" not in r.body and "<html" not in r.body.lower()
                    body = json.loads(r.body)
                    assert set(body) == {"error", "reason", "rule", "request_id"} and body["rule"] == "local"
                    seen[port] = (r.status, body["reason"])
                sock = h2_tunnel(p.port, ("internal.dest.test", closed), ca=pki.interception_ca_cert, cert=client)
                h2_status = h2_get_concurrently(sock, f"internal.dest.test:{closed}", ["/h2"], gap=0)
                sock.close()
        finally:
            plain.close()
        assert h2_status == {"/h2": 502}  # an HTTP/2 client gets the same answer on its stream
        assert seen == {closed: (502, "upstream_unreachable"), pport: (502, "upstream_tls_failed")}
        assert denied_count(p, "upstream_unreachable") == 2 and denied_count(p, "upstream_tls_failed") == 1
        assert f"Connect call failed ('127.0.0.1', {closed})" in p.output()  # the log keeps the address


class TestResolverFailures:
    def test_resolver_timeout_is_504(self, pki, client, proxy_factory, echo):
        """A nameserver that never answers: 504 dns_timeout within the configured timeout."""
        with RebindingDns({}, silent=True) as silent:
            cfg = dest_config(pki, [{"name": "r", "workloads": [BILLING], "to": {"host": "slow.dest.test"},
                                     "action": "allow"}], nameserver=silent.nameserver)
            cfg["upstream"]["resolver"]["timeout_seconds"] = 0.5
            p = proxy_factory(cfg)
            r = curl("--cacert", pki.interception_ca_cert, "--cert", client[0], "--key", client[1],
                     "https://slow.dest.test/", proxy=p.url)
            assert r.status == 504 and json.loads(r.body)["reason"] == "dns_timeout"
            assert silent.queries[("slow.dest.test", "A")] >= 1


def test_explain_shows_addresses_and_verdicts(pki, dns, tmp_path: Path):
    """explain lists every address a URL resolves to and whether it passes; a refused one exits 2."""
    import subprocess

    rule = {"name": "zone", "workloads": [BILLING], "to": {"host": "*.dest.test"}, "action": "allow"}
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(dest_config(pki, [rule], nameserver=dns.nameserver)))

    def explain(url: str, *extra: str):
        r = subprocess.run([str(BIN / "secretless-proxy"), "explain", "--config", str(path), "--workload", BILLING,
                            *extra, url], capture_output=True, text=True, timeout=60)
        assert "Traceback" not in r.stderr
        return r.returncode, r.stdout
    rc, out = explain("https://mixed.dest.test:0/")
    assert (rc, out.strip()) == (2, "refused (400): port 0 is not a destination port")  # not judged as :443
    rc, out = explain("https://mixed.dest.test/")
    assert rc == 2
    assert "8.8.8.8  public: passes" in out and "10.0.0.1  private: refused" in out
    assert "refused (403 destination_private)" in out
    rc, out = explain("https://mapped-meta.dest.test/")
    assert rc == 2 and "link_local (ipv4-mapped 169.254.169.254): refused" in out
    rc, out = explain("https://nowhere.dest.test/")
    assert rc == 2 and "refused (502 dns_failed)" in out
    rc, out = explain("https://mixed.dest.test/", "--no-resolve")
    assert rc == 0 and "8.8.8.8" not in out
