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
from helpers import kustomize
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
SCRAPE = DEPLOY / "prometheus" / "scrape.yaml"
RUNBOOK = Path(__file__).parents[1] / "docs" / "runbook.md"
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


def scrape_job() -> dict:
    (job,) = yaml.safe_load(SCRAPE.read_text())["scrape_configs"]
    return job


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings: lower case, punctuation dropped, spaces to '-'."""
    heads = [line.lstrip("#").strip() for line in markdown.splitlines() if re.match(r"#{1,6} ", line)]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def relabel(rules: list[dict], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus' relabeling for the actions scrape.yaml uses (keep, replace); None when dropped."""
    labels = dict(labels)
    for r in rules:
        value = r.get("separator", ";").join(labels.get(n, "") for n in r.get("source_labels", []))
        m = re.fullmatch(r.get("regex", "(.*)"), value)
        action = r.get("action", "replace")
        if action == "keep":
            if m is None:
                return None
        elif action == "replace":
            if m is not None:
                labels[r["target_label"]] = m.expand(r.get("replacement", "$1").replace("$1", "\\1"))
        else:
            raise ValueError(f"relabel action {action} is not implemented here")
    return labels


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

    def test_every_alert_has_a_runbook(self) -> None:
        """Every alert's runbook_url points at docs/runbook.md and at an anchor one of its headings makes."""
        anchors = github_anchors(RUNBOOK.read_text())
        for rule in alert_rules():
            url = rule["annotations"].get("runbook_url", "")
            page, _, anchor = url.partition("#")
            assert page.endswith("/docs/runbook.md"), (rule["alert"], url)
            assert anchor == rule["alert"].lower() and anchor in anchors, (rule["alert"], url)

    def test_up_job_is_the_scrape_job(self) -> None:
        """The alerts' `up{job=...}` names the job deploy/prometheus/scrape.yaml defines."""
        jobs = {m for r in alert_rules() for m in re.findall(r'\bup\{job="([^"]+)"', r["expr"])}
        assert jobs == {scrape_job()["job_name"]}

    def test_scrape_job_keeps_the_admin_port_only(self) -> None:
        """scrape.yaml's relabeling keeps the proxy pods' admin port and drops the proxy port and other pods."""
        job = scrape_job()
        assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["secretless"]}}]
        objects = kustomize.render(K8S / "base")
        (deployment,) = [d for d in objects if d["kind"] == "Deployment"]
        pod = deployment["spec"]["template"]
        kept = {}
        for name, labels in (("secretless-proxy-0", pod["metadata"]["labels"]), ("other-0", {"app.kubernetes.io/name": "other"})):
            for c in pod["spec"]["containers"]:
                for port in c["ports"]:
                    meta = {f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v for k, v in labels.items()}
                    meta |= {"__meta_kubernetes_pod_container_port_name": port["name"],
                             "__meta_kubernetes_pod_name": name, "__meta_kubernetes_namespace": "secretless",
                             "__address__": f"10.0.0.1:{port['containerPort']}"}
                    out = relabel(job["relabel_configs"], meta)
                    if out is not None:
                        kept[out["__address__"]] = out["instance"]
        admin = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
        (admin_port,) = [p["containerPort"] for p in admin if p["name"] == "admin"]
        assert kept == {f"10.0.0.1:{admin_port}": "secretless-proxy-0"}

    def test_promtool_checks_the_scrape_config(self) -> None:
        """promtool accepts scrape.yaml (skipped where promtool was built without Kubernetes discovery, as Debian's is)."""
        promtool = need("promtool")
        out = subprocess.run([promtool, "check", "config", str(SCRAPE)], check=False, capture_output=True, text=True, timeout=60)
        if "field kubernetes_sd_configs not found" in out.stdout + out.stderr:
            pytest.skip("this promtool has no Kubernetes service discovery (Debian builds it without)")
        assert out.returncode == 0, out.stdout + out.stderr


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
        "scrape_configs": [{"job_name": scrape_job()["job_name"], "static_configs": [{"targets": [f"{host}:{port}"]}]}],
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


KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/prod"]
# The Kubernetes release whose OpenAPI schemas the manifests are checked against (kubernetes-validate
# ships them); the oldest the example supports would do as well, these are the ones it targets.
K8S_VERSION = "1.32"
DNS, HTTPS, REDIS = {("UDP", 53), ("TCP", 53)}, ("TCP", 443), ("TCP", 6379)


