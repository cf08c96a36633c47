"""Trust per trust domain (issue 9): two domains, each with its own CA, through a real proxy on both
hops and the admin API; SPIFFE bundles as SPIRE writes them; trust changes reaching open connections;
the strict SPIFFE ID table through the verifier and `check`."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers.clients import curl, http_exchange, tunnel
from helpers.proxy import SECRET, base_config

from secretless_proxy.dev import certs
from secretless_proxy.errors import IdentityError
from secretless_proxy.identity import IdentityVerifier
from secretless_proxy.trust.bundles import BundleSource, load_bundle

BILLING = "spiffe://example.org/ns/prod/sa/billing"
ADMIN = "spiffe://example.org/ns/ops/sa/admin"
PARTNER_CI = "spiffe://partner.example/ns/ci/sa/deploy"
CLI = Path(sys.executable).with_name("secretless-proxy")


def _b64url(n: int, size: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()


def spire_bundle(*cas: certs.Issued, sequence: int = 7) -> dict:
    """A SPIFFE bundle as `spire-server bundle show -format spiffe` prints it: one x509-svid JWK per CA
    (x5c, no kid), a jwt-svid key beside them, spiffe_sequence and spiffe_refresh_hint."""
    keys = []
    for ca in cas:
        nums = ca.cert.public_key().public_numbers()  # type: ignore[union-attr]
        keys.append({"use": "x509-svid", "kty": "EC", "crv": "P-256", "x": _b64url(nums.x, 32),
                     "y": _b64url(nums.y, 32),
                     "x5c": [base64.b64encode(ca.cert.public_bytes(serialization.Encoding.DER)).decode()]})
    jwt = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    keys.append({"use": "jwt-svid", "kty": "EC", "kid": "Xq3LqVZ6bLbHcPA3gGPIdBuXxE1uTSd3", "crv": "P-256",
                 "x": _b64url(jwt.x, 32), "y": _b64url(jwt.y, 32)})
    return {"keys": keys, "spiffe_refresh_hint": 300, "spiffe_sequence": sequence}


@pytest.fixture(scope="module")
def partner_ca() -> certs.Issued:
    return certs.make_ca(common_name="partner.example CA")


@pytest.fixture
def bundles(pki, partner_ca, tmp_path) -> dict[str, Path]:
    """Our CA as PEM, the partner's as the SPIFFE bundle file SPIRE would write."""
    ours = tmp_path / "example-org.pem"
    ours.write_bytes(pki.workload_ca.cert_pem())
    theirs = tmp_path / "partner.json"
    theirs.write_text(json.dumps(spire_bundle(partner_ca), indent=4))
    return {"example.org": ours, "partner.example": theirs}


