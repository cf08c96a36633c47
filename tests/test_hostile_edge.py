"""A hostile client against the proxy's edge (issue 8 §1, §2, §3, §6): raw sockets, real TLS.

Every target records connections and bytes (targets.py), not only parsed requests: a connection
that reaches a target where policy should have stopped the request is a failure, whatever the
client was answered.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
import redis
from helpers import clients
from helpers.clients import OPEN_SOCKETS, curl, h2_request, open_tunnel, tunnel
from helpers.net import free_port
from helpers.proxy import BIN, SECRET, base_config
from helpers.redis_server import RedisServer
from helpers.targets import CountingTarget, Nginx
from helpers.upstream import EchoUpstream

from secretless_proxy.dev import certs

BILLING = "spiffe://example.org/ns/prod/sa/billing"
HEAD_LIMIT = 16 * 1024
BODY_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def allow_up(pki):
    with EchoUpstream(server_cert=certs.make_server_cert(ca=pki.upstream_ca)) as up:
        yield up


@pytest.fixture
def plain_target():
    with CountingTarget() as t:
        yield t


@pytest.fixture
def tls_target(pki):
    with CountingTarget.tls(pki.upstream_ca) as t:
        yield t


def rules(upstream, allow_up) -> list[dict]:
    return [
        {"name": "billing-to-api", "workloads": [BILLING],
         "to": {"host": "localhost", "port": upstream.port, "methods": ["GET", "POST"], "paths": ["/v1/**"]},
         "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}},
        {"name": "billing-to-open", "workloads": [BILLING], "to": {"host": "localhost", "port": allow_up.port},
         "action": "allow"},
    ]


@pytest.fixture(scope="module")
def admin_port() -> int:
    return free_port()


@pytest.fixture
def proxy(shared_proxy_factory, pki, upstream, allow_up, admin_port):
    allow_up.requests.clear()
    return shared_proxy_factory(base_config(pki, rules=rules(upstream, allow_up), admin={"listen": f"127.0.0.1:{admin_port}"},
                                     limits={"max_request_head_bytes": HEAD_LIMIT, "max_request_body_bytes": BODY_LIMIT}))


# -- raw client helpers ------------------------------------------------------------------------

_SOCKETS = OPEN_SOCKETS  # closed after each test by conftest's autouse fixture


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    _SOCKETS.append(s)
    return s



def read_response(sock) -> tuple[int, dict]:
    """Status and JSON body of one response (a non-JSON body is returned under 'raw')."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    body = resp.read()
    try:
        return resp.status, json.loads(body)
    except ValueError:
        return resp.status, {"raw": body}


def settle() -> None:
    time.sleep(0.3)  # let a relay that got through (it must not) reach its target


def audited(proxy, reason: str) -> bool:
    return any(json.loads(line).get("reason") == reason for line in proxy.output().splitlines()
               if line.startswith("{") and '"request.denied"' in line)


def svid_tunnel(proxy, pki, port: int, *, alpn: list[str] | None = None, cert=True) -> ssl.SSLSocket:
    return clients.svid_tunnel(proxy.port, port, pki=pki, cert=cert, alpn=alpn)


# -- §1 no raw relay ---------------------------------------------------------------------------


