"""Request heads with more than one meaning never leave the proxy (hostile review 12 and 14).

A bare CR, NUL or other control character in a header, or obs-fold, is refused 400
``header_invalid`` before anything is forwarded, on every rule; heads that mitmproxy's own parser
refuses (CL+TE, unknown transfer coding, bad header name, list-valued Content-Length) are refused
in the error contract (JSON, request id, audited, counted) instead of mitmproxy's HTML page.
Targets record connections and bytes, not only parsed requests.
"""

from __future__ import annotations

import http.client
import http.server
import json
import ssl
import threading
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest
from helpers.clients import OPEN_SOCKETS, h2_request, svid_tunnel
from helpers.e2e_broker import metric
from helpers.net import free_port
from helpers.proxy import SECRET, base_config

from secretless_proxy.dev import certs
from secretless_proxy.dev.echoserver import tls_server_context

BILLING = "spiffe://example.org/ns/prod/sa/billing"


@pytest.fixture
def tls_target(tls_counting_target):
    """The module's target (its proxies name it in their rules), with nothing recorded yet."""
    tls_counting_target.reset()
    return tls_counting_target


class _Stdlib(http.server.BaseHTTPRequestHandler):
    """Python's http.server: its header parser splits lines on a bare CR."""

    protocol_version = "HTTP/1.1"
    seen: list[dict] = []
    requests: list[tuple[str, str, bytes]] = []  # every request it parsed: (method, path, body)

    def do_GET(self):  # noqa: N802 - http.server's naming
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        self._answer()

    def _answer(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).requests.append((self.command, self.path, body))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_POST = do_DELETE = _answer  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture
def stdlib_upstream(pki):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stdlib)
    srv.socket = tls_server_context(certs.make_server_cert(ca=pki.upstream_ca)).wrap_socket(srv.socket, server_side=True)
    _Stdlib.seen, _Stdlib.requests = [], []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def unused_port() -> int:
    """A port nothing listens on: the rule a test does not use points there."""
    return free_port()


