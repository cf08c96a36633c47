"""Loopback ports and listeners, and polling, for tests that wait on another process."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Self

from secretless_proxy.dev.certs import Issued
from secretless_proxy.dev.echoserver import TlsHttpServer, tls_server_context


def _port_range() -> tuple[int, int]:
    """This test process's slice of the ports below the kernel's ephemeral range.

    A port the kernel picks for ``bind(0)`` comes from the ephemeral range, which every outgoing
    connection on the machine draws from too: with four xdist workers making thousands of
    connections, a port that was free a moment ago was often taken before the proxy or a
    redis-server bound it ("address already in use"). Below that range the kernel hands out no
    port on its own, and each xdist worker gets its own slice, so only a test can take a port
    another test was given.
    """
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    low, high = 10000, max(10000 + 1000, min(ephemeral, 32768))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    span = (high - low) // count
    return low + index % count * span, low + (index % count + 1) * span


def free_port() -> int:
    """A loopback TCP port that is free now, from this process's slice (see ``_port_range``), for
    listeners whose port goes into a config. Where the proxy can bind port 0 and say which port it
    got, prefer that."""
    low, high = _port_range()
    for _ in range(500):
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {low}-{high}")


def wait_for[T](predicate: Callable[[], T], *, timeout: float = 10, interval: float = 0.05,
                what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def accept_loop(sock: socket.socket, handle: Callable[[socket.socket], None], *,
                accepted: Callable[[], None] = lambda: None, stop: Callable[[], bool] = lambda: False) -> None:
    """Accept until the listening socket is closed (or ``stop()``); each connection is handled by
    ``handle`` in a daemon thread, after ``accepted()`` (a counter) is called. A listening socket with a
    timeout wakes up to look at ``stop()``."""
    while not stop():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        accepted()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def recv_head(conn: socket.socket, bufsize: int = 65536) -> bytes:
    """What ``conn`` sends up to the blank line that ends an HTTP head (and whatever came with it in
    the same read); b"" if the peer closed before the head was complete."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(bufsize)
        if not chunk:
            return b""
        head += chunk
    return head


def head_field(head: bytes, name: bytes) -> bytes | None:
    """The value of the first header line called ``name`` (lower case) in a raw head, or None."""
    return next((line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                 if line.lower().startswith(name + b":")), None)


class TlsListener:
    """A TLS listener on 127.0.0.1 for upstreams that write raw bytes: each accepted connection,
    once its handshake is done, goes to ``handle(conn)`` in a daemon thread; a peer that hangs up
    or fails the handshake ends only its own connection."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._ctx = ctx
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]

    def start(self) -> None:
        threading.Thread(target=accept_loop, args=(self._sock, self._one), daemon=True).start()

    def close(self) -> None:
        self._sock.close()

    def handle(self, conn: ssl.SSLSocket) -> None:
        raise NotImplementedError

    def _one(self, raw: socket.socket) -> None:
        try:
            with self._ctx.wrap_socket(raw, server_side=True) as conn:
                self.handle(conn)
        except OSError:  # ssl.SSLError included
            pass


class FakeHttps:
    """A fake HTTPS API on 127.0.0.1 (``url`` names localhost) inside its ``with`` block: the
    server ``make_server(ctx)`` builds serves it in a thread; leaving sets ``_stop``, which the
    handlers a test makes hang wait on, and joins every thread."""

    thread_name = "fake-https"

    def __init__(self, server_cert: Issued) -> None:
        self._server_cert = server_cert
        self._stop = threading.Event()
        self._server: TlsHttpServer | None = None
        self.url = ""

    def make_server(self, ctx: ssl.SSLContext) -> TlsHttpServer:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._server = self.make_server(tls_server_context(self._server_cert))
        self.url = f"https://localhost:{self._server.server_address[1]}"
        self._server.start(self.thread_name)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.stop()


class LoopbackServer:
    """A server on a loopback socket whose ``_serve`` runs in a daemon thread inside its ``with``
    block; leaving sets ``_stop`` and closes the socket (waking a blocked accept or receive), then
    joins the thread."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True, name=f"{type(self).__name__}-{self.port}")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        with contextlib.suppress(OSError):  # close() alone does not wake a thread blocked in accept()
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        raise NotImplementedError


class QuietHandler(BaseHTTPRequestHandler):
    """The base of the test upstreams built on http.server: HTTP/1.1 keep-alive, silent, and no
    Nagle delay (head and body are two writes: the body waited 40 ms for the peer's delayed ACK)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        """Silenced."""
