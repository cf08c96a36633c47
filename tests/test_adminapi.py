"""The admin API over real mTLS on loopback (grants, inventory, who may call) and its CLI as a real subprocess."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from helpers.proxy import BIN, SECRET, Pki, ProxyProcess, base_config
from helpers.redis_server import RedisServer
from mitmproxy.certs import CertStore
from prometheus_client import CollectorRegistry

from secretless_proxy.admin.api import AdminApi, AdminApiServer, api_server_cert
from secretless_proxy.audit import AuditLog
from secretless_proxy.broker import CachedInfo
from secretless_proxy.config.model import Config
from secretless_proxy.config.parse import load_config
from secretless_proxy.dev import certs
from secretless_proxy.identity import IdentityVerifier
from secretless_proxy.metrics import Metrics
from secretless_proxy.store import MemoryStore, Store
from secretless_proxy.store.redis import RedisStore
from secretless_proxy.store.sealing import Sealer

ADMIN = "spiffe://example.org/ns/ops/sa/admin"
ONCALL = "spiffe://example.org/ns/ops/sa/oncall-alice"
BILLING = "spiffe://example.org/ns/prod/sa/billing"
REPORTS = "spiffe://example.org/ns/prod/sa/reports"
FILE_SECRET = "ghp_FILEsecretVALUE0123456789abcdef"
DOCS = Path(__file__).parents[1] / "docs" / "metrics.md"

Cert = tuple[str, str]


# -- fixtures ----------------------------------------------------------------------------------


@dataclass
class Ids:
    """Client certificates: (cert, key) paths."""

    admin: Cert
    oncall: Cert  # an admin by pattern, issued by an intermediate CA (the chain goes with it)
    billing: Cert  # a valid workload that is not an admin
    foreign: Cert  # the admin's SPIFFE ID from a CA outside the trust bundle
    expired: Cert
    other_domain: Cert


@pytest.fixture(scope="session")
def ids(pki: Pki) -> Ids:
    intermediate = certs.make_ca(common_name="ops intermediate", parent=pki.workload_ca)
    now = dt.datetime.now(dt.UTC)
    return Ids(admin=pki.svid(ADMIN), oncall=pki.svid(ONCALL, ca=intermediate), billing=pki.svid(BILLING),
               foreign=pki.svid(ADMIN, ca=certs.make_ca(common_name="someone else's CA")),
               expired=pki.svid(ADMIN, not_before=now - dt.timedelta(hours=3), ttl=dt.timedelta(hours=1)),
               other_domain=pki.svid("spiffe://other.org/ns/ops/sa/admin"))


@pytest.fixture(scope="session")
def confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real mitmproxy interception CA directory (mitmproxy-ca.pem holds key and cert)."""
    d = tmp_path_factory.mktemp("interception")
    CertStore.from_store(d, "mitmproxy", 2048)
    return d


