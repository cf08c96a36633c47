"""Tests for secretless_proxy.config.model (and yamlsource): the model a valid file loads into, and
malformed files reported with file, line, key path and a message that says what to do."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.trust_domains import TWO_DOMAINS, write_two_domain_cas

from secretless_proxy.config.model import LimitsConfig
from secretless_proxy.config.parse import load_config
from secretless_proxy.dev.certs import Issued
from secretless_proxy.errors import ConfigError, ConfigIssue

CLI = Path(sys.executable).with_name("secretless-proxy")
FILE = "example.yaml"

VALID = TWO_DOMAINS + """\
listen: 127.0.0.1:8080
interception_ca: mitm
upstream:
  ca_bundle: upstream-ca.pem
store: memory://
credentials:
  stripe: {kind: static, secret: env:SECRETLESS_TEST_STRIPE, owner: payments-team}
  github: {kind: static, secret: file:secrets/gh.token}
rules:
  - name: billing-to-stripe
    description: billing may create charges
    workloads: ["spiffe://example.org/ns/prod/sa/billing"]
    to: {host: API.Stripe.com, methods: [GET, POST], paths: ["/v1/charges/*", "/v1/customers/**"]}
    inject: {credential: stripe, header: Authorization, format: "Bearer {secret}"}
  - name: ci-to-github
    workloads: ["spiffe://example.org/ns/ci/**", "spiffe://partner.example/ci"]
    to: {host: ["*.github.example", api.github.example], port: [443, 8443]}
    inject: {credential: github, basic: {username: x-access-token}}
  - name: legacy-plaintext
    workloads: ["spiffe://example.org/ns/*/sa/legacy"]
    to: {host: legacy.internal.example}
    allow_plaintext: true
    inject: {credential: stripe, query: api_key}
  - name: anyone-to-weather
    workloads: ["spiffe://example.org/**"]
    to: {host: api.weather.example}
    action: allow
default: deny
"""

# Lines 1-8 of every malformed document below; the first rule starts on line 9.
HEAD = """\
version: 1
identity:
  trust_bundle: ca/ca.pem
  trust_domains: [example.org]
credentials:
  github: {kind: static, secret: env:SECRETLESS_TEST_GITHUB}
  stripe: {kind: static, secret: env:SECRETLESS_TEST_STRIPE}