def _rules(allow_port: int, inject_port: int) -> list[dict]:
    return [
        {"name": "open", "workloads": [BILLING], "to": {"host": "localhost", "port": allow_port}, "action": "allow"},
        {"name": "api", "workloads": [BILLING], "to": {"host": "localhost", "port": inject_port},
         "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}},
    ]


@pytest.fixture(scope="module")
def admin_ports() -> dict[tuple[int, int], int]:
    return {}


@pytest.fixture
def start(shared_proxy_factory, pki, unused_port, admin_ports):
    """A proxy with an allow rule to ``allow_port`` and an inject rule to ``inject_port`` (None: a
    port nothing listens on); tests with the same two ports share one process (``.admin_port``)."""
    def go(allow_port: int | None, inject_port: int | None):
        ports = (allow_port or unused_port, inject_port or unused_port)
        admin = admin_ports.setdefault(ports, free_port())
        return shared_proxy_factory(base_config(pki, rules=_rules(*ports), admin={"listen": f"127.0.0.1:{admin}"}))
    return go


_SOCKETS = OPEN_SOCKETS  # closed after each test by conftest's autouse fixture


def tunnel(proxy, pki, port: int, *, cert: bool = True, alpn: list[str] | None = None) -> ssl.SSLSocket:
    return svid_tunnel(proxy.port, port, pki=pki, cert=cert, alpn=alpn)


def read_response(sock) -> tuple[int, dict, http.client.HTTPMessage]:
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    body = resp.read()
    try:
        return resp.status, json.loads(body), resp.headers
    except ValueError:
        return resp.status, {"raw": body}, resp.headers


def denied_reasons(proxy) -> list[str]:
    return [json.loads(line).get("reason") for line in proxy.output().splitlines()
            if line.startswith("{") and '"request.denied"' in line]


CTL_HEADS = {
    "bare CR hides Content-Length": b"X: 1\rContent-Length: 9\rTransfer-Encoding: chunked\r\n",
    "bare CR hides Host": b"X: 1\rHost: attacker.example\r\n",
    "NUL in a value": b"X: a\x00b\r\n",
    "other CTL in a value": b"X: a\x01b\x7f\r\n",
    "CR in a name": b"X\r: 1\r\n",
    "obs-fold": b"X: 1\r\n Content-Length: 9\r\n",
}


class TestControlCharacters:
    def test_bare_cr_never_reaches_a_stdlib_upstream(self, start, pki, stdlib_upstream, tls_target):
        """The reviewer's case: a CR-split Content-Length never reaches http.server; 400 header_invalid."""
        proxy = start(stdlib_upstream, tls_target.port)
        s = tunnel(proxy, pki, stdlib_upstream)
        s.sendall(f"GET /status HTTP/1.1\r\nHost: localhost:{stdlib_upstream}\r\n"
                  "X: 1\rContent-Length: 9\rTransfer-Encoding: chunked\r\n\r\n".encode())
        status, body, _ = read_response(s)
        time.sleep(0.3)
        assert (status, body["reason"]) == (400, "header_invalid")
        assert "control character" in body["error"]
        assert _Stdlib.seen == []

    @pytest.mark.parametrize("rule", ["allow", "inject"])
    @pytest.mark.parametrize("head", list(CTL_HEADS), ids=list(CTL_HEADS))
    def test_control_characters_refused_on_every_rule(self, start, pki, tls_target, rule, head):
        """CTLs or obs-fold in a header: 400 header_invalid, audited, counted; the target gets no connection."""
        proxy = start(tls_target.port, None) if rule == "allow" else start(None, tls_target.port)
        denied = metric(proxy.admin_port, "secretless_denied_total", reason="header_invalid")
        s = tunnel(proxy, pki, tls_target.port)
        s.sendall(f"GET /v1/x HTTP/1.1\r\nHost: localhost:{tls_target.port}\r\n".encode() + CTL_HEADS[head] + b"\r\n")
        status, body, headers = read_response(s)
        time.sleep(0.3)
        assert (status, body["reason"]) == (400, "header_invalid")
        assert headers["X-Secretless-Request-Id"] == body["request_id"]
        assert not tls_target.reached()
        assert denied_reasons(proxy) == ["header_invalid"]
        assert metric(proxy.admin_port, "secretless_denied_total", reason="header_invalid") == denied + 1

    def test_control_character_after_a_good_request_on_the_same_connection(self, start, pki, upstream):
        """A kept-alive connection's second head is checked too: the upstream sees only the first request."""
        proxy = start(upstream.port, None)
        s = tunnel(proxy, pki, upstream.port)
        s.sendall(f"GET /a HTTP/1.1\r\nHost: localhost:{upstream.port}\r\n\r\n".encode())
        assert read_response(s)[0] == 200
        s.sendall(f"GET /b HTTP/1.1\r\nHost: localhost:{upstream.port}\r\nX: 1\rContent-Length: 5\r\n\r\n".encode())
        status, body, _ = read_response(s)
        time.sleep(0.3)
        assert (status, body["reason"]) == (400, "header_invalid")
        assert [r["path"] for r in upstream.requests] == ["/a"]

    def test_horizontal_tab_in_a_value_passes(self, start, pki, tls_target):
        """HTAB is the one control character a field value may hold (RFC 9110 §5.5): forwarded."""
        proxy = start(tls_target.port, None)
        s = tunnel(proxy, pki, tls_target.port)
        s.sendall(f"GET /a HTTP/1.1\r\nHost: localhost:{tls_target.port}\r\nX: a\tb\r\n\r\n".encode())
        assert read_response(s)[0] == 200
        assert b"X: a\tb\r\n" in tls_target.received

    def test_http2_control_character_refused(self, start, pki, tls_target):
        """An HTTP/2 header value with a control character is refused header_invalid, never forwarded."""
        proxy = start(tls_target.port, None)
        status, data = h2_request(tunnel(proxy, pki, tls_target.port, alpn=["h2"]), tls_target.port, "/a", [("x", "a\x01b")])
        time.sleep(0.3)
        assert status == b"400"
        assert json.loads(data)["reason"] == "header_invalid"
        assert not tls_target.reached()


class TestRequestTargetFragment:
    """A '#' in the request target hid dot segments from the policy and the audit (hostile review 17)."""

    def test_fragment_with_dot_segments_never_leaves(self, start, pki, tls_target):
        """HTTP/1: `GET /v1/charges/x#/../../../admin` on an inject rule: 400 protocol_refused, audited; no connection upstream."""
        proxy = start(None, tls_target.port)
        s = tunnel(proxy, pki, tls_target.port)
        s.sendall(f"GET /v1/charges/x#/../../../admin HTTP/1.1\r\nHost: localhost:{tls_target.port}\r\n\r\n".encode())
        status, body, _ = read_response(s)
        time.sleep(0.3)
        assert (status, body["reason"]) == (400, "protocol_refused")
        assert "fragment" in body["error"]
        assert not tls_target.reached()
        assert denied_reasons(proxy) == ["protocol_refused"]
        assert SECRET not in proxy.output()

    def test_http2_path_with_a_fragment_refused(self, start, pki, tls_target):
        """HTTP/2 `:path` with '#': refused the same way, never forwarded."""
        proxy = start(None, tls_target.port)
        status, data = h2_request(tunnel(proxy, pki, tls_target.port, alpn=["h2"]), tls_target.port, "/v1/x#/../admin")
        time.sleep(0.3)
        assert (status, json.loads(data)["reason"]) == (b"400", "protocol_refused")
        assert not tls_target.reached()

    def test_an_encoded_hash_passes(self, start, pki, tls_target):
        """%23 is data, not a fragment: the request goes out as written."""
        proxy = start(None, tls_target.port)
        s = tunnel(proxy, pki, tls_target.port)
        s.sendall(f"GET /v1/tag/%23blue HTTP/1.1\r\nHost: localhost:{tls_target.port}\r\n\r\n".encode())
        assert read_response(s)[0] == 200
        assert b"GET /v1/tag/%23blue HTTP/1.1" in tls_target.received


class TestHttp2Framing:
    """HTTP/2 HEADERS with END_STREAM and a Content-Length other than 0 went to an HTTP/1.1 upstream
    as a request that never ends (hostile review 18)."""

    def test_content_length_without_a_body_refused(self, start, pki, tls_target):
        """`content-length: 30` on a request that ends with its headers: 400 protocol_refused, never forwarded."""
        proxy = start(None, tls_target.port)
        status, data = h2_request(tunnel(proxy, pki, tls_target.port, alpn=["h2"]), tls_target.port, "/v1/x",
                                  [("content-length", "30")])
        time.sleep(0.3)
        assert (status, json.loads(data)["reason"]) == (b"400", "protocol_refused")
        assert "Content-Length" in json.loads(data)["error"]
        assert not tls_target.reached()

    def test_content_length_zero_without_a_body_passes(self, start, pki, tls_target):
        """`content-length: 0` with END_STREAM is true: forwarded."""
        proxy = start(None, tls_target.port)
        status, _ = h2_request(tunnel(proxy, pki, tls_target.port, alpn=["h2"]), tls_target.port, "/v1/x",
                               [("content-length", "0")])
        assert status == b"200"
        assert tls_target.reached()

    @pytest.mark.parametrize("rule", ["allow", "inject"])
    def test_request_trailers_refused(self, start, pki, tls_target, rule):
        """HEADERS, DATA, then trailer HEADERS: 400 protocol_refused, no traceback, the trailers never relayed
        (the HTTP/1.1 upstream client crashed on them: hostile review 24). Request bodies are streamed, so
        the head may be upstream already: that request is aborted there."""
        proxy = start(tls_target.port, None) if rule == "allow" else start(None, tls_target.port)
        status, data = h2_request(tunnel(proxy, pki, tls_target.port, alpn=["h2"]), tls_target.port, "/v1/x",
                                  [("content-length", "5")], body=b"hello", trailers=[("x-trailer", "1")])
        time.sleep(0.3)
        assert (status, json.loads(data)["reason"]) == (b"400", "protocol_refused")
        assert b"x-trailer" not in tls_target.received.lower()
        assert "Traceback" not in proxy.output() and "AssertionError" not in proxy.output()

    def test_tab_in_the_path_refused(self, start, pki, tls_target):
        """`:path: /v1/charges?a<TAB>/admin`: 400 header_invalid, never a request line upstream (review 25)."""
        proxy = start(None, tls_target.port)
        status, data = h2_request(tunnel(proxy, pki, tls_target.port, alpn=["h2"]), tls_target.port, "/v1/charges?a\t/admin")
        time.sleep(0.3)
        assert (status, json.loads(data)["reason"]) == (b"400", "header_invalid")
        assert not tls_target.reached()

    @pytest.mark.parametrize("rule", ["allow", "inject"])
    def test_body_without_content_length_is_framed_for_an_http1_upstream(self, start, pki, stdlib_upstream, rule):
        """An HTTP/2 body without content-length whose bytes are an HTTP/1.1 request: the HTTP/1.1
        upstream reads them as that request's (chunked) body, never as a second request that no rule
        judged (hostile review 28: `DELETE /admin/smuggled` reached it)."""
        proxy = start(stdlib_upstream, None) if rule == "allow" else start(None, stdlib_upstream)
        smuggled = f"DELETE /admin/smuggled HTTP/1.1\r\nHost: localhost:{stdlib_upstream}\r\n\r\n".encode()
        status, _ = h2_request(tunnel(proxy, pki, stdlib_upstream, alpn=["h2"]), stdlib_upstream, "/v1/x", body=smuggled)
        time.sleep(0.3)
        assert status == b"200"
        assert _Stdlib.requests == [("POST", "/v1/x", smuggled)]

    @pytest.mark.parametrize("rule", ["allow", "inject"])
    @pytest.mark.parametrize("head, data", [
        ([("content-length", "10")], b"abc"),
        ([("content-length", "2")], b"abcdef"),
        ([("connection", "keep-alive")], b"abc"),
    ], ids=["shorter than content-length", "longer than content-length", "connection-specific header"])
    def test_malformed_request_is_refused_audited_and_counted(self, start, pki, tls_target, rule, head, data):
        """What the h2 library refuses with a connection error (DATA that contradicts content-length, a
        connection-specific header) is a refusal too: audited, counted, the GOAWAY naming its request id;
        nothing reaches the target and no credential is audited as used (hostile review 29)."""
        proxy = start(tls_target.port, None) if rule == "allow" else start(None, tls_target.port)
        denied = metric(proxy.admin_port, "secretless_denied_total", reason="protocol_refused")
        s = tunnel(proxy, pki, tls_target.port, alpn=["h2"])
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))  # send them as they are
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":scheme", "https"), (":authority", f"localhost:{tls_target.port}"),
                              (":path", "/v1/x"), *head], end_stream=False)
        conn.send_data(1, data, end_stream=True)
        s.sendall(conn.data_to_send())
        ended: list[h2.events.ConnectionTerminated] = []  # h2 sends its own GOAWAY first, then the proxy's
        while chunk := s.recv(65536):
            try:
                ended += [e for e in conn.receive_data(chunk) if isinstance(e, h2.events.ConnectionTerminated)]
            except h2.exceptions.ProtocolError:  # frames after the first GOAWAY
                break
        time.sleep(0.3)
        assert ended and {e.error_code for e in ended} == {h2.errors.ErrorCodes.PROTOCOL_ERROR}
        debug = b" ".join(e.additional_data or b"" for e in ended)
        audit = [json.loads(line) for line in proxy.output().splitlines() if line.startswith('{"')]
        [refused] = [a for a in audit if a.get("event") == "request.denied"]
        assert refused["reason"] == "protocol_refused"
        assert f"request id {refused['request_id']}".encode() in debug
        assert not [a for a in audit if a.get("event") == "credential.used"]
        assert metric(proxy.admin_port, "secretless_denied_total", reason="protocol_refused") == denied + 1
        assert not tls_target.reached()

    def test_content_length_matching_the_body_passes(self, start, pki, tls_target):
        """A body of exactly its Content-Length is forwarded whole."""
        proxy = start(None, tls_target.port)
        status, _ = h2_request(tunnel(proxy, pki, tls_target.port, alpn=["h2"]), tls_target.port, "/v1/x",
                               [("content-length", "5")], body=b"hello")
        assert status == b"200"
        # The target answers every chunk it reads, the head's too: the 200 can come back before the
        # body's bytes are in (the flake this test had under load). Wait for them.
        deadline = time.monotonic() + 5
        while not tls_target.received.endswith(b"hello") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert tls_target.received.endswith(b"hello")