class ListSink:
    """An audit sink in memory; ``fail`` makes every write raise."""

    name = "memory"

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.fail = False

    def write(self, line: bytes) -> None:
        if self.fail:
            raise OSError("disk full")
        self.events.append(json.loads(line))

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Api:
    server: AdminApiServer
    url: str
    store: Store
    config: Config
    registry: CollectorRegistry
    sink: ListSink
    cacert: str
    snapshot: list[CachedInfo] = field(default_factory=list)
    last_used: dict[str, float] = field(default_factory=dict)

    def client(self, cert: Cert | None = None, *, cacert: str | None = None) -> httpx.AsyncClient:
        ctx = ssl.create_default_context(cafile=cacert or self.cacert)
        if cert is not None:
            ctx.load_cert_chain(*cert)
        return httpx.AsyncClient(base_url=self.url, verify=ctx, trust_env=False, timeout=10)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.sink.events if e["event"] == name]

    def count(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


def config_dict(pki: Pki, tmp_path: Path) -> dict[str, Any]:
    secret_file = tmp_path / "gh-token"
    secret_file.write_text(FILE_SECRET + "\n")
    grant_rule = {"requires_grant": True, "workloads": ["spiffe://example.org/ns/prod/**"]}
    cfg = base_config(
        pki,
        credentials={
            "stripe": {"kind": "static", "secret": "env:TEST_STRIPE_KEY", "owner": "payments-team"},
            "github-deploy": {"kind": "static", "secret": f"file:{secret_file}", "owner": "platform-team"},
            "payments": {"kind": "oauth2_client_credentials", "token_url": "https://auth.example.com/token",
                         "client_id": "billing-proxy", "client_secret": f"file:{secret_file}"},
        },
        rules=[
            {"name": "billing-to-stripe", "workloads": [BILLING], "to": {"host": "api.stripe.com"},
             "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}},
            {"name": "prod-db-maintenance", **grant_rule, "to": {"host": "db-admin.example.com"},
             "inject": {"credential": "payments", "header": "Authorization", "format": "Bearer {secret}"}},
            {"name": "prod-emergency", **grant_rule, "break_glass": True, "to": {"host": "api.stripe.com"},
             "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}},
        ],
        admin={"api_listen": "127.0.0.1:0", "workloads": [ADMIN, "spiffe://example.org/ns/ops/sa/oncall-*"]},
    )
    return cfg


def write_config(pki: Pki, tmp_path: Path) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_dict(pki, tmp_path), sort_keys=False))
    return load_config(path)


Start = Callable[[Store], Awaitable[Api]]


@pytest.fixture
async def start(pki: Pki, confdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Start]:
    """Start an admin API server on 127.0.0.1:0 over the given store."""
    monkeypatch.setenv("TEST_STRIPE_KEY", SECRET)
    config = write_config(pki, tmp_path)
    servers: list[AdminApiServer] = []

    async def make(store: Store) -> Api:
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        sink = ListSink()
        audit = AuditLog([sink], metrics=metrics)
        snapshot: list[CachedInfo] = []
        last_used: dict[str, float] = {}
        api = AdminApi(store=store, config=lambda: config, snapshot=lambda: list(snapshot), audit=lambda: audit,
                       metrics=metrics, last_used=lambda: last_used)
        verifier = IdentityVerifier(bundles={"example.org": [pki.workload_ca.cert]})
        server = AdminApiServer("127.0.0.1", 0, api=api, verifier=lambda: verifier,
                                admins=lambda: config.admin_workloads,
                                server_cert=api_server_cert(confdir, ("127.0.0.1",)))
        host, port = await server.start()
        servers.append(server)
        return Api(server=server, url=f"https://{host}:{port}", store=store, config=config, registry=registry,
                   sink=sink, cacert=str(confdir / "mitmproxy-ca-cert.pem"), snapshot=snapshot, last_used=last_used)

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def api(start: Start) -> AsyncIterator[Api]:
    async with MemoryStore() as store:
        yield await start(store)


@pytest.fixture
def redis_server() -> Any:
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.e2e)])
async def any_api(request: pytest.FixtureRequest, start: Start) -> AsyncIterator[Api]:
    """The API over the embedded store and over a real redis-server."""
    if request.param == "memory":
        store: Store = MemoryStore()
    else:
        server = request.getfixturevalue("redis_server")
        store = RedisStore(server.url, sealer=Sealer({"k1": os.urandom(32)}, "k1"))
    await store.start()
    try:
        yield await start(store)
    finally:
        await store.close()


def grant_body(**kw: Any) -> dict[str, Any]:
    return {"workload": REPORTS, "rule": "prod-db-maintenance", "ttl_seconds": 900, "reason": "INC-42 backfill", **kw}


async def create(api: Api, cert: Cert, **kw: Any) -> httpx.Response:
    async with api.client(cert) as c:
        return await c.post("/v1/grants", json=grant_body(**kw))


# -- who may call ------------------------------------------------------------------------------


class TestIdentity:
    async def test_no_certificate_is_401(self, api: Api) -> None:
        """A request without a client certificate gets 401 identity_missing, as JSON."""
        async with api.client() as c:
            r = await c.get("/v1/grants")
        assert r.status_code == 401
        assert r.json()["reason"] == "identity_missing"
        assert "no client certificate" in r.json()["error"]

    @pytest.mark.parametrize(("which", "reason"), [
        ("foreign", "identity_untrusted"), ("expired", "identity_expired"), ("other_domain", "identity_trust_domain"),
    ])
    async def test_invalid_certificate_is_401(self, api: Api, ids: Ids, which: str, reason: str) -> None:
        """A certificate the proxy would not accept from a workload is refused with its identity reason."""
        async with api.client(getattr(ids, which)) as c:
            r = await c.get("/v1/grants")
        assert (r.status_code, r.json()["reason"]) == (401, reason)

    async def test_valid_non_admin_is_403(self, api: Api, ids: Ids) -> None:
        """A verified workload that admin.workloads does not list gets 403 not_admin."""
        async with api.client(ids.billing) as c:
            r = await c.get("/v1/credentials")
        assert r.status_code == 403
        assert r.json() == {"error": f"workload {BILLING} is not listed under admin.workloads", "reason": "not_admin"}

    async def test_non_admin_cannot_grant(self, api: Api, ids: Ids) -> None:
        """A non-admin's grant request is refused and nothing is stored or audited as created."""
        r = await create(api, ids.billing, workload=BILLING)
        assert r.status_code == 403
        assert await api.store.list_grants() == []
        assert api.events("grant.created") == []

    async def test_admin_by_pattern_through_intermediate(self, api: Api, ids: Ids) -> None:
        """An admin pattern matches, and a chain through an intermediate the client sends verifies."""
        async with api.client(ids.oncall) as c:
            r = await c.get("/v1/grants")
        assert (r.status_code, r.json()) == (200, {"grants": []})

    async def test_refusals_are_audited(self, api: Api, ids: Ids) -> None:
        """Every refused caller is an admin.denied audit event naming the reason (and the workload if known)."""
        async with api.client() as c:
            await c.get("/v1/grants")
        async with api.client(ids.billing) as c:
            await c.delete("/v1/grants/abcdefgh12345678?reason=x")
        denied = api.events("admin.denied")
        assert [(e["reason"], e["workload"], e["method"], e["path"]) for e in denied] == [
            ("identity_missing", None, "GET", "/v1/grants"),
            ("not_admin", BILLING, "DELETE", "/v1/grants/abcdefgh12345678"),
        ]


