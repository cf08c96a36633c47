"""End to end: a real proxy process, a real TLS upstream, real clients (curl, requests, httpx)."""

from __future__ import annotations

import json
import os
import ssl
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import requests
from helpers.clients import curl, http_exchange, tunnel
from helpers.proxy import SECRET, base_config

BILLING = "spiffe://example.org/ns/prod/sa/billing"


def inject_rule(upstream, **over) -> dict:
    rule = {
        "name": "billing-to-api",
        "workloads": [BILLING],
        "to": {"host": "localhost", "port": upstream.port, "methods": ["GET", "POST"], "paths": ["/v1/**"]},
        "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"},
    }
    rule.update(over)
    return rule


def received_auth(upstream) -> list[str]:
    assert len(upstream.requests) == 1, upstream.requests
    return [v for k, v in upstream.requests[0]["headers"] if k.lower() == "authorization"]


@pytest.fixture(scope="module")
def proxy(module_proxy_factory, pki, upstream):
    """One proxy for the module: the tests that use it only send requests (the upstream's log is
    cleared before each test); tests that need another config start their own."""
    return module_proxy_factory(base_config(pki, rules=[inject_rule(upstream)]))


class TestInjection:
    def test_curl_intercepted_hop_gets_credential(self, proxy, pki, upstream):
        """A verified client cert on the intercepted hop gets the credential injected upstream."""
        cert, key = pki.svid(BILLING)
        r = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key,
                 "-H", "Authorization: Bearer client-chose-this", f"{upstream.url}/v1/charges", proxy=proxy.url)
        assert r.status == 200, r
        assert received_auth(upstream) == [f"Bearer {SECRET}"]
        assert SECRET not in r.body and "client-chose-this" not in r.body

    def test_curl_proxy_hop_gets_credential(self, proxy, pki, upstream):
        """A cert presented to the proxy itself (HTTPS_PROXY=https://) survives the inner handshake."""
        cert, key = pki.svid(BILLING)
        r = curl("--cacert", pki.interception_ca_cert, "--proxy-cacert", pki.interception_ca_cert,
                 "--proxy-cert", cert, "--proxy-key", key, f"{upstream.url}/v1/charges",
                 proxy=f"https://localhost:{proxy.port}")
        assert r.status == 200, r
        assert received_auth(upstream) == [f"Bearer {SECRET}"]

    def test_requests_keepalive_session(self, proxy, pki, upstream):
        """requests with cert= on a kept-alive session gets the credential on every request."""
        cert, key = pki.svid(BILLING)
        with requests.Session() as s:
            s.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override s.verify
            s.proxies = {"https": proxy.url}
            s.verify = pki.interception_ca_cert
            s.cert = (cert, key)
            for i in range(3):
                r = s.post(f"{upstream.url}/v1/charges", data=f"n={i}")
                assert r.status_code == 200
                assert SECRET not in r.text
                assert r.headers["X-Secretless-Request-Id"]
        auths = [[v for k, v in req["headers"] if k.lower() == "authorization"] for req in upstream.requests]
        assert auths == [[f"Bearer {SECRET}"]] * 3
        assert [req["body"] for req in upstream.requests] == ["n=0", "n=1", "n=2"]

    def test_httpx_client(self, proxy, pki, upstream):
        """httpx with a client certificate is injected the same way."""
        cert, key = pki.svid(BILLING)
        ctx = ssl.create_default_context(cafile=pki.interception_ca_cert)
        ctx.load_cert_chain(cert, key)
        with httpx.Client(proxy=proxy.url, verify=ctx, trust_env=False) as c:
            r = c.get(f"{upstream.url}/v1/balance")
        assert r.status_code == 200
        assert received_auth(upstream) == [f"Bearer {SECRET}"]

    def test_glob_workload_matches(self, proxy_factory, pki, upstream):
        """A workload path glob admits any service account it covers, and only those."""
        p = proxy_factory(base_config(pki, rules=[inject_rule(upstream, workloads=["spiffe://example.org/ns/*/sa/billing"])]))
        cert, key = pki.svid("spiffe://example.org/ns/staging/sa/billing")
        assert curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key, f"{upstream.url}/v1/x", proxy=p.url).status == 200
        cert, key = pki.svid("spiffe://example.org/ns/staging/sa/other")
        r = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key, f"{upstream.url}/v1/x", proxy=p.url)
        assert (r.status, json.loads(r.body)["reason"]) == (403, "no_rule")
        assert len(upstream.requests) == 1

    def test_query_parameter_replaced_not_duplicated(self, proxy_factory, pki, upstream):
        """A query credential replaces every client-sent value of that parameter, encoded or not."""
        rule = inject_rule(upstream, inject={"credential": "stripe", "query": "api_key"})
        p = proxy_factory(base_config(pki, rules=[rule]))
        cert, key = pki.svid(BILLING)
        r = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key,
                 f"{upstream.url}/v1/x?api_key=mine&x=1&api%5Fkey=again", proxy=p.url)
        assert r.status == 200
        query = upstream.requests[0]["query"]
        assert [v for k, v in query if k == "api_key"] == [SECRET]
        assert ["x", "1"] in query
        assert SECRET not in r.body

    def test_basic_auth(self, proxy_factory, pki, upstream):
        """Basic auth injection sends base64(user:secret) and the client never sees it."""
        rule = inject_rule(upstream, inject={"credential": "stripe", "basic": {"username": "{secret}", "password": ""}})
        p = proxy_factory(base_config(pki, rules=[rule]))
        cert, key = pki.svid(BILLING)
        r = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key, "-u", "me:mine",
                 f"{upstream.url}/v1/x", proxy=p.url)
        assert r.status == 200
        import base64
        token = base64.b64encode(f"{SECRET}:".encode()).decode()
        assert received_auth(upstream) == [f"Basic {token}"]
        assert token not in r.body and SECRET not in r.body

    def test_uppercase_trailing_dot_host_is_normalised(self, proxy, pki, upstream):
        """LOCALHOST. is the same destination as localhost: matched and connected canonically."""
        cert, key = pki.svid(BILLING)
        r = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key,
                 f"https://LOCALHOST.:{upstream.port}/v1/x", proxy=proxy.url)
        assert r.status == 200, r
        assert received_auth(upstream) == [f"Bearer {SECRET}"]

    def test_allow_rule_forwards_without_credential(self, proxy_factory, pki, upstream):
        """action: allow forwards the request untouched, client headers included."""
        rule = {"name": "pass", "workloads": [BILLING], "to": {"host": "localhost", "port": upstream.port}, "action": "allow"}
        p = proxy_factory(base_config(pki, rules=[rule]))
        cert, key = pki.svid(BILLING)
        r = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key,
                 "-H", "Authorization: Bearer own", f"{upstream.url}/anything", proxy=p.url)
        assert r.status == 200
        assert received_auth(upstream) == ["Bearer own"]