rules:
"""
WL = '["spiffe://example.org/ns/prod/sa/billing"]'


def one_line_rule(
    to: str, tail: str = "inject: {credential: github, header: Authorization}"
) -> str:
    """A whole rule on line 9, so every error in it is reported on line 9."""
    return f"  - {{name: r, workloads: {WL}, to: {to}, {tail}}}\n"


def block_rule(*lines: str) -> str:
    """A rule whose keys are on lines 9 (name), 10 (workloads), 11 (to), then ``lines`` from 12."""
    return f"  - name: r\n    workloads: {WL}\n    to: {{host: api.example.com}}\n" + "".join(
        f"    {line}\n" for line in lines
    )


# (id, document, line, key path, message fragment)
MALFORMED = [
    (
        "unknown-top-level-key",
        HEAD + one_line_rule("{host: a.example.com}") + "defualt: deny\n",
        10,
        "defualt",
        "unknown key 'defualt' (did you mean 'default'? valid keys: version, identity,",
    ),
    (
        "misspelled-rule-key",
        HEAD
        + "  - name: r\n    wrkloads: "
        + WL
        + "\n    to: {host: a.example.com}\n    action: allow\n",
        10,
        "rules[0].wrkloads",
        "unknown key 'wrkloads' (did you mean 'workloads'?",
    ),
    (
        "unknown-credential",
        HEAD + block_rule("inject: {credential: strpe, header: Authorization}"),
        12,
        "rules[0].inject.credential",
        "unknown credential 'strpe' (known: github, stripe)",
    ),
    (
        "duplicate-rule-name",
        HEAD + one_line_rule("{host: a.example.com}") + one_line_rule("{host: b.example.com}"),
        10,
        "rules[1].name",
        "duplicate rule name 'r' (also rules[0])",
    ),
    (
        "duplicate-yaml-key",
        HEAD
        + "  - name: r\n    name: s\n    workloads: "
        + WL
        + "\n    to: {host: a.example.com}\n    action: allow\n",
        10,
        "rules[0].name",
        "duplicate key 'name' (first defined on line 9)",
    ),
    (
        "yaml-syntax-error",
        HEAD + "  - name: r: s\n",
        9,
        "",
        "invalid YAML: mapping values are not allowed here",
    ),
    (
        "yaml-tab-indent",
        HEAD + "  - name: r\n\tworkloads: []\n",
        10,
        "",
        "invalid YAML: found character '\\t' that cannot start any token",
    ),
    (
        "yaml-recursive-alias",
        HEAD + "  - &r {name: r, workloads: [*r], to: {host: a.example.com}, action: allow}\n",
        9,
        "rules[0].workloads[0]",
        "a YAML alias refers to its own anchor",
    ),
    (
        "yaml-merge-key",
        HEAD + one_line_rule("&to {host: a.example.com}") + "  - {<<: *to, name: s}\n",
        10,
        "rules[1]",
        "YAML merge keys (<<) are not supported",
    ),
    (
        "host-middle-wildcard",
        HEAD + one_line_rule('{host: "api.*.com"}'),
        9,
        "rules[0].to.host",
        "unanchored host pattern 'api.*.com'",
    ),
    (
        "host-glued-wildcard",
        HEAD + one_line_rule('{host: "*example.com"}'),
        9,
        "rules[0].to.host",
        "unanchored host pattern '*example.com'",
    ),
    (
        "host-bare-star",
        HEAD + one_line_rule('{host: "*"}'),
        9,
        "rules[0].to.host",
        "unanchored host pattern '*'",
    ),
    (
        "host-with-scheme",
        HEAD + one_line_rule('{host: "https://api.x.com"}'),
        9,
        "rules[0].to.host",
        "invalid host pattern 'https://api.x.com': give a bare host name, no scheme, port",
    ),
    (
        "host-with-port",
        HEAD + one_line_rule('{host: "api.x.com:443"}'),
        9,
        "rules[0].to.host",
        "invalid host pattern 'api.x.com:443'",
    ),
    (
        "host-with-path",
        HEAD + one_line_rule('{host: "api.x.com/v1"}'),
        9,
        "rules[0].to.host",
        "invalid host pattern 'api.x.com/v1'",
    ),
    (
        "host-too-broad",
        HEAD + one_line_rule('{host: "*.com"}'),
        9,
        "rules[0].to.host",
        "'*.com' is too broad",
    ),
    (
        "host-list-item",
        HEAD
        + "  - name: r\n    workloads: "
        + WL
        + "\n    to:\n      host:\n        - a.example.com\n"
        '        - "*.com"\n    action: allow\n',
        14,
        "rules[0].to.host[1]",
        "'*.com' is too broad",
    ),
    (
        "workload-not-spiffe",
        HEAD + f"  - name: r\n    workloads:\n      - {WL[1:-1]}\n"
        "      - https://example.org/ns/prod\n    to: {host: a.example.com}\n    action: allow\n",
        12,
        "rules[0].workloads[1]",
        "invalid SPIFFE ID 'https://example.org/ns/prod'",
    ),
    (
        "workload-foreign-trust-domain",
        HEAD
        + '  - {name: r, workloads: ["spiffe://other.org/x"], to: {host: a.example.com}, action: allow}\n',
        9,
        "rules[0].workloads[0]",
        "trust domain 'other.org' is not in identity.trust_domains (example.org); this pattern could never match",
    ),
    (
        "workload-without-path",
        HEAD
        + '  - {name: r, workloads: ["spiffe://example.org"], to: {host: a.example.com}, action: allow}\n',
        9,
        "rules[0].workloads[0]",
        "has no path: use spiffe://example.org/** for every workload",
    ),
    (
        "lower-case-method",
        HEAD + one_line_rule("{host: a.example.com, methods: [GET, get]}"),
        9,
        "rules[0].to.methods[1]",
        "invalid HTTP method 'get': use upper case, e.g. GET",
    ),
    (
        "relative-path-pattern",
        HEAD + one_line_rule("{host: a.example.com, paths: [/v1/ok, v1/charges]}"),
        9,
        "rules[0].to.paths[1]",
        "path pattern 'v1/charges' must start with '/'",
    ),
    (
        "port-out-of-range",
        HEAD + one_line_rule("{host: a.example.com, port: 70000}"),
        9,
        "rules[0].to.port",
        "must be an integer from 1 to 65535, got 70000",
    ),
    (
        "inject-two-targets",
        HEAD + block_rule("inject: {credential: github, header: Authorization, query: t}"),
        12,
        "rules[0].inject",
        "give exactly one of 'header', 'basic', 'query' or 'sigv4' to say where the credential goes (found: header, query)",
    ),
    (
        "inject-no-target",
        HEAD + block_rule("inject: {credential: github}"),
        12,
        "rules[0].inject",
        "give exactly one of 'header', 'basic', 'query' or 'sigv4'",
    ),
    (
        "format-without-secret",
        HEAD
        + block_rule(
            "inject:", "  credential: github", "  header: Authorization", "  format: Bearer"
        ),
        15,
        "rules[0].inject.format",
        "template 'Bearer' must contain {secret}",
    ),
    (
        "format-other-placeholder",
        HEAD
        + block_rule(
            "inject:",
            "  credential: github",
            "  header: Authorization",
            '  format: "Bearer {secret} {user}"',
        ),
        15,
        "rules[0].inject.format",
        "template 'Bearer {secret} {user}' may only contain the placeholder {secret}",
    ),
    (
        "format-with-query",
        HEAD + block_rule('inject: {credential: github, query: t, format: "x{secret}"}'),
        12,
        "rules[0].inject.format",
        "'format' only applies to 'header' injection",
    ),
    (
        "basic-without-secret",
        HEAD + block_rule("inject: {credential: github, basic: {username: u, password: p}}"),
        12,
        "rules[0].inject.basic",
        "'{secret}' must appear in the username or the password",
    ),
    (
        "reserved-header-host",
        HEAD + block_rule("inject: {credential: github, header: Host}"),
        12,
        "rules[0].inject.header",
        "header 'Host' is owned by the HTTP layer and cannot carry a credential",
    ),
    (
        "invalid-header-name",
        HEAD + block_rule('inject: {credential: github, header: "X Token"}'),
        12,
        "rules[0].inject.header",
        "invalid header name 'X Token'",
    ),
    (
        "allow-with-inject",
        HEAD + block_rule("action: allow", "inject: {credential: github, header: Authorization}"),
        13,
        "rules[0].inject",
        "'action: allow' forwards without a credential; remove 'inject:' or the action",
    ),
    (
        "neither-inject-nor-allow",
        HEAD + block_rule(),
        9,
        "rules[0]",
        "a rule needs 'inject:' (add a credential) or 'action: allow' (forward as is)",
    ),
    (
        "unknown-action",
        HEAD + block_rule("action: deny"),
        12,
        "rules[0].action",
        "must be one of allow, inject, got 'deny'",
    ),
    (
        "plaintext-not-bool",
        HEAD + block_rule("action: allow", 'allow_plaintext: "yes"'),
        13,
        "rules[0].allow_plaintext",
        "must be true or false, got a string",
    ),
    (
        "version-2",
        HEAD.replace("version: 1", "version: 2") + one_line_rule("{host: a.example.com}"),
        1,
        "version",
        "unsupported config version 2 (supported: 1)",
    ),
    (
        "version-true",
        HEAD.replace("version: 1", "version: true") + one_line_rule("{host: a.example.com}"),
        1,
        "version",
        "unsupported config version True (supported: 1)",
    ),
    (
        "empty-port-list",
        HEAD + one_line_rule("{host: a.example.com, port: []}"),
        9,
        "rules[0].to.port",
        "must name at least one port",
    ),
    (
        "query-name-with-separators",
        HEAD + one_line_rule("{host: a.example.com}", "inject: {credential: github, query: 'a=b&c'}"),
        9,
        "rules[0].inject.query",
        "invalid query parameter name 'a=b&c'",
    ),
    (
        "default-allow",
        HEAD + one_line_rule("{host: a.example.com}") + "default: allow\n",
        10,
        "default",
        "must be one of deny, got 'allow'",
    ),
    (
        "env-secret-unset",
        HEAD.replace("env:SECRETLESS_TEST_STRIPE", "env:NOPE_UNSET")
        + one_line_rule("{host: a.example.com}"),
        7,
        "credentials.stripe.secret",
        "cannot resolve env:NOPE_UNSET: environment variable NOPE_UNSET is not set",
    ),
    (
        "file-secret-missing",
        HEAD.replace("env:SECRETLESS_TEST_STRIPE", "file:/nonexistent")
        + one_line_rule("{host: a.example.com}"),
        7,
        "credentials.stripe.secret",
        "cannot resolve file:/nonexistent: secret file /nonexistent does not exist",
    ),
    (
        "bad-secret-reference",
        HEAD.replace("env:SECRETLESS_TEST_STRIPE", "vault:kv/stripe")
        + one_line_rule("{host: a.example.com}"),
        7,
        "credentials.stripe.secret",
        "invalid secret reference, scheme 'vault' is not env or file: use env:NAME or file:/path",
    ),
    (
        "unknown-credential-kind",
        HEAD.replace(
            "kind: static, secret: env:SECRETLESS_TEST_STRIPE", "kind: oauth2, secret: env:X"
        )
        + one_line_rule("{host: a.example.com}"),
        7,
        "credentials.stripe.kind",
        "must be one of aws_sigv4, github_app, jwt, oauth2_client_credentials, oauth2_token_exchange, static, got 'oauth2'",
    ),
    (
        "trust-bundle-missing",
        HEAD.replace("ca/ca.pem", "missing-ca.pem") + one_line_rule("{host: a.example.com}"),
        3,
        "identity.trust_bundle",
        "missing-ca.pem does not exist",
    ),
    (
        "trust-domain-invalid",
        HEAD.replace("[example.org]", "[Example.org]") + "  []\n",
        4,
        "identity.trust_domains[0]",
        "invalid trust domain 'Example.org'",
    ),
    (
        "store-redis-without-encryption-keys",
        HEAD + one_line_rule("{host: a.example.com}") + "store: redis://redis:6379/0\n",
        10,
        "store",
        "missing required key 'encryption_keys': a shared store holds credentials only encrypted",
    ),
    (
        "listen-without-port",
        HEAD + "  []\nlisten: 127.0.0.1\n",
        10,
        "listen",
        "must be HOST:PORT (e.g. 127.0.0.1:8080), got '127.0.0.1'",
    ),
    (
        "rules-not-a-list",
        HEAD + "  name: r\n",
        8,
        "rules",
        "must be a list of rules, got a mapping",
    ),
    ("rules-missing", HEAD.replace("rules:\n", ""), 1, "", "missing required key 'rules'"),
    ("top-level-list", "- version: 1\n- rules: []\n", 1, "", "must be a mapping, got a list"),
    ("empty-file", "", None, "", "the file is empty"),
    ("comments-only", "# nothing here yet\n", None, "", "the file is empty"),
]


def rendered(line: int | None, path: str) -> str:
    """How ConfigIssue.__str__ starts for this location."""
    where = f"{FILE}:{line}" if line else FILE
    return f"{where} {path}: " if path else f"{where}: "


@pytest.fixture
def workdir(tmp_path: Path, ca: Issued, partner_ca: Issued, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config directory with real workload CAs at ca/ca.pem (example.org) and partner/ca.pem
    (partner.example), and the test secrets set."""
    write_two_domain_cas(tmp_path, ca, partner_ca)
    monkeypatch.setenv("SECRETLESS_TEST_GITHUB", "ghs_test_value")
    monkeypatch.setenv("SECRETLESS_TEST_STRIPE", "sk_test_value")
    monkeypatch.delenv("NOPE_UNSET", raising=False)
    return tmp_path