# -- grants ------------------------------------------------------------------------------------


class TestGrantLifecycle:
    async def test_create_list_revoke(self, any_api: Api, ids: Ids) -> None:
        """An admin creates, lists, fetches and revokes a grant; the store honours it exactly while active."""
        api = any_api
        before = time.time()
        r = await create(api, ids.admin)
        assert r.status_code == 201, r.text
        g = r.json()
        assert {k: g[k] for k in ("workload", "rule", "reason", "issued_by", "break_glass", "state",
                                  "revoked_at")} == {
            "workload": REPORTS, "rule": "prod-db-maintenance", "reason": "INC-42 backfill", "issued_by": ADMIN,
            "break_glass": False, "state": "active", "revoked_at": None}
        assert before + 900 <= g["expires_at"] <= time.time() + 900
        assert (await api.store.find_grant(REPORTS, "prod-db-maintenance")).id == g["id"]  # type: ignore[union-attr]

        async with api.client(ids.admin) as c:
            listed = (await c.get("/v1/grants")).json()["grants"]
            one = (await c.get(f"/v1/grants/{g['id']}")).json()
            r = await c.delete(f"/v1/grants/{g['id']}", params={"reason": "INC-42 done"})
            after = (await c.get("/v1/grants")).json()["grants"]
        assert [x["id"] for x in listed] == [g["id"]] and one["id"] == g["id"]
        assert r.status_code == 200
        assert (r.json()["state"], r.json()["revoke_reason"]) == ("revoked", "INC-42 done")
        assert [(x["id"], x["state"]) for x in after] == [(g["id"], "revoked")]
        assert await api.store.find_grant(REPORTS, "prod-db-maintenance") is None

    async def test_revoked_id_cannot_come_back(self, any_api: Api, ids: Ids) -> None:
        """Writing a revoked grant's record back under the same id is refused by the store."""
        g = (await create(any_api, ids.admin)).json()
        original = await any_api.store.get_grant(g["id"])
        async with any_api.client(ids.admin) as c:
            assert (await c.delete(f"/v1/grants/{g['id']}")).status_code == 200
        assert original is not None
        assert await any_api.store.put_grant(replace(original, revoked_at=None, revoke_reason=None)) is False
        assert await any_api.store.find_grant(REPORTS, "prod-db-maintenance") is None

    async def test_audited_and_counted(self, api: Api, ids: Ids) -> None:
        """grant.created and grant.revoked are audited with who and why; both are counted."""
        g = (await create(api, ids.admin)).json()
        async with api.client(ids.oncall) as c:
            await c.delete(f"/v1/grants/{g['id']}")
        (created,) = api.events("grant.created")
        (revoked,) = api.events("grant.revoked")
        assert {k: created[k] for k in ("grant_id", "workload", "rule", "reason", "issued_by", "break_glass")} == {
            "grant_id": g["id"], "workload": REPORTS, "rule": "prod-db-maintenance", "reason": "INC-42 backfill",
            "issued_by": ADMIN, "break_glass": False}
        assert created["expires_at"].endswith("Z")
        assert (revoked["grant_id"], revoked["reason"], revoked["revoked_by"]) == (g["id"], "manual", ONCALL)
        assert api.count("secretless_grants_total", break_glass="false") == 1
        assert api.count("secretless_grants_total", break_glass="true") == 0
        assert api.count("secretless_grant_revocations_total", reason="manual") == 1

    async def test_revoke_twice_is_idempotent(self, api: Api, ids: Ids) -> None:
        """Revoking a revoked grant answers 200 with the first revocation; audited and counted once."""
        g = (await create(api, ids.admin)).json()
        async with api.client(ids.admin) as c:
            first = await c.delete(f"/v1/grants/{g['id']}", params={"reason": "first"})
            second = await c.delete(f"/v1/grants/{g['id']}", params={"reason": "second"})
        assert second.status_code == 200
        assert second.json()["revoke_reason"] == first.json()["revoke_reason"] == "first"
        assert len(api.events("grant.revoked")) == 1
        assert api.count("secretless_grant_revocations_total", reason="manual") == 1

    @pytest.mark.parametrize("grant_id", ["abcdefgh12345678", "nope", "a/b"])
    async def test_unknown_grant_is_404(self, api: Api, ids: Ids, grant_id: str) -> None:
        """An unknown, malformed or expired grant id is 404 on GET and DELETE; nothing is audited."""
        async with api.client(ids.admin) as c:
            got = await c.get(f"/v1/grants/{grant_id}")
            deleted = await c.delete(f"/v1/grants/{grant_id}")
        assert (got.status_code, got.json()["reason"]) == (404, "grant_not_found")
        assert (deleted.status_code, deleted.json()["reason"]) == (404, "grant_not_found")
        assert api.events("grant.revoked") == []

    async def test_store_unavailable_is_503(self, start: Start, ids: Ids, redis_server: RedisServer) -> None:
        """With the shared store down, grant calls answer 503 store_unavailable, never a traceback."""
        store = RedisStore(redis_server.url, sealer=Sealer({"k1": os.urandom(32)}, "k1"))
        await store.start()
        try:
            api = await start(store)
            redis_server.stop()
            r = await create(api, ids.admin)
            async with api.client(ids.admin) as c:
                listed = await c.get("/v1/grants")
        finally:
            await store.close()
        assert (r.status_code, r.json()["reason"]) == (503, "store_unavailable")
        assert (listed.status_code, listed.json()["reason"]) == (503, "store_unavailable")
        assert api.events("grant.created") == []


