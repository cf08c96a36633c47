"""End to end: several proxy replicas sharing one real redis-server (credential cache, grants, revocations).

Each test starts its own redis-server on a free loopback port and two or three
``secretless-proxy run`` processes pointing at it, each with its own admin listener (metrics,
readiness) and mTLS admin API. Clients are requests/httpx with workload and admin certificates
and the real admin CLI; the OAuth2 provider is the test IdP, which counts its token calls. Fault
tests kill Redis with SIGKILL and restart it empty on the same port.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from helpers.e2e_broker import TimedIdP, metric
from helpers.e2e_replicas import (
    ADMIN,
    BILLING,
    PREFIX,
    Admin,
    Cert,
    Replica,
    audit_events,
    cli,
    dump_redis,
    find_grant_directly,
    iter_needles,
    percentile,
    put_grant_directly,
    redis_client,
    restore_keys,
    snapshot_keys,
    started_replica,
)
from helpers.net import free_port, wait_for
from helpers.proxy import LOOPBACK_NETS, SECRET, Pki
from helpers.redis_server import RedisServer

from secretless_proxy.dev import certs
from secretless_proxy.store.sealing import Sealer

CLIENT_SECRET = "cs-" + secrets.token_urlsafe(18)
STORE_KEY = secrets.token_hex(32)  # AES-256, 64 hex digits: what every replica seals with
ENV = {"TEST_CLIENT_SECRET": CLIENT_SECRET, "SECRETLESS_STORE_KEY": STORE_KEY}
CONTRACT = {"error", "reason", "rule", "request_id"}
REPORT = Path(tempfile.gettempdir()) / "secretless-revocation-propagation.json"


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ids(pki: Pki) -> dict[str, Cert]:
    return {"admin": pki.svid(ADMIN), "billing": pki.svid(BILLING)}


@pytest.fixture
def idp(pki: Pki) -> Iterator[TimedIdP]:
    with TimedIdP(server_cert=certs.make_server_cert(ca=pki.upstream_ca), clients={"billing": CLIENT_SECRET}) as server:
        yield server
    assert not server.errors, server.errors[0]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def fleet_config(pki: Pki, upstream: Any, idp: TimedIdP, redis_url: str, *, audit_file: Path | None = None,
                 store: dict[str, Any] | None = None) -> dict:
    """Every replica runs this config; only the audit file differs. Rules are told apart by path.
    ``store`` adds settings to the store section (e.g. grant_cache_seconds)."""

    def rule(name: str, path: str, credential: str, **extra: Any) -> dict:
        return {"name": name, "workloads": [BILLING],
                "to": {"host": "localhost", "port": upstream.port, "paths": [f"/{path}/**"]},
                "inject": {"credential": credential, "header": "Authorization", "format": "Bearer {secret}"}, **extra}

    config = {
        "version": 1,
        "identity": {"trust_bundle": str(pki.trust_bundle), "trust_domains": ["example.org"]},
        "interception_ca": str(pki.interception_dir),
        "upstream": {"ca_bundle": str(pki.upstream_ca_file), "allow_private": list(LOOPBACK_NETS)},  # loopback upstreams
        "store": {"url": redis_url, "encryption_keys": {"k1": "env:SECRETLESS_STORE_KEY"}, "active_key": "k1",
                  **(store or {})},
        "credentials": {
            "stripe": {"kind": "static", "secret": "env:TEST_STRIPE_KEY"},
            "payments": {"kind": "oauth2_client_credentials", "token_url": idp.token_url, "client_id": "billing",
                         "client_secret": "env:TEST_CLIENT_SECRET"},
        },
        "rules": [
            rule("billing-oauth", "v1", "payments"),
            rule("billing-static", "static", "stripe"),
            {**rule("ops-grant", "grant", "stripe", requires_grant=True),
             "workloads": ["spiffe://example.org/ns/prod/**"]},
            rule("ops-grant-oauth", "gauth", "payments", requires_grant=True),
            rule("emergency", "glass", "stripe", requires_grant=True, break_glass=True),
        ],
        "default": "deny",
        # admin.listen on a free port: the config refuses port 0 for both listeners ("needs its own port").
        "admin": {"listen": f"127.0.0.1:{free_port()}", "api_listen": "127.0.0.1:0", "workloads": [ADMIN]},
    }
    if audit_file is not None:
        config["audit"] = {"sinks": ["stdout", f"file:{audit_file}"]}
    return config


class Fleet:
    """Replicas started on demand, all on the test's redis-server; admin clients made per replica."""

    def __init__(self, *, pki: Pki, upstream: Any, idp: TimedIdP, redis: RedisServer, ids: dict[str, Cert],
                 proxy_factory: Callable[..., Any], tmp_path: Path) -> None:
        self.pki, self.upstream, self.idp, self.redis, self.ids = pki, upstream, idp, redis, ids
        self._factory = proxy_factory
        self._tmp = tmp_path
        self.replicas: list[Replica] = []
        self._admins: list[Admin] = []

    def start(self, n: int, *, audit: bool = False, store: dict[str, Any] | None = None) -> list[Replica]:
        out = []
        for _ in range(n):
            name = "ABCDEFG"[len(self.replicas)]
            audit_file = self._tmp / f"audit-{name}.log" if audit else None
            proxy = self._factory(fleet_config(self.pki, self.upstream, self.idp, self.redis.url,
                                               audit_file=audit_file, store=store), env=ENV)
            replica = started_replica(name, proxy)
            self.replicas.append(replica)
            out.append(replica)
        return out

    def session(self, replica: Replica, who: str = "billing") -> requests.Session:
        return replica.session(self.ids[who], self.pki.interception_ca_cert)

    def admin(self, replica: Replica, who: str | None = "admin") -> Admin:
        a = Admin(replica.api_url, cacert=self.pki.interception_ca_cert, cert=self.ids[who] if who else None)
        self._admins.append(a)
        return a

    def url(self, path: str) -> str:
        return f"{self.upstream.url}{path}"

    def audit_file(self, replica: Replica) -> str:
        path = self._tmp / f"audit-{replica.name}.log"
        return path.read_text() if path.exists() else ""

    def close(self) -> None:
        for a in self._admins:
            a.close()
        for r in self.replicas:
            r.close()


