"""The admin listener: ``/metrics``, ``/healthz``, ``/readyz`` and the OIDC discovery documents.

A separate listener on its own address (``admin.listen``), never the proxy port: scrapers and
probes must not need a workload certificate, and workloads must not reach it through the proxy.

**Why asyncio and a minimal parser, not a WSGI server in a thread.** Every answer here reads
state the event loop owns (the registry's callbacks, the cache's expiry entries, readiness
checks, the signer's keys); answering on the loop reads it without locks or races. A thread
would also need its own shutdown dance in ``done()``. The parser is deliberately small and
strict: HTTP/1.0 or 1.1, ``GET``/``HEAD`` only, origin-form target, a request head of at most
8 KiB read within 5 s, no request body, one request per connection (``Connection: close``).
Anything else gets 400/404/405 and the connection is closed. Connections are admitted by
``Listener`` (``limits.admin_max_connections``, ``limits.admin_max_connections_per_client``).
Nothing here blocks: the only work is rendering small documents.

Endpoints:

- ``/metrics``  Prometheus exposition of the ``Metrics`` registry (OpenMetrics when asked for)
- ``/healthz``  200 ``ok``: the process and its event loop are alive
- ``/readyz``   200 when every readiness check passes, else 503; the JSON body lists each check
- ``/.well-known/jwks.json`` and ``/.well-known/openid-configuration``: from ``oidc()``, or 404
  when no signer is configured
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client.exposition import choose_encoder

from .connlimits import RateLimitedLog
from .metrics import Metrics

log = logging.getLogger("secretless.admin")
_REFUSALS = RateLimitedLog(log)  # one line per reason every 10 s, however many connections

MAX_HEAD = 8192
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
MAX_CONNECTIONS = 64

_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (/[\x21-\x7e]*) HTTP/1\.([01])\Z")
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\x20-\x7e\t\x80-\xff]*?)[ \t]*\Z")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}

Readiness = Callable[[], Mapping[str, str | None]]
Oidc = Callable[[], tuple[dict[str, Any], dict[str, Any]]]


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Listener:
    """What the admin listeners share: the asyncio server, admission and the handler tasks.

    Admission (issue 8 §4): at most ``max_per_client`` connections from one address, and at
    most ``max_connections`` in all. When the listener is full, the oldest connection that has
    not yet sent its request is closed to make room: a probe sends its request at once and is
    answered in milliseconds, so idle or trickling connections can never starve ``/healthz``,
    ``/readyz`` or the admin API, whoever opens them.
    """

    name = "admin"
    max_connections = MAX_CONNECTIONS
    max_per_client = 32
    _limit_metrics: Metrics | None = None  # where refusals are counted (set_limits)
    _server: asyncio.Server | None
    _handlers: set[asyncio.Task[None]]
    _peers: dict[asyncio.Task[None], str]
    _waiting: dict[asyncio.Task[None], None]  # still reading their request, oldest first: evictable

    def set_limits(self, *, max_connections: int, max_per_client: int, metrics: Metrics | None) -> None:
        self.max_connections, self.max_per_client, self._limit_metrics = max_connections, max_per_client, metrics
        if metrics is not None:
            metrics.track_open_connections(self.name, lambda: len(self._handlers))

    async def close(self) -> None:
        """Stop listening and drop open connections (wait_closed would wait for idle clients)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        await server.wait_closed()

    def _admit(self, writer: asyncio.StreamWriter) -> asyncio.Task[None] | None:
        """Track this connection's handler task, or close it (see the class docstring)."""
        task = asyncio.current_task()
        assert task is not None
        if not hasattr(self, "_peers"):
            self._peers, self._waiting = {}, {}
        peer = writer.get_extra_info("peername")
        addr = str(peer[0]) if peer else "?"
        reason = None
        if sum(1 for p in self._peers.values() if p == addr) >= self.max_per_client:
            reason = "max_connections_per_client"
        elif len(self._handlers) >= self.max_connections:
            victim = next(iter(self._waiting), None)
            if victim is None:
                reason = "max_connections"
            else:
                self._waiting.pop(victim)
                victim.cancel()  # its handler closes the socket
                self._refused("max_connections")
        if reason is not None:
            writer.close()
            self._refused(reason)
            return None
        self._handlers.add(task)  # type: ignore[arg-type]
        self._peers[task] = addr  # type: ignore[index]
        self._waiting[task] = None  # type: ignore[index]
        task.add_done_callback(self._forget)
        return task  # type: ignore[return-value]

    def _request_read(self, task: asyncio.Task[None]) -> None:
        """The request is in: this connection is being answered and no longer evictable."""
        self._waiting.pop(task, None)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        self._peers.pop(task, None)
        self._waiting.pop(task, None)

    def _refused(self, reason: str) -> None:
        if self._limit_metrics is not None:
            self._limit_metrics.connection_refused(self.name, reason)
        _REFUSALS.warning(f"{self.name}:{reason}", f"{self.name} listener: closed a connection ({reason})")


