"""deploy/: alert rules (promtool), the Grafana dashboard, Kubernetes and systemd examples.

The dashboard and the rules may only name metrics that a fresh ``Metrics`` registry exposes, and
their PromQL must parse and return data from a real Prometheus scraping a real admin listener.
promtool and prometheus come from the Debian package ``prometheus``; tests that need them skip
with that reason when they are missing (CI installs the package).
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import yaml
from helpers.net import free_port
from helpers.proxy import Pki
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from secretless_proxy.admin.health import AdminServer
from secretless_proxy.cli import build_parser
from secretless_proxy.config.parse import load_config
from secretless_proxy.metrics import Metrics

DEPLOY = Path(__file__).parents[1] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yaml"
DASHBOARD = DEPLOY / "grafana" / "secretless-proxy.json"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "secretless-proxy.service"
METRIC = re.compile(r"\bsecretless_[a-z0-9_]+")
PACKAGE = "the Debian/Ubuntu package 'prometheus'"
# Grafana's variables, as Grafana would substitute them.
GRAFANA_VARS = {"$__rate_interval": "10s", "$job": ".*", "$instance": ".*"}


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (install {PACKAGE}; CI does)")
    return path


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", ())]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    return exprs


def grafana(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def exposed_names() -> set[str]:
    """Every sample name a fresh registry can expose, from its exposition's families and types."""
    registry = CollectorRegistry()
    Metrics(registry)
    text = generate_latest(registry).decode()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}
    return {f.name + s for f in text_string_to_metric_families(text) for s in suffixes.get(f.type, ("",))}