@pytest.fixture
def fleet(redis_server, proxy_factory, pki, upstream, idp, ids, tmp_path) -> Iterator[Fleet]:
    # redis_server comes first: torn down last, so the replicas stop while Redis still answers.
    f = Fleet(pki=pki, upstream=upstream, idp=idp, redis=redis_server, ids=ids, proxy_factory=proxy_factory,
              tmp_path=tmp_path)
    yield f
    f.close()


# -- assertions ----------------------------------------------------------------------------------


def refused(r: requests.Response, status: int, reason: str, rule: str | None) -> None:
    """The error contract: status, JSON body with exactly its four keys, reason and rule, the request id."""
    assert r.status_code == status, f"{r.status_code} {r.text}"
    body = r.json()
    assert set(body) == CONTRACT, body
    assert (body["reason"], body["rule"]) == (reason, rule), body
    assert r.headers["X-Secretless-Request-Id"] == body["request_id"]
    assert SECRET not in r.text and "Traceback" not in r.text


def authorization(upstream: Any, path_prefix: str) -> list[str]:
    """The Authorization header of every upstream request under ``path_prefix`` (one each, or fail)."""
    out = []
    for req in upstream.requests:
        if not req["path"].startswith(path_prefix):
            continue
        values = [v for k, v in req["headers"] if k.lower() == "authorization"]
        assert len(values) == 1, f"forwarded without exactly one credential: {req}"
        out.append(values[0])
    return out


def metric_sum(replicas: list[Replica], name: str, **labels: str) -> float:
    return sum(metric(r.metrics_port, name, **labels) for r in replicas)


def readyz(replica: Replica) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{replica.metrics_port}/readyz", trust_env=False, timeout=5)


# -- one provider call for the fleet -------------------------------------------------------------


