"""Seeded certificate fuzz (issue 9 §3): a malformed certificate is an identity refusal, never an
exception, on the verifier, the proxy's two hops and the admin API."""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from helpers.certfuzz import Case, cases
from helpers.clients import curl
from helpers.proxy import base_config

from secretless_proxy.errors import IdentityError
from secretless_proxy.identity import IdentityVerifier

SEED = 20260309
COUNT = 2000
REASONS = {"identity_missing", "identity_untrusted", "identity_expired", "identity_invalid",
           "identity_trust_domain", "identity_conflict"}


def judge(verifier: IdentityVerifier, case: Case) -> str:
    """'ok' or the identity reason; any other exception propagates (that is the bug this hunts)."""
    try:
        verifier.verify(case.chain)
    except IdentityError as exc:
        return exc.reason
    return "ok"


def write_case(case: Case, out: Path) -> tuple[str, str] | None:
    """(cert, key) files for a real client, or None when the key cannot be written."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        key = case.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[attr-defined]
                                     serialization.NoEncryption())
    except (ValueError, TypeError):
        return None
    (out / "cert.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in case.chain))
    (out / "key.pem").write_bytes(key)
    return str(out / "cert.pem"), str(out / "key.pem")


def sample(verifier: IdentityVerifier, ca, *, per_reason: int, seed: int = SEED + 1) -> list[tuple[Case, str]]:
    """A few cases of every outcome, malformed ones (damaged DER, unparsable extensions) first."""
    picked: dict[str, list[tuple[Case, str]]] = collections.defaultdict(list)
    for case in cases(count=600, seed=seed, ca=ca):
        got, bucket = "ok", "ok"
        try:
            verifier.verify(case.chain)
        except IdentityError as exc:
            got = exc.reason
            bucket = got + ("/unparsable" if "malformed" in str(exc) else "")
        bucket += "/damaged" if case.der_damaged else ""
        if len(picked[bucket]) < per_reason:
            picked[bucket].append((case, got))
    return [item for bucket in sorted(picked) for item in picked[bucket]]


@pytest.fixture(scope="module")
def verifier(pki) -> IdentityVerifier:
    return IdentityVerifier(bundles={"example.org": [pki.workload_ca.cert]})


@pytest.mark.slow  # hundreds of generated certificates
class TestVerifierFuzz:
    def test_no_exception_but_identity_refusals(self, pki, verifier) -> None:
        """2,000 seeded odd certificates: each is a workload or an IdentityError with a known reason."""
        outcomes: collections.Counter[str] = collections.Counter()
        escaped: list[tuple[str, str]] = []
        for case in cases(count=COUNT, seed=SEED, ca=pki.workload_ca):
            try:
                outcomes[judge(verifier, case)] += 1
            except Exception as exc:  # noqa: BLE001 - counting exactly these is the point
                escaped.append((case.name, repr(exc)))
        assert escaped == []
        assert sum(outcomes.values()) == COUNT
        assert set(outcomes) - {"ok"} <= REASONS
        # The fuzz reaches the interesting places: unparsable, untrusted, expired, foreign and fine.
        assert {"identity_invalid", "identity_untrusted", "identity_expired", "ok"} <= set(outcomes), outcomes
        assert outcomes["identity_invalid"] > COUNT // 4, outcomes

    def test_malformed_extensions_are_identity_invalid(self, pki, verifier) -> None:
        """Extensions cryptography cannot parse (the old raw ValueError) come out as identity_invalid."""
        damaged = [c for c in cases(count=400, seed=SEED + 2, ca=pki.workload_ca)
                   if "garbage_known_ext" in c.name]
        assert len(damaged) > 20
        reasons = {judge(verifier, c) for c in damaged}
        assert "identity_invalid" in reasons and reasons <= REASONS | {"ok"}

    def test_duplicate_intermediates_do_not_stall(self, pki, verifier) -> None:
        """Many copies of a self-signed certificate as intermediates are refused without a path search."""
        from secretless_proxy.dev import certs
        other = certs.make_ca(common_name="loop CA")
        leaf = certs.make_svid(ca=other, spiffe_id="spiffe://example.org/ns/a").cert
        with pytest.raises(IdentityError, match="at most 4 are accepted") as info:
            verifier.verify([leaf, *[certs.make_ca(common_name="loop CA").cert for _ in range(5)]])
        assert info.value.reason == "identity_invalid"
        with pytest.raises(IdentityError, match="share a subject name"):
            verifier.verify([leaf, other.cert, certs.make_ca(common_name="loop CA").cert])
        with pytest.raises(IdentityError) as info:  # exact duplicates are folded into one
            verifier.verify([leaf, *[other.cert] * 8])
        assert info.value.reason == "identity_untrusted"


class TestListenersFuzzSample:
    def test_sample_through_both_hops_and_admin_api(self, proxy_factory, pki, upstream, verifier, tmp_path) -> None:
        """A sample of fuzz cases through a real proxy: the in-process verdict on the intercepted hop, the
        proxy hop (407) and the admin API (401), never 503 not_configured; no traceback in the output."""
        rule = {"name": "fuzz", "workloads": ["spiffe://example.org/**"],
                "to": {"host": "localhost", "port": upstream.port}, "action": "allow"}
        proxy = proxy_factory(base_config(pki, rules=[rule], admin={
            "api_listen": "127.0.0.1:0", "workloads": ["spiffe://example.org/ns/ops/sa/admin"]}))
        api = re.search(r"admin API on (https://127\.0\.0\.1:\d+)", proxy.output())
        assert api, proxy.output()
        tried: collections.Counter[str] = collections.Counter()
        for i, (case, expected) in enumerate(sample(verifier, pki.workload_ca, per_reason=3)):
            files = write_case(case, tmp_path / f"case{i}")
            if files is None:
                continue
            cert, key = files
            hops = {
                "intercepted": curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key,
                                    f"{upstream.url}/x", proxy=proxy.url),
                "proxy": curl("--cacert", pki.interception_ca_cert, "--proxy-cacert", pki.interception_ca_cert,
                              "--proxy-cert", cert, "--proxy-key", key, f"{upstream.url}/x",
                              proxy=f"https://localhost:{proxy.port}"),
                "admin": curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key,
                              f"{api.group(1)}/v1/grants", proxy=""),
            }
            for hop, r in hops.items():
                if r.status == 0 and ("key" in r.stderr.lower() or "certificate" in r.stderr.lower()):
                    continue  # curl itself could not load this key/certificate pair
                tried[hop] += 1
                refusal = 401 if hop == "admin" else 407
                if expected == "ok":
                    assert r.status == (403 if hop == "admin" else 200), (case.name, hop, r)
                else:
                    assert r.status == refusal, (case.name, hop, expected, r)
                    assert json.loads(r.body)["reason"] == expected, (case.name, hop, r.body)
        print("tried per listener:", dict(tried))
        assert min(tried.values()) >= 10, tried
        assert proxy.proc.poll() is None
        out = proxy.output()
        assert "Traceback" not in out and "Addon error" not in out


@pytest.mark.slow  # runs the bench script in a subprocess
def test_bench_script_runs(tmp_path) -> None:
    """bench/fuzz_certs.py runs a seeded fuzz and reports zero escaped exceptions."""
    script = Path(__file__).parents[1] / "bench" / "fuzz_certs.py"
    proc = subprocess.run([sys.executable, str(script), "--count", "200", "--seed", "7"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "escaped exceptions: 0" in proc.stdout
