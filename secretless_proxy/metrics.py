"""The Prometheus metrics of secretless-proxy: every name, type and label in one place.

Metrics are injected (prometheus_client habit): ``Metrics(registry)`` defines its collectors on
the ``CollectorRegistry`` it is given, nothing is created at import time, so a re-imported addon
script or a test with a fresh registry never registers twice. docs/metrics.md documents each
metric; ``tests/test_deploy.py`` checks the dashboard and alert rules only use names defined here.

Label values are bounded. ``rule`` and ``credential`` are names from the loaded config, ``kind``
a credential kind. Every ``reason``, ``outcome``, ``result`` and ``decision`` belongs to a closed
vocabulary below; anything else is counted as ``other`` (and logged once), so a bug or a new
reason can never explode the series count. Hosts, paths and workload IDs never become labels:
they belong in audit records.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from secretless_proxy import reasons

log = logging.getLogger("secretless.metrics")

OTHER = "other"
NO_RULE = "none"  # rule label of a request refused before any rule matched

# The error contract's refusal reasons: the proxy port's share of the one vocabulary (reasons.py).
IDENTITY_REASONS: frozenset[str] = reasons.IDENTITY
DENY_REASONS: frozenset[str] = reasons.PROXY
# Refusals that are the proxy's failure (5xx), not the client's: decision="error".
ERROR_REASONS: frozenset[str] = reasons.PROXY_FAILURES
DECISIONS = frozenset({"allowed", "injected", "denied", "error"})
FETCH_OUTCOMES = frozenset({"success", "error", "timeout"})
CACHE_RESULTS = frozenset({"hit", "miss", "refresh"})
REVOCATION_REASONS = reasons.REVOCATION_REASONS
RELOAD_OUTCOMES = frozenset({"success", "error"})
# Connection admission and deadlines (edge/connlimits.py, admin/health.py): which listener, and why.
LISTENERS = frozenset({"proxy", "admin", "admin_api"})
CONN_REFUSAL_REASONS = frozenset({
    "max_connections", "max_connections_per_client", "descriptor_limit", "shutting_down", "not_listening",
})
CONN_TIMEOUT_REASONS = frozenset({"handshake", "request_head", "idle"})
# An open connection closed for what it did (edge/connlimits.py): too many refused requests without a
# verified identity, or too many streams reset by the client (HTTP/2 rapid reset).
CONN_CLOSE_REASONS = frozenset({"anonymous_refusals", "stream_resets"})
STORE_EVENT_REJECTIONS = frozenset({"malformed", "unsigned", "forged", "stale", "replayed"})  # store/events.py
GRANT_CACHE_RESULTS = frozenset({"hit", "miss", "bypass"})  # store/grantcache.py
# Why a grant was revoked, as a label: the admin API's free-text reason goes to the audit log only.
GRANT_REVOCATION_REASONS = frozenset({"manual", "config_changed"})

# 50 µs … 1 s: the addon's own work is sub-millisecond when the credential is cached.
OVERHEAD_BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
                    100e-3, 250e-3, 500e-3, 1.0)
# 1 ms … 30 s: a provider round trip (token endpoint, STS), including retries.
FETCH_BUCKETS = (1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0,
                 10.0, 30.0)


class Degraded(str):
    """A readiness check's finding that does not make the proxy unready: it serves correctly on
    what it has (the last good config after a rejected reload). ``/readyz`` stays 200 and names it
    under ``degraded``; ``secretless_ready`` stays 1; alerts watch the counters instead."""

    __slots__ = ()


def decision_for(reason: str) -> str:
    """The ``decision`` label of a refused request: ``error`` for the proxy's failures, else ``denied``."""
    return "error" if reason in ERROR_REASONS else "denied"