class TestOneProviderCall:
    PER_REPLICA = 4

    def test_concurrent_first_requests_on_three_replicas(self, fleet: Fleet):
        """12 first requests released together on three replicas share one token call at the IdP."""
        fleet.idp.mode, fleet.idp.hang_seconds = "hang", 1.0  # the one fetch is still in flight when all arrive
        replicas = fleet.start(3)
        sessions = [fleet.session(r) for r in replicas for _ in range(self.PER_REPLICA)]
        barrier = threading.Barrier(len(sessions))

        def send(s: requests.Session) -> requests.Response:
            barrier.wait(timeout=20)
            return s.get(fleet.url("/v1/first"), timeout=20)

        with ThreadPoolExecutor(len(sessions)) as pool:
            responses = list(pool.map(send, sessions))
        assert [r.status_code for r in responses] == [200] * len(sessions), responses[0].text
        assert fleet.idp.token_calls == 1, fleet.idp.token_times
        (token,) = fleet.idp.issued
        assert authorization(fleet.upstream, "/v1/") == [f"Bearer {token}"] * len(sessions)
        # Every replica injected its own requests; exactly one of them called the provider.
        for r in replicas:
            assert metric(r.metrics_port, "secretless_requests_total", rule="billing-oauth",
                          decision="injected") == self.PER_REPLICA
        fetches = sorted(metric(r.metrics_port, "secretless_credential_fetch_total", credential="payments")
                         for r in replicas)
        assert fetches == [0, 0, 1]
        assert all(token not in r.text for r in responses)  # the echo was redacted on every replica

    def test_replicas_in_turn_reuse_the_shared_token(self, fleet: Fleet):
        """A, B, C and A again in turn: B and C read the token A fetched from Redis; one token call."""
        a, b, c = fleet.start(3)
        for i, r in enumerate((a, b, c, a, b, c)):
            resp = fleet.session(r).get(fleet.url(f"/v1/turn/{i}"))
            assert resp.status_code == 200, resp.text
        assert fleet.idp.token_calls == 1, fleet.idp.token_times
        (token,) = fleet.idp.issued
        assert authorization(fleet.upstream, "/v1/") == [f"Bearer {token}"] * 6
        assert [metric(r.metrics_port, "secretless_credential_fetch_total", credential="payments")
                for r in (a, b, c)] == [1, 0, 0]


# -- grants across replicas ----------------------------------------------------------------------


