"""End to end: what operators see of a real proxy process — metrics, audit, readiness, live reload.

Each test starts ``secretless-proxy run`` with an admin listener on a free loopback port, drives
real traffic through it (requests with client certificates, a real TLS echo upstream) and reads
what the proxy exposes: ``/metrics`` parsed with prometheus_client's parser, ``/readyz`` and
``/healthz``, the JSON-lines audit file, its own log. Config changes are atomic file replaces,
picked up by the proxy's one-second poller (or SIGHUP). Every wait is bounded in time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jwt
import requests
import yaml
from helpers.kubelet import KubeletVolume
from helpers.net import free_port
from helpers.net import wait_for as _wait_for
from helpers.proxy import SECRET, base_config
from prometheus_client.parser import text_string_to_metric_families

from secretless_proxy.audit import AuditLog, rfc3339
from secretless_proxy.dev import certs

BILLING = "spiffe://example.org/ns/prod/sa/billing"
FP_KEY = "fp-key-OBSERVABILITYtest-0123456789abcdef"
AUDIENCE = "https://billing.example"
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
FINGERPRINT = re.compile(r"[0-9a-f]{16}\Z")


# -- helpers ---------------------------------------------------------------------------------


def wait_for(pred: Callable[[], object], *, timeout: float = 6.0, what: str = "condition") -> object:
    """``helpers.net.wait_for`` with this module's bound: 6 s unless a test says otherwise."""
    return _wait_for(pred, timeout=timeout, what=what)


