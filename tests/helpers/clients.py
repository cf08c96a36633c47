"""Clients for the e2e tests: the real curl binary, raw CONNECT tunnels and one HTTP/1.1 exchange."""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events

# Raw sockets a test opened (hostile-client tests keep many): closed after every test, pass or fail,
# by an autouse fixture in conftest.py.
OPEN_SOCKETS: list[socket.socket] = []


@dataclass
class CurlResult:
    status: int
    body: str
    stderr: str


def curl(*args: str, proxy: str, timeout: float = 20) -> CurlResult:
    """Run the real curl binary; returns status and body (never raises on HTTP errors)."""
    assert shutil.which("curl"), "curl is required for the end-to-end tests"
    out = subprocess.run(["curl", "-sS", "--max-time", "15", "-x", proxy, "-w", "\n%{http_code}", *args],
                         capture_output=True, text=True, timeout=timeout)
    body, _, code = out.stdout.rpartition("\n")
    return CurlResult(status=int(code or 0), body=body, stderr=out.stderr)


def send_connect(sock: socket.socket, target: str) -> bytes:
    """Send ``CONNECT target`` on a socket to the proxy; returns the response head, read to its blank line."""
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "proxy closed during CONNECT"
        head += chunk
    return head


def open_tunnel(proxy_port: int, target: str) -> socket.socket:
    """A CONNECT tunnel the proxy answered 200 (closed after the test, pass or fail)."""
    raw = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    OPEN_SOCKETS.append(raw)
    head = send_connect(raw, target)
    assert head.startswith(b"HTTP/1.1 200"), head
    return raw


def svid_tunnel(proxy_port: int, port: int, *, pki, cert: bool = True, alpn: list[str] | None = None,
                spiffe_id: str = "spiffe://example.org/ns/prod/sa/billing") -> ssl.SSLSocket:
    """CONNECT to localhost:<port>, then TLS to the interception CA with a workload SVID (or none) and ALPN."""
    raw = open_tunnel(proxy_port, f"localhost:{port}")
    ctx = ssl.create_default_context(cafile=pki.interception_ca_cert)
    if cert:
        ctx.load_cert_chain(*pki.svid(spiffe_id))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    OPEN_SOCKETS.append(s)
    return s


def tunnel(proxy_port: int, target: tuple[str, int], *, sni: str, ca: str,
           cert: tuple[str, str] | None = None, alpn: list[str] | None = None) -> ssl.SSLSocket:
    """CONNECT through the proxy, then TLS with the given SNI (and client cert, ALPN offers)."""
    raw = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    head = send_connect(raw, f"{target[0]}:{target[1]}")
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False  # the SNI under test may deliberately differ from the target
    if cert:
        ctx.load_cert_chain(*cert)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx.wrap_socket(raw, server_hostname=sni)


def http_exchange(sock: ssl.SSLSocket, request: str) -> tuple[int, bytes]:
    """Send one raw HTTP/1.1 request on a kept-alive socket and read one response."""
    sock.sendall(request.encode())
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    body = resp.read()
    return resp.status, body


def h2_request(s: ssl.SSLSocket, port: int, path: str, extra: list[tuple[str, str]] = (), *,
               body: bytes | None = None, authority: str | None = None,
               trailers: list[tuple[str, str]] | None = None) -> tuple[bytes | None, bytes]:
    """One HTTP/2 request on a tunnel that chose h2, headers unvalidated (so hostile ones go out);
    (status, body) of its answer. ``trailers`` end the request after its body."""
    assert s.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "POST" if body is not None else "GET"), (":scheme", "https"),
                          (":authority", authority or f"localhost:{port}"), (":path", path), *extra], end_stream=body is None)
    if body is not None:
        conn.send_data(1, body, end_stream=trailers is None)
    if trailers is not None:
        conn.send_headers(1, trailers, end_stream=True)
    s.sendall(conn.data_to_send())
    status, data, ended = None, b"", False
    while not ended:
        chunk = s.recv(65536)
        assert chunk, "connection closed"
        for ev in conn.receive_data(chunk):
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers)[b":status"]
            elif isinstance(ev, h2.events.DataReceived):
                data += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                ended = True
        s.sendall(conn.data_to_send())
    return status, data