class TestGrantsAcrossReplicas:
    N_REVOCATIONS = 20
    POLL = 0.02

    def test_grant_from_cli_on_a_is_honoured_on_b(self, fleet: Fleet):
        """Before the grant B refuses 403 grant_required; a grant made with the CLI against A makes B inject."""
        a, b = fleet.start(2)
        sb = fleet.session(b)
        refused(sb.get(fleet.url("/grant/before")), 403, "grant_required", "ops-grant")
        assert authorization(fleet.upstream, "/grant/") == []  # nothing reached the upstream
        ran = cli("grant", "--workload", BILLING, "--rule", "ops-grant", "--ttl", "15m", "--reason", "INC-9 backfill",
                  "--json", api=a.api_url, cert=fleet.ids["admin"], cacert=fleet.pki.interception_ca_cert)
        assert ran.returncode == 0, ran.stderr
        grant = json.loads(ran.stdout)
        assert (grant["workload"], grant["rule"], grant["state"]) == (BILLING, "ops-grant", "active")
        r = sb.get(fleet.url("/grant/after"))
        assert r.status_code == 200, r.text
        assert authorization(fleet.upstream, "/grant/") == [f"Bearer {SECRET}"]
        # B's own admin API sees the grant A issued: one store for the fleet.
        got = fleet.admin(b).client.get(f"/v1/grants/{grant['id']}")
        assert (got.status_code, got.json()["state"], got.json()["issued_by"]) == (200, "active", ADMIN)

    def test_revocation_through_b_stops_a_within_a_second(self, fleet: Fleet, tmp_path: Path):
        """Revoking through B: A refuses the very next request and drops the grant's cached token; p50/p99 reported."""
        a, b = fleet.start(2)
        sa = fleet.session(a)  # one kept-alive tunnel through A: each poll is a single request
        admin_a, admin_b = fleet.admin(a), fleet.admin(b)
        refusal_s: list[float] = []  # DELETE on B returned -> first refused response from A
        polls_needed: list[int] = []
        sent_wall: list[float] = []  # when each DELETE was sent (wall clock, for the audit timestamps)
        for i in range(self.N_REVOCATIONS):
            created = admin_a.grant("ops-grant-oauth", reason=f"INC-{i} propagation")
            assert created.status_code == 201, created.text
            r = sa.get(fleet.url(f"/gauth/{i}/before"))
            assert r.status_code == 200, r.text  # A brokered a token under this grant (in its L1)
            sent_wall.append(time.time())
            deleted = admin_b.revoke(created.json()["id"], reason=f"INC-{i} done")
            t0 = time.perf_counter()
            assert deleted.status_code == 200, deleted.text
            polls = 0
            while True:
                assert time.perf_counter() - t0 < 5, f"revocation {i} not seen on A within 5 s"
                r = sa.get(fleet.url(f"/gauth/{i}/after"))
                polls += 1
                if r.status_code != 200:
                    refusal_s.append(time.perf_counter() - t0)
                    refused(r, 403, "grant_required", "ops-grant-oauth")
                    break
                time.sleep(self.POLL)
            polls_needed.append(polls)
        # A dropped each revoked grant's token on the pub/sub event and audited it: when, relative to the DELETE.
        def revoked_on_a() -> list[dict[str, Any]] | None:
            found = [e for e in audit_events(a.proxy.output(), "credential.revoked") if e["reason"] == "grant_revoked"]
            return found if len(found) >= self.N_REVOCATIONS else None

        revoked = wait_for(revoked_on_a, timeout=5, what=f"{self.N_REVOCATIONS} credential.revoked events on A")
        assert len(revoked) == self.N_REVOCATIONS, revoked
        eviction_s = [dt.datetime.fromisoformat(e["ts"]).timestamp() - sent
                      for e, sent in zip(revoked, sent_wall, strict=True)]
        stats = {
            "what": "grants revoked through replica B's admin API while replica A serves the grant's rule "
                    "(two replicas and Redis on one host, loopback)",
            "samples": self.N_REVOCATIONS,
            "refusal_s": {"measured": "from B's DELETE response to A's first refused response, polling A every "
                                      f"{self.POLL * 1000:g} ms on one kept-alive tunnel",
                          "p50": percentile(refusal_s, 50), "p99": percentile(refusal_s, 99), "max": max(refusal_s),
                          "all": refusal_s, "polls_needed": polls_needed},
            "l1_eviction_s": {"measured": "from sending B's DELETE to A's credential.revoked audit timestamp "
                                          "(pub/sub event; ms resolution)",
                              "p50": percentile(eviction_s, 50), "p99": percentile(eviction_s, 99),
                              "max": max(eviction_s), "all": eviction_s},
        }
        for path in (tmp_path / "revocation-propagation.json", REPORT):
            path.write_text(json.dumps(stats, indent=2))
        print(f"\nrevocation propagation B -> A over {self.N_REVOCATIONS} revocations: "
              f"first refusal p50 {stats['refusal_s']['p50'] * 1000:.1f} ms, "
              f"p99 {stats['refusal_s']['p99'] * 1000:.1f} ms "
              f"(polls needed: max {max(polls_needed)}); "
              f"L1 eviction (pub/sub) p50 {stats['l1_eviction_s']['p50'] * 1000:.1f} ms, "
              f"p99 {stats['l1_eviction_s']['p99'] * 1000:.1f} ms (written to {REPORT})")
        assert polls_needed == [1] * self.N_REVOCATIONS, f"A injected after the DELETE returned: {polls_needed}"
        assert max(refusal_s) < 1.0, refusal_s
        assert max(eviction_s) < 1.0, eviction_s

    def test_break_glass_only_where_permitted_and_counted_apart(self, fleet: Fleet):
        """break_glass is 400 on a rule without break_glass: true, 201 with a reason on one with it, counted apart."""
        a, b = fleet.start(2)
        admin_a = fleet.admin(a)
        r = admin_a.grant("ops-grant", break_glass=True, ttl=3600, reason="INC-7 payments down")
        assert (r.status_code, r.json()["reason"]) == (400, "break_glass_not_permitted"), r.text
        r = admin_a.grant("emergency", break_glass=True, ttl=3600, reason="  ")
        assert (r.status_code, r.json()["reason"]) == (400, "reason_required"), r.text
        sb = fleet.session(b)
        refused(sb.get(fleet.url("/glass/before")), 403, "grant_required", "emergency")
        refused(sb.get(fleet.url("/grant/before")), 403, "grant_required", "ops-grant")  # nothing leaked onto it
        r = admin_a.grant("emergency", break_glass=True, ttl=3600, reason="INC-7 payments down")
        assert r.status_code == 201, r.text
        assert (r.json()["break_glass"], r.json()["reason"]) == (True, "INC-7 payments down")
        glass = sb.get(fleet.url("/glass/after"))
        assert glass.status_code == 200, glass.text
        assert authorization(fleet.upstream, "/glass/") == [f"Bearer {SECRET}"]
        both = [a, b]
        assert metric_sum(both, "secretless_grants_total", break_glass="true") == 1
        assert metric_sum(both, "secretless_grants_total", break_glass="false") == 0
        assert admin_a.grant("ops-grant").status_code == 201
        assert metric_sum(both, "secretless_grants_total", break_glass="true") == 1
        assert metric_sum(both, "secretless_grants_total", break_glass="false") == 1
        created = audit_events(a.proxy.output(), "grant.created")
        assert [(e["rule"], e["break_glass"]) for e in created] == [("emergency", True), ("ops-grant", False)]
        assert created[0]["reason"] == "INC-7 payments down" and created[0]["issued_by"] == ADMIN


