"""Tests for secretless_proxy.policy: first match in file order, default deny, and deny reasons."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.trust_domains import TWO_DOMAINS, write_two_domain_cas

from secretless_proxy.config.parse import load_config
from secretless_proxy.dev.certs import Issued
from secretless_proxy.identity import Workload
from secretless_proxy.matching import split_spiffe_id
from secretless_proxy.policy import Decision, Deny, Policy

BILLING = "spiffe://example.org/ns/prod/sa/billing"
HEAD = TWO_DOMAINS + """\
credentials:
  stripe: {kind: static, secret: env:SECRETLESS_TEST_STRIPE}
rules:
"""

PolicyFactory = Callable[[str], Policy]


def workload(spiffe_id: str = BILLING) -> Workload:
    td, path = split_spiffe_id(spiffe_id)
    return Workload(
        spiffe_id=spiffe_id, trust_domain=td, path=path, not_after=2e9, cert_sha256="00" * 32
    )


def decide(
    policy: Policy,
    *,
    who: str = BILLING,
    host: str = "api.stripe.com",
    port: int = 443,
    scheme: str = "https",
    method: str = "GET",
    path: str = "/",
) -> Decision | Deny:
    return policy.decide(
        workload(who), host=host, port=port, scheme=scheme, method=method, path=path
    )


def rule_name(result: Decision | Deny) -> str:
    assert isinstance(result, Decision), result
    return result.rule.name


@pytest.fixture
def make_policy(tmp_path: Path, ca: Issued, partner_ca: Issued, monkeypatch: pytest.MonkeyPatch) -> PolicyFactory:
    """Build a Policy from YAML rules (list items under 'rules:') through load_config."""
    write_two_domain_cas(tmp_path, ca, partner_ca)
    monkeypatch.setenv("SECRETLESS_TEST_STRIPE", "sk_test_value")

    def build(rules: str) -> Policy:
        path = tmp_path / "policy.yaml"
        path.write_text(HEAD + rules)
        return Policy(load_config(path).rules)

    return build


def rule(name: str, to: str, *, who: str = BILLING, extra: str = "action: allow") -> str:
    return f'  - {{name: {name}, workloads: ["{who}"], to: {to}, {extra}}}\n'


INJECT = "inject: {credential: stripe, header: Authorization, format: 'Bearer {secret}'}"
# Rules of the nearest-miss cases.
_WRITES = rule("writes", "{host: api.stripe.com, methods: [POST], paths: ['/v1/other']}")
_CHARGES = rule("charges", "{host: api.stripe.com, paths: ['/v1/charges']}")
_P1 = rule("p1", "{host: api.stripe.com, paths: ['/a']}")
_P2 = rule("p2", "{host: api.stripe.com, paths: ['/b']}")


class TestFirstMatch:
    def test_earlier_allow_beats_later_inject(self, make_policy: PolicyFactory) -> None:
        """With an allow rule above an inject rule for the same host, the allow rule decides."""
        policy = make_policy(
            rule("passthrough", "{host: api.stripe.com}")
            + rule("charge", "{host: api.stripe.com}", extra=INJECT)
        )
        result = decide(policy)
        assert rule_name(result) == "passthrough"
        assert isinstance(result, Decision) and result.rule.action == "allow"

    def test_swapped_order_swaps_winner(self, make_policy: PolicyFactory) -> None:
        """The same two rules in the other order: the inject rule decides."""
        policy = make_policy(
            rule("charge", "{host: api.stripe.com}", extra=INJECT)
            + rule("passthrough", "{host: api.stripe.com}")
        )
        result = decide(policy)
        assert rule_name(result) == "charge"
        assert isinstance(result, Decision) and result.rule.inject is not None

    def test_file_order_across_wildcard_and_exact(self, make_policy: PolicyFactory) -> None:
        """A wildcard rule above an exact rule wins for a host both name (the host index keeps file order)."""
        policy = make_policy(
            rule("wild", "{host: '*.stripe.com'}")
            + rule("exact", "{host: api.stripe.com}", extra=INJECT)
        )
        assert rule_name(decide(policy)) == "wild"
        policy = make_policy(
            rule("exact", "{host: api.stripe.com}", extra=INJECT)
            + rule("wild", "{host: '*.stripe.com'}")
        )
        assert rule_name(decide(policy)) == "exact"

    def test_near_miss_does_not_stop_the_search(self, make_policy: PolicyFactory) -> None:
        """A rule that fails on method or path is skipped and a later matching rule still decides."""
        policy = make_policy(
            rule("reads", "{host: api.stripe.com, methods: [GET]}")
            + rule("charges", "{host: api.stripe.com, paths: ['/v1/charges']}")
            + rule("posts", "{host: api.stripe.com, methods: [POST]}")
        )
        assert rule_name(decide(policy, method="POST", path="/v1/other")) == "posts"

    def test_candidates_in_file_order_without_duplicates(self, make_policy: PolicyFactory) -> None:
        """A rule naming a host twice (exact and wildcard) is a candidate once, in file order."""
        policy = make_policy(
            rule("b", "{host: ['*.stripe.com', api.stripe.com]}")
            + rule("a", "{host: api.stripe.com}")
            + rule("c", "{host: '*.api.stripe.com'}")
        )
        assert [r.name for r in policy.candidates("api.stripe.com")] == ["b", "a"]
        assert [r.name for r in policy.candidates("x.api.stripe.com")] == ["b", "c"]


class TestDenyReasons:
    def test_no_rules_at_all(self, make_policy: PolicyFactory) -> None:
        """An empty rule list denies everything with no_rule."""
        assert decide(make_policy("  []\n")) == Deny("no_rule", None)

    def test_unknown_host(self, make_policy: PolicyFactory) -> None:
        """A host no rule names is denied with no_rule and no rule name."""
        policy = make_policy(rule("stripe", "{host: api.stripe.com}"))
        assert decide(policy, host="api.github.com") == Deny("no_rule", None)

    def test_other_workload(self, make_policy: PolicyFactory) -> None:
        """A workload no rule lists is denied with no_rule, even for a host that has rules."""
        policy = make_policy(rule("stripe", "{host: api.stripe.com, methods: [POST]}"))
        assert decide(policy, who="spiffe://example.org/ns/prod/sa/other", method="GET") == Deny(
            "no_rule", None
        )

    def test_port_mismatch_is_no_rule(self, make_policy: PolicyFactory) -> None:
        """A rule on port 443 does not cover 8443: no_rule, not a near miss."""
        policy = make_policy(rule("stripe", "{host: api.stripe.com, methods: [POST]}"))
        assert decide(policy, port=8443, method="GET") == Deny("no_rule", None)

    def test_explicit_port(self, make_policy: PolicyFactory) -> None:
        """An explicit port list is what the rule covers, and 443 is then no longer implied."""
        policy = make_policy(rule("alt", "{host: api.stripe.com, port: 8443}"))
        assert rule_name(decide(policy, port=8443)) == "alt"
        assert decide(policy, port=443) == Deny("no_rule", None)

    def test_method(self, make_policy: PolicyFactory) -> None:
        """Matching workload, host and port but not the method: reason method, naming the rule."""
        policy = make_policy(rule("reads", "{host: api.stripe.com, methods: [GET, HEAD]}"))
        assert decide(policy, method="DELETE") == Deny("method", "reads")

    def test_method_is_case_sensitive(self, make_policy: PolicyFactory) -> None:
        """'get' is not GET: methods compare exactly as sent."""
        policy = make_policy(rule("reads", "{host: api.stripe.com, methods: [GET]}"))
        assert decide(policy, method="get") == Deny("method", "reads")

    def test_path(self, make_policy: PolicyFactory) -> None:
        """Matching method but not the path: reason path, naming the rule."""
        policy = make_policy(rule("charges", "{host: api.stripe.com, paths: ['/v1/charges/*']}"))
        assert decide(policy, path="/v1/customers/cus_1") == Deny("path", "charges")
        assert rule_name(decide(policy, path="/v1/charges/ch_1?expand=x")) == "charges"

    def test_path_traversal_denied(self, make_policy: PolicyFactory) -> None:
        """A path that only matches after '..' or an encoded '..' is denied with reason path."""
        policy = make_policy(rule("charges", "{host: api.stripe.com, paths: ['/v1/charges/**']}"))
        assert decide(policy, path="/v1/charges/../admin") == Deny("path", "charges")
        assert decide(policy, path="/v1/charges/%2e%2e/admin") == Deny("path", "charges")
        assert decide(policy, path="/v1/charges/..%2fadmin") == Deny("path", "charges")

    @pytest.mark.parametrize(("rules", "asked", "denial"), [
        (_WRITES + _CHARGES, {"path": "/v1/other"}, Deny("method", "writes")),
        (_CHARGES + _WRITES, {"path": "/v1/other"}, Deny("method", "writes")),
        (rule("writes", "{host: api.stripe.com, methods: [POST], paths: ['/a']}")
         + rule("charges", "{host: api.stripe.com, methods: [GET], paths: ['/v1/charges']}"),
         {"method": "DELETE", "path": "/v1/other"}, Deny("path", "writes")),
        (rule("one", "{host: api.stripe.com, methods: [POST]}") + rule("two", "{host: api.stripe.com, methods: [PUT]}")
         + _P1 + _P2, {"method": "DELETE", "path": "/c"}, Deny("method", "one")),
        (_P1 + _P2, {"path": "/c"}, Deny("path", "p1")),
    ], ids=["method-miss-on-the-path-first", "method-miss-on-the-path-second", "path-miss-outranks-no-rule",
            "first-of-equal-method-misses", "first-of-equal-path-misses"])
    def test_nearest_miss_is_named(self, make_policy: PolicyFactory, rules: str, asked: dict, denial: Deny) -> None:
        """A rule covering the path but not the method outranks a rule missing the path, in any order;
        when no rule covers the path, the reason is 'path' and names the first such rule; of several
        rules missing on the same check, the first in file order is named."""
        assert decide(make_policy(rules), **asked) == denial

    def test_other_workloads_near_miss_is_not_reported(self, make_policy: PolicyFactory) -> None:
        """A rule for another workload never becomes the 'nearest' rule of a denial."""
        policy = make_policy(
            rule(
                "theirs",
                "{host: api.stripe.com, methods: [GET]}",
                who="spiffe://example.org/ns/prod/sa/other",
            )
        )
        assert decide(policy, method="GET") == Deny("no_rule", None)


class TestPlaintext:
    def test_inject_over_http_refused(self, make_policy: PolicyFactory) -> None:
        """An inject rule matching a plain-http request is refused: the credential would travel in clear."""
        policy = make_policy(
            rule("charge", "{host: api.stripe.com, port: [80, 443]}", extra=INJECT)
        )
        assert decide(policy, scheme="http", port=80) == Deny("plaintext_upstream", "charge")
        assert rule_name(decide(policy, scheme="https", port=443)) == "charge"

    def test_inject_over_http_on_443_refused(self, make_policy: PolicyFactory) -> None:
        """The scheme, not the port number, decides whether the upstream hop is plaintext."""
        policy = make_policy(rule("charge", "{host: api.stripe.com}", extra=INJECT))
        assert decide(policy, scheme="http", port=443) == Deny("plaintext_upstream", "charge")

    def test_inject_over_http_without_opt_in_on_default_ports(
        self, make_policy: PolicyFactory
    ) -> None:
        """Without allow_plaintext, port 80 is not even covered by default."""
        policy = make_policy(rule("charge", "{host: api.stripe.com}", extra=INJECT))
        assert decide(policy, scheme="http", port=80) == Deny("no_rule", None)

    def test_allow_plaintext_permits_inject_over_http(self, make_policy: PolicyFactory) -> None:
        """allow_plaintext: true lets an inject rule forward over http on port 80."""
        policy = make_policy(
            rule("legacy", "{host: legacy.example.org}", extra=INJECT + ", allow_plaintext: true")
        )
        result = decide(policy, host="legacy.example.org", scheme="http", port=80)
        assert rule_name(result) == "legacy"

    def test_allow_rule_needs_allow_plaintext_for_http(self, make_policy: PolicyFactory) -> None:
        """An 'action: allow' rule reaches a plain http:// upstream only with allow_plaintext (README)."""
        policy = make_policy(rule("open", "{host: api.weather.example, port: 80}"))
        assert decide(policy, host="api.weather.example", scheme="http", port=80) == Deny("plaintext_upstream", "open")
        policy = make_policy(rule("open", "{host: api.weather.example}", extra="action: allow, allow_plaintext: true"))
        assert rule_name(decide(policy, host="api.weather.example", scheme="http", port=80)) == "open"

    def test_plaintext_refusal_is_final(self, make_policy: PolicyFactory) -> None:
        """A first-matching inject rule over http denies; a later allow rule does not take over."""
        policy = make_policy(
            rule("charge", "{host: api.stripe.com}", extra=INJECT)
            + rule("open", "{host: api.stripe.com}")
        )
        assert decide(policy, scheme="http", port=443) == Deny("plaintext_upstream", "charge")


