"""Test parts for concurrent streams: an HTTP/2-only TLS upstream listening on several loopback
addresses (one port), recording which address got which request, and a slow OAuth2 token endpoint.

Used by test_e2e_destination.py to hold one stream's upstream connection back (its token takes
time) while another stream, under another rule, is admitted and connects.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import h2.config
import h2.connection
import h2.events
import h2.exceptions


class H2Upstream:
    """h2 over TLS on ``addresses`` (same port); ``seen`` holds (address, path, authorization)."""

    def __init__(self, addresses: tuple[str, ...], *, cert_file: str, key_file: str,
                 respond: Callable[[h2.connection.H2Connection, int, dict[str, str]], None] | None = None) -> None:
        self._respond = respond  # answers a request itself (conn, stream id, headers), e.g. with a GOAWAY
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert_file, key_file)
        self.ctx.set_alpn_protocols(["h2"])
        self.seen: list[tuple[str, str, str | None]] = []
        self.connections: list[str] = []
        self.socks: list[socket.socket] = []
        self.port = 0
        for addr in addresses:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, self.port))
            self.port = s.getsockname()[1]
            s.listen(16)
            self.socks.append(s)
            threading.Thread(target=self._accept, args=(s, addr), daemon=True).start()

    def close(self) -> None:
        for s in self.socks:
            s.close()

    def _accept(self, listener: socket.socket, addr: str) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            self.connections.append(addr)
            threading.Thread(target=self._serve, args=(sock, addr), daemon=True).start()

    def _serve(self, sock: socket.socket, addr: str) -> None:
        try:
            with self.ctx.wrap_socket(sock, server_side=True) as s:
                self._exchange(s, addr)
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            sock.close()

    def _exchange(self, s: ssl.SSLSocket, addr: str) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        while data := s.recv(65535):
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    h = dict(ev.headers)
                    self.seen.append((addr, h.get(":path", ""), h.get("authorization")))
                    if self._respond is not None:
                        self._respond(conn, ev.stream_id, h)
                        continue
                    conn.send_headers(ev.stream_id, [(":status", "200"), ("content-length", "2")])
                    conn.send_data(ev.stream_id, b"ok", end_stream=True)
            s.sendall(conn.data_to_send())


class SlowTokenEndpoint:
    """Plain-HTTP OAuth2 token endpoint on loopback that answers after ``delay`` seconds."""

    def __init__(self, token: str, *, delay: float) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # head and body are two writes: no 40 ms delayed-ACK stall between them

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(outer.delay)
                body = json.dumps({"access_token": outer.token, "token_type": "Bearer", "expires_in": 3600}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.token, self.delay = token, delay
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def h2_get_concurrently(sock: ssl.SSLSocket, authority: str, paths: list[str], *, gap: float,
                        timeout: float = 15) -> dict[str, int]:
    """Open one stream per path on one h2 connection (``gap`` seconds apart); path → status."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    ids = {}
    for i, path in enumerate(paths):
        sid = 1 + 2 * i
        ids[sid] = path
        conn.send_headers(sid, [(":method", "GET"), (":scheme", "https"), (":authority", authority), (":path", path)],
                          end_stream=True)
        sock.sendall(conn.data_to_send())
        time.sleep(gap)
    status: dict[str, int] = {}
    done: set[int] = set()
    sock.settimeout(timeout)
    while len(done) < len(ids):
        data = sock.recv(65535)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status[ids[ev.stream_id]] = int(dict(ev.headers)[":status"])
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                done.add(ev.stream_id)
        sock.sendall(conn.data_to_send())
    return status