class TestGrantExpiry:
    EXPIRES_IN = 4.0

    def test_expired_grant_refused_everywhere_and_its_tokens_revoked(self, fleet: Fleet):
        """A grant expiring in seconds: 200 before it on both replicas, 403 after; its token revoked (grant_expired)."""
        a, b = fleet.start(2, audit=True)
        grant = put_grant_directly(fleet.redis.url, key_hex=STORE_KEY, rule="ops-grant-oauth",
                                   expires_in=self.EXPIRES_IN)
        sessions = {a.name: fleet.session(a), b.name: fleet.session(b)}
        samples: list[tuple[str, float, requests.Response]] = []
        while time.time() < grant.expires_at + 1.5:
            for name, s in sessions.items():
                sent = time.time()
                samples.append((name, sent, s.get(fleet.url(f"/gauth/{name}/{len(samples)}"))))
            time.sleep(0.05)
        for name, sent, r in samples:
            if r.status_code == 200:
                assert sent < grant.expires_at, f"{name} injected {sent - grant.expires_at:.3f}s after expiry"
            else:
                refused(r, 403, "grant_required", "ops-grant-oauth")
            if sent >= grant.expires_at:
                assert r.status_code == 403
        for name in sessions:
            mine = [(sent, r.status_code) for n, sent, r in samples if n == name]
            assert any(status == 200 for _, status in mine), f"{name} never honoured the grant"
            assert any(status == 403 and sent >= grant.expires_at for sent, status in mine)
        # The token brokered under the grant was dropped when the grant ran out. One replica revokes it
        # (audited), the others drop their copy on its eviction event, or revoke it themselves first.
        def expired_events() -> list[dict[str, Any]]:
            return [e for r in (a, b) for e in audit_events(fleet.audit_file(r), "credential.revoked")
                    if e["reason"] == "grant_expired"]

        events = wait_for(expired_events, timeout=3, what="credential.revoked with reason grant_expired")
        assert {(e["credential"], e["kind"]) for e in events} == {("payments", "oauth2_client_credentials")}
        assert 1 <= len(events) <= 2, events
        assert fleet.idp.token_calls == 1  # one token for the grant, shared by both replicas

    def test_grant_expired_revocations_are_counted_under_their_reason(self, fleet: Fleet):
        """secretless_revocations_total counts a grant_expired eviction as grant_expired, not other."""
        (a,) = fleet.start(1)
        grant = put_grant_directly(fleet.redis.url, key_hex=STORE_KEY, rule="ops-grant-oauth", expires_in=2.0)
        assert fleet.session(a).get(fleet.url("/gauth/x")).status_code == 200
        time.sleep(max(0.0, grant.expires_at - time.time()))
        wait_for(lambda: metric(a.metrics_port, "secretless_revocations_total") >= 1, timeout=3,
                 what="the grant's token to be revoked")
        counted = {reason: metric(a.metrics_port, "secretless_revocations_total", reason=reason)
                   for reason in ("grant_expired", "other")}
        assert counted == {"grant_expired": 1, "other": 0}, counted