def refused(r, status: int, reason: str) -> dict:
    assert r.status == status, r
    body = json.loads(r.body)
    assert body["reason"] == reason, body
    assert set(body) == {"error", "reason", "rule", "request_id"}
    assert SECRET not in r.body and "Traceback" not in r.body
    return body


class TestIdentity:
    def _get(self, proxy, pki, upstream, cert=None):
        args = ["--cacert", pki.interception_ca_cert]
        if cert:
            args += ["--cert", cert[0], "--key", cert[1]]
        return curl(*args, f"{upstream.url}/v1/x", proxy=proxy.url)

    def test_no_certificate(self, proxy, pki, upstream):
        """No client certificate: 407 identity_missing and nothing reaches the upstream."""
        refused(self._get(proxy, pki, upstream), 407, "identity_missing")
        assert upstream.requests == []

    def test_other_ca(self, proxy, pki, upstream):
        """A certificate from a CA outside the trust bundle is untrusted."""
        from secretless_proxy.dev import certs
        rogue = certs.make_ca(common_name="rogue CA")
        refused(self._get(proxy, pki, upstream, pki.svid(BILLING, ca=rogue)), 407, "identity_untrusted")
        assert upstream.requests == []

    def test_expired(self, proxy, pki, upstream):
        """An expired certificate is refused as expired."""
        past = datetime.now(UTC) - timedelta(hours=3)
        refused(self._get(proxy, pki, upstream, pki.svid(BILLING, not_before=past, ttl=timedelta(hours=1))), 407, "identity_expired")

    def test_wrong_trust_domain(self, proxy, pki, upstream):
        """A trusted CA vouching for another trust domain is still refused."""
        refused(self._get(proxy, pki, upstream, pki.svid("spiffe://evil.org/ns/prod/sa/billing")), 407, "identity_trust_domain")

    def test_two_uri_sans(self, proxy, pki, upstream):
        """An SVID must carry exactly one URI SAN."""
        cert = pki.svid(BILLING, extra_uris=("spiffe://example.org/ns/prod/sa/admin",))
        refused(self._get(proxy, pki, upstream, cert), 407, "identity_invalid")

    def test_ca_certificate_as_client(self, proxy, pki, upstream):
        """A CA=true certificate is not a workload identity."""
        refused(self._get(proxy, pki, upstream, pki.svid(BILLING, ca_flag=True)), 407, "identity_invalid")

    def test_server_auth_only_eku(self, proxy, pki, upstream):
        """A certificate whose EKU lacks clientAuth is refused."""
        from cryptography.x509.oid import ExtendedKeyUsageOID
        cert = pki.svid(BILLING, eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
        refused(self._get(proxy, pki, upstream, cert), 407, "identity_invalid")

    def test_intermediate_chain(self, proxy, pki, upstream):
        """A leaf issued by an intermediate under the trusted root verifies through the chain."""
        from secretless_proxy.dev import certs
        inter = certs.make_ca(common_name="workload intermediate", parent=pki.workload_ca)
        r = self._get(proxy, pki, upstream, pki.svid(BILLING, ca=inter))
        assert r.status == 200, r


class TestPolicy:
    def _cert(self, pki):
        return pki.svid(BILLING)

    def test_method_denied(self, proxy, pki, upstream):
        """A method the rule does not list is refused with reason 'method' and the rule named."""
        cert, key = self._cert(pki)
        r = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key, "-X", "DELETE", f"{upstream.url}/v1/x", proxy=proxy.url)
        assert refused(r, 403, "method")["rule"] == "billing-to-api"
        assert upstream.requests == []

    @pytest.mark.parametrize("path", ["/admin", "/v1/../admin", "/v1/%2e%2e/admin", "/v2/x"])
    def test_path_denied(self, proxy, pki, upstream, path):
        """Paths outside the rule, including traversal tricks, are refused with reason 'path'."""
        cert, key = self._cert(pki)
        r = curl("--path-as-is", "--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key, f"{upstream.url}{path}", proxy=proxy.url)
        refused(r, 403, "path")
        assert upstream.requests == []

    @pytest.mark.parametrize("url", [
        "https://localhost.evil.test:{port}/v1/x",
        "https://localhost@evil.test:{port}/v1/x",
        "https://evil-localhost:{port}/v1/x",
    ])
    def test_lookalike_hosts(self, proxy, pki, upstream, url):
        """Hosts that merely contain the rule's host never match it."""
        cert, key = self._cert(pki)
        r = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key, url.format(port=upstream.port), proxy=proxy.url)
        refused(r, 403, "no_rule")

    def test_other_port_denied(self, proxy, pki, upstream):
        """The rule's port is part of the destination."""
        cert, key = self._cert(pki)
        r = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key, f"https://localhost:{upstream.port + 1}/v1/x", proxy=proxy.url)
        refused(r, 403, "no_rule")

    def test_first_match_wins(self, proxy_factory, pki, upstream):
        """Rules are evaluated in file order: an earlier allow rule shadows a later inject rule."""
        allow = {"name": "first", "workloads": [BILLING], "to": {"host": "localhost", "port": upstream.port, "paths": ["/v1/public/*"]}, "action": "allow"}
        p = proxy_factory(base_config(pki, rules=[allow, inject_rule(upstream)]))
        cert, key = self._cert(pki)
        assert curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key, f"{upstream.url}/v1/public/x", proxy=p.url).status == 200
        assert received_auth(upstream) == []
        upstream.requests.clear()
        assert curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key, f"{upstream.url}/v1/private", proxy=p.url).status == 200
        assert received_auth(upstream) == [f"Bearer {SECRET}"]