class TestGrantValidation:
    @pytest.mark.parametrize(("body", "reason", "match"), [
        (grant_body(rule="no-such-rule"), "unknown_rule",
         "unknown rule 'no-such-rule' (rules that take grants: prod-db-maintenance, prod-emergency)"),
        (grant_body(rule="billing-to-stripe"), "rule_not_grantable", "does not say requires_grant: true"),
        (grant_body(workload="spiffe://example.org/ns/staging/sa/reports"), "workload_not_covered",
         "does not cover workload"),
        (grant_body(workload="spiffe://example.org/ns/prod/sa/*"), "invalid_request", "not a pattern"),
        (grant_body(workload="billing"), "invalid_request", "invalid SPIFFE ID"),
        (grant_body(ttl_seconds=10), "invalid_grant", "must last from 60 to 604800 seconds"),
        (grant_body(ttl_seconds=30 * 86400), "invalid_grant", "must last from 60 to 604800 seconds"),
        (grant_body(ttl_seconds="15m"), "invalid_grant", "ttl must be a number of seconds"),
        (grant_body(reason="two\nlines"), "invalid_grant", "must not contain line breaks"),
        (grant_body(break_glass="yes"), "invalid_request", "break_glass must be true or false"),
        (grant_body(id="mine12345678"), "invalid_request", "unknown field 'id'"),
        ({"workload": REPORTS, "rule": "prod-db-maintenance"}, "invalid_request", "missing required field 'ttl_seconds'"),
        ([1, 2], "invalid_json", "must be a JSON object"),
    ])
    async def test_bad_request_is_400(self, api: Api, ids: Ids, body: Any, reason: str, match: str) -> None:
        """A grant request that is malformed, names no grantable rule or widens a rule is 400 and says why."""
        async with api.client(ids.admin) as c:
            r = await c.post("/v1/grants", json=body)
        assert (r.status_code, r.json()["reason"]) == (400, reason)
        assert match in r.json()["error"]
        assert await api.store.list_grants() == []

    async def test_not_json(self, api: Api, ids: Ids) -> None:
        """A body that is not JSON is 400 invalid_json."""
        async with api.client(ids.admin) as c:
            r = await c.post("/v1/grants", content=b"{nope", headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json()["reason"]) == (400, "invalid_json")

    async def test_post_needs_json_content_type(self, api: Api, ids: Ids) -> None:
        """A POST that is not application/json is 415 (no cross-origin form post can create a grant)."""
        async with api.client(ids.admin) as c:
            r = await c.post("/v1/grants", content=json.dumps(grant_body()).encode(),
                             headers={"Content-Type": "text/plain"})
        assert (r.status_code, r.json()["reason"]) == (415, "unsupported_media_type")
        assert await api.store.list_grants() == []

    async def test_body_size_is_bounded(self, api: Api, ids: Ids) -> None:
        """A request body over 16 KiB is refused with 413 before it is parsed."""
        async with api.client(ids.admin) as c:
            r = await c.post("/v1/grants", json=grant_body(reason="x" * 20000))
        assert r.status_code == 413