# -- Redis down and back --------------------------------------------------------------------------


def statuses_for(seconds: float, sessions: dict[str, requests.Session], url: Callable[[str], str],
                 every: float = 0.05) -> list[tuple[str, str, requests.Response]]:
    """Send to every (label → session) in turn for ``seconds``; returns (label, path, response)."""
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for label, s in sessions.items():
            path = label.split(":", 1)[1]
            out.append((label, path, s.get(url(path), timeout=10)))
        time.sleep(every)
    return out


class TestRedisOutage:
    OUTAGE = 2.0

    def test_grant_rules_fail_closed_plain_rules_serve_from_cache(self, fleet: Fleet):
        """Redis killed: grant rule 503 store_unavailable, cached/static rules 200; after restart a new grant works."""
        a, b = fleet.start(2)
        admin_a = fleet.admin(a)
        assert admin_a.grant("ops-grant").status_code == 201
        sa, sb = fleet.session(a), fleet.session(b)
        for s in (sa, sb):  # warm: the OAuth2 token in both L1 caches, the grant honoured on both
            for path in ("/v1/warm", "/static/warm", "/grant/warm"):
                assert s.get(fleet.url(path)).status_code == 200
        assert fleet.idp.token_calls == 1
        (token,) = fleet.idp.issued
        fleet.redis.stop()  # SIGKILL, as a crash would
        outage = statuses_for(self.OUTAGE, {f"{n}:{p}": s for n, s in (("A", sa), ("B", sb))
                                            for p in ("/grant/x", "/v1/x", "/static/x")}, fleet.url)
        for label, path, r in outage:
            if path.startswith("/grant/"):
                refused(r, 503, "store_unavailable", "ops-grant")
            else:
                assert r.status_code == 200, f"{label}: {r.status_code} {r.text}"
        assert fleet.idp.token_calls == 1  # served from each replica's L1, no provider call
        assert set(authorization(fleet.upstream, "/v1/")) == {f"Bearer {token}"}
        for replica in (a, b):
            ready = readyz(replica)
            assert ready.status_code == 503 and "store" in ready.json()["failing"], ready.text
            assert metric(replica.metrics_port, "secretless_store_errors_total") > 0
            assert metric(replica.metrics_port, "secretless_denied_total", reason="store_unavailable") > 0
        assert admin_a.grant("ops-grant").json()["reason"] == "store_unavailable"

        fleet.redis.start()  # same port, empty: the grant made before the outage is gone with it
        for replica in (a, b):
            wait_for(lambda r=replica: readyz(r).status_code == 200, timeout=10, what=f"{replica.name} ready again")
        refused(sb.get(fleet.url("/grant/after")), 403, "grant_required", "ops-grant")
        created = wait_for(lambda: (r := admin_a.grant("ops-grant")).status_code == 201 and r, timeout=10,
                           what="a new grant through A")
        assert created.json()["state"] == "active"
        for s in (sa, sb):
            for path in ("/grant/new", "/v1/new", "/static/new"):
                r = s.get(fleet.url(path))
                assert r.status_code == 200, f"{path}: {r.text}"

    def test_grant_revoked_before_outage_is_never_honoured_again(self, fleet: Fleet):
        """Revoke, kill Redis, restart it and restore the grant's pre-revocation record: never 200 on its rule."""
        a, b = fleet.start(2)
        admin_a, admin_b = fleet.admin(a), fleet.admin(b)
        created = admin_a.grant("ops-grant")
        assert created.status_code == 201
        gid = created.json()["id"]
        sa, sb = fleet.session(a), fleet.session(b)
        assert sa.get(fleet.url("/grant/ok")).status_code == 200
        assert sb.get(fleet.url("/grant/ok")).status_code == 200
        # A backup taken while the grant was active (the record, the pair index, the grant list).
        with redis_client(fleet.redis.url) as r:
            grant_keys = sorted(k.decode() for k in r.scan_iter(match=f"{PREFIX}grant*"))
        assert f"{PREFIX}grant:{gid}" in grant_keys and len(grant_keys) == 3, grant_keys
        backup = snapshot_keys(fleet.redis.url, grant_keys)
        assert admin_b.revoke(gid, reason="INC-3 access no longer needed").status_code == 200
        # A may serve its cached grant until the revocation event arrives, never past the cache's bound
        # (store.grant_cache_seconds, 0.5 s: "every replica within a second", issue 12 §2).
        revoked_at = time.monotonic()
        while (r := sa.get(fleet.url("/grant/revoked"))).status_code == 200:
            assert time.monotonic() - revoked_at < 1.0, "a revoked grant was honoured past the cache's bound"
        refused(r, 403, "grant_required", "ops-grant")

        fleet.redis.stop()
        sessions = {"A:/grant/during": sa, "B:/grant/during": sb}
        seen = statuses_for(1.0, sessions, fleet.url)
        fleet.redis.start()
        restore_keys(fleet.redis.url, backup)  # the grant comes back from the backup, its tombstone does not
        seen += statuses_for(0.5, sessions, fleet.url)

        def both_answer() -> bool:
            answers = [(label, "/grant/back", s.get(fleet.url("/grant/back"))) for label, s in sessions.items()]
            seen.extend(answers)
            return all(r.status_code == 403 for _, _, r in answers)

        wait_for(both_answer, timeout=10, what="both replicas answering the grant check again")
        # The replicas wrote their tombstone back into the Redis that lost it.
        with redis_client(fleet.redis.url) as r:
            wait_for(lambda: r.zscore(f"{PREFIX}revoked", gid) is not None, timeout=5,
                     what="the tombstone back in Redis")
            r.delete(f"{PREFIX}revoked")  # and lost again (a failover to a stale replica): memory still holds it
        restore_keys(fleet.redis.url, backup)
        # A process that never saw the revocation would honour the restored record: the test is not vacuous.
        revived = find_grant_directly(fleet.redis.url, key_hex=STORE_KEY, rule="ops-grant")
        assert revived is not None and revived.id == gid, revived
        seen += statuses_for(1.0, sessions, fleet.url)
        honoured = [(label, r.status_code) for label, _, r in seen if r.status_code == 200]
        assert honoured == [], honoured
        for label, _, r in seen:
            assert r.status_code in (403, 503), f"{label}: {r.status_code} {r.text}"
            refused(r, r.status_code, "grant_required" if r.status_code == 403 else "store_unavailable", "ops-grant")
        assert {r.status_code for _, _, r in seen} == {403, 503}  # the outage was seen, and the recovery
        got = admin_a.client.get(f"/v1/grants/{gid}")  # the restored record shows as revoked, not active
        assert (got.status_code, got.json()["state"]) == (200, "revoked"), got.text
        # The client reconnected by itself: a new grant on the same rule works on both replicas.
        assert admin_a.grant("ops-grant", reason="INC-4 new access").status_code == 201
        for s in (sa, sb):
            r = s.get(fleet.url("/grant/new"))
            assert r.status_code == 200, r.text


