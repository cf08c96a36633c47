"""The admin listener on a real loopback socket: metrics, health, readiness, OIDC, bad requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from secretless_proxy.admin.exchange import MAX_HEAD
from secretless_proxy.admin.health import AdminServer
from secretless_proxy.metrics import Degraded, Metrics

JWKS = {"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "x": "x", "y": "y", "use": "sig", "alg": "ES256"}]}
OPENID = {"issuer": "https://proxy.example", "jwks_uri": "https://proxy.example/.well-known/jwks.json"}


@dataclass
class Admin:
    server: AdminServer
    url: str
    host: str
    port: int
    registry: CollectorRegistry
    metrics: Metrics
    checks: dict[str, str | None] = field(default_factory=dict)


async def start(oidc: Callable[[], tuple[dict, dict]] | None = None) -> Admin:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    checks: dict[str, str | None] = {"config": None, "audit": None}
    server = AdminServer("127.0.0.1", 0, metrics=metrics, readiness=lambda: checks, oidc=oidc)
    host, port = await server.start()
    return Admin(server=server, url=f"http://{host}:{port}", host=host, port=port, registry=registry,
                 metrics=metrics, checks=checks)


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    a = await start()
    yield a
    await a.server.close()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as c:
        yield c


async def raw(a: Admin, data: bytes, *, read: bool = True) -> bytes:
    """Send raw bytes and read until the server closes the connection."""
    reader, writer = await asyncio.open_connection(a.host, a.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10) if read else b""
    finally:
        writer.close()
        await writer.wait_closed()


class TestAdminServer:
    async def test_binds_ephemeral_port(self, admin: Admin) -> None:
        """Port 0 binds a free port and start() returns it."""
        assert admin.port != 0
        assert admin.host == "127.0.0.1"

    async def test_metrics_parse(self, admin: Admin, client: httpx.AsyncClient) -> None:
        """/metrics serves the registry in Prometheus text format that parses."""
        admin.metrics.request_done(rule="billing", decision="injected", overhead_seconds=0.0003)
        r = await client.get(admin.url + "/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        (sample,) = [s for s in families["secretless_requests"].samples if s.name == "secretless_requests_total"]
        assert sample.labels == {"rule": "billing", "decision": "injected"}
        assert sample.value == 1
        assert families["secretless_ready"].samples[0].value == 1

    async def test_metrics_openmetrics(self, admin: Admin, client: httpx.AsyncClient) -> None:
        """An OpenMetrics Accept header gets OpenMetrics."""
        r = await client.get(admin.url + "/metrics", headers={"Accept": "application/openmetrics-text"})
        assert r.headers["content-type"].startswith("application/openmetrics-text")
        assert r.text.endswith("# EOF\n")

    async def test_metrics_ignores_query(self, admin: Admin, client: httpx.AsyncClient) -> None:
        """A query string on a known path is ignored."""
        assert (await client.get(admin.url + "/metrics?name[]=x")).status_code == 200

    async def test_healthz(self, admin: Admin, client: httpx.AsyncClient) -> None:
        """/healthz is 200 "ok" while the process runs, even when not ready."""
        admin.checks["config"] = "no config loaded"
        r = await client.get(admin.url + "/healthz")
        assert (r.status_code, r.text) == (200, "ok\n")

    async def test_readyz_turns_503_naming_the_check(self, admin: Admin, client: httpx.AsyncClient) -> None:
        """/readyz is 200 while all checks pass, then 503 naming the failing check."""
        r = await client.get(admin.url + "/readyz")
        assert r.status_code == 200
        assert r.json() == {"ready": True, "failing": [], "degraded": [], "checks": {"audit": "ok", "config": "ok"}}
        admin.checks["audit"] = "audit sink failing: file:/var/log/a.log"
        r = await client.get(admin.url + "/readyz")
        assert r.status_code == 503
        assert r.json() == {"ready": False, "failing": ["audit"], "degraded": [],
                            "checks": {"audit": "audit sink failing: file:/var/log/a.log", "config": "ok"}}
        assert admin.registry.get_sample_value("secretless_ready") == 0

    async def test_a_degraded_check_is_named_but_keeps_the_proxy_ready(self, admin: Admin,
                                                                       client: httpx.AsyncClient) -> None:
        """A Degraded finding (a rejected reload, the previous config serving) keeps /readyz 200 and
        secretless_ready 1, and is named under degraded: one bad ConfigMap edit would otherwise take
        every replica out of the Service at once."""
        admin.checks["config"] = Degraded("last reload failed, the previous config serves: 1 error(s)")
        r = await client.get(admin.url + "/readyz")
        assert r.status_code == 200
        assert r.json() == {"ready": True, "failing": [], "degraded": ["config"], "checks": {
            "audit": "ok", "config": "last reload failed, the previous config serves: 1 error(s)"}}
        assert admin.registry.get_sample_value("secretless_ready") == 1

    async def test_readyz_check_raising(self, client: httpx.AsyncClient) -> None:
        """A readiness callable that raises makes the proxy not ready instead of crashing the listener."""
        metrics = Metrics(CollectorRegistry())
        server = AdminServer("127.0.0.1", 0, metrics=metrics, readiness=lambda: 1 / 0)  # type: ignore[arg-type,return-value]
        host, port = await server.start()
        try:
            r = await client.get(f"http://{host}:{port}/readyz")
            assert r.status_code == 503
            assert r.json()["checks"] == {"readiness": "check raised ZeroDivisionError"}
        finally:
            await server.close()

    async def test_oidc_documents(self, client: httpx.AsyncClient) -> None:
        """With a signer, the JWKS and discovery documents come from the provider callable."""
        a = await start(oidc=lambda: (JWKS, OPENID))
        try:
            r = await client.get(a.url + "/.well-known/jwks.json")
            assert (r.status_code, r.json()) == (200, JWKS)
            assert r.headers["content-type"] == "application/json"
            r = await client.get(a.url + "/.well-known/openid-configuration")
            assert (r.status_code, r.json()) == (200, OPENID)
        finally:
            await a.server.close()

    async def test_oidc_provider_failing(self, client: httpx.AsyncClient) -> None:
        """A provider that raises gives 503, not a crash."""
        def broken() -> tuple[dict, dict]:
            raise RuntimeError("key store down")
        a = await start(oidc=broken)
        try:
            r = await client.get(a.url + "/.well-known/jwks.json")
            assert r.status_code == 503
            assert "key store down" not in r.text
        finally:
            await a.server.close()

    @pytest.mark.parametrize("path", ["/.well-known/jwks.json", "/.well-known/openid-configuration"])
    async def test_oidc_404_without_signer(self, admin: Admin, client: httpx.AsyncClient, path: str) -> None:
        """Without a signer the OIDC documents are 404."""
        assert (await client.get(admin.url + path)).status_code == 404

    async def test_unknown_path_404(self, admin: Admin, client: httpx.AsyncClient) -> None:
        """An unknown path is 404."""
        assert (await client.get(admin.url + "/admin")).status_code == 404

    @pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
    async def test_other_methods_405(self, admin: Admin, client: httpx.AsyncClient, method: str) -> None:
        """Methods other than GET/HEAD are 405 with an Allow header."""
        r = await client.request(method, admin.url + "/metrics")
        assert r.status_code == 405
        assert r.headers["allow"] == "GET, HEAD"

    async def test_head(self, admin: Admin, client: httpx.AsyncClient) -> None:
        """HEAD answers like GET without a body."""
        r = await client.head(admin.url + "/healthz")
        assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"", "3")

    @pytest.mark.parametrize("data", [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS ClientHello
        b"GET /metrics\r\n\r\n",  # HTTP/0.9
        b"GET http://x/metrics HTTP/1.1\r\nHost: x\r\n\r\n",  # absolute-form: we are not a proxy
        b"GET /metrics HTTP/2.0\r\nHost: x\r\n\r\n",
        b"get /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n\r\n",  # no Host
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\n\r\n\r\n",  # bare LF
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n",  # incomplete head, then EOF
    ])
    async def test_garbage_gets_400(self, admin: Admin, client: httpx.AsyncClient, data: bytes) -> None:
        """Malformed requests get 400 and the listener keeps serving."""
        reader, writer = await asyncio.open_connection(admin.host, admin.port)
        writer.write(data)
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await writer.wait_closed()
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert (await client.get(admin.url + "/healthz")).status_code == 200

    async def test_oversized_head(self, admin: Admin, client: httpx.AsyncClient) -> None:
        """A request head beyond 8 KiB gets 431 and the listener keeps serving."""
        data = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (MAX_HEAD * 2) + b"\r\n\r\n"
        answer = await raw(admin, data)
        assert answer.startswith(b"HTTP/1.1 431 ")
        assert (await client.get(admin.url + "/healthz")).status_code == 200

    async def test_slow_client_does_not_block_others(self, admin: Admin, client: httpx.AsyncClient) -> None:
        """A client that sends half a request does not stall other requests."""
        _, writer = await asyncio.open_connection(admin.host, admin.port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")
        await writer.drain()
        try:
            r = await asyncio.wait_for(client.get(admin.url + "/healthz"), 2)
            assert r.status_code == 200
        finally:
            writer.close()
            await writer.wait_closed()

    async def test_close_with_idle_connection(self) -> None:
        """close() returns promptly even while a client holds an idle connection."""
        a = await start()
        reader, writer = await asyncio.open_connection(a.host, a.port)
        await asyncio.sleep(0.05)  # let the server accept it
        await asyncio.wait_for(a.server.close(), 2)
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        await writer.wait_closed()
        with pytest.raises(OSError):
            await asyncio.open_connection(a.host, a.port)

    async def test_concurrent_scrapes(self, admin: Admin, client: httpx.AsyncClient) -> None:
        """Many concurrent scrapes are all answered."""
        rs = await asyncio.gather(*(client.get(admin.url + "/metrics") for _ in range(30)))
        assert {r.status_code for r in rs} == {200}