class TestBreakGlass:
    async def test_allowed_where_rule_permits(self, api: Api, ids: Ids) -> None:
        """A break-glass grant on a break_glass rule is issued, audited as such and counted apart."""
        r = await create(api, ids.admin, rule="prod-emergency", break_glass=True, ttl_seconds=3600,
                         reason="INC-7 payments down")
        assert r.status_code == 201, r.text
        assert r.json()["break_glass"] is True
        (event,) = api.events("grant.created")
        assert (event["break_glass"], event["reason"], event["rule"]) == (True, "INC-7 payments down", "prod-emergency")
        assert api.count("secretless_grants_total", break_glass="true") == 1
        assert api.count("secretless_grants_total", break_glass="false") == 0

    async def test_refused_where_rule_does_not_permit(self, api: Api, ids: Ids) -> None:
        """break_glass on a rule without break_glass: true is 400 and nothing is issued or counted."""
        r = await create(api, ids.admin, break_glass=True)
        assert (r.status_code, r.json()["reason"]) == (400, "break_glass_not_permitted")
        assert "prod-db-maintenance" in r.json()["error"]
        assert await api.store.list_grants() == []
        assert api.count("secretless_grants_total", break_glass="true") == 0

    async def test_needs_reason(self, api: Api, ids: Ids) -> None:
        """A break-glass grant without a reason is 400 reason_required."""
        r = await create(api, ids.admin, rule="prod-emergency", break_glass=True, reason="  ")
        assert (r.status_code, r.json()["reason"]) == (400, "reason_required")

    async def test_at_most_four_hours(self, api: Api, ids: Ids) -> None:
        """A break-glass grant may last at most 4 h."""
        r = await create(api, ids.admin, rule="prod-emergency", break_glass=True, ttl_seconds=5 * 3600)
        assert (r.status_code, r.json()["reason"]) == (400, "invalid_grant")
        assert "a break-glass grant must last from 60 to 14400 seconds" in r.json()["error"]

    async def test_unaudited_grant_is_taken_back(self, api: Api, ids: Ids) -> None:
        """If the audit log cannot record a grant (fail-closed), it is revoked and the answer is 503."""
        api.sink.fail = True
        r = await create(api, ids.admin, rule="prod-emergency", break_glass=True, reason="INC-8")
        assert (r.status_code, r.json()["reason"]) == (503, "audit_unavailable")
        assert await api.store.find_grant(REPORTS, "prod-emergency") is None
        assert api.count("secretless_grants_total", break_glass="true") == 0


class TestRouting:
    @pytest.mark.parametrize(("method", "path", "status", "allow"), [
        ("GET", "/v1/nothing", 404, None), ("GET", "/", 404, None),
        ("PUT", "/v1/grants", 405, "GET, POST"), ("POST", "/v1/grants/abcdefgh12345678", 405, "GET, DELETE"),
        ("DELETE", "/v1/credentials", 405, "GET"),
    ])
    async def test_unknown_routes(self, api: Api, ids: Ids, method: str, path: str, status: int,
                                  allow: str | None) -> None:
        """Unknown paths are 404 and wrong methods 405 with Allow, both as JSON."""
        async with api.client(ids.admin) as c:
            r = await c.request(method, path, json={} if method in ("PUT", "POST") else None)
        assert r.status_code == status
        assert r.headers["content-type"] == "application/json"
        assert r.headers.get("allow") == allow
        assert set(r.json()) == {"error", "reason"}

    async def test_unknown_query_parameter(self, api: Api, ids: Ids) -> None:
        """A query parameter the endpoint does not know is 400, not silently ignored."""
        async with api.client(ids.admin) as c:
            r = await c.get("/v1/grants", params={"workload": BILLING})
        assert (r.status_code, r.json()["reason"]) == (400, "invalid_request")


async def raw(api: Api, data: bytes, cert: Cert | None = None) -> bytes:
    """Send raw bytes over mTLS and read the answer until the server closes."""
    ctx = ssl.create_default_context(cafile=api.cacert)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    reader, writer = await asyncio.open_connection("127.0.0.1", api.server.port, ssl=ctx)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


