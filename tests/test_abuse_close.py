"""One client connection cannot flood the audit log or starve the event loop (invariant 7).

Real proxy process, real TLS, raw HTTP/1 and HTTP/2 (the ``h2`` library) clients: a connection
without a verified identity is closed after ``ANONYMOUS_REFUSALS`` refused requests (at most that
many audit records), a client resetting streams in a loop (HTTP/2 rapid reset) is closed, and
``/healthz`` keeps answering while anonymous HTTP/2 connections flood the proxy port.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
import urllib.request

import h2.config
import h2.connection
import h2.events
import pytest
from helpers.clients import OPEN_SOCKETS, svid_tunnel, tunnel
from helpers.net import free_port
from helpers.proxy import base_config

from secretless_proxy.edge.connlimits import ANONYMOUS_REFUSALS, RESETS_PER_WINDOW

BILLING = "spiffe://example.org/ns/prod/sa/billing"


@pytest.fixture
def silent(tls_counting_target):
    """A TLS target that never answers: an allowed stream stays in flight until the client resets it."""
    return tls_counting_target


@pytest.fixture
def admin_port() -> int:
    return free_port()


@pytest.fixture
def proxy(proxy_factory, pki, upstream, silent, admin_port):
    rules = [
        {"name": "billing-to-api", "workloads": [BILLING],
         "to": {"host": "localhost", "port": upstream.port, "methods": ["GET"], "paths": ["/v1/**"]},
         "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}},
        {"name": "billing-to-silent", "workloads": [BILLING], "to": {"host": "localhost", "port": silent.port},
         "action": "allow"},
    ]
    return proxy_factory(base_config(pki, rules=rules, admin={"listen": f"127.0.0.1:{admin_port}"}))


_SOCKETS = OPEN_SOCKETS  # closed after each test by conftest's autouse fixture


def denied_lines(proxy) -> list[dict]:
    return [json.loads(line) for line in proxy.output().splitlines()
            if line.startswith("{") and '"request.denied"' in line]


def metric(admin_port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def h2_tunnel(proxy, pki, port: int, *, cert: bool) -> tuple[ssl.SSLSocket, h2.connection.H2Connection]:
    """CONNECT, TLS with ALPN h2 (with the billing SVID or no certificate), the h2 preface."""
    s = svid_tunnel(proxy.port, port, pki=pki, cert=cert, alpn=["h2"])
    assert s.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    return s, conn


def flood_until_closed(s: ssl.SSLSocket, conn: h2.connection.H2Connection, port: int, *, streams: int,
                       end_stream: bool = True) -> bool:
    """HEADERS+RST_STREAM ``streams`` times; True if the proxy then closes the connection."""
    hdrs = [(":method", "GET"), (":scheme", "https"), (":authority", f"localhost:{port}"), (":path", "/x")]
    closed = threading.Event()

    def drain() -> None:
        try:
            while s.recv(1 << 16):
                pass
        except OSError:
            pass
        closed.set()

    s.settimeout(15)
    threading.Thread(target=drain, daemon=True).start()
    try:
        for _ in range(streams // 50):
            for _ in range(50):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, hdrs, end_stream=end_stream)
                conn.reset_stream(sid)
            s.sendall(conn.data_to_send())
            time.sleep(0.01)
    except OSError:
        pass  # closed while sending: what we want
    return closed.wait(15)


class TestAnonymousRefusals:
    def test_h2_connection_without_identity_is_closed_after_the_limit(self, proxy, pki, upstream, admin_port):
        """An anonymous h2 connection streaming refused requests is closed; it wrote at most the limit of audit records."""
        s, conn = h2_tunnel(proxy, pki, upstream.port, cert=False)
        assert flood_until_closed(s, conn, upstream.port, streams=1000), "the proxy kept the connection open"
        time.sleep(0.5)
        lines = denied_lines(proxy)
        assert len(lines) == ANONYMOUS_REFUSALS, len(lines)
        assert all(line["workload"] is None for line in lines)
        assert metric(admin_port, 'secretless_connections_closed_total{listener="proxy",reason="anonymous_refusals"}') == 1
        assert proxy.output().count("INFO secretless: refused ") <= ANONYMOUS_REFUSALS

    def test_http1_connection_is_closed_after_its_refusal(self, proxy, pki, upstream):
        """HTTP/1 without identity: the refusal says Connection: close and the socket closes after it."""
        s = tunnel(proxy.port, ("localhost", upstream.port), sni="localhost", ca=pki.interception_ca_cert)
        _SOCKETS.append(s)
        s.settimeout(10)
        s.sendall(f"GET /v1/x HTTP/1.1\r\nHost: localhost:{upstream.port}\r\n\r\n".encode())
        resp = http.client.HTTPResponse(s)
        resp.begin()
        resp.read()
        assert (resp.status, resp.getheader("Connection")) == (407, "close")
        assert s.recv(4096) == b""
        assert len(denied_lines(proxy)) == 1

    def test_identified_workload_is_not_closed_for_refusals(self, proxy, pki, upstream):
        """h2 with a verified identity: twice the limit of refused requests, each answered 403 and audited."""
        s, conn = h2_tunnel(proxy, pki, upstream.port, cert=True)
        s.settimeout(10)
        n = ANONYMOUS_REFUSALS * 2
        hdrs = [(":method", "GET"), (":scheme", "https"), (":authority", f"localhost:{upstream.port}"),
                (":path", "/not-allowed")]
        statuses: list[str] = []
        for _ in range(n):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, hdrs, end_stream=True)
            s.sendall(conn.data_to_send())
            ended = False
            while not ended:
                data = s.recv(65536)
                assert data, f"closed after {len(statuses)} refusals"
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        statuses.append(dict(ev.headers)[":status"])
                    ended = ended or (isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid)
                s.sendall(conn.data_to_send())
        assert statuses == ["403"] * n
        assert len([x for x in denied_lines(proxy) if x["workload"] == BILLING]) == n


class TestRapidReset:
    def test_identified_client_resetting_streams_is_closed(self, proxy, pki, silent, admin_port):
        """A workload resetting more than the limit of in-flight streams is closed and counted (CVE-2023-44487)."""
        s, conn = h2_tunnel(proxy, pki, silent.port, cert=True)
        # Without END_STREAM: a request still arriving when reset (mitmproxy drops a reset that comes in
        # the same read as a complete request: that stream is an ordinary, finished request to it).
        assert flood_until_closed(s, conn, silent.port, streams=RESETS_PER_WINDOW * 4, end_stream=False), "still open"
        assert metric(admin_port, 'secretless_connections_closed_total{listener="proxy",reason="stream_resets"}') == 1


def test_admin_answers_during_an_anonymous_h2_flood(proxy, pki, upstream, admin_port):
    """Four anonymous h2 connections reconnecting and flooding: every /healthz probe answers within 3 s."""
    stop = threading.Event()
    opened = []

    def flood() -> None:
        while not stop.is_set():
            try:
                s, conn = h2_tunnel(proxy, pki, upstream.port, cert=False)
            except (OSError, AssertionError):
                continue
            opened.append(1)
            flood_until_closed(s, conn, upstream.port, streams=500)
            s.close()

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    latencies = []
    try:
        time.sleep(1)
        for _ in range(8):
            t0 = time.monotonic()
            urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=10).read()
            latencies.append(time.monotonic() - t0)
            time.sleep(0.25)
    finally:
        stop.set()
        for t in threads:
            t.join(20)
    assert max(latencies) < 3.0, latencies
    assert len(denied_lines(proxy)) <= ANONYMOUS_REFUSALS * len(opened)