# -- what Redis holds -----------------------------------------------------------------------------


class TestRedisHoldsOnlyCiphertext:
    def test_no_secret_in_any_key_or_value(self, fleet: Fleet):
        """After traffic on every kind of rule, no key, value or event in Redis holds a secret or a workload ID."""
        a, b = fleet.start(2)
        events: list[bytes] = []
        stop = threading.Event()
        listener = redis_client(fleet.redis.url)
        pubsub = listener.pubsub()
        pubsub.subscribe(f"{PREFIX}events")

        def collect() -> None:
            while not stop.is_set():
                msg = pubsub.get_message(timeout=0.1)
                if msg and msg["type"] == "message":
                    events.append(msg["data"])

        thread = threading.Thread(target=collect, daemon=True)
        thread.start()
        try:
            admin_a, admin_b = fleet.admin(a), fleet.admin(b)
            sa, sb = fleet.session(a), fleet.session(b)
            for s in (sa, sb):
                assert s.get(fleet.url("/v1/x")).status_code == 200
                assert s.get(fleet.url("/static/x")).status_code == 200
            oauth_grant = admin_a.grant("ops-grant-oauth")
            static_grant = admin_b.grant("ops-grant")
            assert oauth_grant.status_code == static_grant.status_code == 201
            assert sb.get(fleet.url("/gauth/x")).status_code == 200  # a token brokered under the grant
            assert sa.get(fleet.url("/grant/x")).status_code == 200
            assert admin_a.revoke(static_grant.json()["id"]).status_code == 200
            wait_for(lambda: len(events) >= 3, timeout=5, what="grant events on the channel")
        finally:
            stop.set()
            thread.join(5)
            pubsub.close()
            listener.close()

        tokens = list(fleet.idp.issued)
        assert len(tokens) == 2, tokens  # the shared one and the one under the grant
        dump = dump_redis(fleet.redis.url)
        everything = b"\n".join([*dump, *(v for _, values in dump.values() for v in values), *events])
        needles = {"static secret": SECRET, "client secret": CLIENT_SECRET, "store key": STORE_KEY,
                   "workload": BILLING, **{f"token {i}": t for i, t in enumerate(tokens)}}
        for label, needle in iter_needles(needles):
            assert needle not in everything, f"{label} is in Redis in the clear"
        # The scan saw the real thing: sealed credentials that open, with this key, to the issued tokens.
        sealer = Sealer({"k1": bytes.fromhex(STORE_KEY)}, "k1")
        creds = {k.decode(): v[0] for k, (_kind, v) in dump.items() if k.startswith(f"{PREFIX}cred:".encode())}
        opened = {json.loads(sealer.open(blob, aad=key))["secret"] for key, blob in creds.items()}
        assert opened == set(tokens), creds.keys()
        grants = {k.decode(): dict(zip(v[::2], v[1::2], strict=True)) for k, (_kind, v) in dump.items()
                  if k.startswith(f"{PREFIX}grant:".encode())}
        assert len(grants) == 2
        for key, fields in grants.items():
            assert json.loads(sealer.open(fields[b"sealed"], aad=key))["workload"] == BILLING


