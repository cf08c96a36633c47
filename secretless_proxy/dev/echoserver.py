"""A real HTTP(S) echo server: the upstream for tests, benchmarks and the README quickstart.

Every request, whatever its method or path, gets ``200`` and a JSON echo of what arrived::

    {"method": "GET", "path": "/p", "query": [["a", "1"], ["a", "2"]],
     "headers": [["Host", "localhost:1234"], ...], "body": ""}

Query pairs and headers keep their order and duplicates, so tests can see exactly what a
proxy added, removed or reordered. The same dicts are appended to ``EchoUpstream.requests``.
"""

from __future__ import annotations

import json
import socket
import ssl
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl

from secretless_proxy.dev.certs import Issued

__all__ = ["EchoUpstream", "TlsHttpServer", "tls_server_context"]

_LOOPBACK_NAMES = ("127.0.0.1", "localhost")


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers any method with a JSON echo of the request."""

    protocol_version = "HTTP/1.1"  # keep-alive, so tests can check connection reuse
    disable_nagle_algorithm = True  # head and body are two writes: no 40 ms delayed-ACK stall between them
    server: _EchoServer

    def __getattr__(self, name: str) -> Any:
        # BaseHTTPRequestHandler dispatches on do_<METHOD>; echo every method, even odd ones.
        if name.startswith("do_"):
            return self._echo
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: the default writes every request to stderr."""

    def _echo(self) -> None:
        try:
            body = self._read_body()
        except ValueError as exc:
            self.send_error(400, str(exc))
            self.close_connection = True
            return
        path, _, query = self.path.partition("?")
        record = {
            "method": self.command,
            "path": path,
            "query": [list(kv) for kv in parse_qsl(query, keep_blank_values=True)],
            "headers": [[name, value] for name, value in self.headers.items()],
            "body": body.decode("utf-8", errors="replace"),
        }
        self.server.record(record)
        payload = json.dumps(record).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return b""
        try:
            length = int(raw_length)
        except ValueError:
            raise ValueError(f"bad Content-Length {raw_length!r}") from None
        if length < 0:
            raise ValueError(f"bad Content-Length {raw_length!r}")
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        # Some clients/proxies stream bodies; decoding here keeps the echo faithful.
        chunks: list[bytes] = []
        while True:
            size_line = self.rfile.readline(1024).split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise ValueError("bad chunk size") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # skip trailers
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline(8)  # CRLF after the chunk


class TlsHttpServer(ThreadingHTTPServer):
    """Threaded server that does TLS per connection and can force open connections closed.

    The base of the echo server and of the test suite's fake upstreams (IdP, GitHub API), so each
    of them stops without a handler thread outliving it.
    """

    # Non-daemon so server_close() joins every handler (ThreadingMixIn only tracks those);
    # close_connections() first wakes any handler parked on a keep-alive read.
    daemon_threads = False

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 ssl_context: ssl.SSLContext | None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.ssl_context = ssl_context
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._closing = False
        self._thread: threading.Thread | None = None
        super().__init__(address, handler)

    def start(self, name: str) -> None:
        """Serve in a background thread (``name``) until ``stop()``."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, name=name,
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, wake the handlers parked on keep-alive reads and join every thread."""
        if self._thread is not None:
            self.shutdown()
        self.close_connections()
        self.server_close()  # joins the handler threads
        if self._thread is not None:
            self._thread.join()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Runs in the per-connection thread, so a slow or bad handshake never stalls accept().
        with self._lock:
            if self._closing:
                return
            conn: socket.socket = request
            if self.ssl_context is not None:
                # No I/O yet: the handshake happens below, outside the lock.
                conn = self.ssl_context.wrap_socket(
                    request, server_side=True, do_handshake_on_connect=False
                )
            self._conns.add(conn)
        try:
            if isinstance(conn, ssl.SSLSocket):
                conn.do_handshake()
            super().finish_request(conn, client_address)
        except OSError:
            pass  # bad handshakes and resets are things tests do on purpose
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close_connections(self) -> None:
        """Refuse new connections and wake every handler blocked on a keep-alive read."""
        with self._lock:
            self._closing = True
            conns = list(self._conns)
        for conn in conns:
            try:
                # The plain-socket shutdown, so a TLS wrapper's state is left to its own thread.
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Silenced: clients disconnecting mid-request is normal in tests."""


class _EchoServer(TlsHttpServer):
    """The echo server: records every request it answers."""

    def __init__(self, address: tuple[str, int], *, ssl_context: ssl.SSLContext | None) -> None:
        self.requests: list[dict[str, Any]] = []
        super().__init__(address, _EchoHandler, ssl_context=ssl_context)

    def record(self, request: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(request)


class EchoUpstream:
    """Context manager running an echo server on ``host``: HTTPS with ``server_cert``, else HTTP."""

    def __init__(self, *, server_cert: Issued | None, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server_cert = server_cert
        self._host = host
        self._port = port
        self._server: _EchoServer | None = None
        self.port = 0
        self.url = ""

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every request received so far, oldest first."""
        return self._server.requests if self._server else []

    def __enter__(self) -> EchoUpstream:
        ctx = tls_server_context(self._server_cert) if self._server_cert else None
        self._server = _EchoServer((self._host, self._port), ssl_context=ctx)
        self.port = self._server.server_address[1]
        scheme = "https" if ctx else "http"
        # "localhost" so TLS clients check a DNS SAN and send SNI (neither happens for IPs).
        name = "localhost" if self._host in _LOOPBACK_NAMES else self._host
        name = f"[{name}]" if ":" in name else name
        self.url = f"{scheme}://{name}:{self.port}"
        self._server.start(f"echo-upstream-{self.port}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.stop()


def tls_server_context(cert: Issued) -> ssl.SSLContext:
    """A server-side TLS context (HTTP/1.1 only) for ``cert``; shared by the dev and test servers."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.set_alpn_protocols(["http/1.1"])  # never let a client pick h2, which we do not speak
    # ssl can only load keys from files; the temp dir is private (0700) and gone right after.
    with tempfile.TemporaryDirectory(prefix="echo-upstream-") as tmp:
        cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_file.write_bytes(cert.cert_pem())
        key_file.touch(mode=0o600)
        key_file.write_bytes(cert.key_pem())
        ctx.load_cert_chain(certfile=cert_file, keyfile=key_file)
    return ctx