class TestNoRawRelay:
    def test_split_write_in_plain_tunnel_is_judged_as_http(self, proxy, plain_target):
        """`GE` then `T /internal …` in a tunnel is one HTTP request: judged (407), never relayed."""
        s = open_tunnel(proxy.port, f"127.0.0.1:{plain_target.port}")
        s.sendall(b"GE")
        time.sleep(0.3)
        s.sendall(f"T /internal HTTP/1.1\r\nHost: 127.0.0.1:{plain_target.port}\r\n\r\n".encode())
        status, body = read_response(s)
        settle()
        assert (status, body["reason"]) == (407, "identity_missing")
        assert not plain_target.reached()

    def test_split_write_inside_tls_to_unnamed_host(self, proxy, pki, tls_target):
        """A split request inside TLS to a host no rule names is refused 403, never relayed."""
        s = svid_tunnel(proxy, pki, tls_target.port)
        s.sendall(b"GE")
        time.sleep(0.3)
        s.sendall(f"T /internal HTTP/1.1\r\nHost: localhost:{tls_target.port}\r\n\r\n".encode())
        status, body = read_response(s)
        settle()
        assert (status, body["reason"]) == (403, "no_rule")
        assert not tls_target.reached()

    @pytest.mark.parametrize("payload", [b"*1\r\n$4\r\nPING\r\n", b"PING\r\n", b"SET k v\r\n", b"\x00\x01\x02binary"])
    def test_non_http_bytes_in_plain_tunnel_refused(self, proxy, plain_target, payload):
        """Bytes that are not an HTTP request get 400 protocol_refused; the target sees nothing."""
        s = open_tunnel(proxy.port, f"127.0.0.1:{plain_target.port}")
        s.sendall(payload)
        status, body = read_response(s)
        settle()
        assert (status, body["reason"]) == (400, "protocol_refused")
        assert not plain_target.reached()
        assert audited(proxy, "protocol_refused")

    def test_redis_through_tunnel_refused(self, proxy):
        """A real Redis server behind a tunnel gets no connection; PING and SET never arrive."""
        with RedisServer() as server:
            admin = redis.Redis.from_url(server.url)
            before = admin.info("stats")["total_connections_received"]
            for payload in (b"*1\r\n$4\r\nPING\r\n", b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"):
                s = open_tunnel(proxy.port, f"127.0.0.1:{server.port}")
                s.sendall(payload)
                status, body = read_response(s)
                assert (status, body["reason"]) == (400, "protocol_refused")
            settle()
            assert admin.info("stats")["total_connections_received"] == before
            assert admin.get("k") is None
            admin.close()

    def test_non_http_inside_tls_tunnel_refused(self, proxy, pki, tls_target):
        """Non-HTTP bytes inside the intercepted TLS (with a valid SVID) are refused, not relayed."""
        s = svid_tunnel(proxy, pki, tls_target.port)
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        status, body = read_response(s)
        settle()
        assert (status, body["reason"]) == (400, "protocol_refused")
        assert not tls_target.reached()

    def test_non_http_to_the_proxy_port_refused(self, proxy):
        """Non-HTTP bytes sent straight to the proxy's port are refused and audited."""
        s = connect(proxy.port)
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        status, body = read_response(s)
        assert (status, body["reason"]) == (400, "protocol_refused")
        assert audited(proxy, "protocol_refused")

    @pytest.mark.parametrize("with_cert", [False, True])
    def test_connect_to_the_admin_port_is_judged_by_policy(self, proxy, pki, admin_port, with_cert):
        """CONNECT to the proxy's own admin port: /metrics is judged (407/403), never served."""
        s = open_tunnel(proxy.port, f"127.0.0.1:{admin_port}")
        s.sendall(b"GE")
        time.sleep(0.2)
        s.sendall(f"T /metrics HTTP/1.1\r\nHost: 127.0.0.1:{admin_port}\r\n\r\n".encode())
        status, body = read_response(s)
        assert (status, body["reason"]) == (407, "identity_missing")
        assert "secretless_" not in json.dumps(body)
        if with_cert:  # the same through TLS with an identity: no rule names the admin port
            t = svid_tunnel(proxy, pki, admin_port)
            t.sendall(f"GET /metrics HTTP/1.1\r\nHost: localhost:{admin_port}\r\n\r\n".encode())
            status, body = read_response(t)
            assert (status, body["reason"]) == (403, "no_rule")

    def test_non_http_after_a_request_on_the_same_connection_refused(self, proxy, pki, allow_up):
        """After one allowed request, non-HTTP bytes on the kept-alive connection are refused and audited."""
        s = svid_tunnel(proxy, pki, allow_up.port)
        s.sendall(f"GET / HTTP/1.1\r\nHost: localhost:{allow_up.port}\r\n\r\n".encode())
        assert read_response(s)[0] == 200
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        status, body = read_response(s)
        assert (status, body["reason"]) == (400, "protocol_refused")
        assert len(allow_up.requests) == 1
        assert audited(proxy, "protocol_refused")

    def test_connect_inside_a_tunnel_never_tunnels(self, proxy, pki, tls_target):
        """A CONNECT sent inside an intercepted tunnel is refused in the error contract (JSON, not
        mitmproxy's HTML page) and audited under the id it names; no nested tunnel opens."""
        s = svid_tunnel(proxy, pki, tls_target.port)
        s.sendall(f"CONNECT 127.0.0.1:{tls_target.port} HTTP/1.1\r\nHost: 127.0.0.1:{tls_target.port}\r\n\r\n".encode())
        status, body = read_response(s)
        settle()
        assert (status, body.get("reason")) == (400, "protocol_refused"), body
        assert "CONNECT inside a tunnel" in body["error"]
        assert not tls_target.reached()
        assert any(json.loads(line).get("request_id") == body["request_id"] for line in proxy.output().splitlines()
                   if line.startswith("{") and '"request.denied"' in line)

    @pytest.mark.parametrize("head", [b"GET / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
                                      b"GET /x HTTP/1.0\r\n\r\n"], ids=["no_host", "empty_host", "http10"])
    def test_request_naming_no_destination_is_refused_in_the_error_contract(self, proxy, head):
        """A request sent to the proxy port in origin form with no Host names no destination: a JSON 400,
        audited under the id it carries (mitmproxy answered with its unaudited HTML page)."""
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        _SOCKETS.append(s)
        s.sendall(head)
        status, body = read_response(s)
        assert (status, body.get("reason")) == (400, "protocol_refused"), body
        assert "no destination" in body["error"]
        assert any(json.loads(line).get("request_id") == body["request_id"] for line in proxy.output().splitlines()
                   if line.startswith("{") and '"request.denied"' in line)

    @pytest.mark.parametrize(("offers", "chosen"), [(["h3"], None), (["h3", "h2"], "h2"), (["h3", "http/1.1"], "http/1.1")])
    def test_alpn_h3_is_never_negotiated_over_tcp(self, proxy, pki, allow_up, offers, chosen):
        """A client offering h3 inside a TCP tunnel (no certificate): the proxy negotiates h2 or HTTP/1.1
        or nothing, never h3, whose mitmproxy layer crashed on TCP with no answer (hostile review 4.15)."""
        s = svid_tunnel(proxy, pki, allow_up.port, alpn=offers, cert=False)
        assert s.selected_alpn_protocol() == chosen
        if chosen == "h2":
            status, data = h2_request(s, allow_up.port, "/")
            assert (status, json.loads(data)["reason"]) == (b"407", "identity_missing")
        else:
            s.sendall(f"GET / HTTP/1.1\r\nHost: localhost:{allow_up.port}\r\n\r\n".encode())
            status, body = read_response(s)
            assert (status, body["reason"]) == (407, "identity_missing")
        assert "has crashed" not in proxy.output()

    def test_control_characters_from_a_client_never_reach_the_log_raw(self, proxy, pki, allow_up):
        """An anonymous HTTP/2 :path with ESC, FF and VT is refused, and its log line carries them escaped
        (\\x1b): no terminal sequence, no forged line (hostile review 4.17: they were written raw)."""
        s = svid_tunnel(proxy, pki, allow_up.port, alpn=["h2"], cert=False)
        status, _ = h2_request(s, allow_up.port, "/x\x1b[2J\x0c2026-12-04 00:00:00,000 INFO secretless: forged\x0bz")
        assert status == b"400"
        out = proxy.output()
        assert "\\x1b[2J\\x0c2026-12-04" in out
        assert not any(c in out for c in "\x1b\x0c\x0b")

    def test_http2_scheme_other_than_https_is_refused_without_a_crash(self, proxy, pki, allow_up):
        """HTTP/2 streams with :scheme ftp and END_STREAM on their HEADERS (no certificate): each gets its 400
        in the error contract, and the layer does not crash on the end of message that follows (hostile
        review 4.07: a traceback per stream after the 400)."""
        s = svid_tunnel(proxy, pki, allow_up.port, alpn=["h2"], cert=False)
        conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
        conn.initiate_connection()
        for sid in (1, 3, 5):
            conn.send_headers(sid, [(":method", "GET"), (":scheme", "ftp"), (":authority", f"localhost:{allow_up.port}"),
                                    (":path", "/")], end_stream=True)
        s.sendall(conn.data_to_send())
        statuses, ended = {}, set()
        while len(ended) < 3:
            data = s.recv(65536)
            assert data, "connection closed"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    statuses[ev.stream_id] = dict(ev.headers)[b":status"]
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended.add(ev.stream_id)
            s.sendall(conn.data_to_send())
        assert statuses == {1: b"400", 3: b"400", 5: b"400"}
        settle()
        assert "has crashed" not in proxy.output() and "Traceback" not in proxy.output()

    def test_http2_prior_knowledge_in_plain_tunnel_refused(self, proxy, plain_target):
        """h2c with prior knowledge (the HTTP/2 preface in clear text) is refused, never relayed."""
        s = open_tunnel(proxy.port, f"127.0.0.1:{plain_target.port}")
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        status, body = read_response(s)
        settle()
        assert (status, body["reason"]) == (400, "protocol_refused")
        assert not plain_target.reached()

    def test_dns_port_gets_no_dns_relay(self, proxy):
        """A tunnel to port 53 with DNS-over-TCP bytes is refused (mitmproxy would relay DNS)."""
        s = open_tunnel(proxy.port, "127.0.0.1:53")
        s.sendall(b"\x00\x1d\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01")
        status, body = read_response(s)
        assert (status, body["reason"]) == (400, "protocol_refused")


class TestTlsVariants:
    def test_client_hello_in_one_byte_pieces_still_works(self, proxy, pki, upstream):
        """A TLS handshake trickled in one-byte writes is still intercepted and judged (no refusal)."""
        raw = open_tunnel(proxy.port, f"localhost:{upstream.port}")
        ctx = ssl.create_default_context(cafile=pki.interception_ca_cert)
        ctx.load_cert_chain(*pki.svid(BILLING))
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        for b in outgoing.read():
            raw.sendall(bytes([b]))
            time.sleep(0.002)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if data := outgoing.read():
                    raw.sendall(data)
                chunk = raw.recv(65536)
                assert chunk, "proxy closed the trickled handshake"
                incoming.write(chunk)
        if data := outgoing.read():
            raw.sendall(data)
        tls.write(f"GET /v1/x HTTP/1.1\r\nHost: localhost:{upstream.port}\r\nConnection: close\r\n\r\n".encode())
        raw.sendall(outgoing.read())
        got = b""
        while b"\r\n\r\n" not in got:
            try:
                got += tls.read(65536)
            except ssl.SSLWantReadError:
                incoming.write(raw.recv(65536))
        assert got.startswith(b"HTTP/1.1 200"), got[:200]

    def test_tls_inside_intercepted_tls_refused(self, proxy, pki, tls_target):
        """A second TLS handshake inside the intercepted one is refused; the target sees nothing."""
        outer = svid_tunnel(proxy, pki, tls_target.port)
        ctx = ssl.create_default_context(cafile=pki.interception_ca_cert)
        inner = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            inner.do_handshake()
        outer.sendall(out.read())
        status, body = read_response(outer)
        settle()
        assert (status, body["reason"]) == (400, "protocol_refused")
        assert not tls_target.reached()

    def test_connect_over_http2_to_the_proxy_refused(self, proxy, pki, upstream):
        """HTTP/2 to the proxy itself (proxy hop) cannot open a CONNECT tunnel."""
        ctx = ssl.create_default_context(cafile=pki.interception_ca_cert)
        ctx.load_cert_chain(*pki.svid(BILLING))
        ctx.set_alpn_protocols(["h2"])
        s = ctx.wrap_socket(connect(proxy.port), server_hostname="localhost")
        _SOCKETS.append(s)
        if s.selected_alpn_protocol() != "h2":
            pytest.skip("the proxy hop did not negotiate h2: no HTTP/2 CONNECT possible")
        # h2 refuses to send a CONNECT without :path on its own; the proxy must refuse it anyway.
        conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "CONNECT"), (":authority", f"localhost:{upstream.port}")])
        s.sendall(conn.data_to_send())
        status = None
        while status is None:  # a 400, a reset stream or a closed connection: never a 200 tunnel
            try:
                chunk = s.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                status = b"closed"
                break
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = dict(ev.headers)[b":status"]
                elif isinstance(ev, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    status = b"reset"
            s.sendall(conn.data_to_send())
        assert status in (b"400", b"reset", b"closed"), status
        settle()
        assert upstream.requests == []


class TestUpgrades:
    def test_h2c_upgrade_refused(self, proxy, pki, allow_up):
        """`Upgrade: h2c` on an allow rule is refused upgrade_refused; the upstream sees nothing."""
        s = svid_tunnel(proxy, pki, allow_up.port)
        s.sendall(f"GET / HTTP/1.1\r\nHost: localhost:{allow_up.port}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                  "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".encode())
        status, body = read_response(s)
        assert (status, body["reason"]) == (400, "upgrade_refused")
        assert allow_up.requests == []

    def test_other_upgrade_refused(self, proxy, pki, allow_up):
        """Any Upgrade but websocket (here: a made-up tcp protocol) is refused."""
        s = svid_tunnel(proxy, pki, allow_up.port)
        s.sendall(f"GET / HTTP/1.1\r\nHost: localhost:{allow_up.port}\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n".encode())
        status, body = read_response(s)
        assert (status, body["reason"]) == (400, "upgrade_refused")
        assert allow_up.requests == []

    def test_websocket_upgrade_needs_identity_and_rule(self, proxy, pki, allow_up, tls_target):
        """A WebSocket handshake is judged like any request: 407 without a cert, 403 without a rule,
        forwarded (Upgrade intact) on an allow rule."""
        ws = ("GET /chat HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
              "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        s = svid_tunnel(proxy, pki, allow_up.port, cert=False)
        s.sendall(ws.format(port=allow_up.port).encode())
        assert read_response(s)[1]["reason"] == "identity_missing"
        s = svid_tunnel(proxy, pki, tls_target.port)
        s.sendall(ws.format(port=tls_target.port).encode())
        assert read_response(s)[1]["reason"] == "no_rule"
        settle()
        assert not tls_target.reached() and allow_up.requests == []
        s = svid_tunnel(proxy, pki, allow_up.port)
        s.sendall(ws.format(port=allow_up.port).encode())
        read_response(s)
        [seen] = allow_up.requests
        assert ("Upgrade", "websocket") in [(k.title(), v) for k, v in seen["headers"]]

    def test_http2_authority_must_match_connect(self, proxy, pki, upstream):
        """HTTP/2 inside the tunnel with :authority naming another host is refused host_mismatch."""
        s = svid_tunnel(proxy, pki, upstream.port, alpn=["h2"])
        status, data = h2_request(s, upstream.port, "/v1/x", authority="attacker-app.example")
        assert status == b"403"
        assert json.loads(data)["reason"] == "host_mismatch"
        assert upstream.requests == []


# -- §2 the request target is the bound destination ---------------------------------------------


@pytest.fixture(scope="module")
def nginx(pki):
    leaf = certs.make_server_cert(ca=pki.upstream_ca, hosts=("localhost", "attacker-app.example", "127.0.0.1"))
    with Nginx(cert_pem=leaf.cert_pem(), key_pem=leaf.key_pem()) as n:
        yield n


class TestRequestTarget:
    @pytest.fixture
    def nginx_proxy(self, proxy_factory, pki, nginx):
        rule = {"name": "billing-to-nginx", "workloads": [BILLING], "to": {"host": "localhost", "port": nginx.port},
                "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}}
        return proxy_factory(base_config(pki, rules=[rule]))

    @pytest.mark.parametrize("target", ["https://attacker-app.example/", "https://attacker-app.example:{port}/",
                                        "https://localhost:1/", "http://localhost:{port}/"])
    def test_absolute_form_naming_another_destination_is_refused(self, nginx_proxy, pki, nginx, target):
        """An absolute-form target that differs from the tunnel (host, port or scheme) is 403
        host_mismatch, and nginx gets no connection: neither virtual host sees the credential."""
        before = nginx.probe()
        s = svid_tunnel(nginx_proxy, pki, nginx.port)
        s.sendall(f"GET {target.format(port=nginx.port)} HTTP/1.1\r\nHost: localhost:{nginx.port}\r\n\r\n".encode())
        status, body = read_response(s)
        s.close()
        assert (status, body["reason"]) == (403, "host_mismatch")
        assert nginx.probe() == before + 1  # no connection between the two probes
        assert SECRET not in nginx.log("attacker") + nginx.log("localhost")

    @pytest.mark.parametrize("path", ["https://attacker-app.example/steal", "attacker-app.example:443",
                                      "v1/x", "/v1/x"])
    def test_http2_path_not_in_origin_form_is_refused(self, nginx_proxy, pki, nginx, path):
        """An HTTP/2 :path in absolute or authority form with an allowed :authority: 400, and nginx gets no
        connection (hostile review 4.08: it went to the HTTP/1.1 upstream as that request line, which
        nginx routes by, to the attacker's virtual host, with the credential)."""
        before = nginx.probe()
        s = svid_tunnel(nginx_proxy, pki, nginx.port, alpn=["h2", "http/1.1"])  # as real clients offer
        status, data = h2_request(s, nginx.port, path)
        s.close()
        if path == "/v1/x":  # the control: origin form over HTTP/2 reaches the localhost virtual host
            assert (status, data) == (b"200", b"vhost=localhost\n"), data
            return
        assert (status, json.loads(data)["reason"]) == (b"400", "protocol_refused"), data
        assert "origin form" in json.loads(data)["error"]
        assert nginx.probe() == before + 1  # no connection between the two probes
        assert SECRET not in nginx.log("attacker") + nginx.log("localhost")

    def test_absolute_form_naming_the_destination_goes_in_origin_form(self, nginx_proxy, pki, nginx):
        """An absolute-form target naming the tunnel is forwarded in origin form with the decided Host:
        the credential reaches only the localhost virtual host."""
        s = svid_tunnel(nginx_proxy, pki, nginx.port)
        s.sendall(f"GET https://localhost:{nginx.port}/v1/x HTTP/1.1\r\nHost: localhost:{nginx.port}\r\n\r\n".encode())
        status, body = read_response(s)
        assert status == 200 and body["raw"] == b"vhost=localhost\n"
        deadline = time.monotonic() + 5
        while "GET /v1/x HTTP/1.1" not in nginx.log("localhost") and time.monotonic() < deadline:
            time.sleep(0.05)
        line = nginx.log("localhost").splitlines()[-1]
        assert "|GET /v1/x HTTP/1.1|" in line and line.endswith(f"Bearer {SECRET}")
        assert nginx.log("attacker") == ""


# -- §3 decide on the head, bounded bytes --------------------------------------------------------


class TestLimits:
    def test_oversized_head_without_cert_gets_431(self, proxy, plain_target):
        """A request head over max_request_head_bytes gets 431 head_too_large before anything else."""
        s = open_tunnel(proxy.port, f"127.0.0.1:{plain_target.port}")
        s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{plain_target.port}\r\n".encode())
        try:
            for _ in range(64):
                s.sendall(b"X-Pad: " + b"a" * 1024 + b"\r\n")
        except OSError:
            pass  # the proxy may close while we are still writing
        status, body = read_response(s)
        settle()
        assert (status, body["reason"]) == (431, "head_too_large")
        assert "max_request_head_bytes" in body["error"]
        assert not plain_target.reached()

    def test_head_in_one_write_over_the_limit_gets_431(self, proxy, pki, allow_up):
        """A head over the limit that arrives whole is refused on the head too."""
        s = svid_tunnel(proxy, pki, allow_up.port)
        s.sendall(f"GET / HTTP/1.1\r\nHost: localhost:{allow_up.port}\r\nX-Pad: {'a' * (HEAD_LIMIT + 10)}\r\n\r\n".encode())
        status, body = read_response(s)
        assert (status, body["reason"]) == (431, "head_too_large")
        assert allow_up.requests == []

    @pytest.mark.parametrize(("length", "status"), [(200 * 2**20, 413), (BODY_LIMIT, 407)])
    def test_body_without_cert_is_refused_on_the_head(self, proxy, plain_target, length, status):
        """An upload without a certificate is refused after its head (413 over the limit, else
        407): the answer comes while most of the body is still unsent."""
        s = open_tunnel(proxy.port, f"127.0.0.1:{plain_target.port}")
        s.sendall(f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{plain_target.port}\r\nContent-Length: {length}\r\n\r\n".encode()
                  + b"x" * 65536)
        got, body = read_response(s)
        settle()
        assert (got, body["reason"]) == (status, "body_too_large" if status == 413 else "identity_missing")
        assert not plain_target.reached()

    def test_declared_body_over_the_limit_gets_413(self, proxy, pki, allow_up):
        """Content-Length over max_request_body_bytes gets 413 body_too_large; nothing goes upstream."""
        s = svid_tunnel(proxy, pki, allow_up.port)
        s.sendall(f"POST / HTTP/1.1\r\nHost: localhost:{allow_up.port}\r\nContent-Length: {BODY_LIMIT + 1}\r\n\r\n".encode())
        status, body = read_response(s)
        assert (status, body["reason"]) == (413, "body_too_large")
        assert allow_up.requests == []

    @pytest.mark.parametrize("rule", ["allow", "inject"])
    def test_chunked_body_over_the_limit_gets_413(self, proxy, pki, allow_up, upstream, rule):
        """A chunked body that grows past the limit is cut off with 413 body_too_large (audited), on an
        allow and an inject rule (whose body errors are refused on the same path: test_request_bodies.py)."""
        target = allow_up if rule == "allow" else upstream
        s = svid_tunnel(proxy, pki, target.port)
        s.sendall(f"POST /v1/upload HTTP/1.1\r\nHost: localhost:{target.port}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"%x\r\n%s\r\n" % (65536, b"y" * 65536)
        try:
            for _ in range(BODY_LIMIT // 65536 + 2):
                s.sendall(chunk)
        except OSError:
            pass
        status, body = read_response(s)
        assert (status, body["reason"]) == (413, "body_too_large")
        assert all(len(r.get("body", b"")) <= BODY_LIMIT for r in target.requests)
        settle()
        assert audited(proxy, "body_too_large")

    @pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2"])
    def test_body_over_the_limit_in_the_heads_write_never_sends_the_head(self, proxy_factory, pki,
                                                                         tls_counting_target, http2):
        """Head and an over-limit chunked body (HTTP/2: DATA with no content-length) in one write, on an
        inject rule: 413, and neither the head with its credential nor a byte reaches the upstream
        (hostile review 30: the head went out, then the 413). The credential was not used."""
        target = tls_counting_target
        target.reset()
        rule = {"name": "billing-to-api", "workloads": [BILLING], "to": {"host": "localhost", "port": target.port},
                "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}}
        p = proxy_factory(base_config(pki, rules=[rule], limits={"max_request_body_bytes": 1000}))
        s = clients.svid_tunnel(p.port, target.port, pki=pki, alpn=["h2"] if http2 else None)
        if http2:
            status, data = h2_request(s, target.port, "/v1/upload", body=b"x" * 2000)
            status, body = int(status), json.loads(data)
        else:
            s.sendall(f"POST /v1/upload HTTP/1.1\r\nHost: localhost:{target.port}\r\nTransfer-Encoding: chunked\r\n\r\n"
                      .encode() + b"7d0\r\n" + b"x" * 2000 + b"\r\n0\r\n\r\n")
            status, body = read_response(s)
        settle()
        assert (status, body["reason"]) == (413, "body_too_large")
        assert not target.reached(), target.received[:200]
        out = p.output()
        assert audited(p, "body_too_large")
        assert '"credential.used"' not in out

    def test_body_within_the_limit_is_streamed_through(self, proxy, pki, upstream):
        """A body under the limit on an inject rule arrives whole, with the credential."""
        cert, key = pki.svid(BILLING)
        r = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key, "--data-binary", "@-",
                 f"{upstream.url}/v1/upload", proxy=proxy.url)
        assert r.status == 200, r


class TestResponseScan:
    SCAN = 64 * 1024

    @pytest.fixture
    def scan_proxy(self, proxy_factory, pki, upstream, allow_up):
        inject = {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}
        rules = [{"name": "checked", "workloads": [BILLING], "to": {"host": "localhost", "port": upstream.port},
                  "inject": inject},
                 {"name": "streamed", "workloads": [BILLING], "to": {"host": "localhost", "port": allow_up.port},
                  "inject": {**inject, "echo_check": False}}]
        return proxy_factory(base_config(pki, rules=rules, limits={"max_response_scan_bytes": self.SCAN}))

    def _post(self, proxy, pki, port: int, body: bytes):
        s = svid_tunnel(proxy, pki, port)
        s.sendall(f"POST /v1/x HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        return read_response(s)

    def test_inject_response_over_the_scan_window_is_withheld(self, scan_proxy, pki, upstream):
        """An inject-rule response larger than max_response_scan_bytes is withheld: 502
        response_too_large, none of its bytes reach the client, the refusal is audited."""
        status, body = self._post(scan_proxy, pki, upstream.port, b"z" * (2 * self.SCAN))
        assert (status, body["reason"], body["rule"]) == (502, "response_too_large", "checked")
        assert "echo_check" in body["error"]
        assert audited(scan_proxy, "response_too_large")

    def test_inject_response_within_the_window_is_checked(self, scan_proxy, pki, upstream):
        """A response under the window is buffered and an echoed credential is redacted."""
        status, body = self._post(scan_proxy, pki, upstream.port, b"small")
        assert status == 200 and SECRET not in json.dumps(body)

    def test_echo_check_false_streams_a_large_response(self, scan_proxy, pki, allow_up):
        """With inject.echo_check: false the response is streamed whole, past the scan window."""
        status, body = self._post(scan_proxy, pki, allow_up.port, b"z" * (2 * self.SCAN))
        assert status == 200 and body["body"] == "z" * (2 * self.SCAN)


# -- §6 headers the proxy owns -------------------------------------------------------------------


class TestOwnedHeaders:
    def test_curl_proxy_user_never_forwarded(self, proxy, pki, allow_up):
        """On an allow rule the upstream sees no Proxy-Authorization, also from curl --proxy-user."""
        cert, key = pki.svid(BILLING)
        r = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key, "--proxy-user", "me:pw",
                 "-H", "Proxy-Authorization: Basic c3B5OnNweQ==", "-H", "X-Secretless-Rule: other",
                 f"https://localhost:{allow_up.port}/", proxy=proxy.url)
        assert r.status == 200, r
        [seen] = allow_up.requests
        names = {k.lower() for k, _ in seen["headers"]}
        assert not names & {"proxy-authorization", "x-secretless-rule"}

    def test_own_and_hop_by_hop_headers_never_forwarded(self, proxy, pki, allow_up):
        """X-Secretless-*, Proxy-Authorization and hop-by-hop headers (also those named in
        Connection) are stripped; end-to-end headers stay."""
        s = svid_tunnel(proxy, pki, allow_up.port)
        s.sendall(f"GET / HTTP/1.1\r\nHost: localhost:{allow_up.port}\r\nProxy-Authorization: Basic c3B5OnNweQ==\r\n"
                  "X-Secretless-Request-Id: forged\r\nx-secretless-rule: other\r\nKeep-Alive: timeout=5\r\n"
                  "Proxy-Connection: keep-alive\r\nTE: gzip\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n"
                  "X-Keep: 1\r\n\r\n".encode())
        assert read_response(s)[0] == 200
        [seen] = allow_up.requests
        names = {k.lower() for k, _ in seen["headers"]}
        assert not names & {"proxy-authorization", "x-secretless-request-id", "x-secretless-rule", "keep-alive",
                            "proxy-connection", "te", "x-drop", "connection"}
        assert "x-keep" in names

    def test_range_never_reaches_an_echo_checked_upstream(self, proxy, pki, upstream, allow_up):
        """Range and If-Range are dropped on an inject rule whose responses are checked for echoes: slices
        at chosen offsets would each hold less than a block of the credential and rebuild it together
        (hostile review 4.12). An allow rule keeps them."""
        for target, kept in ((upstream, False), (allow_up, True)):
            s = svid_tunnel(proxy, pki, target.port)
            s.sendall(f"GET /v1/echo HTTP/1.1\r\nHost: localhost:{target.port}\r\nRange: bytes=20-33\r\n"
                      'If-Range: "etag"\r\n\r\n'.encode())
            assert read_response(s)[0] == 200
            names = {k.lower() for k, _ in target.requests[-1]["headers"]}
            assert ({"range", "if-range"} <= names) is kept and not ({"range", "if-range"} & names and not kept)

    def test_client_connection_close_is_honoured(self, proxy, pki, allow_up):
        """`Connection: close, X-Drop` from the client: the answer comes and then the proxy closes the
        connection; upstream only `Connection: close` is left of it (X-Drop is stripped)."""
        s = svid_tunnel(proxy, pki, allow_up.port)
        s.sendall(f"GET / HTTP/1.1\r\nHost: localhost:{allow_up.port}\r\nConnection: close, X-Drop\r\n"
                  "X-Drop: 1\r\n\r\n".encode())
        assert read_response(s)[0] == 200
        s.settimeout(3)
        assert s.recv(1) == b""  # closed by the proxy, not left open until the idle timeout
        [seen] = allow_up.requests
        assert [(k.lower(), v) for k, v in seen["headers"] if k.lower() in ("connection", "x-drop")] == \
            [("connection", "close")]

    @pytest.mark.parametrize("method", ["get", "Get", "gEt"])
    def test_non_canonical_method_refused(self, proxy, pki, upstream, method):
        """`get`/`Get` do not pass a GET rule with the credential: 400 method_not_canonical."""
        s = svid_tunnel(proxy, pki, upstream.port)
        s.sendall(f"{method} /v1/x HTTP/1.1\r\nHost: localhost:{upstream.port}\r\n\r\n".encode())
        status, body = read_response(s)
        assert (status, body["reason"]) == (400, "method_not_canonical")
        assert upstream.requests == []


# -- §1 the options that would reopen a path -----------------------------------------------------


@pytest.mark.e2e  # starts mitmdump, which must refuse
class TestOpenOptionsRefused:
    @pytest.mark.parametrize(("args", "message"), [
        (["--set", "tcp_hosts=.*"], "tcp_hosts"),
        (["--ignore-hosts", ".*"], "ignore_hosts"),
        (["--allow-hosts", "localhost"], "allow_hosts"),
        (["--mode", "socks5"], "only the regular"),
        (["--set", "udp_hosts=.*"], "udp_hosts"),
    ])
    def test_mitmdump_cannot_be_configured_open(self, pki, tmp_path, upstream, args, message):
        """mitmdump -s addons/secretless.py refuses to start with an option that opens a relay."""
        import yaml

        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump(base_config(pki, rules=[])))
        out = subprocess.run([str(BIN / "mitmdump"), "--listen-host", "127.0.0.1", "-p", "0", *args,
                              "-s", str(Path(__file__).parents[1] / "addons" / "secretless.py"),
                              "--set", f"secretless_config={cfg}"],
                             capture_output=True, text=True, timeout=30, env={"TEST_STRIPE_KEY": SECRET, "PATH": ""})
        text = out.stdout + out.stderr
        assert out.returncode != 0, text
        assert message in text and "not allowed with secretless-proxy" in text


__all__ = ["tunnel"]