class TestUpstreamBinding:
    def test_host_header_differs_from_connect(self, proxy, pki, upstream):
        """CONNECT to the upstream with Host: another host is refused, never injected."""
        cert, key = pki.svid(BILLING)
        r = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key,
                 "-H", f"Host: evil.test:{upstream.port}", f"{upstream.url}/v1/x", proxy=proxy.url)
        refused(r, 403, "host_mismatch")
        assert upstream.requests == []

    def test_keepalive_second_request_other_host(self, proxy, pki, upstream):
        """On one tunnel, a later request with a different Host is refused while the first passed."""
        cert = pki.svid(BILLING)
        sock = tunnel(proxy.port, ("localhost", upstream.port), sni="localhost", ca=pki.interception_ca_cert, cert=cert)
        with sock:
            status, _ = http_exchange(sock, f"GET /v1/a HTTP/1.1\r\nHost: localhost:{upstream.port}\r\n\r\n")
            assert status == 200
            status, body = http_exchange(sock, f"GET /v1/b HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n\r\n")
        assert status == 403 and json.loads(body)["reason"] == "host_mismatch"
        assert [r["path"] for r in upstream.requests] == ["/v1/a"]

    def test_sni_differs_from_connect(self, proxy, pki, upstream):
        """A TLS SNI naming another host than the CONNECT target is refused."""
        cert = pki.svid(BILLING)
        with tunnel(proxy.port, ("localhost", upstream.port), sni="evil.test", ca=pki.interception_ca_cert, cert=cert) as sock:
            status, body = http_exchange(sock, f"GET /v1/a HTTP/1.1\r\nHost: localhost:{upstream.port}\r\n\r\n")
        assert status == 403 and json.loads(body)["reason"] == "host_mismatch"
        assert upstream.requests == []

    def test_upstream_tls_is_verified(self, proxy_factory, pki):
        """An upstream whose certificate does not verify never receives the request."""
        from helpers.upstream import EchoUpstream

        from secretless_proxy.dev import certs
        rogue = certs.make_ca(common_name="unknown upstream CA")
        with EchoUpstream(server_cert=certs.make_server_cert(ca=rogue)) as bad:
            p = proxy_factory(base_config(pki, rules=[inject_rule(bad)]))
            cert, key = pki.svid(BILLING)
            r = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key, f"{bad.url}/v1/x", proxy=p.url)
            assert r.status == 502
            assert bad.requests == []
            assert SECRET not in r.body


