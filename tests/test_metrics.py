"""Metrics: names, labels, closed vocabularies and the expiry gauge, on a fresh registry per test."""

from __future__ import annotations

import logging
import platform
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from secretless_proxy.credentials.base import IssuedCredential
from secretless_proxy.metrics import DENY_REASONS, Metrics, decision_for
from secretless_proxy.observe import Observer
from secretless_proxy.secretrefs import Secret

DOCS = Path(__file__).parents[1] / "docs" / "metrics.md"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry, clock: Clock) -> Metrics:
    return Metrics(registry, clock=clock)


def cred(name: str = "payments", scope: str = "", expires_at: float | None = 1_700_000_600.0,
         value: str = "tok-1") -> IssuedCredential:
    return IssuedCredential(name=name, kind="oauth2_client_credentials", secret=Secret(value),
                            expires_at=expires_at, scope=scope)


def series(registry: CollectorRegistry, name: str) -> list[dict[str, str]]:
    return [s.labels for m in registry.collect() for s in m.samples if s.name == name]


class TestMetrics:
    def test_two_instances_on_two_registries(self) -> None:
        """Nothing is registered at import time: each Metrics owns the registry it is given."""
        a, b = CollectorRegistry(), CollectorRegistry()
        Metrics(a).request_done(rule="r", decision="injected", overhead_seconds=0.001)
        Metrics(b)
        assert a.get_sample_value("secretless_requests_total", {"rule": "r", "decision": "injected"}) == 1
        assert b.get_sample_value("secretless_requests_total", {"rule": "r", "decision": "injected"}) is None

    def test_same_registry_twice_is_refused(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """Registering the names twice on one registry fails loudly instead of double counting."""
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            Metrics(registry)

    def test_requests_by_rule_and_decision(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """requests_total counts per rule and decision; a refusal before any rule is rule="none"."""
        metrics.request_done(rule="billing", decision="injected", overhead_seconds=0.0002)
        metrics.request_done(rule="billing", decision="injected", overhead_seconds=0.0002)
        metrics.request_done(rule=None, decision="denied", overhead_seconds=0.00001)
        get = registry.get_sample_value
        assert get("secretless_requests_total", {"rule": "billing", "decision": "injected"}) == 2
        assert get("secretless_requests_total", {"rule": "none", "decision": "denied"}) == 1

    def test_overhead_histogram_has_sub_millisecond_buckets(self, registry: CollectorRegistry,
                                                            metrics: Metrics) -> None:
        """A 70 µs request lands in the 100 µs bucket, not the 50 µs one."""
        metrics.request_done(rule="r", decision="allowed", overhead_seconds=70e-6)
        get = registry.get_sample_value
        assert get("secretless_request_overhead_seconds_bucket", {"le": "5e-05"}) == 0
        assert get("secretless_request_overhead_seconds_bucket", {"le": "0.0001"}) == 1
        assert get("secretless_request_overhead_seconds_bucket", {"le": "1.0"}) == 1
        assert get("secretless_request_overhead_seconds_count") == 1

    def test_denied_reasons_preregistered_at_zero(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """Every error-contract reason has a series from the start, so rate() sees 0, not no data."""
        for reason in DENY_REASONS:
            assert registry.get_sample_value("secretless_denied_total", {"reason": reason}) == 0

    @pytest.mark.parametrize("reason", sorted(DENY_REASONS))
    def test_denied_known_reason(self, registry: CollectorRegistry, metrics: Metrics, reason: str) -> None:
        """Each reason of the error contract is counted under its own name."""
        metrics.request_denied(reason)
        assert registry.get_sample_value("secretless_denied_total", {"reason": reason}) == 1

    def test_unknown_labels_become_other(self, registry: CollectorRegistry, metrics: Metrics,
                                         caplog: pytest.LogCaptureFixture) -> None:
        """Values outside a closed vocabulary are counted as "other": cardinality stays bounded."""
        caplog.set_level(logging.WARNING, "secretless.metrics")
        for i in range(50):
            metrics.request_denied(f"api.host{i}.example.com")
            metrics.cert_rejected(f"weird{i}")
            metrics.cache_lookup(credential="c", result=f"r{i}")
            metrics.credential_fetched(credential="c", kind="static", outcome=f"o{i}", seconds=0.01)
            metrics.credential_revoked(credential="c", scope="", reason=f"x{i}")
            metrics.request_done(rule="r", decision=f"d{i}", overhead_seconds=0.0)
        get = registry.get_sample_value
        assert get("secretless_denied_total", {"reason": "other"}) == 50
        assert len(series(registry, "secretless_denied_total")) == len(DENY_REASONS) + 1
        assert get("secretless_client_cert_rejections_total", {"reason": "other"}) == 50
        assert series(registry, "secretless_client_cert_rejections_total") == [{"reason": "other"}]
        assert get("secretless_credential_cache_total", {"credential": "c", "result": "other"}) == 50
        assert get("secretless_credential_fetch_total",
                   {"credential": "c", "kind": "static", "outcome": "other"}) == 50
        assert get("secretless_revocations_total", {"reason": "other"}) == 50
        assert get("secretless_requests_total", {"rule": "r", "decision": "other"}) == 50
        assert "unknown reason 'api.host0.example.com'" in caplog.text

    def test_credential_fetch(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """Fetches are counted by credential, kind and outcome; durations by kind."""
        metrics.credential_fetched(credential="gh", kind="github_app", outcome="success", seconds=0.2)
        metrics.credential_fetched(credential="gh", kind="github_app", outcome="error", seconds=5.0)
        get = registry.get_sample_value
        assert get("secretless_credential_fetch_total",
                   {"credential": "gh", "kind": "github_app", "outcome": "error"}) == 1
        assert get("secretless_credential_fetch_seconds_count", {"kind": "github_app"}) == 2
        assert get("secretless_credential_fetch_seconds_sum", {"kind": "github_app"}) == pytest.approx(5.2)

    def test_cache_results(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """hit, miss and refresh are counted per credential."""
        for result in ("hit", "hit", "miss", "refresh"):
            metrics.cache_lookup(credential="gh", result=result)
        get = registry.get_sample_value
        assert get("secretless_credential_cache_total", {"credential": "gh", "result": "hit"}) == 2
        assert get("secretless_credential_cache_total", {"credential": "gh", "result": "refresh"}) == 1

    def test_config_info_keeps_one_series(self, registry: CollectorRegistry, metrics: Metrics,
                                          clock: Clock) -> None:
        """A reload replaces the config_info series and stamps the success time."""
        metrics.config_loaded("a" * 64)
        clock.now += 60
        metrics.config_loaded("b" * 64)
        metrics.config_reload_failed()
        get = registry.get_sample_value
        assert series(registry, "secretless_config_info") == [{"sha256": "b" * 64}]
        assert get("secretless_config_info", {"sha256": "b" * 64}) == 1
        assert get("secretless_config_reloads_total", {"outcome": "success"}) == 2
        assert get("secretless_config_reloads_total", {"outcome": "error"}) == 1
        assert get("secretless_config_last_reload_success_timestamp_seconds") == clock.now

    def test_build_info(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """build_info carries the package, mitmproxy and Python versions."""
        from mitmproxy.version import VERSION

        (labels,) = series(registry, "secretless_build_info")
        assert labels["mitmproxy"] == VERSION
        assert labels["python"] == platform.python_version()
        assert re.fullmatch(r"\d+\.\d+\.\d+.*", labels["version"])

    def test_audit_write_errors_by_sink(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """Audit write failures are counted per sink."""
        metrics.audit_write_failed("stdout")
        assert registry.get_sample_value("secretless_audit_write_errors_total", {"sink": "stdout"}) == 1

    def test_ready_follows_checks_at_scrape_time(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """secretless_ready is 1 while every check passes, 0 when one fails or the checks raise."""
        checks: dict[str, str | None] = {"config": None}
        metrics.track_readiness(lambda: checks)
        assert registry.get_sample_value("secretless_ready") == 1
        checks["audit"] = "sink failing"
        assert registry.get_sample_value("secretless_ready") == 0
        metrics.track_readiness(lambda: 1 / 0)  # type: ignore[arg-type,return-value]
        assert registry.get_sample_value("secretless_ready") == 0

    def test_exposition_parses(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """The whole exposition parses with prometheus_client's own parser."""
        metrics.credential_cached(credential="gh", scope="", expires_at=1_700_000_100.0)
        names = {f.name for f in text_string_to_metric_families(generate_latest(registry).decode())}
        assert {"secretless_requests", "secretless_credential_expiry_timestamp_seconds",
                "secretless_ready"} <= names

    def test_every_metric_is_documented(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """docs/metrics.md has a row for every metric family the registry exposes."""
        doc = DOCS.read_text()
        for family in registry.collect():
            name = family.name + ("_total" if family.type == "counter" else "")
            assert f"`{name}`" in doc, f"{name} is not documented in docs/metrics.md"


class TestDecisionFor:
    @pytest.mark.parametrize(("reason", "decision"), [
        ("no_rule", "denied"), ("identity_missing", "denied"), ("credential_unavailable", "error"),
        ("audit_unavailable", "error"), ("internal_error", "error"), ("not_configured", "error"),
    ])
    def test_maps_reason_to_decision(self, reason: str, decision: str) -> None:
        """The proxy's own failures are decision="error", policy and identity refusals "denied"."""
        assert decision_for(reason) == decision


class TestExpiryGauge:
    def test_set_on_issue(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """An issued credential sets the gauge to its expiry time."""
        metrics.credential_cached(credential="gh", scope="", expires_at=1_700_000_600.0)
        assert registry.get_sample_value("secretless_credential_expiry_timestamp_seconds",
                                         {"credential": "gh"}) == 1_700_000_600.0

    def test_soonest_among_scopes(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """With several scopes cached the gauge shows the soonest expiry, and one series only."""
        metrics.credential_cached(credential="jwt", scope="spiffe://a", expires_at=1_700_000_900.0)
        metrics.credential_cached(credential="jwt", scope="spiffe://b", expires_at=1_700_000_300.0)
        assert series(registry, "secretless_credential_expiry_timestamp_seconds") == [{"credential": "jwt"}]
        assert registry.get_sample_value("secretless_credential_expiry_timestamp_seconds",
                                         {"credential": "jwt"}) == 1_700_000_300.0

    def test_refresh_replaces_same_scope(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """A refreshed value for the same scope moves the gauge forward."""
        metrics.credential_cached(credential="gh", scope="", expires_at=1_700_000_300.0)
        metrics.credential_cached(credential="gh", scope="", expires_at=1_700_003_600.0)
        assert metrics.soonest_expiry() == {"gh": 1_700_003_600.0}

    def test_removed_when_none_cached(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """Revoking the last cached scope removes the series; a remaining scope keeps it."""
        metrics.credential_cached(credential="jwt", scope="a", expires_at=1_700_000_300.0)
        metrics.credential_cached(credential="jwt", scope="b", expires_at=1_700_000_900.0)
        metrics.credential_revoked(credential="jwt", scope="a", reason="grant_revoked")
        assert metrics.soonest_expiry() == {"jwt": 1_700_000_900.0}
        metrics.credential_revoked(credential="jwt", scope="b", reason="config_changed")
        assert series(registry, "secretless_credential_expiry_timestamp_seconds") == []
        assert registry.get_sample_value("secretless_revocations_total", {"reason": "grant_revoked"}) == 1

    def test_expired_entries_drop_out(self, registry: CollectorRegistry, metrics: Metrics,
                                      clock: Clock) -> None:
        """An entry past its expiry is not a usable cache: it leaves the gauge at scrape time."""
        metrics.credential_cached(credential="gh", scope="", expires_at=clock.now + 10)
        clock.now += 11
        assert series(registry, "secretless_credential_expiry_timestamp_seconds") == []

    def test_pruned_without_scrapes(self, metrics: Metrics, clock: Clock) -> None:
        """Expired per-workload entries are dropped even when nobody scrapes the gauge."""
        for i in range(3000):
            metrics.credential_cached(credential="jwt", scope=f"spiffe://example.org/w{i}", expires_at=clock.now + 1)
            clock.now += 2
        assert len(metrics._expiry._entries) <= 1025  # type: ignore[attr-defined]

    def test_non_expiring_not_shown(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """A credential without expiry (static key) has no expiry series."""
        metrics.credential_cached(credential="gh", scope="", expires_at=1_700_000_300.0)
        metrics.credential_cached(credential="gh", scope="", expires_at=None)
        assert metrics.soonest_expiry() == {}


class TestObserverMetrics:
    def test_broker_events(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """The BrokerEvents calls update fetch, cache, expiry and revocation metrics."""
        obs = Observer(metrics=metrics)
        obs.fetched(credential="payments", kind="oauth2_client_credentials", outcome="success", seconds=0.05)
        obs.cache(credential="payments", result="miss")
        c = cred()
        obs.issued(c)
        assert metrics.soonest_expiry() == {"payments": c.expires_at}
        obs.revoked(c, reason="expired")
        assert metrics.soonest_expiry() == {}
        get = registry.get_sample_value
        assert get("secretless_revocations_total", {"reason": "expired"}) == 1
        assert get("secretless_credential_cache_total", {"credential": "payments", "result": "miss"}) == 1

    def test_uncached_issue_not_on_gauge(self, metrics: Metrics) -> None:
        """A credential minted per request (cached=False) is not reported as cached."""
        Observer(metrics=metrics).issued(cred(), cached=False)
        assert metrics.soonest_expiry() == {}

    def test_addon_events(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """request_done, denied, cert_rejected and config events reach their metrics."""
        obs = Observer(metrics=metrics)
        obs.request_done(rule=None, decision="denied", overhead_seconds=0.0001)
        obs.denied(request_id="1", workload=None, reason="identity_missing", host="h", path="/")
        obs.cert_rejected("identity_untrusted")
        obs.config_loaded("c" * 64)
        obs.config_reload_failed()
        get = registry.get_sample_value
        assert get("secretless_denied_total", {"reason": "identity_missing"}) == 1
        assert get("secretless_client_cert_rejections_total", {"reason": "identity_untrusted"}) == 1
        assert get("secretless_config_reloads_total", {"outcome": "error"}) == 1

    def test_methods_never_raise(self, metrics: Metrics, caplog: pytest.LogCaptureFixture) -> None:
        """A broken argument is logged by type and dropped; used() answers False."""
        obs = Observer(metrics=metrics)
        obs.issued(object())  # type: ignore[arg-type]
        obs.revoked(None, reason="manual")  # type: ignore[arg-type]
        obs.request_done(rule="r", decision="allowed", overhead_seconds="slow")  # type: ignore[arg-type]
        assert obs.used(request_id="1", workload="w", rule="r", cred=None, method="GET",  # type: ignore[arg-type]
                        host="h", path="/", status=200, duration=0.1) is False
        assert "issued failed (AttributeError)" in caplog.text