class _ExpiryCollector:
    """``secretless_credential_expiry_timestamp_seconds``: the soonest expiry per credential.

    Computed at scrape time from the cached (credential, scope) entries, so a credential whose
    last cached scope was revoked, or has expired, simply has no series.
    """

    NAME = "secretless_credential_expiry_timestamp_seconds"
    HELP = "Soonest expiry (Unix time) among the cached, unexpired scopes of each credential."

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._entries: dict[tuple[str, str], float] = {}
        self._prune_at = 1024  # also prune when nobody scrapes, so per-workload scopes cannot pile up

    def set(self, credential: str, scope: str, expires_at: float | None) -> None:
        if expires_at is None:  # does not expire (static keys): nothing to watch
            self._entries.pop((credential, scope), None)
            return
        self._entries[(credential, scope)] = expires_at
        if len(self._entries) > self._prune_at:
            self._prune()
            self._prune_at = max(1024, 2 * len(self._entries))

    def remove(self, credential: str, scope: str) -> None:
        self._entries.pop((credential, scope), None)

    def _prune(self) -> None:
        now = self._clock()
        for key in [k for k, exp in self._entries.items() if exp <= now]:
            del self._entries[key]  # expired entries are not a usable cache: drop them

    def soonest(self) -> dict[str, float]:
        self._prune()
        out: dict[str, float] = {}
        for (credential, _), exp in self._entries.items():
            if exp < out.get(credential, float("inf")):
                out[credential] = exp
        return out

    def describe(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["credential"])

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["credential"])
        for credential, exp in sorted(self.soonest().items()):
            family.add_metric([credential], exp)
        yield family