# -- who may use the admin API --------------------------------------------------------------------


class TestAdminApiIdentity:
    def test_non_admin_403_and_no_certificate_401_on_every_replica(self, fleet: Fleet):
        """Every replica's admin API: no certificate 401 identity_missing, a workload 403 not_admin; nothing created."""
        replicas = fleet.start(2)
        for replica in replicas:
            anonymous, workload = fleet.admin(replica, who=None), fleet.admin(replica, who="billing")
            r = anonymous.client.get("/v1/grants")
            assert (r.status_code, r.json()["reason"]) == (401, "identity_missing"), r.text
            r = anonymous.grant("ops-grant")
            assert (r.status_code, r.json()["reason"]) == (401, "identity_missing"), r.text
            r = workload.client.get("/v1/grants")
            assert (r.status_code, r.json()["reason"]) == (403, "not_admin"), r.text
            r = workload.grant("ops-grant")  # a workload granting itself access
            assert (r.status_code, r.json()["reason"]) == (403, "not_admin"), r.text
        listed = fleet.admin(replicas[0]).client.get("/v1/grants")
        assert (listed.status_code, listed.json()) == (200, {"grants": []})
        refused(fleet.session(replicas[1]).get(fleet.url("/grant/x")), 403, "grant_required", "ops-grant")
        for replica in replicas:
            out = replica.proxy.output()
            assert audit_events(out, "grant.created") == []
            denied = [(e["reason"], e["workload"]) for e in audit_events(out, "admin.denied")]
            assert denied == [("identity_missing", None)] * 2 + [("not_admin", BILLING)] * 2, denied