class TestHttp:
    async def test_chunked_body_is_411(self, api: Api, ids: Ids) -> None:
        """A body without Content-Length is refused with 411; nothing is created."""
        answer = await raw(api, b"POST /v1/grants HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", ids.admin)
        assert answer.startswith(b"HTTP/1.1 411 ")
        assert await api.store.list_grants() == []

    async def test_malformed_request_from_stranger_is_401(self, api: Api) -> None:
        """Without a certificate even a malformed request gets only 401: no hints for strangers."""
        answer = await raw(api, b"GARBAGE\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 401 ")
        assert b'"reason":"identity_missing"' in answer

    async def test_malformed_request_from_admin_is_400(self, api: Api, ids: Ids) -> None:
        """An admin's malformed request line is 400 with a JSON body."""
        answer = await raw(api, b"GET v1/grants HTTP/1.1\r\nHost: x\r\n\r\n", ids.admin)
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert b'"error":"malformed request line"' in answer

    async def test_stalled_and_plaintext_clients_block_nobody(self, api: Api, ids: Ids) -> None:
        """A client that never handshakes, or speaks plain HTTP, does not hold up an admin's request."""
        _, stalled = await asyncio.open_connection("127.0.0.1", api.server.port)
        plain_reader, plain = await asyncio.open_connection("127.0.0.1", api.server.port)
        plain.write(b"GET /v1/grants HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            assert await asyncio.wait_for(plain_reader.read(), 10) == b""  # closed, never answered in plaintext
            async with api.client(ids.admin) as c:
                r = await asyncio.wait_for(c.get("/v1/grants"), 5)
            assert r.status_code == 200
        finally:
            stalled.close()
            plain.close()


# -- inventory ---------------------------------------------------------------------------------


class TestInventory:
    async def test_lists_every_definition(self, api: Api, ids: Ids) -> None:
        """Every credential with kind, owner, lifetime, cached expiry and last use, and the rules using it."""
        now = time.time()
        api.snapshot.append(CachedInfo(name="payments", kind="oauth2_client_credentials", scope="",
                                       expires_at=now + 300, issued_at=now - 60, last_used=now - 5))
        async with api.client(ids.admin) as c:
            r = await c.get("/v1/credentials")
        assert r.status_code == 200
        creds = {c["name"]: c for c in r.json()["credentials"]}
        assert list(creds) == ["github-deploy", "payments", "stripe"]
        assert {n: (c["kind"], c["owner"], c["lifetime"], c["rules"]) for n, c in creds.items()} == {
            "github-deploy": ("static", "platform-team", "long-lived", []),
            "payments": ("oauth2_client_credentials", None, "brokered", ["prod-db-maintenance"]),
            "stripe": ("static", "payments-team", "long-lived", ["billing-to-stripe", "prod-emergency"]),
        }
        assert (creds["payments"]["expires_at"], creds["payments"]["last_used"]) == (now + 300, now - 5)
        assert creds["payments"]["cached"] == [{"scope": "", "issued_at": now - 60, "expires_at": now + 300,
                                                "last_used": now - 5}]
        assert creds["stripe"]["cached"] == [] and creds["stripe"]["expires_at"] is None
        assert creds["stripe"]["last_used"] is None

    async def test_last_use_of_uncached_static_key(self, api: Api, ids: Ids) -> None:
        """A static key is never cached, yet its last injection shows as last use."""
        api.last_used["stripe"] = 1_800_000_000.0
        async with api.client(ids.admin) as c:
            creds = {c["name"]: c for c in (await c.get("/v1/credentials")).json()["credentials"]}
        assert creds["stripe"]["last_used"] == 1_800_000_000.0 and creds["stripe"]["cached"] == []

    async def test_never_shows_values(self, api: Api, ids: Ids) -> None:
        """The inventory holds no secret value and not even where a secret is read from."""
        async with api.client(ids.admin) as c:
            text = (await c.get("/v1/credentials")).text
        for needle in (SECRET, FILE_SECRET, "TEST_STRIPE_KEY", "gh-token", "client_secret"):
            assert needle not in text


# -- the server certificate and the metric names -----------------------------------------------


class TestApiServerCert:
    def test_issued_by_interception_ca(self, confdir: Path) -> None:
        """The API's certificate chains to the interception CA and names the hosts clients dial."""
        issued = api_server_cert(confdir, ("api.internal", "10.0.0.5", "0.0.0.0"))
        ca = x509.load_pem_x509_certificate((confdir / "mitmproxy-ca-cert.pem").read_bytes())
        issued.cert.verify_directly_issued_by(ca)
        san = issued.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(n.value) for n in san] == ["api.internal", "10.0.0.5"]
        assert issued.cert.not_valid_after_utc <= ca.not_valid_after_utc

    def test_wildcard_listen_names_loopback(self, confdir: Path) -> None:
        """Listening on 0.0.0.0 alone gives a certificate for localhost and the loopback addresses."""
        san = api_server_cert(confdir, ("0.0.0.0",)).cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        assert [str(n.value) for n in san] == ["localhost", "127.0.0.1", "::1"]

    def test_missing_ca_is_a_clear_error(self, tmp_path: Path) -> None:
        """Without the interception CA the error names the file and who creates it."""
        with pytest.raises(ValueError, match=r"mitmproxy-ca.pem cannot be read .*mitmproxy creates it at start"):
            api_server_cert(tmp_path, ("127.0.0.1",))


class TestGrantMetrics:
    def test_registered_at_zero_and_documented(self) -> None:
        """track_grants() registers both counters once, at 0, and docs/metrics.md documents them."""
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        metrics.track_grants()
        metrics.track_grants()
        assert registry.get_sample_value("secretless_grants_total", {"break_glass": "true"}) == 0
        assert registry.get_sample_value("secretless_grant_revocations_total", {"reason": "manual"}) == 0
        doc = DOCS.read_text()
        for name in ("secretless_grants_total", "secretless_grant_revocations_total", "grant.created",
                     "grant.revoked", "admin.denied"):
            assert f"`{name}`" in doc

    def test_free_text_reason_is_not_a_label(self) -> None:
        """A revocation reason outside the closed list is counted as other."""
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        metrics.grant_revoked(reason="INC-42: done early")
        assert registry.get_sample_value("secretless_grant_revocations_total", {"reason": "other"}) == 1


# -- the CLI -----------------------------------------------------------------------------------


@dataclass
class Ran:
    code: int
    out: str
    err: str