class Scrape:
    """One parsed /metrics answer: samples by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(self, name: str, **labels: str) -> float:
        """The sample's value, 0 when the series does not exist."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}

    def delta(self, before: Scrape, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Every series of ``name`` that changed since ``before``, with its change."""
        keys = set(self.series(name)) | set(before.series(name))
        out = {}
        for k in keys:
            d = self.samples.get((name, k), 0.0) - before.samples.get((name, k), 0.0)
            if d:
                out[k] = d
        return out


def labels(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


@dataclass
class Admin:
    url: str

    def get(self, path: str) -> requests.Response:
        with requests.Session() as s:
            s.trust_env = False  # never route the admin call through an environment proxy
            return s.get(self.url + path, timeout=5)

    def scrape(self) -> Scrape:
        r = self.get("/metrics")
        assert r.status_code == 200, r.text
        return Scrape(r.text)

    def config_sha(self) -> str | None:
        found = [dict(k)["sha256"] for k in self.scrape().series("secretless_config_info")]
        assert len(found) <= 1, found
        return found[0] if found else None

    def wait_config(self, sha: str, timeout: float = 6.0) -> None:
        wait_for(lambda: self.config_sha() == sha, timeout=timeout, what=f"config {sha[:12]} in force")


@dataclass
class Proxy:
    proc: object  # conftest.ProxyProcess
    admin: Admin
    config_path: Path

    @property
    def url(self) -> str:
        return self.proc.url

    def output(self) -> str:
        return self.proc.output()

    @property
    def alive(self) -> bool:
        return self.proc.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        self.proc.proc.send_signal(sig)  # the secretless-proxy process itself (no shell between)

    def rewrite(self, config: dict | str) -> str:
        """Atomically replace the config file (temp file + rename); returns the new sha256."""
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        tmp = self.config_path.with_name(self.config_path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)
        return hashlib.sha256(text.encode()).hexdigest()


def start(proxy_factory, config: dict, *, env: dict[str, str] | None = None) -> Proxy:
    port = free_port()
    config = {**config, "admin": {"listen": f"127.0.0.1:{port}"}}
    p = proxy_factory(config, env=env)
    args = list(p.proc.args)
    return Proxy(proc=p, admin=Admin(f"http://127.0.0.1:{port}"), config_path=Path(args[args.index("--config") + 1]))


def with_admin(proxy: Proxy, config: dict) -> dict:
    """``config`` plus the admin section the proxy was started with (a change needs a restart)."""
    return {**config, "admin": {"listen": proxy.admin.url.removeprefix("http://")}}


def inject_rule(upstream, *, name: str = "billing-to-api", paths: list[str] | None = None,
                credential: str = "stripe") -> dict:
    return {
        "name": name,
        "workloads": [BILLING],
        "to": {"host": "localhost", "port": upstream.port, "methods": ["GET", "POST"], "paths": paths or ["/v1/**"]},
        "inject": {"credential": credential, "header": "Authorization", "format": "Bearer {secret}"},
    }


def allow_rule(upstream, *, name: str, paths: list[str]) -> dict:
    return {"name": name, "workloads": [BILLING],
            "to": {"host": "localhost", "port": upstream.port, "paths": paths}, "action": "allow"}


def client(proxy: Proxy, pki, cert: tuple[str, str] | None = None) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override s.verify
    s.proxies = {"https": proxy.url}
    s.verify = pki.interception_ca_cert
    if cert is not None:
        s.cert = cert
    return s


def auth_headers(upstream) -> list[list[str]]:
    return [[v for k, v in r["headers"] if k.lower() == "authorization"] for r in upstream.requests]


def audit_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text.splitlines() if line]


def refusal(r: requests.Response, status: int, reason: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["reason"] == reason, body
    return body


# -- metrics ---------------------------------------------------------------------------------


class TestMetricsAfterTraffic:
    def test_counters_move_by_exactly_the_traffic(self, proxy_factory, pki, upstream):
        """3 injected, 2 path denials, 1 missing and 1 untrusted identity move each counter by exactly that."""
        proxy = start(proxy_factory, base_config(pki, rules=[inject_rule(upstream)]))
        before = proxy.admin.scrape()
        cert = pki.svid(BILLING)
        with client(proxy, pki, cert) as s:
            for i in range(3):
                assert s.get(f"{upstream.url}/v1/charges?n={i}", timeout=10).status_code == 200
            refusal(s.get(f"{upstream.url}/admin", timeout=10), 403, "path")
            refusal(s.get(f"{upstream.url}/v2/charges", timeout=10), 403, "path")
        with client(proxy, pki) as s:
            refusal(s.get(f"{upstream.url}/v1/charges", timeout=10), 407, "identity_missing")
        rogue = certs.make_ca(common_name="rogue CA")
        with client(proxy, pki, pki.svid(BILLING, ca=rogue)) as s:
            refusal(s.get(f"{upstream.url}/v1/charges", timeout=10), 407, "identity_untrusted")
        after = proxy.admin.scrape()

        assert after.delta(before, "secretless_requests_total") == {
            labels(rule="billing-to-api", decision="injected"): 3,
            labels(rule="billing-to-api", decision="denied"): 2,
            labels(rule="none", decision="denied"): 2,
        }
        assert after.delta(before, "secretless_denied_total") == {
            labels(reason="path"): 2, labels(reason="identity_missing"): 1, labels(reason="identity_untrusted"): 1,
        }
        assert after.delta(before, "secretless_client_cert_rejections_total") == {
            labels(reason="identity_untrusted"): 1,
        }
        assert after.delta(before, "secretless_request_overhead_seconds_count") == {(): 7}
        assert after.value("secretless_request_overhead_seconds_sum") > before.value("secretless_request_overhead_seconds_sum")
        assert len(upstream.requests) == 3

    def test_config_info_is_the_file_sha256(self, proxy_factory, pki, upstream):
        """secretless_config_info carries exactly one series: the sha256 of the config file in force."""
        proxy = start(proxy_factory, base_config(pki, rules=[inject_rule(upstream)]))
        m = proxy.admin.scrape()
        want = hashlib.sha256(proxy.config_path.read_bytes()).hexdigest()
        assert m.series("secretless_config_info") == {labels(sha256=want): 1.0}
        assert m.value("secretless_config_reloads_total", outcome="success") == 1
        assert m.value("secretless_config_reloads_total", outcome="error") == 0
        assert abs(m.value("secretless_config_last_reload_success_timestamp_seconds") - time.time()) < 120
        assert m.value("secretless_ready") == 1

    def test_no_label_names_a_host_path_or_workload(self, proxy_factory, pki, upstream):
        """After varied traffic, no label value holds a host, a request path or a SPIFFE ID."""
        proxy = start(proxy_factory, base_config(pki, rules=[inject_rule(upstream)]))
        with client(proxy, pki, pki.svid(BILLING)) as s:
            assert s.get(f"{upstream.url}/v1/charges/ch_42?q=1", timeout=10).status_code == 200
            refusal(s.get(f"{upstream.url}/secret-admin-path", timeout=10), 403, "path")
            refusal(s.get(f"https://127.0.0.1:{upstream.port}/v1/x", timeout=10), 403, "no_rule")
        with client(proxy, pki, pki.svid("spiffe://evil.org/ns/x/sa/intruder")) as s:
            refusal(s.get(f"{upstream.url}/v1/x", timeout=10), 407, "identity_trust_domain")
        m = proxy.admin.scrape()
        forbidden = ("spiffe://", "example.org", "evil.org", "localhost", "127.0.0.1", str(upstream.port),
                     "/v1", "ch_42", "secret-admin-path", "intruder")
        for (name, lbls), _ in m.samples.items():
            for key, value in lbls:
                if name == "secretless_build_info" or key == "sha256":
                    continue  # versions and a hash: fixed strings, not request data
                assert not any(f in value for f in forbidden), (name, key, value)
        rules = {dict(k)["rule"] for k in m.series("secretless_requests_total")}
        assert rules == {"billing-to-api", "none"}


# -- audit -----------------------------------------------------------------------------------


class TestAuditStream:
    def test_events_fields_fingerprints_and_no_secrets(self, proxy_factory, pki, upstream, tmp_path):
        """issued/used/denied/revoked events carry their fields; one JWT shares one fingerprint; no value leaks."""
        audit_path = tmp_path / "audit.log"
        creds = {"stripe": {"kind": "static", "secret": "env:TEST_STRIPE_KEY"},
                 "minted": {"kind": "jwt", "audience": AUDIENCE, "ttl_seconds": 300}}
        rules = [inject_rule(upstream), inject_rule(upstream, name="billing-jwt", paths=["/jwt/**"], credential="minted")]
        audit = {"sinks": [f"file:{audit_path}"], "fingerprint_key": "env:AUDIT_FP_KEY"}
        config = base_config(pki, rules=rules, credentials=creds, audit=audit)
        proxy = start(proxy_factory, config, env={"AUDIT_FP_KEY": FP_KEY})
        fp = AuditLog([], key=FP_KEY.encode()).fingerprint  # the configured key, not a per-process one

        with client(proxy, pki, pki.svid(BILLING)) as s:
            r1 = s.get(f"{upstream.url}/jwt/a?token=client-query", timeout=10)
            r2 = s.post(f"{upstream.url}/jwt/b", data="x", timeout=10)
            r3 = s.get(f"{upstream.url}/v1/charges?limit=3", timeout=10)
            d1 = s.get(f"{upstream.url}/admin?ticket=q", timeout=10)
        with client(proxy, pki) as s:
            d2 = s.get(f"{upstream.url}/v1/x?y=1", timeout=10)
        assert [r.status_code for r in (r1, r2, r3, d1, d2)] == [200, 200, 200, 403, 407]
        auths = auth_headers(upstream)
        token = auths[0][0].removeprefix("Bearer ")
        assert auths == [[f"Bearer {token}"], [f"Bearer {token}"], [f"Bearer {SECRET}"]]  # cached per workload+audience
        claims = jwt.decode(token, options={"verify_signature": False})
        assert (claims["sub"], claims["aud"]) == (BILLING, AUDIENCE)
        m = proxy.admin.scrape()
        assert m.value("secretless_credential_expiry_timestamp_seconds", credential="minted") == claims["exp"]

        events = audit_events(audit_path)
        assert [e["event"] for e in events] == ["credential.issued", "credential.used", "credential.used",
                                                "credential.used", "request.denied", "request.denied"]
        for e in events:
            assert TS.match(e["ts"]), e
        issued, u1, u2, u3, den1, den2 = events
        scope = f"{BILLING}|{AUDIENCE}"
        assert issued == {"ts": issued["ts"], "event": "credential.issued", "credential": "minted", "kind": "jwt",
                          "scope": scope, "expires_at": rfc3339(claims["exp"]), "fingerprint": fp(token)}
        for e, r, method, path, rule, cred, value in (
                (u1, r1, "GET", "/jwt/a", "billing-jwt", "minted", token),
                (u2, r2, "POST", "/jwt/b", "billing-jwt", "minted", token),
                (u3, r3, "GET", "/v1/charges", "billing-to-api", "stripe", SECRET)):
            assert isinstance(e["duration_seconds"], float) and 0 <= e["duration_seconds"] < 10, e
            assert e == {"ts": e["ts"], "event": "credential.used", "request_id": r.headers["X-Secretless-Request-Id"],
                         "workload": BILLING, "rule": rule, "credential": cred, "fingerprint": fp(value),
                         "method": method, "host": "localhost", "path": path, "status": 200,
                         "duration_seconds": e["duration_seconds"]}
        assert den1 == {"ts": den1["ts"], "event": "request.denied", "request_id": d1.json()["request_id"],
                        "workload": BILLING, "rule": "billing-to-api", "reason": "path", "host": "localhost",
                        "path": "/admin"}
        assert den2 == {"ts": den2["ts"], "event": "request.denied", "request_id": d2.json()["request_id"],
                        "workload": None, "workload_unknown": "identity_missing", "rule": None,
                        "reason": "identity_missing", "host": "localhost", "path": "/v1/x"}

        # Changing the JWT credential's definition revokes its cached value (reason config_changed).
        before = proxy.admin.scrape()
        changed = json.loads(json.dumps(config))
        changed["credentials"]["minted"]["ttl_seconds"] = 600
        proxy.admin.wait_config(proxy.rewrite(with_admin(proxy, changed)))
        revoked = wait_for(lambda: [e for e in audit_events(audit_path) if e["event"] == "credential.revoked"],
                           what="credential.revoked")
        assert revoked == [{"ts": revoked[0]["ts"], "event": "credential.revoked", "credential": "minted",
                            "kind": "jwt", "scope": scope, "fingerprint": fp(token), "reason": "config_changed"}]
        after = proxy.admin.scrape()
        assert after.delta(before, "secretless_revocations_total") == {labels(reason="config_changed"): 1}
        assert "minted" not in {dict(k)["credential"] for k in after.series("secretless_credential_expiry_timestamp_seconds")}

        # The next request mints a new token: a new issuance with a new fingerprint.
        upstream.requests.clear()
        with client(proxy, pki, pki.svid(BILLING)) as s:
            r4 = s.get(f"{upstream.url}/jwt/c", timeout=10)
        assert r4.status_code == 200
        token2 = auth_headers(upstream)[0][0].removeprefix("Bearer ")
        assert token2 != token
        tail = audit_events(audit_path)[len(events) + 1:]
        assert [(e["event"], e["fingerprint"]) for e in tail] == [("credential.issued", fp(token2)),
                                                                   ("credential.used", fp(token2))]
        assert fp(token2) != fp(token)

        metrics_body = proxy.admin.get("/metrics").text
        audit_text = audit_path.read_text()
        proxy.proc.stop()
        output = proxy.output()
        for secret in (SECRET, token, token2, FP_KEY):
            for where, text in (("audit", audit_text), ("metrics", metrics_body), ("output", output),
                                ("responses", r1.text + r2.text + r3.text + r4.text)):
                assert secret not in text, f"a secret appeared in the {where}"
        assert "client-query" not in audit_text and "limit=3" not in audit_text and "ticket" not in audit_text


class TestAuditSinkFailure:
    def _config(self, pki, upstream, **audit) -> dict:
        rules = [inject_rule(upstream), allow_rule(upstream, name="public", paths=["/public/**"])]
        return base_config(pki, rules=rules, audit={"sinks": ["file:/dev/full"], **audit})

    def test_fail_closed_withholds_credentials(self, proxy_factory, pki, upstream):
        """With the default fail_closed, a failing sink turns injection into 503 audit_unavailable and /readyz 503."""
        proxy = start(proxy_factory, self._config(pki, upstream))
        assert proxy.admin.get("/readyz").status_code == 200
        with client(proxy, pki, pki.svid(BILLING)) as s:
            # The first use passes (nothing had failed yet); its credential.used write hits ENOSPC.
            assert s.get(f"{upstream.url}/v1/charges", timeout=10).status_code == 200
            seen = len(upstream.requests)
            assert seen == 1
            for _ in range(2):
                body = refusal(s.get(f"{upstream.url}/v1/charges", timeout=10), 503, "audit_unavailable")
                assert body["rule"] == "billing-to-api"
            assert len(upstream.requests) == seen  # nothing more was forwarded with a credential
            assert s.get(f"{upstream.url}/public/x", timeout=10).status_code == 200  # nothing to withhold
        ready = proxy.admin.get("/readyz")
        assert ready.status_code == 503
        doc = ready.json()
        assert doc["ready"] is False and "audit" in doc["failing"]
        assert "file:/dev/full" in doc["checks"]["audit"]
        assert proxy.admin.get("/healthz").status_code == 200
        m = proxy.admin.scrape()
        assert m.value("secretless_ready") == 0
        assert m.value("secretless_audit_write_errors_total", sink="file:/dev/full") == 3  # used + 2 denials
        assert m.value("secretless_denied_total", reason="audit_unavailable") == 2
        assert m.value("secretless_requests_total", rule="billing-to-api", decision="error") == 2
        assert "audit sink file:/dev/full failed to write (OSError)" in proxy.output()

    def test_log_and_continue_keeps_serving(self, proxy_factory, pki, upstream):
        """With log_and_continue, requests keep their credential while the write-error counter moves."""
        proxy = start(proxy_factory, self._config(pki, upstream, on_sink_failure="log_and_continue"))
        before = proxy.admin.scrape()
        with client(proxy, pki, pki.svid(BILLING)) as s:
            for _ in range(3):
                assert s.get(f"{upstream.url}/v1/charges", timeout=10).status_code == 200
        assert auth_headers(upstream) == [[f"Bearer {SECRET}"]] * 3
        after = proxy.admin.scrape()
        assert after.delta(before, "secretless_audit_write_errors_total") == {labels(sink="file:/dev/full"): 3}
        assert after.value("secretless_denied_total", reason="audit_unavailable") == 0
        assert proxy.admin.get("/readyz").status_code == 200
        assert after.value("secretless_ready") == 1


class TestAuditReopen:
    def test_sighup_reopens_after_rename(self, proxy_factory, pki, upstream, tmp_path):
        """After logrotate renames the file, SIGHUP makes new events go to a new file at the original path."""
        audit_path = tmp_path / "audit.log"
        rotated = tmp_path / "audit.log.1"
        proxy = start(proxy_factory, base_config(pki, rules=[inject_rule(upstream)],
                                                 audit={"sinks": [f"file:{audit_path}"]}))
        with client(proxy, pki, pki.svid(BILLING)) as s:
            get = lambda path: s.get(f"{upstream.url}{path}", timeout=10)  # noqa: E731
            assert get("/v1/one").status_code == 200
            os.rename(audit_path, rotated)
            assert get("/v1/two").status_code == 200  # still the open descriptor: the rotated file
            assert not audit_path.exists()
            proxy.send_signal(signal.SIGHUP)
            wait_for(lambda: "SIGHUP: reopening audit files" in proxy.output(), what="SIGHUP handled")
            wait_for(audit_path.exists, what="audit file recreated")
            assert get("/v1/three").status_code == 200
        assert [e["path"] for e in audit_events(rotated)] == ["/v1/one", "/v1/two"]
        assert [e["path"] for e in audit_events(audit_path)] == ["/v1/three"]
        assert oct(audit_path.stat().st_mode & 0o777) == oct(0o640)
        assert proxy.alive


# -- live configuration ----------------------------------------------------------------------


class TestReloadUnderLoad:
    def test_twenty_rewrites_never_fail_an_allowed_request(self, proxy_factory, pki, upstream):
        """20 config rewrites (some invalid) under keep-alive load: no failed request, errors counted, last good wins."""
        loop_rule = inject_rule(upstream)
        config = base_config(pki, rules=[loop_rule])
        proxy = start(proxy_factory, config)
        name = proxy.config_path.name

        def version(i: int) -> dict:
            return with_admin(proxy, base_config(pki, rules=[loop_rule, allow_rule(upstream, name=f"extra-{i}", paths=[f"/extra/{i}/**"])]))

        def invalid(i: int) -> tuple[str, str]:
            """(file text, regex of the logged error) for invalid version ``i``."""
            good = yaml.safe_dump(version(i), sort_keys=False)
            kind = i // 5 % 3
            if kind == 0:
                return good + "broken: [unclosed\n", rf"{re.escape(name)}:\d+: invalid YAML"
            cfg = version(i)
            if kind == 1:
                cfg["rules"][1]["wrkloads"] = cfg["rules"][1].pop("workloads")
                return yaml.safe_dump(cfg, sort_keys=False), rf"{re.escape(name)}:\d+ rules\[1\]\.wrkloads: unknown key"
            cfg["rules"][1] = inject_rule(upstream, name=f"extra-{i}", paths=[f"/extra/{i}/**"], credential="strpe")
            return (yaml.safe_dump(cfg, sort_keys=False),
                    rf"{re.escape(name)}:\d+ rules\[1\]\.inject\.credential: unknown credential 'strpe'")

        stop = threading.Event()
        results: list[tuple[int, bool]] = []
        failures: list[str] = []

        def load() -> None:
            deadline = time.monotonic() + 60
            with client(proxy, pki, pki.svid(BILLING)) as s:
                while not stop.is_set() and time.monotonic() < deadline:
                    try:
                        r = s.get(f"{upstream.url}/v1/charges", timeout=10)
                    except requests.RequestException as exc:
                        failures.append(type(exc).__name__)
                        continue
                    results.append((r.status_code, SECRET in r.text))
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")

        worker = threading.Thread(target=load, name="reload-load")
        worker.start()
        try:
            wait_for(lambda: len(results) >= 3, what="load running")
            before = proxy.admin.scrape()
            invalid_at = (4, 9, 14, 19)  # the last write is invalid: the one before it must stay in force
            errors_seen, expected_logs, last_valid = 0, [], None
            for i in range(20):
                if i in invalid_at:
                    # The poller coalesces writes within its 1 s tick: let the valid one land first.
                    proxy.admin.wait_config(last_valid)
                    text, pattern = invalid(i)
                    proxy.rewrite(text)
                    errors_seen += 1
                    expected_logs.append(pattern)
                    want = before.value("secretless_config_reloads_total", outcome="error") + errors_seen
                    wait_for(lambda want=want: proxy.admin.scrape().value("secretless_config_reloads_total", outcome="error") >= want,
                             what=f"invalid write {i} rejected")
                    assert proxy.admin.config_sha() == last_valid  # the last good config keeps serving
                else:
                    last_valid = proxy.rewrite(version(i))
                    time.sleep(0.3 + 0.1 * (i % 3))
                assert proxy.alive, f"the proxy exited after write {i}"
            time.sleep(0.5)
        finally:
            stop.set()
            worker.join(timeout=30)
        assert not worker.is_alive()
        assert failures == []
        assert len(results) >= 20, len(results)
        assert all(status == 200 and not leaked for status, leaked in results)
        assert auth_headers(upstream) == [[f"Bearer {SECRET}"]] * len(results)

        after = proxy.admin.scrape()
        assert after.value("secretless_config_reloads_total", outcome="error") - \
            before.value("secretless_config_reloads_total", outcome="error") == len(invalid_at)
        assert after.value("secretless_config_reloads_total", outcome="success") > \
            before.value("secretless_config_reloads_total", outcome="success")
        assert after.series("secretless_config_info") == {labels(sha256=last_valid): 1.0}
        output = proxy.output()
        for pattern in expected_logs:
            assert re.search(r"config reload rejected, still serving the previous config: " + pattern, output), pattern
        assert proxy.alive
        assert proxy.admin.get("/healthz").status_code == 200


class TestReloadChangesBehaviour:
    def test_added_rule_passes_removed_rule_denies(self, proxy_factory, pki, upstream):
        """A valid reload applies to new requests: an added rule admits a denied path, removing it denies again."""
        config = base_config(pki, rules=[inject_rule(upstream)])
        proxy = start(proxy_factory, config)
        with client(proxy, pki, pki.svid(BILLING)) as s:
            get = lambda: s.get(f"{upstream.url}/v2/refunds", timeout=10)  # noqa: E731
            refusal(get(), 403, "path")
            added = with_admin(proxy, base_config(pki, rules=[inject_rule(upstream),
                                                              inject_rule(upstream, name="refunds", paths=["/v2/**"])]))
            proxy.admin.wait_config(proxy.rewrite(added))
            assert get().status_code == 200  # same kept-alive connection, new rules
            assert auth_headers(upstream) == [[f"Bearer {SECRET}"]]
            proxy.admin.wait_config(proxy.rewrite(with_admin(proxy, config)))
            assert refusal(get(), 403, "path")["rule"] == "billing-to-api"
        assert len(upstream.requests) == 1
        assert "config reloaded" in proxy.output()
        assert proxy.admin.scrape().value("secretless_config_reloads_total", outcome="success") == 3

    def test_changed_audit_sink_takes_new_events(self, proxy_factory, pki, upstream, tmp_path):
        """A reload that changes audit.sinks sends the next events to the new sink and none to the old one."""
        first, second = tmp_path / "first.log", tmp_path / "second.log"
        config = base_config(pki, rules=[inject_rule(upstream)], audit={"sinks": [f"file:{first}"]})
        proxy = start(proxy_factory, config)
        with client(proxy, pki, pki.svid(BILLING)) as s:
            assert s.get(f"{upstream.url}/v1/one", timeout=10).status_code == 200
            moved = with_admin(proxy, {**config, "audit": {"sinks": [f"file:{second}"]}})
            proxy.admin.wait_config(proxy.rewrite(moved))
            assert s.get(f"{upstream.url}/v1/two", timeout=10).status_code == 200
        assert [e["path"] for e in audit_events(first)] == ["/v1/one"]
        assert [e["path"] for e in audit_events(second)] == ["/v1/two"]


class TestReadiness:
    def test_garbage_trust_bundle_is_degraded_not_unready(self, proxy_factory, pki, upstream, tmp_path):
        """A trust bundle file turned to garbage: the bundle loaded before keeps verifying workloads, so
        /readyz stays 200 and names trust_bundle and config under degraded (a rejected update must not
        take every replica out of the Service); secretless_ready stays 1; all clear once it is fixed."""
        bundle = tmp_path / "workload-bundle.pem"
        shutil.copyfile(pki.trust_bundle, bundle)
        good = bundle.read_bytes()
        config = base_config(pki, rules=[inject_rule(upstream)])
        config["identity"]["trust_bundle"] = str(bundle)
        proxy = start(proxy_factory, config)
        admin = proxy.admin

        def replace(data: bytes) -> None:
            tmp = bundle.with_name("bundle.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, bundle)

        assert admin.get("/readyz").status_code == 200
        assert admin.scrape().value("secretless_ready") == 1
        errors = admin.scrape().value("secretless_config_reloads_total", outcome="error")
        replace(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
        wait_for(lambda: set(admin.get("/readyz").json()["degraded"]) == {"trust_bundle", "config"},
                 what="the rejected bundle named under degraded")
        r = admin.get("/readyz")
        doc = r.json()
        assert r.status_code == 200 and doc["ready"] is True and doc["failing"] == []
        assert "the previous config serves" in doc["checks"]["config"]
        assert admin.scrape().value("secretless_ready") == 1
        assert admin.scrape().value("secretless_config_reloads_total", outcome="error") > errors  # what the alert watches
        with client(proxy, pki, pki.svid(BILLING)) as s:
            assert s.get(f"{upstream.url}/v1/x", timeout=10).status_code == 200

        replace(good)
        wait_for(lambda: admin.get("/readyz").json()["degraded"] == [], what="degraded cleared")
        assert admin.get("/readyz").json() == {"ready": True, "failing": [], "degraded": [], "checks": {
            "audit": "ok", "config": "ok", "draining": "ok", "interception_ca": "ok", "store": "ok", "trust_bundle": "ok"}}
        assert admin.get("/healthz").status_code == 200
        assert admin.scrape().value("secretless_ready") == 1


class TestRequestId:
    def test_every_response_carries_the_id_of_its_audit_event(self, proxy_factory, pki, upstream, tmp_path):
        """Forwarded and refused responses carry X-Secretless-Request-Id; refusals repeat it in body and audit."""
        audit_path = tmp_path / "audit.log"
        rules = [inject_rule(upstream), allow_rule(upstream, name="public", paths=["/public/**"])]
        proxy = start(proxy_factory, base_config(pki, rules=rules, audit={"sinks": [f"file:{audit_path}"]}))
        with client(proxy, pki, pki.svid(BILLING)) as s:
            injected = s.get(f"{upstream.url}/v1/charges", timeout=10)
            allowed = s.get(f"{upstream.url}/public/x", timeout=10)
            by_path = s.get(f"{upstream.url}/admin", timeout=10)
            by_method = s.delete(f"{upstream.url}/v1/charges", timeout=10)
        with client(proxy, pki) as s:
            no_cert = s.get(f"{upstream.url}/v1/charges", timeout=10)
        assert [r.status_code for r in (injected, allowed, by_path, by_method, no_cert)] == [200, 200, 403, 403, 407]
        ids = [r.headers.get("X-Secretless-Request-Id") for r in (injected, allowed, by_path, by_method, no_cert)]
        assert all(ids) and len(set(ids)) == len(ids), ids

        events = audit_events(audit_path)
        used = [e for e in events if e["event"] == "credential.used"]
        denied = {e["request_id"]: e for e in events if e["event"] == "request.denied"}
        assert [e["request_id"] for e in used] == [injected.headers["X-Secretless-Request-Id"]]
        for r in (by_path, by_method, no_cert):
            rid = r.headers["X-Secretless-Request-Id"]
            body = r.json()
            assert body["request_id"] == rid
            assert (denied[rid]["reason"], denied[rid]["rule"]) == (body["reason"], body["rule"])
        assert no_cert.json()["reason"] == "identity_missing"
        assert len(denied) == 3



    def test_upstream_failure_is_logged_and_audited_with_the_id(self, proxy_factory, pki, upstream, tmp_path):
        """An unreachable upstream gets the error contract (502 upstream_unreachable, with the id),
        audited as a refusal with that id and logged with the address; the credential never left,
        so no credential.used."""
        audit_path = tmp_path / "audit.log"
        dead = free_port()  # nothing listens here
        rule = {**inject_rule(upstream, name="dead-upstream"), "to": {"host": "localhost", "port": dead}}
        proxy = start(proxy_factory, base_config(pki, rules=[rule], audit={"sinks": [f"file:{audit_path}"]}))
        with client(proxy, pki, pki.svid(BILLING)) as s:
            r = s.get(f"https://localhost:{dead}/v1/x", timeout=10)
        assert r.status_code == 502
        body = r.json()
        assert (body["reason"], body["rule"]) == ("upstream_unreachable", "dead-upstream")
        rid = body["request_id"]
        assert r.headers["X-Secretless-Request-Id"] == rid
        assert SECRET not in r.text and "127.0.0.1" not in r.text and "::1" not in r.text
        denied = wait_for(lambda: [e for e in audit_events(audit_path) if e["event"] == "request.denied"],
                          what="request.denied")
        assert [(e["request_id"], e["reason"], e["rule"]) for e in denied] == [(rid, "upstream_unreachable", "dead-upstream")]
        assert not [e for e in audit_events(audit_path) if e["event"] == "credential.used"]
        wait_for(lambda: f"request {rid} to localhost:{dead}: the upstream connection failed" in proxy.output(),
                 what="log line")


class TestHostileReload:
    def test_deep_and_tagged_files_are_counted_shown_and_logged(self, proxy_factory, pki, upstream):
        """A live reload of a 1,000-level or a tagged file is counted as an error, named in /readyz with
        file:line, logged with file:line, and the previous config keeps serving."""
        proxy = start(proxy_factory, base_config(pki, rules=[inject_rule(upstream)]))
        name = proxy.config_path.name
        before = proxy.admin.scrape().value("secretless_config_reloads_total", outcome="error")
        hostile = [
            ("version: 1\nidentity: " + "[" * 1000 + "]" * 1000 + "\n",
             f"{name}:2: the document is nested more than 64 levels deep"),
            ("version: 1\nidentity: !!python/object/apply:os.system ['true']\nrules: []\n",
             f"{name}:2 identity: unsupported YAML tag '!!python/object/apply:os.system'"),
            ("version: !!bool maybe\nidentity: {}\nrules: []\n", f"{name}:1 version: 'maybe' is not a valid !!bool"),
        ]
        for n, (text, located) in enumerate(hostile, start=1):
            proxy.rewrite(text)
            wait_for(lambda n=n: proxy.admin.scrape().value("secretless_config_reloads_total", outcome="error")
                     >= before + n, what=f"hostile file {n} rejected")
            ready = proxy.admin.get("/readyz")
            assert ready.status_code == 200 and ready.json()["degraded"] == ["config"]  # the previous config serves
            assert located in ready.json()["checks"]["config"]
            assert re.search("config reload rejected, still serving the previous config: " + re.escape(located),
                             proxy.output())
            with client(proxy, pki, pki.svid(BILLING)) as s:
                assert s.get(f"{upstream.url}/v1/charges", timeout=10).status_code == 200
        assert proxy.alive
        output = proxy.output()
        assert "Traceback" not in output and "RecursionError" not in output

    def test_a_secret_pasted_into_the_config_is_never_shown(self, proxy_factory, pki, upstream):
        """A literal secret where a reference belongs (`secret: sk_live_…`, a common slip) is a rejected
        reload whose error names the key and the mistake but never the value: not in /readyz, whose
        admin listener has no authentication, nor in the log (hostile review 5.10)."""
        config = base_config(pki, rules=[inject_rule(upstream)])
        proxy = start(proxy_factory, config)
        pasted = "sk_live_51PastedByMistake0123456789abcdef"
        bad = with_admin(proxy, config)
        bad["credentials"] = {name: {**cred, "secret": pasted} for name, cred in bad["credentials"].items()}
        before = proxy.admin.scrape().value("secretless_config_reloads_total", outcome="error")
        proxy.rewrite(bad)
        wait_for(lambda: proxy.admin.scrape().value("secretless_config_reloads_total", outcome="error") > before,
                 what="the pasted secret rejected")
        ready = proxy.admin.get("/readyz").text
        assert "invalid secret reference, not a reference" in ready
        assert pasted not in ready and pasted not in proxy.output()
        assert pasted[:16] not in ready and pasted[:16] not in proxy.output()

    def test_config_replaced_by_a_fifo_never_freezes_the_proxy(self, proxy_factory, pki, upstream, tmp_path):
        """A config file swapped for a FIFO (an atomic mv) is a failed reload; the event loop never blocks on it."""
        proxy = start(proxy_factory, base_config(pki, rules=[inject_rule(upstream)]))
        before = proxy.admin.scrape().value("secretless_config_reloads_total", outcome="error")
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        os.replace(fifo, proxy.config_path)
        wait_for(lambda: proxy.admin.scrape().value("secretless_config_reloads_total", outcome="error") > before,
                 what="the FIFO reload rejected")
        assert proxy.admin.get("/healthz").status_code == 200
        assert "is not a regular file (a FIFO)" in proxy.admin.get("/readyz").json()["checks"]["config"]
        with client(proxy, pki, pki.svid(BILLING)) as s:
            assert s.get(f"{upstream.url}/v1/charges", timeout=10).status_code == 200
        assert proxy.alive and "Traceback" not in proxy.output()



class TestConfigMapVolume:
    """The config as the kubelet mounts a ConfigMap directory (helpers/kubelet.py), updated by symlink swap."""

    def _start(self, proxy_factory, volume: KubeletVolume, port: int) -> Proxy:
        p = proxy_factory({}, config_file=volume.path("config.yaml"))
        return Proxy(proc=p, admin=Admin(f"http://127.0.0.1:{port}"), config_path=volume.path("config.yaml"))

    def test_kubelet_symlink_swap_reloads(self, proxy_factory, pki, upstream, tmp_path):
        """A ConfigMap update (new ..<timestamp> dir, ..data renamed onto it, old dir removed) is
        reloaded: the added rule admits, and the next swap removes it again."""
        port = free_port()

        def files(rules: list[dict]) -> dict[str, str]:
            cfg = base_config(pki, rules=rules, admin={"listen": f"127.0.0.1:{port}"})
            return {"config.yaml": yaml.safe_dump(cfg, sort_keys=False)}

        volume = KubeletVolume(tmp_path / "configmap", files([inject_rule(upstream)]))
        proxy = self._start(proxy_factory, volume, port)
        with client(proxy, pki, pki.svid(BILLING)) as s:
            get = lambda: s.get(f"{upstream.url}/v2/refunds", timeout=10)  # noqa: E731
            refusal(get(), 403, "path")
            added = files([inject_rule(upstream), inject_rule(upstream, name="refunds", paths=["/v2/**"])])
            volume.update(added)
            proxy.admin.wait_config(hashlib.sha256(added["config.yaml"].encode()).hexdigest())
            assert get().status_code == 200
            again = files([inject_rule(upstream)])
            volume.update(again)
            proxy.admin.wait_config(hashlib.sha256(again["config.yaml"].encode()).hexdigest())
            assert refusal(get(), 403, "path")["rule"] == "billing-to-api"
        assert proxy.output().count("config reloaded") == 2
        assert proxy.admin.scrape().value("secretless_config_reloads_total", outcome="success") == 3

    def test_rejected_update_keeps_relative_files_readable(self, proxy_factory, pki, upstream, tmp_path):
        """After a rejected update the previous config still serves, and its relative file: reference
        (a key beside config.yaml, as in a projected volume) reads through ..data, not the removed version."""
        port = free_port()
        cfg = base_config(pki, rules=[inject_rule(upstream)], admin={"listen": f"127.0.0.1:{port}"},
                          credentials={"stripe": {"kind": "static", "secret": "file:stripe-key"}})
        good = {"config.yaml": yaml.safe_dump(cfg, sort_keys=False), "stripe-key": SECRET + "\n"}
        volume = KubeletVolume(tmp_path / "projected", good)
        proxy = self._start(proxy_factory, volume, port)
        volume.update({**good, "config.yaml": "version: 1\nrules: [}\n"})
        wait_for(lambda: proxy.admin.scrape().value("secretless_config_reloads_total", outcome="error") >= 1,
                 what="the broken update rejected")
        with client(proxy, pki, pki.svid(BILLING)) as s:
            r = s.get(f"{upstream.url}/v1/charges", timeout=10)
        assert r.status_code == 200, r.text
        assert auth_headers(upstream) == [[f"Bearer {SECRET}"]]
