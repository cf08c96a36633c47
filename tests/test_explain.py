"""`secretless-proxy explain`: the policy decision for a request, from the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from secretless_proxy.dev import certs

CLI = Path(sys.executable).parent / "secretless-proxy"
CONFIG = """\
version: 1
identity: {{trust_bundle: {bundle}, trust_domains: [example.org]}}
credentials:
  stripe: {{kind: static, secret: env:NOT_NEEDED_FOR_EXPLAIN}}
rules:
  - name: public
    workloads: ["spiffe://example.org/**"]
    to: {{host: api.example.com, paths: ["/v1/public/**"]}}
    action: allow
  - name: billing
    workloads: ["spiffe://example.org/ns/*/sa/billing"]
    to: {{host: "*.example.com", methods: [GET, POST]}}
    inject: {{credential: stripe, header: Authorization, format: "Bearer {{secret}}"}}
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("explain")
    certs.write_ca(certs.make_ca(), d / "ca")
    path = d / "c.yaml"
    path.write_text(CONFIG.format(bundle=d / "ca" / "ca.pem"))
    return path


def explain(config: Path, url: str, *, workload: str, method: str = "GET") -> tuple[int, str]:
    r = subprocess.run([str(CLI), "explain", "--no-resolve", "--config", str(config), "--workload", workload, "--method", method, url],
                       capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr
    return r.returncode, r.stdout + r.stderr


@pytest.mark.slow  # runs the CLI in a subprocess (an interpreter start and mitmproxy's imports each)
class TestExplain:
    def test_first_match_is_named_with_its_line(self, config):
        """An allowed request names the deciding rule, its line and what gets injected."""
        rc, out = explain(config, "https://api.example.com/v1/charges", workload="spiffe://example.org/ns/prod/sa/billing")
        assert rc == 0
        assert "rule 'billing' (c.yaml:10)" in out and "credential 'stripe' injected (header)" in out

    def test_earlier_allow_rule_wins(self, config):
        """File order decides: the public allow rule shadows the inject rule for its paths."""
        rc, out = explain(config, "https://api.example.com/v1/public/x", workload="spiffe://example.org/ns/prod/sa/billing")
        assert rc == 0 and "rule 'public'" in out and "forwarded as is" in out

    def test_refusal_names_reason_and_nearest_rule(self, config):
        """A method outside the nearest rule is refused with reason 'method' (exit 2)."""
        rc, out = explain(config, "https://pay.example.com/x", workload="spiffe://example.org/ns/prod/sa/billing", method="DELETE")
        assert rc == 2 and "403 method" in out and "'billing'" in out

    def test_unknown_trust_domain(self, config):
        """A workload from an unaccepted trust domain is refused as at the TLS layer."""
        rc, out = explain(config, "https://api.example.com/", workload="spiffe://evil.org/x")
        assert rc == 2 and "identity_trust_domain" in out

    def test_bad_url_is_a_clear_error(self, config):
        """A URL without scheme is reported in one sentence, exit 1."""
        rc, out = explain(config, "api.example.com/x", workload="spiffe://example.org/a")
        assert rc == 1 and "--url must be an absolute http(s) URL" in out