class TestHostsAndWorkloads:
    @pytest.mark.parametrize(
        ("host", "allowed"),
        [
            ("a.stripe.com", True),
            ("a.b.stripe.com", True),
            ("stripe.com", False),
            ("evilstripe.com", False),
            ("stripe.com.evil.test", False),
            ("a.stripe.co", False),
        ],
    )
    def test_wildcard_host(self, make_policy: PolicyFactory, host: str, allowed: bool) -> None:
        """'*.stripe.com' covers its subdomains at any depth, never the bare or a look-alike name."""
        policy = make_policy(rule("wild", "{host: '*.stripe.com'}"))
        assert isinstance(decide(policy, host=host), Decision) is allowed

    def test_rule_host_is_normalised(self, make_policy: PolicyFactory) -> None:
        """A rule written as 'API.Stripe.COM.' matches the normalised host api.stripe.com."""
        policy = make_policy(rule("caps", "{host: API.Stripe.COM.}"))
        assert rule_name(decide(policy)) == "caps"

    @pytest.mark.parametrize(
        ("who", "allowed"),
        [
            ("spiffe://example.org/ns/prod/sa/billing", True),
            ("spiffe://example.org/ns/dev/sa/billing", True),
            ("spiffe://example.org/ns/prod/sa/billing-admin", False),
            ("spiffe://example.org/ns/a/b/sa/billing", False),
            ("spiffe://partner.example/ns/prod/sa/billing", False),
        ],
    )
    def test_workload_glob(self, make_policy: PolicyFactory, who: str, allowed: bool) -> None:
        """'ns/*/sa/billing' matches any one namespace segment, in its own trust domain only."""
        policy = make_policy(
            rule("billing", "{host: api.stripe.com}", who="spiffe://example.org/ns/*/sa/billing")
        )
        assert isinstance(decide(policy, who=who), Decision) is allowed

    def test_workload_double_star_and_several_patterns(self, make_policy: PolicyFactory) -> None:
        """A rule with several patterns matches when any one does; '**' covers a whole subtree."""
        policy = make_policy(
            "  - name: ci\n"
            '    workloads: ["spiffe://example.org/ns/ci/**", "spiffe://partner.example/deploy"]\n'
            "    to: {host: api.stripe.com}\n"
            "    action: allow\n"
        )
        assert rule_name(decide(policy, who="spiffe://example.org/ns/ci/sa/runner/7")) == "ci"
        assert rule_name(decide(policy, who="spiffe://partner.example/deploy")) == "ci"
        assert decide(policy, who="spiffe://partner.example/ns/ci/x") == Deny("no_rule", None)
        assert decide(policy, who="spiffe://example.org/ns/cid/x") == Deny("no_rule", None)

    def test_ip_literal_host(self, make_policy: PolicyFactory) -> None:
        """An IPv6 rule written with brackets matches the canonical address."""
        policy = make_policy(rule("v6", "{host: '[2001:db8::0:1]'}"))
        assert rule_name(decide(policy, host="2001:db8::1")) == "v6"
