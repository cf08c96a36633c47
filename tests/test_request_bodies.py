"""HTTP/1 request bodies that cannot be read are refused in the error contract (hostile review 21).

A request accepted on its head whose chunked body ends with trailer fields got mitmproxy's HTML
400 page; a bad chunk size line, chunk data without its CRLF or a broken chunk extension got the
connection dropped unanswered; and each was audited as ``credential.used`` (status null) although
nothing reached the upstream. Now each gets a JSON 400 (``body_malformed``, trailers
``protocol_refused``) with the request id and ``Connection: close``, is audited as a refusal and
counted. Targets record connections and bytes, not only parsed requests.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import ssl
import time

import pytest
from helpers.clients import OPEN_SOCKETS, svid_tunnel
from helpers.e2e_broker import metric
from helpers.net import free_port
from helpers.proxy import SECRET, base_config
from helpers.targets import CountingTarget

from secretless_proxy.dev import certs
from secretless_proxy.dev.echoserver import tls_server_context

BILLING = "spiffe://example.org/ns/prod/sa/billing"
BODY_LIMIT = 64 * 1024

# A chunked body after `Transfer-Encoding: chunked`, and the reason it is refused with.
BAD_BODIES = {
    "trailer fields": (b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n", "protocol_refused"),
    "bad chunk size": (b"zz\r\nabc\r\n0\r\n\r\n", "body_malformed"),
    "chunk data without CRLF": (b"3\r\nabcXY\r\n0\r\n\r\n", "body_malformed"),
    "chunk extension without ';'": (b"3 ext\r\nabc\r\n0\r\n\r\n", "body_malformed"),
}


@pytest.fixture
def tls_target(pki):
    with CountingTarget(tls_context=tls_server_context(certs.make_server_cert(ca=pki.upstream_ca))) as t:
        yield t


@pytest.fixture
def silent_target(pki):
    """Records what reaches it and never answers: a streamed request stays open upstream."""
    with CountingTarget(tls_context=tls_server_context(certs.make_server_cert(ca=pki.upstream_ca)), answer=False) as t:
        yield t


@pytest.fixture
def admin_port() -> int:
    return free_port()


@pytest.fixture
def start(proxy_factory, pki, admin_port):
    def go(*, allow_port: int, inject_port: int):
        rules = [
            {"name": "open", "workloads": [BILLING], "to": {"host": "localhost", "port": allow_port}, "action": "allow"},
            {"name": "api", "workloads": [BILLING], "to": {"host": "localhost", "port": inject_port},
             "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}},
        ]
        return proxy_factory(base_config(pki, rules=rules, admin={"listen": f"127.0.0.1:{admin_port}"},
                                         limits={"max_request_body_bytes": BODY_LIMIT}))
    return go


def tunnel(proxy, pki, port: int) -> ssl.SSLSocket:
    return svid_tunnel(proxy.port, port, pki=pki)


def read_all(sock: ssl.SSLSocket, timeout: float = 5.0) -> bytes:
    """Everything the proxy sends until it closes the connection (a test fails if it never does)."""
    sock.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLError, ConnectionResetError):
            return out
        except TimeoutError:
            raise AssertionError(f"the proxy did not close the connection; got {out!r}") from None
        if not chunk:
            return out
        out += chunk


def parse(raw: bytes) -> tuple[int, dict, http.client.HTTPMessage]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = http.client.parse_headers(io.BytesIO(head.split(b"\r\n", 1)[1] + b"\r\n\r\n"))
    return status, json.loads(body), headers


def audit(proxy) -> list[dict]:
    return [json.loads(line) for line in proxy.output().splitlines() if line.startswith("{")]


def assert_refused(proxy, raw: bytes, reason: str, admin_port: int) -> str:
    """The error contract: JSON 400 with ``reason`` and the request id, Connection: close, no mitmproxy
    page, audited as a refusal and counted; returns the request id."""
    assert b"mitmproxy" not in raw.lower() and b"<html" not in raw.lower(), raw
    status, body, headers = parse(raw)
    assert (status, body["reason"]) == (400, reason), body
    assert headers["Content-Type"] == "application/json"
    assert headers["Connection"] == "close"
    rid = body["request_id"]
    assert headers["X-Secretless-Request-Id"] == rid
    time.sleep(0.3)  # the audit line is written after the answer
    assert [(a["request_id"], a["reason"]) for a in audit(proxy) if a["event"] == "request.denied"] == [(rid, reason)]
    assert metric(admin_port, "secretless_denied_total", reason=reason) == 1
    assert SECRET.encode() not in raw and SECRET not in proxy.output()
    return rid


def used(proxy) -> list[dict]:
    return [a for a in audit(proxy) if a["event"] == "credential.used"]


class TestBodyErrorsInOneWrite:
    """Head and malformed body arrive together: the body fails while the request hooks run, before
    anything went upstream. Nothing is sent, no credential is used."""

    @pytest.mark.parametrize("case", list(BAD_BODIES), ids=list(BAD_BODIES))
    def test_inject_rule(self, start, pki, tls_target, admin_port, case):
        """JSON 400 in the error contract, the connection closed; the target gets no connection and
        the audit has the refusal and no credential.used."""
        proxy = start(allow_port=free_port(), inject_port=tls_target.port)
        body, reason = BAD_BODIES[case]
        s = tunnel(proxy, pki, tls_target.port)
        s.sendall(f"POST /v1/charges HTTP/1.1\r\nHost: localhost:{tls_target.port}\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode() + body)
        raw = read_all(s)  # returns only once the proxy closed the connection
        assert_refused(proxy, raw, reason, admin_port)
        assert not tls_target.reached()
        assert used(proxy) == []

    @pytest.mark.parametrize("case", ["trailer fields", "bad chunk size"])
    def test_allow_rule(self, start, pki, tls_target, admin_port, case):
        """The same on an allow rule (streamed, nothing injected): refused, nothing upstream."""
        proxy = start(allow_port=tls_target.port, inject_port=free_port())
        body, reason = BAD_BODIES[case]
        s = tunnel(proxy, pki, tls_target.port)
        s.sendall(f"POST /x HTTP/1.1\r\nHost: localhost:{tls_target.port}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                  + body)
        assert_refused(proxy, read_all(s), reason, admin_port)
        assert not tls_target.reached()

    def test_refused_on_its_head_answered_once(self, start, pki, tls_target, admin_port):
        """No client certificate and a malformed body in the same write: the head's refusal (407) is the
        one answer and the one audit record; the malformed body is never read on."""
        proxy = start(allow_port=free_port(), inject_port=tls_target.port)
        s = svid_tunnel(proxy.port, tls_target.port, pki=pki, cert=False)
        s.sendall(f"POST /v1/charges HTTP/1.1\r\nHost: localhost:{tls_target.port}\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode() + BAD_BODIES["bad chunk size"][0])
        raw = read_all(s)
        assert raw.count(b"HTTP/1.1 ") == 1 and b"mitmproxy" not in raw.lower()
        status, body, _ = parse(raw)
        assert (status, body["reason"]) == (407, "identity_missing")
        time.sleep(0.3)
        assert [a["reason"] for a in audit(proxy) if a["event"] == "request.denied"] == ["identity_missing"]
        assert not tls_target.reached()

    def test_eof_before_the_declared_length(self, start, pki, tls_target, admin_port):
        """3 of 10 declared bytes, then the client half-closes: still answered (it can read), audited
        body_malformed, nothing upstream, no credential.used."""
        proxy = start(allow_port=free_port(), inject_port=tls_target.port)
        s = tunnel(proxy, pki, tls_target.port)
        s.sendall(f"POST /v1/charges HTTP/1.1\r\nHost: localhost:{tls_target.port}\r\nContent-Length: 10\r\n\r\nabc".encode())
        # A FIN under the TLS session (no close_notify), on a second handle of the same socket:
        # SSLSocket.shutdown would drop the TLS session we still read the answer with.
        half = socket.socket(fileno=os.dup(s.fileno()))
        OPEN_SOCKETS.append(half)
        half.shutdown(socket.SHUT_WR)
        assert_refused(proxy, read_all(s), "body_malformed", admin_port)
        assert not tls_target.reached()
        assert used(proxy) == []

    def test_eof_with_the_client_gone(self, start, pki, tls_target, admin_port):
        """A short body and the connection closed at once: nobody to answer, but the refusal is
        audited and counted, no credential.used, nothing upstream, no traceback."""
        proxy = start(allow_port=free_port(), inject_port=tls_target.port)
        s = tunnel(proxy, pki, tls_target.port)
        s.sendall(f"POST /v1/charges HTTP/1.1\r\nHost: localhost:{tls_target.port}\r\nContent-Length: 10\r\n\r\nabc".encode())
        s.close()
        deadline = time.monotonic() + 5
        while not [a for a in audit(proxy) if a["event"] == "request.denied"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [a["reason"] for a in audit(proxy) if a["event"] == "request.denied"] == ["body_malformed"]
        assert metric(admin_port, "secretless_denied_total", reason="body_malformed") == 1
        assert used(proxy) == []
        assert not tls_target.reached()
        assert "Traceback" not in proxy.output()


class TestBodyErrorsWhileStreaming:
    """The head went upstream (with its credential) before the malformed part of the body arrived."""

    @pytest.mark.parametrize("case", ["trailer fields", "bad chunk size"])
    def test_streamed_request_aborted_upstream(self, start, pki, silent_target, admin_port, case):
        """JSON 400 for the client; the upstream request is aborted (its connection closed) and never
        gets the malformed part. The credential did reach the upstream with the head: audited as used
        (with the status the client got), besides the refusal."""
        proxy = start(allow_port=free_port(), inject_port=silent_target.port)
        body, reason = BAD_BODIES[case]
        s = tunnel(proxy, pki, silent_target.port)
        s.sendall(f"POST /v1/charges HTTP/1.1\r\nHost: localhost:{silent_target.port}\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in silent_target.received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"Bearer {SECRET}".encode() in silent_target.received  # streamed: the head is upstream
        s.sendall(body)
        raw = read_all(s)
        rid = assert_refused(proxy, raw, reason, admin_port)
        assert silent_target.closed.wait(3), "the upstream request was not aborted"
        assert not silent_target.received.endswith(body)
        assert b"X-T" not in silent_target.received and b"zz" not in silent_target.received
        assert [(a["request_id"], a["status"]) for a in used(proxy)] == [(rid, 400)]


    def test_after_100_continue(self, start, pki, silent_target, admin_port):
        """`Expect: 100-continue`: the body that follows the interim response is malformed. The
        `100 Continue` is no answer: the JSON refusal still comes, and the upstream request is aborted."""
        proxy = start(allow_port=free_port(), inject_port=silent_target.port)
        s = tunnel(proxy, pki, silent_target.port)
        s.sendall(f"POST /v1/charges HTTP/1.1\r\nHost: localhost:{silent_target.port}\r\nExpect: 100-continue\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        interim = b""
        while b"\r\n\r\n" not in interim:
            interim += s.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100")
        s.sendall(BAD_BODIES["bad chunk size"][0])
        rest = interim.split(b"\r\n\r\n", 1)[1] + read_all(s)
        rid = assert_refused(proxy, rest, "body_malformed", admin_port)
        assert silent_target.closed.wait(3), "the upstream request was not aborted"
        assert [(a["request_id"], a["status"]) for a in used(proxy)] == [(rid, 400)]


class TestWellFormedBodies:
    def test_chunked_request_passes(self, start, pki, upstream, admin_port):
        """A chunked body without trailers goes upstream whole, with the credential, on an inject rule."""
        proxy = start(allow_port=free_port(), inject_port=upstream.port)
        s = tunnel(proxy, pki, upstream.port)
        s.sendall(f"POST /v1/charges HTTP/1.1\r\nHost: localhost:{upstream.port}\r\nTransfer-Encoding: chunked\r\n"
                  "\r\n3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\n\r\n".encode())
        resp = http.client.HTTPResponse(s)
        resp.begin()
        assert resp.status == 200 and json.loads(resp.read())["body"] == "abcdefg"
        [got] = upstream.requests
        assert got["body"] == "abcdefg"
        assert ["Authorization", f"Bearer {SECRET}"] in got["headers"]
        assert [a["status"] for a in used(proxy)] == [200]
        assert [a for a in audit(proxy) if a["event"] == "request.denied"] == []


class TestMitmproxyShape:
    def test_the_code_the_guard_relies_on(self):
        """mitmproxy 12.2 catches h11.ProtocolError around the body reader (and closes unanswered), and
        a request event waits in ``_paused_event_queue`` while a hook runs, where check_killed (and
        GuardedHttpStream.start_request_stream) look for it (fails if mitmproxy changes shape)."""
        import inspect

        from mitmproxy.proxy.layers.http import HttpStream, _http1

        from secretless_proxy.edge import layerguard

        layerguard.install()
        body = inspect.getsource(_http1.Http1Connection.read_body.__wrapped__)
        assert "self.body_reader(self.buf)" in body and "self.body_reader.read_eof()" in body
        assert "except h11.ProtocolError" in body
        assert "self._paused_event_queue" in inspect.getsource(HttpStream.check_killed)