class TestPlaintext:
    def _run(self, proxy_factory, pki, **rule_over):
        from helpers.upstream import EchoUpstream
        with EchoUpstream(server_cert=None) as plain:
            p = proxy_factory(base_config(pki, rules=[inject_rule(plain, **rule_over)]))
            cert, key = pki.svid(BILLING)
            # The client proves its identity on the proxy hop, then sends a plain http:// request.
            r = curl("--proxy-cacert", pki.interception_ca_cert, "--proxy-cert", cert, "--proxy-key", key,
                     f"http://localhost:{plain.port}/v1/x", proxy=f"https://localhost:{p.port}")
            return r, list(plain.requests)

    def test_plaintext_refused_by_default(self, proxy_factory, pki):
        """An inject rule never sends its credential over plaintext HTTP unless told to."""
        r, seen = self._run(proxy_factory, pki)
        refused(r, 403, "plaintext_upstream")
        assert seen == []

    def test_plaintext_allowed_when_rule_says_so(self, proxy_factory, pki):
        """allow_plaintext: true lets the rule inject over http."""
        r, seen = self._run(proxy_factory, pki, allow_plaintext=True)
        assert r.status == 200, r
        assert [v for k, v in seen[0]["headers"] if k.lower() == "authorization"] == [f"Bearer {SECRET}"]


class TestPlaintextAllowRule:
    """An 'action: allow' rule reaches a plain http:// upstream only with allow_plaintext (hostile review 11)."""

    def _rule(self, port: int, **over) -> dict:
        return {"name": "open", "workloads": [BILLING], "to": {"host": "localhost", "port": port}, "action": "allow", **over}

    def test_allow_rule_without_allow_plaintext_refused_on_the_proxy_hop(self, proxy_factory, pki):
        """curl to http:// on the proxy hop: 403 plaintext_upstream, the target gets no connection."""
        from helpers.targets import CountingTarget
        with CountingTarget() as target:
            p = proxy_factory(base_config(pki, rules=[self._rule(target.port)]))
            cert, key = pki.svid(BILLING)
            r = curl("--proxy-cacert", pki.interception_ca_cert, "--proxy-cert", cert, "--proxy-key", key,
                     f"http://localhost:{target.port}/status", proxy=f"https://localhost:{p.port}")
            body = refused(r, 403, "plaintext_upstream")
            assert body["rule"] == "open" and "allow_plaintext" in body["error"]
            assert not target.reached()

    def test_allow_rule_without_allow_plaintext_refused_in_a_plain_tunnel(self, proxy_factory, pki):
        """Plain HTTP inside a CONNECT tunnel, identity on the proxy hop: refused, never relayed."""
        import socket

        from helpers.targets import CountingTarget
        with CountingTarget() as target:
            p = proxy_factory(base_config(pki, rules=[self._rule(target.port)]))
            ctx = ssl.create_default_context(cafile=pki.interception_ca_cert)
            ctx.load_cert_chain(*pki.svid(BILLING))
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", p.port), timeout=10), server_hostname="localhost")
            with s:
                s.sendall(f"CONNECT localhost:{target.port} HTTP/1.1\r\nHost: localhost:{target.port}\r\n\r\n".encode())
                head = b""
                while b"\r\n\r\n" not in head:
                    head += s.recv(4096)
                assert head.startswith(b"HTTP/1.1 200"), head
                status, body = http_exchange(s, f"GET /status HTTP/1.1\r\nHost: localhost:{target.port}\r\n\r\n")
            assert (status, json.loads(body)["reason"]) == (403, "plaintext_upstream")
            assert not target.reached()

    def test_allow_rule_with_allow_plaintext_forwards(self, proxy_factory, pki):
        """allow_plaintext: true lets an allow rule reach the plain http:// upstream."""
        from helpers.upstream import EchoUpstream
        with EchoUpstream(server_cert=None) as plain:
            p = proxy_factory(base_config(pki, rules=[self._rule(plain.port, allow_plaintext=True)]))
            cert, key = pki.svid(BILLING)
            r = curl("--proxy-cacert", pki.interception_ca_cert, "--proxy-cert", cert, "--proxy-key", key,
                     f"http://localhost:{plain.port}/status", proxy=f"https://localhost:{p.port}")
            assert r.status == 200, r
            assert [q["path"] for q in plain.requests] == ["/status"]