class AdminServer(Listener):
    """The admin HTTP listener; ``start()`` in mitmproxy's ``running()``, ``close()`` in ``done()``."""

    def __init__(self, host: str, port: int, *, metrics: Metrics, readiness: Readiness,
                 oidc: Oidc | None = None) -> None:
        self.host = host
        self.port = port
        self.metrics = metrics
        self.readiness = readiness
        self.oidc = oidc
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        # secretless_ready follows the same checks as /readyz.
        metrics.track_readiness(self._checks)

    async def start(self) -> tuple[str, int]:
        """Listen; returns the bound (host, port) — port 0 picks a free one."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_HEAD)
        sockname = self._server.sockets[0].getsockname()
        self.port = sockname[1]
        log.info("admin listener on %s:%d (/metrics /healthz /readyz)", sockname[0], sockname[1])
        return sockname[0], sockname[1]


    # -- connection ----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = self._admit(writer)
        if task is None:
            return
        try:
            await self._serve_one(reader, writer, task)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or stalled: nothing to answer
        except asyncio.CancelledError:
            pass  # close(): shutting down
        except Exception as exc:  # noqa: BLE001 - one bad connection must not take down the listener
            log.error("admin request failed (%s)", type(exc).__name__)
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         task: asyncio.Task[None]) -> None:
        head_only = False
        try:
            method, path, accept = await self._read_head(reader)
            self._request_read(task)
            head_only = method == "HEAD"
            status, headers, body = self._route(method, path, accept)
        except _BadRequest as exc:
            status, headers, body = _text(exc.status, f"{exc}\n")
        await self._write(writer, status, headers, b"" if head_only else body, len(body))

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str, str]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except asyncio.LimitOverrunError:
            raise _BadRequest(431, "request head too large") from None
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise _BadRequest(400, "incomplete request") from None
            raise
        except TimeoutError:
            raise _BadRequest(408, "request head not received in time") from None
        lines = head[:-4].split(b"\r\n")
        m = _REQUEST_LINE.match(lines[0])
        if m is None:
            raise _BadRequest(400, "malformed request line")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            h = _HEADER.match(line)
            if h is None:  # includes obsolete line folding and bare LF/CR tricks
                raise _BadRequest(400, "malformed header")
            name = h.group(1).lower()
            if name in headers and name in (b"host", b"content-length", b"transfer-encoding"):
                raise _BadRequest(400, "duplicate header")
            headers[name] = h.group(2)
        if m.group(3) == b"1" and b"host" not in headers:
            raise _BadRequest(400, "missing Host header")  # RFC 9112 §3.2
        if b"transfer-encoding" in headers or headers.get(b"content-length", b"0").strip() != b"0":
            raise _BadRequest(400, "request bodies are not accepted")
        return m.group(1).decode(), m.group(2).decode(), headers.get(b"accept", b"").decode("latin-1")

    async def _write(self, writer: asyncio.StreamWriter, status: int, headers: dict[str, str],
                     body: bytes, length: int) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
                 f"Content-Length: {length}", "Connection: close", "X-Content-Type-Options: nosniff"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)

    # -- routes --------------------------------------------------------------------------------

    def _route(self, method: str, target: str, accept: str) -> tuple[int, dict[str, str], bytes]:
        path = target.split("?", 1)[0]
        routes: dict[str, Callable[[str], tuple[int, dict[str, str], bytes]]] = {
            "/metrics": self._metrics, "/healthz": self._healthz, "/readyz": self._readyz,
            "/.well-known/jwks.json": self._jwks, "/.well-known/openid-configuration": self._openid,
        }
        route = routes.get(path)
        if route is None:
            return _text(404, "not found\n")
        if method not in ("GET", "HEAD"):
            status, headers, body = _text(405, "method not allowed\n")
            headers["Allow"] = "GET, HEAD"
            return status, headers, body
        return route(accept)

    def _metrics(self, accept: str) -> tuple[int, dict[str, str], bytes]:
        encoder, content_type = choose_encoder(accept)
        return 200, {"Content-Type": content_type, "Cache-Control": "no-store"}, encoder(self.metrics.registry)

    def _healthz(self, accept: str) -> tuple[int, dict[str, str], bytes]:
        return _text(200, "ok\n")

    def _checks(self) -> dict[str, str | None]:
        try:
            return dict(self.readiness())
        except Exception as exc:  # noqa: BLE001 - a broken check is a failing check
            return {"readiness": f"check raised {type(exc).__name__}"}

    def _readyz(self, accept: str) -> tuple[int, dict[str, str], bytes]:
        checks = self._checks()
        failing = sorted(name for name, problem in checks.items() if problem is not None)
        body = {"ready": not failing, "failing": failing,
                "checks": {name: "ok" if problem is None else str(problem) for name, problem in sorted(checks.items())}}
        return _json(200 if not failing else 503, body, cache="no-store")

    def _jwks(self, accept: str) -> tuple[int, dict[str, str], bytes]:
        return self._oidc_doc(0)

    def _openid(self, accept: str) -> tuple[int, dict[str, str], bytes]:
        return self._oidc_doc(1)

    def _oidc_doc(self, index: int) -> tuple[int, dict[str, str], bytes]:
        if self.oidc is None:
            return _text(404, "no signing key is configured\n")
        try:
            doc = self.oidc()[index]
        except Exception as exc:  # noqa: BLE001
            log.error("OIDC document provider failed (%s)", type(exc).__name__)
            return _json(503, {"error": "the signing keys are not available"}, cache="no-store")
        # Short: relying parties refetch soon after a key rotation.
        return _json(200, doc, cache="max-age=60")


def _text(status: int, text: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"}, text.encode()


def _json(status: int, doc: Any, *, cache: str) -> tuple[int, dict[str, str], bytes]:
    body = (json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n").encode()
    return status, {"Content-Type": "application/json", "Cache-Control": cache}, body