def two_domain_config(pki, upstream, bundles: dict[str, Path], **extra) -> dict:
    rules = [
        {"name": "billing", "workloads": [BILLING], "to": {"host": "localhost", "port": upstream.port},
         "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}},
        {"name": "partner-ci", "workloads": ["spiffe://partner.example/ns/ci/**"],
         "to": {"host": "127.0.0.1", "port": upstream.port}, "action": "allow"},
    ]
    cfg = base_config(pki, rules=rules, **extra)
    cfg["identity"] = {"trust_domains": ["example.org", "partner.example"],
                       "trust_bundles": {td: str(p) for td, p in bundles.items()}}
    return cfg


def refused(r, status: int, reason: str) -> None:
    assert r.status == status, r
    assert json.loads(r.body)["reason"] == reason, r.body


def hop_get(pki, proxy, url: str, cert: tuple[str, str], hop: str):
    if hop == "intercepted":
        return curl("--cacert", pki.interception_ca_cert, "--cert", cert[0], "--key", cert[1], url, proxy=proxy.url)
    return curl("--cacert", pki.interception_ca_cert, "--proxy-cacert", pki.interception_ca_cert,
                "--proxy-cert", cert[0], "--proxy-key", cert[1], url, proxy=f"https://localhost:{proxy.port}")


class TestSpiffeBundleFile:
    def test_spire_bundle_loads_x509_authorities_only(self, partner_ca, tmp_path) -> None:
        """A SPIRE-format bundle yields its x509-svid CAs; the jwt-svid key and the SPIFFE fields are skipped."""
        second = certs.make_ca(common_name="partner.example CA (next)")
        path = tmp_path / "bundle.json"
        path.write_text(json.dumps(spire_bundle(partner_ca, second)))
        got = load_bundle(BundleSource(path=path))
        assert [c.subject for c in got] == [partner_ca.cert.subject, second.cert.subject]

    @pytest.mark.parametrize(("doc", "message"), [
        ({"keys": [{"use": "jwt-svid", "kty": "EC"}]}, "has no x509-svid key with a certificate"),
        ({"keys": [{"use": "x509-svid", "x5c": ["not base64!"]}]}, r"keys\[0\]\.x5c\[0\] is not a base64 DER"),
        ({"keys": {}}, "must be a JSON object with a 'keys' list"),
        ({"keys": [], "spiffe_sequence": "1"}, "spiffe_sequence must be a non-negative integer"),
    ])
    def test_bad_spiffe_bundle_is_refused(self, tmp_path, doc, message) -> None:
        """A SPIFFE bundle that cannot serve X509-SVIDs is refused with a sentence naming the problem."""
        path = tmp_path / "bundle.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=message):
            load_bundle(BundleSource(path=path, format="spiffe"))


class TestCrossDomain:
    @pytest.fixture
    def proxy(self, proxy_factory, pki, upstream, bundles):
        return proxy_factory(two_domain_config(pki, upstream, bundles, admin={
            "api_listen": "127.0.0.1:0", "workloads": [ADMIN]}))

    @pytest.mark.parametrize("hop", ["intercepted", "proxy"])
    def test_partner_ca_cannot_mint_our_ids(self, proxy, pki, partner_ca, upstream, hop) -> None:
        """A leaf for example.org minted by the partner's CA is refused (407 identity_untrusted) and
        gets no credential, on both hops."""
        r = hop_get(pki, proxy, f"{upstream.url}/v1/x", pki.svid(BILLING, ca=partner_ca), hop)
        refused(r, 407, "identity_untrusted")
        assert SECRET not in r.body and upstream.requests == []

    @pytest.mark.parametrize("hop", ["intercepted", "proxy"])
    def test_our_ca_cannot_mint_partner_ids(self, proxy, pki, upstream, hop) -> None:
        """Our CA cannot vouch for the partner's names either."""
        r = hop_get(pki, proxy, f"https://127.0.0.1:{upstream.port}/x", pki.svid(PARTNER_CI), hop)
        refused(r, 407, "identity_untrusted")
        assert upstream.requests == []

    @pytest.mark.parametrize("hop", ["intercepted", "proxy"])
    def test_partner_ids_from_partner_ca_are_accepted(self, proxy, pki, partner_ca, upstream, hop) -> None:
        """The partner's own IDs, chaining to its SPIFFE bundle, pass the rule that names them."""
        r = hop_get(pki, proxy, f"https://127.0.0.1:{upstream.port}/x", pki.svid(PARTNER_CI, ca=partner_ca), hop)
        assert r.status == 200, r
        assert len(upstream.requests) == 1

    def test_partner_ids_get_only_their_rules(self, proxy, pki, partner_ca, upstream) -> None:
        """A verified partner identity is still bound by the rules: billing's destination is 403."""
        r = hop_get(pki, proxy, f"{upstream.url}/v1/x", pki.svid(PARTNER_CI, ca=partner_ca), "intercepted")
        refused(r, 403, "no_rule")

    def test_ours_still_get_credentials(self, proxy, pki, upstream) -> None:
        """Our own billing identity from our CA gets its credential injected as before."""
        r = hop_get(pki, proxy, f"{upstream.url}/v1/x", pki.svid(BILLING), "proxy")
        assert r.status == 200, r
        assert [v for k, v in upstream.requests[0]["headers"] if k.lower() == "authorization"] == [f"Bearer {SECRET}"]

    def test_admin_api_refuses_partner_minted_admin(self, proxy, pki, partner_ca) -> None:
        """A partner-minted admin identity cannot create a grant (401 identity_untrusted); ours can list."""
        api = re.search(r"admin API on (https://127\.0\.0\.1:\d+)", proxy.output())
        assert api
        forged = pki.svid(ADMIN, ca=partner_ca)
        body = json.dumps({"workload": BILLING, "rule": "billing", "ttl_seconds": 60, "reason": "x"})
        r = curl("--cacert", pki.interception_ca_cert, "--cert", forged[0], "--key", forged[1], "-X", "POST",
                 "-H", "Content-Type: application/json", "--data", body, f"{api.group(1)}/v1/grants", proxy="")
        refused(r, 401, "identity_untrusted")
        real = pki.svid(ADMIN)
        r = curl("--cacert", pki.interception_ca_cert, "--cert", real[0], "--key", real[1],
                 f"{api.group(1)}/v1/grants", proxy="")
        assert r.status == 200 and json.loads(r.body) == {"grants": []}, r


class TestTrustChangesReachOpenConnections:
    def _wait_reloaded(self, proxy, n: int) -> None:
        deadline = time.monotonic() + 10
        while proxy.output().count("config reloaded") < n:
            assert time.monotonic() < deadline, proxy.output()
            time.sleep(0.05)

    def test_ca_removed_during_keepalive(self, proxy_factory, pki, partner_ca, upstream, bundles) -> None:
        """A CA removed from a bundle file (reloaded) refuses the next request on the same kept-alive
        connection with 407 identity_untrusted."""
        proxy = proxy_factory(two_domain_config(pki, upstream, bundles))
        sock = tunnel(proxy.port, ("localhost", upstream.port), sni="localhost", ca=pki.interception_ca_cert,
                      cert=pki.svid(BILLING))
        req = f"GET /v1/x HTTP/1.1\r\nHost: localhost:{upstream.port}\r\n\r\n"
        assert http_exchange(sock, req)[0] == 200
        bundles["example.org"].write_bytes(certs.make_ca(common_name="replacement CA").cert_pem())
        self._wait_reloaded(proxy, 1)
        status, body = http_exchange(sock, req)
        assert (status, json.loads(body)["reason"]) == (407, "identity_untrusted")
        assert len(upstream.requests) == 1
        sock.close()

    def test_trust_domain_removed_during_keepalive(self, proxy_factory, pki, partner_ca, upstream, bundles,
                                                   tmp_path) -> None:
        """A trust domain dropped from the config refuses its open connections (identity_trust_domain)."""
        cfg = two_domain_config(pki, upstream, bundles)
        proxy = proxy_factory(cfg)
        sock = tunnel(proxy.port, ("127.0.0.1", upstream.port), sni="127.0.0.1", ca=pki.interception_ca_cert,
                      cert=pki.svid(PARTNER_CI, ca=partner_ca))
        req = f"GET /x HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n\r\n"
        assert http_exchange(sock, req)[0] == 200
        cfg["identity"] = {"trust_bundle": str(bundles["example.org"]), "trust_domains": ["example.org"]}
        cfg["rules"] = cfg["rules"][:1]
        config_path = tmp_path / "config0.yaml"  # proxy_factory's file for its first proxy
        config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self._wait_reloaded(proxy, 1)
        status, body = http_exchange(sock, req)
        assert (status, json.loads(body)["reason"]) == (407, "identity_trust_domain")
        sock.close()


# -- the SPIFFE ID table --------------------------------------------------------------------------

INVALID_IDS = [
    "spiffe://example.org",  # no path: the trust domain's own ID (X509-SVID §5.2)
    "spiffe://example.org/",
    "spiffe://example.org//ns",
    "spiffe://example.org/ns//sa",
    "spiffe://example.org/ns/",
    "spiffe://example.org/./ns",
    "spiffe://example.org/ns/.",
    "spiffe://example.org/ns/..",
    "spiffe://example.org/ns/ci/sa/../../prod/sa/billing",
    "spiffe://example.org/ns/%70rod",
    "spiffe://example.org/ns/prod%2Fsa",
    "spiffe://example.org/ns\x00/prod",
    "spiffe://example.org/ns/prod\n",
    "spiffe://example.org/ns/\tprod",
    "spiffe://example.org/ns/pr od",
    "spiffe://example.org/ns/prod?x=1",
    "spiffe://example.org/ns/prod#frag",
    "spiffe://user@example.org/ns/prod",
    "spiffe://example.org:443/ns/prod",
    "spiffe://example.org:/ns/prod",
    "spiffe://Example.org/ns/prod",
    "spiffe://exa%6dple.org/ns/prod",
    "spiffe://exa mple.org/ns/prod",
    "spiffe://[::1]/ns/prod",
    "spiffe:///ns/prod",
    "SPIFFE://example.org/ns/prod",
    "https://example.org/ns/prod",
    "spiffe:/example.org/ns/prod",
    "spiffe:example.org/ns/prod",
    "spiffe://example.org/ns/prod\\sa",
    "spiffe://example.org/ns/prod;x",
    "spiffe://example.org/ns/~billing",
    "spiffe://example.org/ns/prod@x",
    "spiffe://example.org/ns/*",
    " spiffe://example.org/ns/prod",
    "spiffe://" + "a" * 256 + "/ns",
    "spiffe://example.org/" + "a" * 2028,  # 2049 bytes
]
VALID_IDS = [
    "spiffe://example.org/ns/prod/sa/billing",
    "spiffe://example.org/a",
    "spiffe://example.org/A-Z_a.z-0.9",
    "spiffe://example.org/9eebccd2-12bf-40a6-b262-65fe0487d453",
    "spiffe://example.org/...",
    "spiffe://example.org/.hidden/..x",
    "spiffe://example.org/a/b/c/d/e/f/g/h",
    "spiffe://example.org/ns/UPPER/sa/Mixed_Case",
    "spiffe://example.org/" + "a" * 2027,  # exactly 2048 bytes
    "spiffe://my_td-1.example.org/x",
    "spiffe://" + "t" * 255 + "/x",
    "spiffe://partner.example/ns/ci/sa/deploy",
]


def _domains(ids: list[str]) -> list[str]:
    out = []
    for i in ids:
        td = i.removeprefix("spiffe://").split("/", 1)[0]
        if td not in out and i.startswith("spiffe://") and re.fullmatch(r"[a-z0-9._-]{1,255}", td):
            out.append(td)
    return out


def test_id_table_sizes() -> None:
    """The table holds at least 30 invalid and 10 valid IDs, and the long ones sit at the bounds."""
    assert len(INVALID_IDS) >= 30 and len(VALID_IDS) >= 10
    assert len(INVALID_IDS[-1].encode()) == 2049 and len(VALID_IDS[8].encode()) == 2048


@pytest.fixture(scope="module")
def verifier_and_cas():
    """A verifier trusting every domain of the table, each with its own CA."""
    cas = {td: certs.make_ca(common_name=f"{td[:40]} CA") for td in _domains(VALID_IDS + INVALID_IDS)}
    return IdentityVerifier(bundles={td: [ca.cert] for td, ca in cas.items()}), cas


@pytest.mark.slow  # runs the CLI in a subprocess (an interpreter start and mitmproxy's imports each)
class TestSpiffeIdTable:
    @pytest.mark.parametrize("spiffe_id", INVALID_IDS, ids=range(len(INVALID_IDS)))
    def test_invalid_id_is_identity_invalid(self, verifier_and_cas, spiffe_id) -> None:
        """A certificate from a trusted CA whose one URI SAN is not a valid workload ID: identity_invalid."""
        verifier, cas = verifier_and_cas
        td = spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
        ca = cas.get(td, cas["example.org"])
        leaf = certs.make_svid(ca=ca, spiffe_id=None, extra_uris=(spiffe_id,)).cert
        with pytest.raises(IdentityError, match="SPIFFE ID is not valid|spiffe:// URI SAN") as info:
            verifier.verify([leaf])
        assert info.value.reason == "identity_invalid"

    @pytest.mark.parametrize("spiffe_id", VALID_IDS, ids=range(len(VALID_IDS)))
    def test_valid_id_is_a_workload(self, verifier_and_cas, spiffe_id) -> None:
        """A valid workload ID from its own domain's CA verifies to exactly that ID."""
        verifier, cas = verifier_and_cas
        td = spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
        leaf = certs.make_svid(ca=cas[td], spiffe_id=spiffe_id).cert
        assert verifier.verify([leaf]).spiffe_id == spiffe_id

    def _check(self, tmp_path: Path, ids: list[str]) -> subprocess.CompletedProcess[str]:
        domains = _domains(VALID_IDS)
        bundles = {}
        for td in domains:
            p = tmp_path / f"{td[:40]}-{len(bundles)}.pem"
            p.write_bytes(certs.make_ca(common_name="c").cert_pem())
            bundles[td] = str(p)
        cfg = {"version": 1, "identity": {"trust_domains": domains, "trust_bundles": bundles},
               "rules": [{"name": "r", "workloads": ids, "to": {"host": "api.example.com"}, "action": "allow"}]}
        path = tmp_path / "ids.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=False, width=10_000))
        return subprocess.run([str(CLI), "check", str(path)], capture_output=True, text=True, timeout=60)

    def test_check_reports_every_invalid_id(self, tmp_path) -> None:
        """`check` reports each invalid ID at its own rules[0].workloads[i] path, and accepts the valid ones."""
        bad = [i for i in INVALID_IDS if "*" not in i]  # in a rule, '*' is a glob, not part of an ID
        assert len(bad) >= 30
        proc = self._check(tmp_path, bad)
        assert proc.returncode == 1
        for i in range(len(bad)):
            assert f"rules[0].workloads[{i}]: " in proc.stderr, (i, bad[i], proc.stderr)
        assert "Traceback" not in proc.stderr
        ok = self._check(tmp_path, VALID_IDS)
        assert ok.returncode == 0, ok.stderr


@pytest.mark.slow  # runs the CLI in a subprocess (an interpreter start and mitmproxy's imports each)
class TestCheckBundles:
    def _run(self, tmp_path: Path, identity: dict) -> subprocess.CompletedProcess[str]:
        cfg = {"version": 1, "identity": identity,
               "rules": [{"name": "r", "workloads": [BILLING], "to": {"host": "a.example.com"}, "action": "allow"}]}
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return subprocess.run([str(CLI), "check", str(path)], capture_output=True, text=True, timeout=60)

    def test_domain_without_bundle(self, tmp_path, bundles) -> None:
        """A trust domain with no bundle is reported at its trust_domains entry."""
        proc = self._run(tmp_path, {"trust_domains": ["example.org", "partner.example"],
                                    "trust_bundles": {"example.org": str(bundles["example.org"])}})
        assert proc.returncode == 1
        assert "identity.trust_domains[1]: trust domain 'partner.example' has no bundle" in proc.stderr

    def test_bundle_without_domain(self, tmp_path, bundles) -> None:
        """A bundle keyed by a domain that is not in trust_domains is reported at that bundle."""
        proc = self._run(tmp_path, {"trust_domains": ["example.org"],
                                    "trust_bundles": {td: str(p) for td, p in bundles.items()}})
        assert proc.returncode == 1
        assert "identity.trust_bundles.partner.example: bundle for 'partner.example', which is not in " \
               "identity.trust_domains" in proc.stderr

    def test_shorthand_with_two_domains(self, tmp_path, bundles) -> None:
        """The single-bundle shorthand with two domains (the old, unsafe shape) names the migration."""
        proc = self._run(tmp_path, {"trust_bundle": str(bundles["example.org"]),
                                    "trust_domains": ["example.org", "partner.example"]})
        assert proc.returncode == 1
        assert "one trust bundle cannot serve 2 trust domains" in proc.stderr
        assert "Trust bundles per trust domain" in proc.stderr

    def test_one_ca_in_two_domains(self, tmp_path, bundles) -> None:
        """The same CA certificate in two domains' bundles is refused: it could mint both domains' IDs."""
        proc = self._run(tmp_path, {"trust_domains": ["example.org", "partner.example"],
                                    "trust_bundles": {"example.org": str(bundles["example.org"]),
                                                      "partner.example": str(bundles["example.org"])}})
        assert proc.returncode == 1
        assert "is also in the bundle of 'example.org'" in proc.stderr

    def test_spiffe_bundle_and_pem_ok(self, tmp_path, bundles) -> None:
        """A PEM bundle and a SPIRE-written SPIFFE bundle side by side pass `check`."""
        proc = self._run(tmp_path, {"trust_domains": ["example.org", "partner.example"],
                                    "trust_bundles": {"example.org": str(bundles["example.org"]),
                                                      "partner.example": {"path": str(bundles["partner.example"]),
                                                                          "format": "spiffe"}}})
        assert proc.returncode == 0, proc.stderr
