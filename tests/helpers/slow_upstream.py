"""A real TLS upstream that answers ``GET /slow/<seconds>`` after sleeping that long.

It logs every connection and the bytes it received (not only parsed requests), the requests
that arrived and those whose response was fully written, so a shutdown test can tell a request
that reached the upstream and was answered from one that was cut.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from types import TracebackType

from helpers.net import accept_loop
from secretless_proxy.dev.certs import Issued
from secretless_proxy.dev.echoserver import tls_server_context

_TARGET = re.compile(rb"^GET /slow/([0-9.]+) HTTP/1\.1\r\n")


class SlowUpstream:
    def __init__(self, *, server_cert: Issued) -> None:
        self._ctx: ssl.SSLContext = tls_server_context(server_cert)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"https://localhost:{self.port}"
        self.connections = 0
        self.bytes_received = 0
        self.arrived = 0  # complete request heads received
        self.completed = 0  # responses fully written
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> SlowUpstream:
        t = threading.Thread(target=self._accept, name=f"slow-upstream-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._sock.close()

    def _accept(self) -> None:
        self._sock.settimeout(0.1)
        accept_loop(self._sock, self._serve, accepted=self._count, stop=self._stop.is_set)

    def _count(self) -> None:
        with self._lock:
            self.connections += 1

    def _serve(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(30)
            conn = self._ctx.wrap_socket(raw, server_side=True)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                with self._lock:
                    self.bytes_received += len(chunk)
                head += chunk
            m = _TARGET.match(head)
            with self._lock:
                self.arrived += 1
            time.sleep(float(m.group(1)) if m else 0)
            body = b"slow response\n"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            with self._lock:
                self.completed += 1
            conn.close()
        except OSError:
            pass  # the proxy cut the connection: that is what some tests check
        finally:
            raw.close()