PARSER_REFUSED = {
    "CL and TE": b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE chunked, identity": b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "space before colon": b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "CL list": b"Content-Length: 3, 30\r\n\r\nabc",
    "bad name": b"X(y): 1\r\n\r\n",
}


class TestParserRefusals:
    @pytest.mark.parametrize("head", list(PARSER_REFUSED), ids=list(PARSER_REFUSED))
    def test_parser_refusals_follow_the_error_contract(self, start, pki, tls_target, head):
        """What mitmproxy's parser refuses gets JSON 400 protocol_refused with a request id, audited
        and counted, also without a client certificate; the target gets no connection."""
        proxy = start(tls_target.port, None)
        denied = metric(proxy.admin_port, "secretless_denied_total", reason="protocol_refused")
        s = tunnel(proxy, pki, tls_target.port, cert=False)
        s.sendall(f"POST /status HTTP/1.1\r\nHost: localhost:{tls_target.port}\r\n".encode() + PARSER_REFUSED[head])
        status, body, headers = read_response(s)
        time.sleep(0.3)
        assert (status, body["reason"]) == (400, "protocol_refused"), body
        assert headers["Content-Type"] == "application/json" and "mitmproxy" not in str(headers)
        assert headers["X-Secretless-Request-Id"] == body["request_id"]
        assert "not valid HTTP/1.1" in body["error"]
        assert not tls_target.reached()
        assert denied_reasons(proxy) == ["protocol_refused"]
        assert metric(proxy.admin_port, "secretless_denied_total", reason="protocol_refused") == denied + 1

    def test_empty_lines_before_the_request_line_are_ignored(self, start, pki, upstream, tls_target):
        """Empty lines before a request line (RFC 9112 §2.2) neither hide a bad head nor stall a good one."""
        proxy = start(upstream.port, tls_target.port)
        s = tunnel(proxy, pki, upstream.port)
        s.sendall(f"\r\n\r\nGET /a HTTP/1.1\r\nHost: localhost:{upstream.port}\r\n\r\n".encode())
        assert read_response(s)[0] == 200
        s = tunnel(proxy, pki, tls_target.port)
        s.sendall(f"\r\nGET /a HTTP/1.1\r\nHost: localhost:{tls_target.port}\r\nContent-Length: 1\r\n"
                  "Content-Length: 2\r\n\r\n".encode())
        status, body, _ = read_response(s)
        time.sleep(0.3)
        assert (status, body["reason"]) == (400, "protocol_refused")
        assert not tls_target.reached()