@pytest.mark.slow  # runs an external checker (promtool, kubectl, systemd-analyze)
class TestAlertRules:
    def test_promtool_check(self) -> None:
        """promtool accepts the alert rules."""
        promtool = need("promtool")
        out = subprocess.run([promtool, "check", "rules", str(ALERTS)], check=False, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr

    def test_promtool_unit_tests(self) -> None:
        """The alerts fire (and stay quiet) as alerts_test.yaml expects."""
        promtool = need("promtool")
        out = subprocess.run([promtool, "test", "rules", str(ALERT_TESTS)], check=False, capture_output=True, text=True,
                             timeout=120, cwd=ALERT_TESTS.parent)
        assert out.returncode == 0, out.stdout + out.stderr

    def test_names_exist(self) -> None:
        """Every secretless_* metric an alert uses is exposed by Metrics."""
        known = exposed_names()
        used = {m for r in alert_rules() for m in METRIC.findall(r["expr"])}
        assert used, "no secretless_* metric found in the alert rules"
        assert used <= known, f"unknown metrics in alerts.yaml: {sorted(used - known)}"

    def test_required_alerts_present(self) -> None:
        """The alerts the runbook relies on exist, each with a severity and a summary."""
        rules = {r["alert"]: r for r in alert_rules()}
        assert {"SecretlessCredentialFetchFailing", "SecretlessCredentialExpiringNotRefreshed",
                "SecretlessRefusalSpike", "SecretlessConfigReloadFailing", "SecretlessNotReady"} <= set(rules)
        for name, rule in rules.items():
            assert rule["labels"]["severity"] in ("warning", "critical"), name
            assert rule["annotations"]["summary"], name


@pytest.mark.slow  # runs an external checker (promtool, kubectl, systemd-analyze)
class TestDashboard:
    def test_names_exist(self) -> None:
        """Every secretless_* metric the dashboard queries is exposed by Metrics."""
        known = exposed_names()
        used = {m for e in dashboard_exprs() for m in METRIC.findall(e)}
        assert used <= known, f"unknown metrics in the dashboard: {sorted(used - known)}"

    def test_covers_the_issue(self) -> None:
        """The dashboard shows decisions, overhead quantiles, refusals, fetches, expiry, revocations, reloads."""
        exprs = "\n".join(dashboard_exprs())
        for needle in ("sum by (decision) (rate(secretless_requests_total",
                       "histogram_quantile(0.5, sum by (le) (rate(secretless_request_overhead_seconds_bucket",
                       "histogram_quantile(0.99, sum by (le) (rate(secretless_request_overhead_seconds_bucket",
                       "secretless_denied_total", 'outcome!="success"', "secretless_credential_fetch_seconds_bucket",
                       "secretless_credential_expiry_timestamp_seconds", "secretless_revocations_total",
                       "secretless_config_reloads_total"):
            assert needle in exprs, needle

    def test_well_formed(self) -> None:
        """Panel ids are unique and every query uses the datasource variable and the job filter."""
        dash = json.loads(DASHBOARD.read_text())
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids))
        assert dash["uid"] == "secretless-proxy"
        for p in dash["panels"]:
            for t in p.get("targets", ()):
                assert t["datasource"]["uid"] == "${datasource}"
                assert 'job=~"$job"' in t["expr"], t["expr"]

    def test_promql_parses(self, tmp_path: Path) -> None:
        """Every dashboard query is valid PromQL (checked by promtool as recording rules)."""
        promtool = need("promtool")
        rules = {"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:query{i}", "expr": grafana(e)} for i, e in enumerate(dashboard_exprs())]}]}
        path = tmp_path / "dashboard-rules.yaml"
        path.write_text(yaml.safe_dump(rules))
        out = subprocess.run([promtool, "check", "rules", str(path)], check=False, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


# -- a real Prometheus scraping a real admin listener ------------------------------------------


def traffic(m: Metrics, now: float) -> None:
    """One round of every kind of event, so each rate() and increase() has something to show."""
    for decision in ("allowed", "injected", "denied", "error"):
        m.request_done(rule="billing", decision=decision, overhead_seconds=0.0003)
    m.request_denied("no_rule")
    m.credential_fetched(credential="payments", kind="oauth2_client_credentials", outcome="success", seconds=0.05)
    m.credential_fetched(credential="payments", kind="oauth2_client_credentials", outcome="error", seconds=5.0)
    for result in ("hit", "miss", "refresh"):
        m.cache_lookup(credential="payments", result=result)
    m.credential_cached(credential="payments", scope="", expires_at=now + 600)
    m.credential_cached(credential="old", scope="", expires_at=now + 600)
    m.credential_revoked(credential="old", scope="", reason="expired")
    m.cert_rejected("identity_untrusted")
    m.config_loaded("ab" * 32)
    m.config_reload_failed()
    m.audit_write_failed("stdout")
    m.breaker_changed(credential="payments", failing=1)
    m.backed_off(credential="payments")


@pytest_asyncio.fixture(scope="class", loop_scope="class")
async def scraped(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A Prometheus (0.5 s scrape interval) scraping a live AdminServer with steady traffic; yields its URL."""
    prometheus = need("prometheus")
    tmp_path = tmp_path_factory.mktemp("prometheus")
    metrics = Metrics(CollectorRegistry())
    admin = AdminServer("127.0.0.1", 0, metrics=metrics, readiness=lambda: {"config": None})
    host, port = await admin.start()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "500ms", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "secretless-proxy", "static_configs": [{"targets": [f"{host}:{port}"]}]}],
    }))
    web = f"127.0.0.1:{free_port()}"
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            prometheus, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={web}", stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    stop = asyncio.Event()

    async def generate() -> None:
        while not stop.is_set():
            traffic(metrics, time.time())
            await asyncio.sleep(0.25)

    gen = asyncio.create_task(generate())
    url = f"http://{web}"
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            deadline = time.monotonic() + 60
            while True:  # ready once Prometheus holds several scrapes of our target
                assert proc.returncode is None, (tmp_path / "prometheus.log").read_text()
                assert time.monotonic() < deadline, "Prometheus did not scrape the admin listener in time"
                try:
                    r = await client.get(f"{url}/api/v1/query",
                                         params={"query": "count_over_time(secretless_ready[1m])"})
                    result = r.json()["data"]["result"] if r.status_code == 200 else []
                    if result and float(result[0]["value"][1]) >= 5:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.5)
        yield url
    finally:
        stop.set()
        await gen
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await admin.close()


async def query(url: str, expr: str) -> list[dict]:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"{url}/api/v1/query", params={"query": expr})
    body = r.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


@pytest.mark.asyncio(loop_scope="class")
@pytest.mark.e2e  # a real Prometheus server scrapes a real proxy
class TestWithPrometheus:
    async def test_dashboard_queries_return_data(self, scraped: str) -> None:
        """Every dashboard query, run by a real Prometheus against a real admin listener, returns series."""
        empty = [e for e in dashboard_exprs() if not await query(scraped, grafana(e))]
        assert not empty, f"dashboard queries without data: {empty}"

    async def test_alert_expressions_evaluate(self, scraped: str) -> None:
        """Every alert expression evaluates without error on real data."""
        for rule in alert_rules():
            await query(scraped, rule["expr"])

    async def test_fetch_failure_expression_sees_errors(self, scraped: str) -> None:
        """The fetch-errors query sees the failing credential by name, not by host or workload."""
        result = await query(scraped, 'sum by (credential, outcome) (rate(secretless_credential_fetch_total{outcome!="success"}[10s]))')
        assert [r["metric"] for r in result] == [{"credential": "payments", "outcome": "error"}]


# -- Kubernetes and systemd examples -----------------------------------------------------------


def k8s_docs() -> list[dict]:
    return [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def k8s(kind: str) -> dict:
    (doc,) = [d for d in k8s_docs() if d["kind"] == kind]
    return doc


@pytest.fixture
def k8s_config() -> dict:
    return yaml.safe_load(k8s("ConfigMap")["data"]["config.yaml"])


@pytest.mark.slow  # runs an external checker (promtool, kubectl, systemd-analyze)
class TestKubernetes:
    def test_config_is_valid(self, k8s_config: dict, pki: Pki, tmp_path: Path) -> None:
        """The ConfigMap's config passes the real config loader (files pointed at test fixtures)."""
        k8s_config["identity"]["trust_bundle"] = str(pki.trust_bundle)
        k8s_config["interception_ca"] = str(tmp_path / "interception")
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(k8s_config))
        cfg = load_config(path, resolve_secrets=False)
        assert cfg.admin_listen is not None and cfg.listen is not None
        assert cfg.admin_listen[1] != cfg.listen[1]

    def test_probes_and_scrape_use_the_admin_port(self, k8s_config: dict) -> None:
        """Probes hit /healthz and /readyz and Prometheus scrapes the port admin.listen names."""
        admin_port = int(k8s_config["admin"]["listen"].rsplit(":", 1)[1])
        proxy_port = int(k8s_config["listen"].rsplit(":", 1)[1])
        pod = k8s("Deployment")["spec"]["template"]
        (c,) = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"proxy": proxy_port, "admin": admin_port}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(admin_port)

    def test_service_exposes_proxy_port_only(self) -> None:
        """Workloads reach the proxy through the Service, never the admin listener."""
        assert [p["targetPort"] for p in k8s("Service")["spec"]["ports"]] == ["proxy"]

    def test_secrets_are_files_not_values(self, k8s_config: dict) -> None:
        """Every secret in the example config is a file: reference into the mounted Secret."""
        refs = [v["secret"] if "secret" in v else v.get("client_secret") for v in k8s_config["credentials"].values()]
        refs.append(k8s_config["audit"]["fingerprint_key"])
        assert all(r.startswith("file:/etc/secretless/secrets/") for r in refs), refs

    def test_mounts_match_config_paths(self, k8s_config: dict) -> None:
        """Every path the config names is under a volume the container mounts."""
        (c,) = k8s("Deployment")["spec"]["template"]["spec"]["containers"]
        mounts = [m["mountPath"] for m in c["volumeMounts"]]
        paths = [k8s_config["identity"]["trust_bundle"], k8s_config["interception_ca"] + "/x"]
        paths += [r[5:] for r in yaml.safe_dump(k8s_config).split() if r.startswith("file:/")]
        for p in paths:
            assert any(p.startswith(m.rstrip("/") + "/") for m in mounts), p
        assert c["args"][:3] == ["run", "--config", "/etc/secretless/config.yaml"]

    def test_grace_period_outlasts_the_drain(self, k8s_config: dict) -> None:
        """terminationGracePeriodSeconds covers preStop, limits.drain_seconds and the revocation timeout."""
        pod = k8s("Deployment")["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        budget = float(pre_stop[1]) + k8s_config["limits"]["drain_seconds"] + k8s_config["broker"]["timeout_seconds"]
        assert pod["terminationGracePeriodSeconds"] > budget

    def test_kustomize_renders(self) -> None:
        """kubectl kustomize renders the example (skipped without kubectl)."""
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            pytest.skip("kubectl is not installed")
        out = subprocess.run([kubectl, "kustomize", str(K8S)], check=False, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        kinds = sorted(d["kind"] for d in yaml.safe_load_all(out.stdout) if d)
        assert kinds == ["ConfigMap", "Deployment", "Namespace", "Service"]


@pytest.mark.slow  # runs an external checker (promtool, kubectl, systemd-analyze)
class TestSystemd:
    def test_exec_start_parses(self) -> None:
        """ExecStart is a command line the CLI accepts."""
        (line,) = [ln for ln in UNIT.read_text().splitlines() if ln.startswith("ExecStart=")]
        argv = shlex.split(line.removeprefix("ExecStart="))
        assert argv[0].endswith("/secretless-proxy")
        args = build_parser().parse_args(argv[1:])
        assert (args.command, args.config) == ("run", "/etc/secretless/config.yaml")

    def test_stop_timeout_outlasts_the_drain(self) -> None:
        """TimeoutStopSec is longer than the default limits.drain_seconds, and core files are off."""
        from secretless_proxy.config.model import LimitsConfig

        lines = UNIT.read_text().splitlines()
        (stop,) = [x for x in lines if x.startswith("TimeoutStopSec=")]
        assert float(stop.removeprefix("TimeoutStopSec=").removesuffix("s")) > LimitsConfig().drain_seconds + 5
        assert "LimitCORE=0" in lines

    def test_systemd_analyze_verify(self, tmp_path: Path) -> None:
        """systemd-analyze verify finds nothing wrong but the binary's install path (skipped without it)."""
        tool = shutil.which("systemd-analyze")
        if tool is None:
            pytest.skip("systemd-analyze is not installed")
        unit = tmp_path / UNIT.name
        unit.write_text(UNIT.read_text().replace("/opt/secretless-proxy/bin/secretless-proxy", "/bin/true"))
        out = subprocess.run([tool, "verify", str(unit)], check=False, capture_output=True, text=True, timeout=60)
        problems = [ln for ln in (out.stdout + out.stderr).splitlines() if UNIT.name in ln]
        assert not problems, problems