@pytest.fixture
def valid_dir(workdir: Path) -> Path:
    (workdir / "secrets").mkdir()
    (workdir / "secrets" / "gh.token").write_text("ghs_file_value\n")
    (workdir / "upstream-ca.pem").write_text("placeholder: only its existence is checked here\n")
    (workdir / FILE).write_text(VALID)
    return workdir


def write(directory: Path, text: str) -> Path:
    path = directory / FILE
    path.write_text(text)
    return path


class TestValidConfig:
    def test_top_level_fields(self, valid_dir: Path) -> None:
        """Top-level keys land in their typed fields; relative paths resolve against the config's directory."""
        cfg = load_config(valid_dir / FILE)
        assert cfg.identity.bundles["example.org"].path == valid_dir / "ca" / "ca.pem"
        assert cfg.identity.bundles["partner.example"].path == valid_dir / "partner" / "ca.pem"
        assert cfg.identity.trust_domains == ("example.org", "partner.example")
        assert cfg.listen == ("127.0.0.1", 8080)
        assert cfg.interception_ca == valid_dir / "mitm"
        assert cfg.upstream_ca_bundle == valid_dir / "upstream-ca.pem"
        assert cfg.store.url == "memory://"
        assert len(cfg.digest) == 64 and re.fullmatch(r"[0-9a-f]+", cfg.digest)

    def test_relative_paths_do_not_depend_on_cwd(
        self,
        valid_dir: Path,
        tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Loaded from another working directory, relative paths still point next to the config file."""
        monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
        cfg = load_config(valid_dir / FILE)
        assert cfg.identity.bundles["example.org"].path == valid_dir / "ca" / "ca.pem"
        assert cfg.credentials["github"].settings.secret.target == str(valid_dir / "secrets" / "gh.token")

    def test_credentials(self, valid_dir: Path) -> None:
        """Credentials keep their name, kind, owner and secret reference (not the value)."""
        creds = load_config(valid_dir / FILE).credentials
        assert sorted(creds) == ["github", "stripe"]
        stripe = creds["stripe"]
        assert (stripe.name, stripe.kind, stripe.owner) == ("stripe", "static", "payments-team")
        assert str(stripe.settings.secret) == "env:SECRETLESS_TEST_STRIPE"
        assert creds["github"].owner is None
        assert "sk_test_value" not in repr(creds)

    def test_rules_keep_file_order(self, valid_dir: Path) -> None:
        """Rules come out in file order with their index and the line they start on."""
        rules = load_config(valid_dir / FILE).rules
        assert [(r.name, r.index, r.line) for r in rules] == [
            ("billing-to-stripe", 0, 14),
            ("ci-to-github", 1, 19),
            ("legacy-plaintext", 2, 23),
            ("anyone-to-weather", 3, 28),
        ]

    def test_destination(self, valid_dir: Path) -> None:
        """Hosts are normalised, methods and path globs kept, and ports default to 443."""
        to = load_config(valid_dir / FILE).rules[0].to
        assert [h.exact for h in to.hosts] == ["api.stripe.com"]
        assert to.ports == frozenset({443})
        assert to.methods == frozenset({"GET", "POST"})
        assert [g.text for g in to.paths or ()] == ["/v1/charges/*", "/v1/customers/**"]

    def test_explicit_ports_and_host_list(self, valid_dir: Path) -> None:
        """A port list replaces the default; a host list keeps wildcard and exact entries in order."""
        to = load_config(valid_dir / FILE).rules[1].to
        assert to.ports == frozenset({443, 8443})
        assert [(h.exact, h.suffix) for h in to.hosts] == [
            (None, ".github.example"),
            ("api.github.example", None),
        ]
        assert to.methods is None and to.paths is None

    def test_allow_plaintext_defaults_ports_to_80_and_443(self, valid_dir: Path) -> None:
        """With allow_plaintext the default ports are {80, 443}; without it only 443."""
        rules = load_config(valid_dir / FILE).rules
        assert (rules[2].allow_plaintext, rules[2].to.ports) == (True, frozenset({80, 443}))
        assert (rules[3].allow_plaintext, rules[3].to.ports) == (False, frozenset({443}))

    def test_workload_patterns(self, valid_dir: Path) -> None:
        """Workload patterns keep their trust domain, across every configured trust domain."""
        rules = load_config(valid_dir / FILE).rules
        assert [(w.trust_domain, w.path.text) for w in rules[1].workloads] == [
            ("example.org", "/ns/ci/**"),
            ("partner.example", "/ci"),
        ]

    def test_injections(self, valid_dir: Path) -> None:
        """Header, basic and query injections carry exactly the fields given, with defaults filled in."""
        rules = load_config(valid_dir / FILE).rules
        header, basic, query = rules[0].inject, rules[1].inject, rules[2].inject
        assert header is not None and basic is not None and query is not None
        assert (header.credential, header.header, header.format, header.query) == (
            "stripe",
            "Authorization",
            "Bearer {secret}",
            None,
        )
        assert (basic.credential, basic.basic_username, basic.basic_password, basic.header) == (
            "github",
            "x-access-token",
            "{secret}",
            None,
        )
        assert (query.credential, query.query, query.header) == ("stripe", "api_key", None)
        assert [r.action for r in rules] == ["inject", "inject", "inject", "allow"]
        assert rules[3].inject is None

    def test_model_is_frozen(self, valid_dir: Path) -> None:
        """The loaded model cannot be changed after validation."""
        cfg = load_config(valid_dir / FILE)
        with pytest.raises(AttributeError):
            cfg.rules[0].to.ports = frozenset({80})  # type: ignore[misc]

    def test_secrets_not_resolved_when_asked(
        self, valid_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """resolve_secrets=False validates the shape without needing the secrets present."""
        monkeypatch.delenv("SECRETLESS_TEST_STRIPE")
        assert len(load_config(valid_dir / FILE, resolve_secrets=False).rules) == 4
        with pytest.raises(
            ConfigError,
            match=r"credentials\.stripe\.secret: cannot resolve env:SECRETLESS_TEST_STRIPE",
        ):
            load_config(valid_dir / FILE)

    def test_empty_rule_list_loads(self, workdir: Path) -> None:
        """A config with no rules is valid: everything is denied."""
        assert load_config(write(workdir, HEAD + "  []\n")).rules == ()


class TestMalformedConfig:
    @pytest.mark.parametrize(
        ("doc", "line", "path", "fragment"),
        [c[1:] for c in MALFORMED],
        ids=[c[0] for c in MALFORMED],
    )
    def test_issue_located(
        self, workdir: Path, doc: str, line: int | None, path: str, fragment: str
    ) -> None:
        """The problem is reported at its file:line and key path with a message saying what is wrong."""
        with pytest.raises(
            ConfigError, match=re.escape(rendered(line, path)) + ".*" + re.escape(fragment)
        ) as info:
            load_config(write(workdir, doc))
        located = [i for i in info.value.issues if (i.file, i.line, i.path) == (FILE, line, path)]
        assert any(fragment in i.message for i in located), info.value.issues

    def test_missing_file(self, tmp_path: Path) -> None:
        """A config path that does not exist is one issue, not an OSError."""
        with pytest.raises(ConfigError, match="nope.yaml: file not found"):
            load_config(tmp_path / "nope.yaml")

    def test_not_utf8(self, workdir: Path) -> None:
        """A file that is not UTF-8 is one issue naming the problem."""
        (workdir / FILE).write_bytes(b"version: 1\n\xff\n")
        with pytest.raises(ConfigError, match=r"cannot read the file \(UnicodeDecodeError\)"):
            load_config(workdir / FILE)

    def test_every_issue_reported_sorted_by_line(self, workdir: Path) -> None:
        """All problems of one file come out at once, ordered by line whatever order they were found in."""
        doc = (
            "version: 1\n"  # 1
            "store: redis://r:6379\n"  # 2 (checked last)
            "identity:\n"  # 3
            "  trust_bundle: ca/ca.pem\n"  # 4
            "  trust_domains: [example.org]\n"  # 5
            "  colour: red\n"  # 6
            "credentials:\n"  # 7
            "  github: {kind: static, secret: env:NOPE_UNSET}\n"  # 8
            "rules:\n"  # 9
            f"  - {{name: a, workloads: {WL}, to: {{host: '*.com'}}, action: allow}}\n"  # 10
            f"  - {{name: a, workloads: {WL}, to: {{host: x.example, methods: [get]}}, action: allow}}\n"  # 11
            f"  - {{name: c, workloads: {WL}, to: {{host: y.example}}, inject: {{credential: gh, query: t}}}}\n"  # 12
        )
        with pytest.raises(ConfigError) as info:
            load_config(write(workdir, doc))
        assert [(i.line, i.path) for i in info.value.issues] == [
            (2, "store"),
            (6, "identity.colour"),
            (8, "credentials.github.secret"),
            (10, "rules[0].to.host"),
            (11, "rules[1].name"),
            (11, "rules[1].to.methods[0]"),
            (12, "rules[2].inject.credential"),
        ]
        text = str(info.value)
        assert text.splitlines()[0].startswith(f"{FILE}:2 store: missing required key 'encryption_keys'")
        assert (
            f"{FILE}:12 rules[2].inject.credential: unknown credential 'gh' (known: github)" in text
        )

    def test_issue_str_format(self) -> None:
        """ConfigIssue renders as 'file:line key.path: message' and drops what it does not know."""
        assert (
            str(ConfigIssue(file="a.yaml", line=14, path="rules[2].x", message="m"))
            == "a.yaml:14 rules[2].x: m"
        )
        assert str(ConfigIssue(file="a.yaml", line=None, path="", message="m")) == "a.yaml: m"

    def test_message_never_contains_secret_value(
        self, workdir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A secret that fails validation is reported by reference, never by value."""
        monkeypatch.setenv("SECRETLESS_TEST_STRIPE", "sk_live_leak\r\nX: y")
        with pytest.raises(
            ConfigError, match="env:SECRETLESS_TEST_STRIPE contains a line break"
        ) as info:
            load_config(write(workdir, HEAD + "  []\n"))
        assert "sk_live_leak" not in str(info.value)


def run_check(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), "check", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


@pytest.mark.slow  # runs the CLI in a subprocess (an interpreter start and mitmproxy's imports each)
class TestCheckCommand:
    def test_valid_exits_0(self, valid_dir: Path) -> None:
        """`check` on a valid file prints OK with the counts to stdout and exits 0."""
        proc = run_check(valid_dir / FILE, SECRETLESS_TEST_STRIPE="sk_test_value")
        assert (proc.returncode, proc.stderr) == (0, "")
        assert proc.stdout.strip() == f"{valid_dir / FILE}: OK (4 rules, 2 credentials)"

    def test_invalid_exits_1_with_located_issues(self, workdir: Path) -> None:
        """`check` on a broken file exits 1 and prints every issue as file:line path: message to stderr."""
        doc = (
            HEAD
            + block_rule("inject: {credential: strpe, header: Authorization}")
            + "defualt: deny\n"
        )
        proc = run_check(
            write(workdir, doc), SECRETLESS_TEST_GITHUB="x", SECRETLESS_TEST_STRIPE="y"
        )
        assert proc.returncode == 1
        assert proc.stdout == ""
        assert proc.stderr.splitlines() == [
            f"{FILE}:12 rules[0].inject.credential: unknown credential 'strpe' (known: github, stripe)",
            (
                f"{FILE}:13 defualt: unknown key 'defualt' (did you mean 'default'? valid keys: version, "
                "identity, rules, credentials, default, listen, interception_ca, upstream, store, admin, signing, broker, audit, limits)"
            ),
            f"{workdir / FILE}: 2 error(s)",
        ]

    @pytest.mark.parametrize(
        ("doc", "expected"),
        [
            ("", "example.yaml: the file is empty"),
            ("version: [1\n", "example.yaml:2: invalid YAML"),
            ("- a\n", "example.yaml:1: must be a mapping, got a list"),
            ("a: &x [*x]\n", "a YAML alias refers to its own anchor"),
        ],
        ids=["empty", "syntax", "list", "recursive-alias"],
    )
    def test_unparseable_files_exit_1_without_traceback(
        self, workdir: Path, doc: str, expected: str
    ) -> None:
        """Files that are not even YAML mappings still give a located message, never a traceback."""
        proc = run_check(write(workdir, doc))
        assert proc.returncode == 1
        assert expected in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout

    def test_bundle_without_certificate_exits_1(self, workdir: Path) -> None:
        """A trust bundle that exists but holds no certificate is reported by `check`, not at first request."""
        (workdir / "ca" / "ca.pem").write_text("not a certificate\n")
        proc = run_check(
            write(workdir, HEAD + "  []\n"), SECRETLESS_TEST_GITHUB="x", SECRETLESS_TEST_STRIPE="y"
        )
        assert proc.returncode == 1
        assert "identity.trust_bundle: trust bundle" in proc.stderr
        assert "holds no valid PEM certificate" in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout

    def test_missing_file_exits_1(self, tmp_path: Path) -> None:
        """`check` on a path that does not exist exits 1 with 'file not found'."""
        proc = run_check(tmp_path / "absent.yaml")
        assert proc.returncode == 1
        assert "absent.yaml: file not found" in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout


class TestHardening:
    def test_billion_laughs_refused(self, tmp_path):
        """A document whose aliases expand without bound is refused with a clear error."""
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]" for i in range(1, 9)]
        p = tmp_path / "c.yaml"
        p.write_text("\n".join(lines) + "\n")
        with pytest.raises(ConfigError, match="expands to more than"):
            load_config(p)


