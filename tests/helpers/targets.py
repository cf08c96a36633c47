"""Targets that log connections and bytes, not only parsed requests (issue 8 tests).

A hostile test asserts that policy stopped a request *before* the proxy connected anywhere: a
target that only records well-formed requests would miss a raw relay. ``CountingTarget`` accepts
TCP (or TLS) connections on loopback, records each connection and every byte it receives, and
answers anything with a small HTTP response so a relay that did get through is visible to the
client too. ``Nginx`` runs the real ``/usr/sbin/nginx`` with two virtual hosts on one port.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from helpers.net import LoopbackServer, accept_loop, free_port

REACHED = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nREACHED"


class CountingTarget(LoopbackServer):
    """Records ``connections`` (count) and ``received`` (all bytes, every connection); ``closed`` is
    set once a connection has ended. ``answer=False``: never answers (a request held open upstream)."""

    def __init__(self, *, tls_context: ssl.SSLContext | None = None, answer: bool = True) -> None:
        self._tls = tls_context
        self._answer = answer
        self.closed = threading.Event()
        self.connections = 0
        self.received = b""
        self._lock = threading.Lock()
        super().__init__(socket.create_server(("127.0.0.1", 0)))

    @classmethod
    def tls(cls, ca) -> CountingTarget:
        """A target that speaks TLS with a ``localhost`` certificate from ``ca`` (the upstream CA)."""
        from secretless_proxy.dev import certs
        from secretless_proxy.dev.echoserver import tls_server_context

        return cls(tls_context=tls_server_context(certs.make_server_cert(ca=ca)))

    def reset(self) -> None:
        """Forget what was recorded so far (a module's tests share one target)."""
        with self._lock:
            self.connections = 0
            self.received = b""

    def reached(self) -> bool:
        with self._lock:
            return self.connections > 0 or bool(self.received)

    def _serve(self) -> None:
        accept_loop(self._sock, self._handle, accepted=self._count, stop=lambda: self._stop)

    def _count(self) -> None:
        with self._lock:
            self.connections += 1

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            while chunk := conn.recv(65536):
                with self._lock:
                    self.received += chunk
                if self._answer:
                    conn.sendall(REACHED)
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()
            self.closed.set()


NGINX = "/usr/sbin/nginx"

_NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
error_log {prefix}/error.log info;
pid {prefix}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp;
    log_format seen '$server_name|$connection|$request_length|$request|$http_host|$http_authorization';
    server {{
        listen 127.0.0.1:{port} ssl default_server;
        server_name localhost;
        ssl_certificate {prefix}/server.pem;
        ssl_certificate_key {prefix}/server-key.pem;
        access_log {prefix}/localhost.log seen;
        location / {{ return 200 "vhost=localhost\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name attacker-app.example;
        ssl_certificate {prefix}/server.pem;
        ssl_certificate_key {prefix}/server-key.pem;
        access_log {prefix}/attacker.log seen;
        location / {{ return 200 "vhost=attacker\\n"; }}
    }}
}}
"""


class Nginx:
    """A real nginx with two TLS virtual hosts (``localhost``, ``attacker-app.example``) on one port."""

    def __init__(self, *, cert_pem: bytes, key_pem: bytes) -> None:
        if not Path(NGINX).exists() and not shutil.which("nginx"):
            pytest.skip("nginx is not installed (Debian package nginx-light)")
        self.prefix = Path(tempfile.mkdtemp(prefix="nginx-test-"))
        (self.prefix / "tmp").mkdir()
        (self.prefix / "server.pem").write_bytes(cert_pem)
        (self.prefix / "server-key.pem").write_bytes(key_pem)
        self.port = free_port()
        (self.prefix / "nginx.conf").write_text(_NGINX_CONF.format(prefix=self.prefix, port=self.port))
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Nginx:
        self.proc = subprocess.Popen([NGINX if Path(NGINX).exists() else "nginx", "-p", str(self.prefix),
                                      "-c", str(self.prefix / "nginx.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError(f"nginx did not start: {self.error_log()}")
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.prefix, ignore_errors=True)

    def log(self, vhost: str) -> str:
        path = self.prefix / f"{vhost}.log"
        return path.read_text() if path.exists() else ""

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text() if path.exists() else ""

    def probe(self) -> int:
        """nginx's serial number of a fresh connection of our own: connections between two probes
        are ``probe() - earlier_probe - 1`` (nginx numbers every accepted TCP connection, ``*N``)."""
        before = self._max_serial()
        socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if (now := self._max_serial()) > before:
                return now
            time.sleep(0.02)
        raise AssertionError("nginx did not log the probe connection")

    def _max_serial(self) -> int:
        serials = [int(m) for m in re.findall(r"\*(\d+) ", self.error_log())]
        for vhost in ("localhost", "attacker"):
            serials += [int(line.split("|")[1]) for line in self.log(vhost).splitlines() if line.count("|") >= 5]
        return max(serials, default=0)