async def cli(api: Api | None, *args: str, cert: Cert | None = None, cacert: str | None = None,
              url: str | None = None) -> Ran:
    """Run the real ``secretless-proxy`` command against the API (settings through the environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECRETLESS_ADMIN_")}
    env["HTTPS_PROXY"] = env["ALL_PROXY"] = "http://127.0.0.1:9"  # must be ignored: the API is dialled directly
    if url or api:
        env["SECRETLESS_ADMIN_API"] = url or api.url  # type: ignore[union-attr]
    if cacert or api:
        env["SECRETLESS_ADMIN_CACERT"] = cacert or api.cacert  # type: ignore[union-attr]
    if cert is not None:
        env["SECRETLESS_ADMIN_CERT"], env["SECRETLESS_ADMIN_KEY"] = cert
    proc = await asyncio.create_subprocess_exec(str(BIN / "secretless-proxy"), *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


@pytest.mark.slow  # runs the CLI in a subprocess (an interpreter start and mitmproxy's imports each)
class TestCli:
    async def test_round_trip(self, api: Api, ids: Ids) -> None:
        """grant → grants shows it active → revoke → grants shows it revoked, all through the real CLI."""
        g = await cli(api, "grant", "--workload", REPORTS, "--rule", "prod-db-maintenance", "--ttl", "15m",
                      "--reason", "INC-42 backfill", cert=ids.admin)
        assert g.code == 0, g.err
        assert g.out.startswith("granted ") and f"{REPORTS} may use rule 'prod-db-maintenance' until " in g.out
        grant_id = g.out.split()[1].rstrip(":")
        listed = await cli(api, "grants", cert=ids.admin)
        assert listed.code == 0, listed.err
        header, row = listed.out.splitlines()
        assert header.split()[:4] == ["ID", "STATE", "WORKLOAD", "RULE"]
        assert row.split()[:4] == [grant_id, "active", REPORTS, "prod-db-maintenance"]
        revoked = await cli(api, "revoke", grant_id, "--reason", "done", cert=ids.admin)
        assert (revoked.code, revoked.out.strip()) == (0, f"revoked {grant_id} ({REPORTS}, rule 'prod-db-maintenance'): done")
        after = await cli(api, "grants", "--json", cert=ids.admin)
        assert [(x["id"], x["state"], x["revoke_reason"]) for x in json.loads(after.out)["grants"]] == [
            (grant_id, "revoked", "done")]
        assert await api.store.find_grant(REPORTS, "prod-db-maintenance") is None

    async def test_break_glass_flag(self, api: Api, ids: Ids) -> None:
        """--break-glass issues a break-glass grant; --json prints the API's answer."""
        r = await cli(api, "grant", "--workload", REPORTS, "--rule", "prod-emergency", "--ttl", "1h",
                      "--reason", "INC-7", "--break-glass", "--json", cert=ids.admin)
        assert r.code == 0, r.err
        assert json.loads(r.out)["break_glass"] is True
        assert api.count("secretless_grants_total", break_glass="true") == 1

    async def test_inventory(self, api: Api, ids: Ids) -> None:
        """inventory prints a table of every credential, with no secret value."""
        r = await cli(api, "inventory", cert=ids.admin)
        assert r.code == 0, r.err
        lines = r.out.splitlines()
        assert lines[0].split() == ["NAME", "KIND", "OWNER", "LIFETIME", "CACHED", "EXPIRES", "LAST", "USED", "RULES"]
        assert lines[3].split()[:4] == ["stripe", "static", "payments-team", "long-lived"]
        assert lines[3].endswith("billing-to-stripe, prod-emergency")
        assert SECRET not in r.out and FILE_SECRET not in r.out

    @pytest.mark.parametrize(("args", "who", "message"), [
        (("grant", "--workload", REPORTS, "--rule", "nope", "--ttl", "15m"), "admin",
         "secretless-proxy grant: unknown rule 'nope' (rules that take grants: prod-db-maintenance, "
         "prod-emergency) (400 unknown_rule)"),
        (("grant", "--workload", REPORTS, "--rule", "prod-db-maintenance", "--ttl", "soon"), "admin",
         "secretless-proxy grant: --ttl: invalid TTL 'soon'"),
        (("grant", "--workload", REPORTS, "--rule", "prod-emergency", "--ttl", "1h", "--break-glass"), "admin",
         "a break-glass grant needs a reason"),
        (("grants",), "billing", f"secretless-proxy grants: workload {BILLING} is not listed under admin.workloads "
                                 "(403 not_admin)"),
        (("inventory",), None, "no client certificate was presented"),
        (("revoke", "abcdefgh12345678"), "admin", "no grant abcdefgh12345678: unknown, expired or not a grant id "
                                                   "(404 grant_not_found)"),
    ])
    async def test_api_errors(self, api: Api, ids: Ids, args: tuple[str, ...], who: str | None, message: str) -> None:
        """A refusal exits 1 with the API's own sentence on stderr, never a traceback."""
        r = await cli(api, *args, cert=getattr(ids, who) if who else None)
        assert r.code == 1
        assert message in r.err
        assert "Traceback" not in r.err and r.out == ""

    async def test_connection_errors(self, api: Api, ids: Ids, pki: Pki) -> None:
        """No API, plain http, a closed port, an untrusted or misnamed server, a missing key: exit 1, one sentence."""
        cases = [
            (await cli(None, "grants", cert=ids.admin), "no admin API given: pass --api https://HOST:PORT"),
            (await cli(api, "grants", cert=ids.admin, url="http://127.0.0.1:1"), "--api must be https://HOST:PORT"),
            (await cli(api, "grants", cert=ids.admin, url="https://127.0.0.1:1"),
             "cannot reach the admin API at https://127.0.0.1:1"),
            (await cli(api, "grants", cert=ids.admin, cacert=str(pki.upstream_ca_file)),
             "--cacert must name the CA that issued the API's certificate"),
            (await cli(api, "grants", cert=ids.admin, url=api.url.replace("127.0.0.1", "localhost")),
             "the API's certificate names the host of admin.api_listen"),
            (await cli(api, "grants", cert=(ids.admin[0], "/nonexistent/key.pem")),
             "cannot load the admin certificate"),
        ]
        for ran, message in cases:
            assert ran.code == 1, ran
            assert message in ran.err, ran.err
            assert "Traceback" not in ran.err