class Metrics:
    """Every secretless-proxy metric, registered on ``registry``. Methods never raise on odd labels."""

    def __init__(self, registry: CollectorRegistry, *, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self._clock = clock
        self._warned: set[tuple[str, str]] = set()
        r = registry
        self.requests = Counter(
            "secretless_requests_total", "Requests handled by the proxy, by rule and decision.",
            ["rule", "decision"], registry=r)
        self.denied = Counter(
            "secretless_denied_total", "Requests refused, by error-contract reason.", ["reason"], registry=r)
        self.overhead = Histogram(
            "secretless_request_overhead_seconds",
            "Time spent in the secretless addon per request (identity, policy, credential, inject).",
            buckets=OVERHEAD_BUCKETS, registry=r)
        self.fetches = Counter(
            "secretless_credential_fetch_total", "Credential provider calls, by credential, kind and outcome.",
            ["credential", "kind", "outcome"], registry=r)
        self.fetch_seconds = Histogram(
            "secretless_credential_fetch_seconds", "Duration of credential provider calls, by kind.",
            ["kind"], buckets=FETCH_BUCKETS, registry=r)
        self.cache = Counter(
            "secretless_credential_cache_total", "Credential cache lookups: hit, miss or refresh.",
            ["credential", "result"], registry=r)
        self._expiry = _ExpiryCollector(clock)
        r.register(self._expiry)
        self.revocations = Counter(
            "secretless_revocations_total", "Cached credentials revoked, by reason.", ["reason"], registry=r)
        self.reloads = Counter(
            "secretless_config_reloads_total", "Config loads and reloads, by outcome.", ["outcome"], registry=r)
        self.config_info = Gauge(
            "secretless_config_info", "The loaded config's sha256 (value is always 1).", ["sha256"], registry=r)
        self.config_success = Gauge(
            "secretless_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load.", registry=r)
        self.cert_rejections = Counter(
            "secretless_client_cert_rejections_total", "Client certificates rejected, by reason.",
            ["reason"], registry=r)
        self.build_info = Gauge(
            "secretless_build_info", "Versions of secretless-proxy, mitmproxy and Python (value is always 1).",
            ["version", "mitmproxy", "python"], registry=r)
        self.audit_errors = Counter(
            "secretless_audit_write_errors_total", "Audit events a sink failed to write, by sink.",
            ["sink"], registry=r)
        self.ready = Gauge(
            "secretless_ready", "1 when every readiness check passes, else 0.", registry=r)
        self.store_errors = Counter(
            "secretless_store_errors_total", "Shared-store (Redis) operations that failed, by operation.",
            ["op"], registry=r)
        self.conn_refused = Counter(
            "secretless_connections_refused_total",
            "Client connections closed at accept, by listener and reason (caps, descriptor limit, shutdown).",
            ["listener", "reason"], registry=r)
        self.conn_timeouts = Counter(
            "secretless_connection_timeouts_total",
            "Client connections closed for a missed deadline, by listener and phase (handshake, request_head, idle).",
            ["listener", "reason"], registry=r)
        self.conn_closed = Counter(
            "secretless_connections_closed_total",
            "Open client connections closed for abuse, by listener and reason (anonymous_refusals, stream_resets).",
            ["listener", "reason"], registry=r)
        self.open_connections = Gauge(
            "secretless_open_connections", "Client connections open now, by listener.", ["listener"], registry=r)
        self.breaker_open = Gauge(
            "secretless_credential_breaker_open", "Circuit breakers of a credential now open or half-open "
            "(one per failing scope): its provider is being damped.", ["credential"], registry=r)
        self.backoff = Counter(
            "secretless_credential_backoff_total", "Requests refused without a provider call because the "
            "credential's circuit breaker is open (or its probe is out).", ["credential"], registry=r)
        self.store_events_rejected = Counter(
            "secretless_store_events_rejected_total", "Shared-store events refused before any effect, by "
            "reason: malformed, unsigned, forged, stale or replayed.", ["reason"], registry=r)
        self.grant_cache = Counter(
            "secretless_grant_cache_total", "Grant checks of requires_grant rules: hit (served from this "
            "replica's memory), miss (asked the store) or bypass (asked the store: its events are not arriving).",
            ["result"], registry=r)
        self.build_info.labels(*_versions()).set(1)
        # Zero-valued series for the closed vocabularies: rate() and alerts see a 0, not "no data".
        for reason in DENY_REASONS:
            self.denied.labels(reason)
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome)
        for listener in LISTENERS:
            for reason in CONN_REFUSAL_REASONS:
                self.conn_refused.labels(listener, reason)
            for reason in CONN_TIMEOUT_REASONS:
                self.conn_timeouts.labels(listener, reason)
        for reason in CONN_CLOSE_REASONS:
            self.conn_closed.labels("proxy", reason)
        for reason in STORE_EVENT_REJECTIONS:
            self.store_events_rejected.labels(reason)
        for result in GRANT_CACHE_RESULTS:
            self.grant_cache.labels(result)

    # -- recording ---------------------------------------------------------------------------

    def request_done(self, *, rule: str | None, decision: str, overhead_seconds: float) -> None:
        self.requests.labels(rule or NO_RULE, self._closed("decision", decision, DECISIONS)).inc()
        self.overhead.observe(max(overhead_seconds, 0.0))

    def request_denied(self, reason: str) -> None:
        self.denied.labels(self._closed("reason", reason, DENY_REASONS)).inc()

    def credential_fetched(self, *, credential: str, kind: str, outcome: str, seconds: float) -> None:
        self.fetches.labels(credential, kind, self._closed("outcome", outcome, FETCH_OUTCOMES)).inc()
        self.fetch_seconds.labels(kind).observe(max(seconds, 0.0))

    def cache_lookup(self, *, credential: str, result: str) -> None:
        self.cache.labels(credential, self._closed("result", result, CACHE_RESULTS)).inc()

    def credential_cached(self, *, credential: str, scope: str, expires_at: float | None) -> None:
        """A credential value for (credential, scope) is now cached; it replaces the previous one."""
        self._expiry.set(credential, scope, expires_at)

    def credential_revoked(self, *, credential: str, scope: str, reason: str) -> None:
        self._expiry.remove(credential, scope)
        self.revocations.labels(self._closed("reason", reason, REVOCATION_REASONS)).inc()

    def breaker_changed(self, *, credential: str, failing: int) -> None:
        """``failing`` of the credential's breakers are open or half-open now."""
        if failing:
            self.breaker_open.labels(credential).set(failing)
        else:  # closed again: drop the series (a credential removed by a reload leaves none behind)
            try:
                self.breaker_open.remove(credential)
            except KeyError:
                pass

    def backed_off(self, *, credential: str) -> None:
        self.backoff.labels(credential).inc()

    def store_event_rejected(self, reason: str) -> None:
        """A store event was refused (``store/events.py``); ``reason`` is one of its closed set."""
        self.store_events_rejected.labels(self._closed("reason", reason, STORE_EVENT_REJECTIONS)).inc()

    def grant_lookup(self, result: str) -> None:
        """A grant check (``store/grantcache.py``): hit, miss or bypass."""
        self.grant_cache.labels(self._closed("result", result, GRANT_CACHE_RESULTS)).inc()

    def store_error(self, op: str) -> None:
        """A shared-store operation failed (``op`` is the store's bounded operation name)."""
        self.store_errors.labels(op=op if op.isidentifier() and len(op) <= 32 else "other").inc()

    def connection_refused(self, listener: str, reason: str, count: int = 1) -> None:
        self.conn_refused.labels(self._closed("listener", listener, LISTENERS),
                                 self._closed("reason", reason, CONN_REFUSAL_REASONS)).inc(count)

    def connection_closed(self, listener: str, reason: str) -> None:
        self.conn_closed.labels(self._closed("listener", listener, LISTENERS),
                                self._closed("reason", reason, CONN_CLOSE_REASONS)).inc()

    def connection_timed_out(self, listener: str, reason: str) -> None:
        self.conn_timeouts.labels(self._closed("listener", listener, LISTENERS),
                                  self._closed("reason", reason, CONN_TIMEOUT_REASONS)).inc()

    def track_open_connections(self, listener: str, count: Callable[[], int]) -> None:
        """``secretless_open_connections{listener}`` read at scrape time from ``count``."""
        self.open_connections.labels(self._closed("listener", listener, LISTENERS)).set_function(count)

    def cert_rejected(self, reason: str) -> None:
        self.cert_rejections.labels(self._closed("reason", reason, IDENTITY_REASONS)).inc()

    def config_loaded(self, digest: str) -> None:
        self.reloads.labels("success").inc()
        self.config_info.clear()  # one series: the config in force now
        self.config_info.labels(digest).set(1)
        self.config_success.set(self._clock())

    def config_reload_failed(self) -> None:
        self.reloads.labels("error").inc()

    def audit_write_failed(self, sink: str) -> None:
        self.audit_errors.labels(sink).inc()

    def track_readiness(self, checks: Callable[[], Mapping[str, str | None]]) -> None:
        """Make ``secretless_ready`` evaluate ``checks`` at scrape time (1 when every value is None
        or ``Degraded``)."""
        def ready() -> float:
            try:
                return 1.0 if all(v is None or isinstance(v, Degraded) for v in checks().values()) else 0.0
            except Exception as exc:  # noqa: BLE001 - a failing check means not ready, never a failed scrape
                log.warning("readiness check raised %s", type(exc).__name__)
                return 0.0
        self.ready.set_function(ready)

    def soonest_expiry(self) -> dict[str, float]:
        """The expiry gauge's current values, by credential (for tests and `explain`)."""
        return self._expiry.soonest()

    # -- grants (admin API) ----------------------------------------------------------------------
    # Registered on first use rather than in __init__: only a proxy with an admin API issues
    # grants, and the API calls track_grants() when it is built so the series start at 0.

    def track_grants(self) -> None:
        """Register ``secretless_grants_total`` and ``secretless_grant_revocations_total`` (idempotent)."""
        self._grant_counters()

    def grant_created(self, *, break_glass: bool) -> None:
        self._grant_counters()[0].labels("true" if break_glass else "false").inc()

    def grant_revoked(self, *, reason: str) -> None:
        self._grant_counters()[1].labels(self._closed("reason", reason, GRANT_REVOCATION_REASONS)).inc()

    def _grant_counters(self) -> tuple[Counter, Counter]:
        counters: tuple[Counter, Counter] | None = getattr(self, "_grants", None)
        if counters is None:
            created = Counter("secretless_grants_total", "Grants issued through the admin API; break-glass "
                              "grants are counted under break_glass=\"true\".", ["break_glass"], registry=self.registry)
            revoked = Counter("secretless_grant_revocations_total", "Grants revoked, by reason.", ["reason"],
                              registry=self.registry)
            for value in ("true", "false"):
                created.labels(value)
            for reason in GRANT_REVOCATION_REASONS:
                revoked.labels(reason)
            counters = self._grants = (created, revoked)
        return counters

    def _closed(self, label: str, value: str, allowed: frozenset[str]) -> str:
        if value in allowed:
            return value
        if (label, value) not in self._warned and len(self._warned) < 100:
            self._warned.add((label, value))
            log.warning("unknown %s %r counted as %r", label, str(value), OTHER)  # a Reason logs as its string
        return OTHER


def _versions() -> tuple[str, str, str]:
    try:
        version = metadata.version("secretless-proxy")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        from mitmproxy.version import VERSION as mitmproxy_version
    except ImportError:
        mitmproxy_version = "unknown"
    return version, mitmproxy_version, platform.python_version()
