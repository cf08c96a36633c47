"""The admin listener: ``/metrics``, ``/healthz``, ``/readyz`` and the OIDC discovery documents.

A separate listener on its own address (``admin.listen``), never the proxy port: scrapers and
probes must not need a workload certificate, and workloads must not reach it through the proxy.

**Why asyncio, not a WSGI server in a thread.** Every answer here reads state the event loop
owns (the registry's callbacks, the cache's expiry entries, readiness checks, the signer's
keys); answering on the loop reads it without locks or races. A thread would also need its own
shutdown dance in ``done()``. HTTP is ``adminhttp``'s (h11, strict): HTTP/1.0 or 1.1, ``GET``/
``HEAD`` only, a request head of at most 8 KiB read within 5 s (408 otherwise), no request
body, one request per connection (``Connection: close``). Anything else gets 400/404/405/431
and the connection is closed. Connections are admitted by ``adminhttp.Listener``
(``limits.admin_max_connections``, ``limits.admin_max_connections_per_client``). Nothing here
blocks: the only work is rendering small documents.

Endpoints:

- ``/metrics``  Prometheus exposition of the ``Metrics`` registry (OpenMetrics when asked for)
- ``/healthz``  200 ``ok``: the process and its event loop are alive
- ``/readyz``   200 when every readiness check passes, else 503; the JSON body lists each check.
  A ``Degraded`` finding (the last reload was rejected; the previous config serves) keeps it 200
  and is listed under ``degraded``: one bad ConfigMap edit must not take every replica out.
- ``/.well-known/jwks.json`` and ``/.well-known/openid-configuration``: from ``oidc()``, or 404
  when no signer is configured
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client.exposition import choose_encoder

from secretless_proxy.admin.exchange import (
    MAX_HEAD,
    READ_TIMEOUT,
    WRITE_TIMEOUT,
    Exchange,
    Listener,
    Response,
    json_doc,
    refused_text,
    text,
)
from secretless_proxy.metrics import Degraded, Metrics
from secretless_proxy.reasons import Reason
from secretless_proxy.refusal import Refusal

log = logging.getLogger("secretless.admin")

Readiness = Callable[[], Mapping[str, str | None]]
Oidc = Callable[[], tuple[dict[str, Any], dict[str, Any]]]


class AdminServer(Listener):
    """The admin HTTP listener; ``server.AdminListeners`` starts and closes it with the process."""

    def __init__(self, host: str, port: int, *, metrics: Metrics, readiness: Readiness,
                 oidc: Oidc | None = None) -> None:
        super().__init__(host, port)
        self.metrics = metrics
        self.readiness = readiness
        self.oidc = oidc
        # secretless_ready follows the same checks as /readyz.
        metrics.track_readiness(self._checks)

    def complete_request(self, data: bytes) -> bool:
        # The whole head (no body is accepted), or more than one may be: either is answered at once.
        return b"\r\n\r\n" in data or len(data) > MAX_HEAD

    def listening(self, host: str, port: int) -> None:
        log.info("admin listener on %s:%d (/metrics /healthz /readyz)", host, port)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    task: asyncio.Task[None]) -> None:
        exchange = Exchange(lambda: reader.read(65536), max_body=None)
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    request = await exchange.read()
            except TimeoutError:
                raise Refusal(408, Reason.INVALID_REQUEST, "request head not received in time") from None
            self.request_read(task)
            response = self._route(request.method, request.target, request.header(b"accept").decode("latin-1"))
        except Refusal as exc:
            response = refused_text(exc)
        writer.write(exchange.render(response))
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)

    # -- routes --------------------------------------------------------------------------------

    def _route(self, method: str, target: str, accept: str) -> Response:
        path = target.split("?", 1)[0]
        routes: dict[str, Callable[[str], Response]] = {
            "/metrics": self._metrics, "/healthz": self._healthz, "/readyz": self._readyz,
            "/.well-known/jwks.json": self._jwks, "/.well-known/openid-configuration": self._openid,
        }
        route = routes.get(path)
        if route is None:
            return text(404, "not found\n")
        if method not in ("GET", "HEAD"):
            return refused_text(Refusal(405, Reason.METHOD_NOT_ALLOWED, "method not allowed", allow=("GET", "HEAD")))
        return route(accept)

    def _metrics(self, accept: str) -> Response:
        encoder, content_type = choose_encoder(accept)
        return Response(200, {"Content-Type": content_type, "Cache-Control": "no-store"}, encoder(self.metrics.registry))

    def _healthz(self, accept: str) -> Response:
        return text(200, "ok\n")

    def _checks(self) -> dict[str, str | None]:
        try:
            return dict(self.readiness())
        except Exception as exc:  # noqa: BLE001 - a broken check is a failing check
            return {"readiness": f"check raised {type(exc).__name__}"}

    def _readyz(self, accept: str) -> Response:
        checks = self._checks()
        failing = sorted(name for name, problem in checks.items() if problem is not None and not isinstance(problem, Degraded))
        degraded = sorted(name for name, problem in checks.items() if isinstance(problem, Degraded))
        body = {"ready": not failing, "failing": failing, "degraded": degraded,
                "checks": {name: "ok" if problem is None else str(problem) for name, problem in sorted(checks.items())}}
        return json_doc(200 if not failing else 503, body, cache="no-store")

    def _jwks(self, accept: str) -> Response:
        return self._oidc_doc(0)

    def _openid(self, accept: str) -> Response:
        return self._oidc_doc(1)

    def _oidc_doc(self, index: int) -> Response:
        if self.oidc is None:
            return text(404, "no signing key is configured\n")
        try:
            doc = self.oidc()[index]
        except Exception as exc:  # noqa: BLE001
            log.error("OIDC document provider failed (%s)", type(exc).__name__)
            return json_doc(503, {"error": "the signing keys are not available"}, cache="no-store")
        # Short: relying parties refetch soon after a key rotation.
        return json_doc(200, doc, cache="max-age=60")