def rendered(name: str) -> list[dict]:
    return kustomize.render(K8S / name)


def pick(objects: list[dict], kind: str, name: str = "secretless-proxy") -> dict:
    (doc,) = [d for d in objects if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def config_of(objects: list[dict]) -> dict:
    return yaml.safe_load(pick(objects, "ConfigMap")["data"]["config.yaml"])


def pod_of(objects: list[dict]) -> dict:
    return pick(objects, "Deployment")["spec"]["template"]


def proxy_container(objects: list[dict]) -> dict:
    (c,) = pod_of(objects)["spec"]["containers"]
    return c


def selects(selector: dict, labels: dict) -> bool:
    """A label selector with matchLabels only (all ours use) against an object's labels."""
    assert set(selector) <= {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def policies_of(objects: list[dict]) -> list[dict]:
    pod_labels = pod_of(objects)["metadata"]["labels"]
    return [d["spec"] for d in objects if d["kind"] == "NetworkPolicy" and selects(d["spec"]["podSelector"], pod_labels)]


def policy_port(port: dict, container: dict) -> tuple[str, int]:
    """(protocol, number) of a NetworkPolicy port, a named one looked up in the proxy container."""
    number = port["port"]
    if isinstance(number, str):
        (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == number]
    return port.get("protocol", "TCP"), number


def file_refs(config: dict) -> list[str]:
    return [t[5:] for t in yaml.safe_dump(config, width=1000).split() if t.startswith("file:/")]


@pytest.fixture(params=KUSTOMIZATIONS)
def manifests(request: pytest.FixtureRequest) -> list[dict]:
    """The rendered objects of the base and of each overlay (helpers/kustomize.py)."""
    return rendered(request.param)


class TestKubernetes:
    def test_renders(self) -> None:
        """The base and both overlays render to the same kinds; dev runs one replica, prod three with Redis egress."""
        kinds = ["ConfigMap", "Deployment", "Namespace", "NetworkPolicy", "PodDisruptionBudget", "Service"]
        assert sorted(d["kind"] for d in rendered("base")) == kinds
        assert sorted(d["kind"] for d in rendered("overlays/dev")) == kinds
        assert sorted(d["kind"] for d in rendered("overlays/prod")) == sorted([*kinds, "NetworkPolicy"])
        replicas = {k: pick(rendered(k), "Deployment")["spec"]["replicas"] for k in KUSTOMIZATIONS}
        assert replicas == {"base": 2, "overlays/dev": 1, "overlays/prod": 3}

    def test_config_is_valid(self, manifests: list[dict], pki: Pki, tmp_path: Path) -> None:
        """The ConfigMap's config passes the real config loader (files pointed at test fixtures)."""
        config = config_of(manifests)
        config["identity"]["trust_bundle"] = str(pki.trust_bundle)
        config["interception_ca"] = str(tmp_path / "interception")
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        cfg = load_config(path, resolve_secrets=False)
        assert cfg.admin_listen is not None and cfg.listen is not None
        assert cfg.admin_listen[1] != cfg.listen[1]

    def test_probes_use_the_admin_port(self, manifests: list[dict]) -> None:
        """The container ports are the config's listen and admin.listen; probes hit /healthz and /readyz on admin."""
        config = config_of(manifests)
        c = proxy_container(manifests)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"proxy": int(config["listen"].rsplit(":", 1)[1]),
                         "admin": int(config["admin"]["listen"].rsplit(":", 1)[1])}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}

    def test_service_exposes_proxy_port_only(self, manifests: list[dict]) -> None:
        """Workloads reach the proxy through the Service, never the admin listener."""
        assert [p["targetPort"] for p in pick(manifests, "Service")["spec"]["ports"]] == ["proxy"]

    def test_secrets_are_files_from_secret_volumes(self, manifests: list[dict]) -> None:
        """Every secret the config names is a file: reference into a mounted Secret, never a value."""
        config = config_of(manifests)
        refs = [v["secret"] if "secret" in v else v["client_secret"] for v in config["credentials"].values()]
        refs.append(config["audit"]["fingerprint_key"])
        if isinstance(config["store"], dict):
            refs += [*config["store"]["encryption_keys"].values(), config["store"]["password"]]
        volumes = {v["name"]: v for v in pod_of(manifests)["spec"]["volumes"]}
        secret_mounts = [m["mountPath"] for m in proxy_container(manifests)["volumeMounts"] if "secret" in volumes[m["name"]]]
        for ref in refs:
            assert ref.startswith("file:/"), ref
            assert any(ref[5:].startswith(m + "/") for m in secret_mounts), ref

    def test_mounts_match_config_paths(self, manifests: list[dict]) -> None:
        """Every path the config names is under a volume the container mounts."""
        config = config_of(manifests)
        mounts = [m["mountPath"] for m in proxy_container(manifests)["volumeMounts"]]
        for p in [config["identity"]["trust_bundle"], config["interception_ca"] + "/x", *file_refs(config)]:
            assert any(p.startswith(m.rstrip("/") + "/") for m in mounts), p

    def test_config_is_a_directory_mount(self, manifests: list[dict]) -> None:
        """--config names a key of the ConfigMap inside a whole-directory mount: no subPath, so updates arrive."""
        c = proxy_container(manifests)
        pod = pod_of(manifests)["spec"]
        assert all("subPath" not in m and "subPathExpr" not in m for x in pod["containers"] + pod["initContainers"]
                   for m in x["volumeMounts"])
        assert c["args"][:2] == ["run", "--config"]
        config_path = Path(c["args"][2])
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["configMap"]["name"] == "secretless-proxy"
        assert config_path.name in pick(manifests, "ConfigMap")["data"]

    def test_grace_period_matches_the_drain(self, manifests: list[dict]) -> None:
        """terminationGracePeriodSeconds covers preStop + limits.drain_seconds + the revocation timeout, with
        at most 10 s to spare (a longer one only delays rollouts)."""
        from secretless_proxy.config.model import BrokerConfig, LimitsConfig

        config = config_of(manifests)
        pod = pod_of(manifests)["spec"]
        pre_stop = proxy_container(manifests)["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        drain = config.get("limits", {}).get("drain_seconds", LimitsConfig().drain_seconds)
        revoke = config.get("broker", {}).get("timeout_seconds", BrokerConfig().timeout)
        budget = float(pre_stop[1]) + drain + revoke
        assert budget < pod["terminationGracePeriodSeconds"] <= budget + 10, (budget, pod["terminationGracePeriodSeconds"])

    def test_ingress_only_from_clients_and_monitoring(self, manifests: list[dict]) -> None:
        """The proxy port admits labelled client namespaces or pods only; the admin port the monitoring namespace only."""
        c = proxy_container(manifests)
        ingress: dict[tuple[str, int], list[dict]] = {}
        for spec in policies_of(manifests):
            if "Ingress" in spec["policyTypes"]:
                for rule in spec.get("ingress", []):
                    assert rule.get("ports") and rule.get("from"), f"an ingress rule open to all: {rule}"
                    for port in rule["ports"]:
                        ingress.setdefault(policy_port(port, c), []).extend(rule["from"])
        ports = {p["name"]: ("TCP", p["containerPort"]) for p in c["ports"]}
        client = {"matchLabels": {"secretless-proxy/client": "true"}}
        assert ingress == {
            ports["proxy"]: [{"namespaceSelector": client}, {"namespaceSelector": {}, "podSelector": client}],
            ports["admin"]: [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        }

    def test_egress_only_dns_https_and_redis(self, manifests: list[dict]) -> None:
        """The pods may open DNS and 443 anywhere, and Redis only where the config has a Redis store."""
        c = proxy_container(manifests)
        egress = set()
        for spec in policies_of(manifests):
            assert "Egress" in spec["policyTypes"]
            for rule in spec.get("egress", []):
                assert rule.get("ports"), f"an egress rule open to every port: {rule}"
                egress |= {policy_port(p, c) for p in rule["ports"]}
        store = config_of(manifests)["store"]
        redis = isinstance(store, dict) and store["url"].startswith("redis://")
        assert egress == DNS | {HTTPS} | ({REDIS} if redis else set())
        if redis:
            assert store["url"].split("/")[2].endswith(":6379")

    def test_replicas_spread_and_disruption_budget(self, manifests: list[dict]) -> None:
        """Replicas spread over nodes (hard) and zones (soft); a PodDisruptionBudget evicts one at a time."""
        labels = pod_of(manifests)["metadata"]["labels"]
        spread = pod_of(manifests)["spec"]["topologySpreadConstraints"]
        assert {(t["topologyKey"], t["whenUnsatisfiable"]) for t in spread} == {
            ("kubernetes.io/hostname", "DoNotSchedule"), ("topology.kubernetes.io/zone", "ScheduleAnyway")}
        assert all(t["maxSkew"] == 1 and selects(t["labelSelector"], labels) for t in spread)
        pdb = pick(manifests, "PodDisruptionBudget")["spec"]
        assert pdb["maxUnavailable"] == 1 and selects(pdb["selector"], labels)

    def test_overlays_change_only_the_store(self) -> None:
        """dev runs the base config; prod the same config with a Redis store whose secrets come from secretless-store."""
        base = config_of(rendered("base"))
        assert config_of(rendered("overlays/dev")) == base
        prod_objects = rendered("overlays/prod")
        prod = config_of(prod_objects)
        assert base.pop("store") == "memory://"
        store = prod.pop("store")
        assert prod == base
        assert store["url"].startswith("redis://")
        volumes = {v["name"]: v for v in pod_of(prod_objects)["spec"]["volumes"]}
        (mount,) = [m for m in proxy_container(prod_objects)["volumeMounts"] if m["name"] == "store"]
        assert volumes["store"]["secret"]["secretName"] == "secretless-store"
        assert all(r.startswith(f"file:{mount['mountPath']}/") for r in [*store["encryption_keys"].values(), store["password"]])

    @pytest.mark.parametrize("source", [*KUSTOMIZATIONS, "examples/client.yaml"])
    def test_openapi_schemas(self, source: str) -> None:
        """Every object, rendered, passes kubernetes-validate's strict OpenAPI schema check (unknown fields fail)."""
        import kubernetes_validate

        path = K8S / source
        objects = rendered(source) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert objects
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{source}: {obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")

    def test_client_example(self) -> None:
        """The client pod's namespace is admitted by the policy, its SVID's SPIFFE ID is one the rules name,
        and it reaches the proxy's Service with HTTPS_PROXY and trusts a mounted CA file."""
        objects = [d for d in yaml.safe_load_all((K8S / "examples" / "client.yaml").read_text()) if d]
        base = rendered("base")
        (app,) = [d for d in objects if d["kind"] == "Deployment"]
        ns = app["metadata"]["namespace"]
        (namespace,) = [d for d in objects if d["kind"] == "Namespace" and d["metadata"]["name"] == ns]
        assert namespace["metadata"]["labels"]["secretless-proxy/client"] == "true"
        pod = app["spec"]["template"]["spec"]
        spiffe_id = f"spiffe://example.org/ns/{ns}/sa/{pod['serviceAccountName']}"
        assert any(spiffe_id in r["workloads"] for r in config_of(base)["rules"]), spiffe_id
        (c,) = pod["containers"]
        env = {e["name"]: e["value"] for e in c["env"]}
        svc = pick(base, "Service")
        proxy_url = f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc:{svc['spec']['ports'][0]['port']}"
        assert env["HTTPS_PROXY"] == env["https_proxy"] == proxy_url
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            assert Path(env[var]).parent == Path(mounts["interception-ca"]), var
        assert "configMap" in volumes["interception-ca"]  # the public certificate: never the CA's Secret
        assert volumes["spiffe"]["csi"]["driver"] in ("spiffe.csi.cert-manager.io", "csi.spiffe.io")
        command = " ".join(c["args"])
        assert f"--cert {mounts['spiffe']}/tls.crt --key {mounts['spiffe']}/tls.key" in command

    @pytest.mark.slow  # runs an external checker (kubectl)
    def test_kubectl_kustomize_agrees(self) -> None:
        """kubectl kustomize renders each kustomization as helpers/kustomize.py does (skipped without kubectl)."""
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            pytest.skip("kubectl is not installed")
        for name in KUSTOMIZATIONS:
            out = subprocess.run([kubectl, "kustomize", str(K8S / name)], check=False, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
            assert sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=key) == sorted(rendered(name), key=key)


@pytest.mark.slow  # runs an external checker (promtool, kubectl, systemd-analyze)
class TestSystemd:
    def test_exec_start_parses(self) -> None:
        """ExecStart is a command line the CLI accepts."""
        (line,) = [x for x in UNIT.read_text().splitlines() if x.startswith("ExecStart=")]
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
        problems = [x for x in (out.stdout + out.stderr).splitlines() if UNIT.name in x]
        assert not problems, problems