class TestLimits:
    def test_defaults_bound_everything(self, valid_dir: Path) -> None:
        """Without a limits section every bound is on, with the documented defaults."""
        lim = load_config(valid_dir / FILE).limits
        assert lim.max_request_head_bytes == 64 * 1024
        assert lim.max_request_body_bytes == 16 * 1024 * 1024
        assert lim.max_response_head_bytes == 64 * 1024
        assert 0 < lim.handshake_timeout <= 60 and 0 < lim.idle_timeout <= 600
        assert lim.max_connections_per_client <= lim.max_connections
        assert lim.revoke_on_shutdown is False

    def test_values_land_in_fields(self, valid_dir: Path) -> None:
        """Sizes, counts, seconds and the shutdown switch are read into their typed fields."""
        text = (valid_dir / FILE).read_text() + (
            "limits:\n  max_request_head_bytes: 8192\n  max_request_body_bytes: 0\n"
            "  handshake_timeout_seconds: 2.5\n  idle_timeout_seconds: 30\n  drain_seconds: 5\n"
            "  max_connections: 100\n  max_connections_per_client: 10\n  revoke_on_shutdown: true\n")
        lim = load_config(write(valid_dir, text)).limits
        assert (lim.max_request_head_bytes, lim.max_request_body_bytes) == (8192, 0)
        assert (lim.handshake_timeout, lim.idle_timeout, lim.drain_seconds) == (2.5, 30.0, 5.0)
        assert (lim.max_connections, lim.max_connections_per_client, lim.revoke_on_shutdown) == (100, 10, True)

    @pytest.mark.parametrize(("line", "fragment"), [
        ("  max_request_head_bytes: 10", "limits.max_request_head_bytes: must be an integer from 1024"),
        ("  max_response_head_bytes: 10", "limits.max_response_head_bytes: must be an integer from 1024"),
        ("  idle_timeout_seconds: -1", "limits.idle_timeout_seconds: must be a number of seconds"),
        ("  max_conections: 5", "did you mean 'max_connections'"),
        ("  max_connections: 5\n  max_connections_per_client: 6", "must not exceed limits.max_connections (5)"),
        ("  revoke_on_shutdown: yes please", "limits.revoke_on_shutdown: must be true or false"),
        ("  admin_max_connections: 1", "limits.admin_max_connections: must be an integer from 2"),
        ("  admin_max_connections: 4\n  admin_max_connections_per_client: 5",
         "must not exceed limits.admin_max_connections (4)"),
    ])
    def test_bad_values_named(self, valid_dir: Path, line: str, fragment: str) -> None:
        """A wrong limit is reported with its key path and what would be valid."""
        text = (valid_dir / FILE).read_text() + "limits:\n" + line + "\n"
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            load_config(write(valid_dir, text))

    def test_admin_limits_land_in_fields(self, valid_dir: Path) -> None:
        """The admin listeners' caps are read into their own fields, with defaults below the proxy's."""
        assert LimitsConfig().admin_max_connections_per_client <= LimitsConfig().admin_max_connections
        text = (valid_dir / FILE).read_text() + "limits:\n  admin_max_connections: 10\n  admin_max_connections_per_client: 3\n"
        lim = load_config(write(valid_dir, text)).limits
        assert (lim.admin_max_connections, lim.admin_max_connections_per_client) == (10, 3)

    def test_revoke_on_shutdown_needs_memory_store(self, valid_dir: Path) -> None:
        """revoke_on_shutdown with a shared store is refused: one replica stopping would revoke for all."""
        (valid_dir / "secrets" / "store.key").write_text("ab" * 32 + "\n")
        text = (valid_dir / FILE).read_text().replace(
            "store: memory://", "store: {url: 'redis://127.0.0.1:1/0', encryption_keys: {k1: file:secrets/store.key}}") + (
            "limits:\n  revoke_on_shutdown: true\n")
        with pytest.raises(ConfigError, match=r"limits\.revoke_on_shutdown: needs store: memory://"):
            load_config(write(valid_dir, text))

class TestEchoCheck:
    def _rule(self, valid_dir: Path, inject: str) -> Path:
        return write(valid_dir, HEAD + one_line_rule("{host: api.example.com}", f"inject: {inject}"))

    def test_default_is_on(self, valid_dir: Path) -> None:
        """An inject rule checks responses for an echoed credential unless told otherwise."""
        cfg = load_config(self._rule(valid_dir, "{credential: github, header: Authorization}"))
        assert cfg.rules[0].inject.echo_check is True

    def test_opt_out_read(self, valid_dir: Path) -> None:
        """`echo_check: false` is read into the rule (its responses are then streamed)."""
        cfg = load_config(self._rule(valid_dir, "{credential: github, header: Authorization, echo_check: false}"))
        assert cfg.rules[0].inject.echo_check is False

    def test_non_boolean_named(self, valid_dir: Path) -> None:
        """A non-boolean echo_check is an error naming its key path."""
        with pytest.raises(ConfigError, match=re.escape("rules[0].inject.echo_check: must be true or false")):
            load_config(self._rule(valid_dir, "{credential: github, header: Authorization, echo_check: off please}"))