class TestFailClosed:
    def test_secret_file_removed_refuses(self, proxy_factory, pki, upstream, tmp_path):
        """When the credential source fails, the request is refused (503), never forwarded bare."""
        secret_file = tmp_path / "stripe.key"
        secret_file.write_text(SECRET + "\n")
        creds = {"stripe": {"kind": "static", "secret": f"file:{secret_file}"}}
        p = proxy_factory(base_config(pki, rules=[inject_rule(upstream)], credentials=creds))
        cert, key = pki.svid(BILLING)
        args = ("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key, f"{upstream.url}/v1/x")
        assert curl(*args, proxy=p.url).status == 200
        os.unlink(secret_file)
        body = refused(curl(*args, proxy=p.url), 503, "credential_unavailable")
        assert body["rule"] == "billing-to-api"
        assert len(upstream.requests) == 1

    def test_rotated_secret_file_is_picked_up(self, proxy_factory, pki, upstream, tmp_path):
        """A secret file replaced on disk (as Kubernetes rotates it) is used without a restart."""
        secret_file = tmp_path / "stripe.key"
        secret_file.write_text(SECRET)
        creds = {"stripe": {"kind": "static", "secret": f"file:{secret_file}"}}
        p = proxy_factory(base_config(pki, rules=[inject_rule(upstream)], credentials=creds), env={"ROTATED": SECRET + "-v2"})
        cert, key = pki.svid(BILLING)
        args = ("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key, f"{upstream.url}/v1/x")
        assert curl(*args, proxy=p.url).status == 200
        new = tmp_path / "new.key"
        new.write_text(SECRET + "-v2")
        os.replace(new, secret_file)
        assert curl(*args, proxy=p.url).status == 200
        auths = [[v for k, v in r["headers"] if k.lower() == "authorization"] for r in upstream.requests]
        assert auths == [[f"Bearer {SECRET}"], [f"Bearer {SECRET}-v2"]]


class TestMitmdumpEntry:
    def test_mitmdump_script_injects_and_refuses(self, proxy_factory, pki, upstream):
        """mitmdump -s addons/secretless.py runs the same addon with the same guarantees."""
        p = proxy_factory(base_config(pki, rules=[inject_rule(upstream)]), via="mitmdump")
        cert, key = pki.svid(BILLING)
        r = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key, f"{upstream.url}/v1/x", proxy=p.url)
        assert r.status == 200, r
        assert received_auth(upstream) == [f"Bearer {SECRET}"]
        refused(curl("--cacert", pki.interception_ca_cert, f"{upstream.url}/v1/x", proxy=p.url), 407, "identity_missing")

    def test_mitmdump_query_credential_not_in_flow_log(self, proxy_factory, pki, upstream):
        """mitmdump prints each flow's URL: an injected query credential is scrubbed before that."""
        rule = inject_rule(upstream, inject={"credential": "stripe", "query": "api_key"})
        p = proxy_factory(base_config(pki, rules=[rule]), via="mitmdump")
        cert, key = pki.svid(BILLING)
        r = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key, f"{upstream.url}/v1/x?api_key=mine", proxy=p.url)
        assert r.status == 200
        assert [v for k, v in upstream.requests[0]["query"] if k == "api_key"] == [SECRET]
        p.stop()
        assert "/v1/x?api_key=%5BREDACTED%5D" in p.output()  # the flow line is there, scrubbed