def _client_hello(ctx: ssl.SSLContext | None = None) -> bytes:
    """A real ClientHello, as a TLS client sends it first."""
    out, into = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = (ctx or ssl.create_default_context()).wrap_bio(into, out, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


class TestAdmission:
    @pytest.mark.parametrize(("data", "complete"), [
        (_client_hello(), True),
        (_client_hello() + b"\x17\x03\x03", True),  # more behind it
        (_client_hello()[:-1], False),  # the record not yet all in
        (_client_hello()[:5], False),  # its header alone
        (b"\x16\x03\x01\xff\xff" + b"\x00" * 65535, False),  # longer than any TLS record may be
        (b"\x16\x03\x01\x00\x00", False),  # an empty handshake record
        (b"GET /v1/grants HTTP/1.1\r\n\r\n", False),  # not TLS
    ], ids=["client-hello", "client-hello-and-more", "partial-record", "header-only", "oversized-record",
            "empty-record", "plain-http"])
    async def test_only_a_whole_first_record_holds_a_request(self, api: Api, data: bytes, complete: bool) -> None:
        """A connection holds its request (is never evicted at a cap) only once its whole first TLS record is in."""
        assert api.server.complete_request(data) is complete

    async def test_a_long_client_hello_takes_a_silent_slot(self, api: Api, ids: Ids) -> None:
        """At the per-client cap, an admin whose ClientHello (~10 KB, longer than a request head) is in
        takes the slot of a silent connection at once."""
        api.server.set_limits(max_connections=64, max_per_client=1, metrics=None)
        host, port = api.url.removeprefix("https://").rsplit(":", 1)
        with socket.create_connection((host, int(port))):  # silent: holds this address's one slot
            await asyncio.sleep(0.1)
            ctx = ssl.create_default_context(cafile=api.cacert)
            ctx.load_cert_chain(*ids.admin)
            ctx.set_alpn_protocols(["http/1.1", *(f"{i:03d}".ljust(250, "x") for i in range(40))])
            assert len(_client_hello(ctx)) > 10_000
            async with asyncio.timeout(2):  # a held newcomer would wait for the silent one's 5 s timeout
                reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=host)
                writer.write(b"GET /v1/grants HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                status = await reader.readline()
                writer.close()
        assert status.startswith(b"HTTP/1.1 200"), status


class TestEndToEnd:
    async def test_cli_against_running_proxy(self, pki: Pki, ids: Ids, tmp_path: Path,
                                             proxy_factory: Callable[..., ProxyProcess]) -> None:
        """A real proxy process serves the admin API on admin.api_listen, trusted via its interception CA."""
        proxy = proxy_factory(config_dict(pki, tmp_path))
        m = re.search(r"admin API on (https://127\.0\.0\.1:\d+)", proxy.output())
        assert m, proxy.output()
        target = {"url": m.group(1), "cacert": pki.interception_ca_cert}
        g = await cli(None, "grant", "--workload", REPORTS, "--rule", "prod-db-maintenance", "--ttl", "15m",
                      "--reason", "INC-42", "--json", cert=ids.admin, **target)
        assert g.code == 0, g.err
        grant_id = json.loads(g.out)["id"]
        listed = await cli(None, "grants", "--json", cert=ids.admin, **target)
        assert [x["id"] for x in json.loads(listed.out)["grants"]] == [grant_id]
        refused = await cli(None, "inventory", cert=ids.billing, **target)
        assert (refused.code, "(403 not_admin)" in refused.err) == (1, True)
        assert f'"event":"grant.created","grant_id":"{grant_id}"' in proxy.output()
