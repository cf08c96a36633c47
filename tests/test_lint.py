"""`check` warns about rules that are valid but weaker than they look (secretless_proxy/config/lint.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from secretless_proxy.config.lint import cross_rule_echo
from secretless_proxy.config.parse import load_config
from secretless_proxy.dev.certs import make_ca, write_ca

CLI = Path(sys.executable).with_name("secretless-proxy")
BILLING = '["spiffe://example.org/ns/prod/sa/billing"]'


def config(tmp_path: Path, *rules: str) -> Path:
    write_ca(make_ca(), tmp_path / "ca")
    (tmp_path / "key").write_text("sk_lint_value\n")
    path = tmp_path / "c.yaml"
    path.write_text(
        "version: 1\nidentity: {trust_bundle: ca/ca.pem, trust_domains: [example.org]}\n"
        "credentials:\n  api: {kind: static, secret: file:key}\nrules:\n"
        f"  - {{name: inject-api, workloads: {BILLING}, to: {{host: api.example.com}}, "
        "inject: {credential: api, header: Authorization}}\n" + "".join(f"  - {r}\n" for r in rules))
    return path


class TestCrossRuleEcho:
    @pytest.mark.parametrize("host", ["api.example.com", "*.example.com", "API.Example.com"])
    def test_allow_rule_on_an_injected_host_is_warned(self, tmp_path, host):
        """An allow rule reaching a host an inject rule sends a credential to is named, with both rules."""
        cfg = load_config(config(tmp_path, f"{{name: logs, workloads: {BILLING}, to: {{host: '{host}'}}, action: allow}}"))
        found = cross_rule_echo(cfg)
        assert len(found) == 1
        assert found[0].startswith("c.yaml:7 rules[1].action: allow rule 'logs' reaches ")
        assert "rule 'inject-api' injects credential 'api'" in found[0]

    @pytest.mark.parametrize("to", ["{host: other.example.net}", "{host: api.example.com, port: 8443}"])
    def test_unrelated_allow_rule_is_not_warned(self, tmp_path, to):
        """Another host, or another port of the same host, is not the inject rule's upstream."""
        cfg = load_config(config(tmp_path, f"{{name: other, workloads: {BILLING}, to: {to}, action: allow}}"))
        assert cross_rule_echo(cfg) == []

    @pytest.mark.slow  # runs the CLI in a subprocess (an interpreter start and mitmproxy's imports each)
    def test_check_prints_the_warning_and_still_exits_0(self, tmp_path):
        """The warning goes to stderr; the file is valid, so check exits 0."""
        path = config(tmp_path, f"{{name: logs, workloads: {BILLING}, to: {{host: api.example.com}}, action: allow}}")
        out = subprocess.run([str(CLI), "check", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "warning: c.yaml:7 rules[1].action: allow rule 'logs' reaches api.example.com" in out.stderr
