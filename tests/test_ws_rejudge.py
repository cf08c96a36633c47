"""An open WebSocket is judged on the trust and rules loaded now (hostile review 17).

A real proxy, a real TLS WebSocket upstream (wsproto) that records every message it receives, a
wsproto client on a raw TLS socket through a CONNECT tunnel; the trust bundle and the config are
real files that the proxy watches and reloads.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import socket
import ssl
import time

import pytest
import yaml
from helpers.e2e_broker import metric
from helpers.net import TlsListener, free_port, head_field, recv_head
from helpers.proxy import SECRET, base_config
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import AcceptConnection, CloseConnection, Message, Request, TextMessage

from secretless_proxy.dev import certs
from secretless_proxy.dev.echoserver import tls_server_context

BILLING = "spiffe://example.org/ns/prod/sa/billing"
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WsUpstream(TlsListener):
    """TLS WebSocket server: answers each text message with ``echo: …``, records what it got."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        super().__init__(ctx)
        self.messages: list[str] = []
        self.heads: list[bytes] = []
        self.start()

    def handle(self, conn: ssl.SSLSocket) -> None:
        conn.settimeout(30)
        head = recv_head(conn)
        if not head:
            return
        self.heads.append(head)
        key = head_field(head, b"sec-websocket-key")
        assert key is not None, head
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        ws = Connection(ConnectionType.SERVER)
        while data := conn.recv(65536):
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, TextMessage):
                    self.messages.append(event.data)
                    conn.sendall(ws.send(TextMessage(data=f"echo: {event.data}")))
                elif isinstance(event, CloseConnection):
                    conn.sendall(ws.send(event.response()))
                    return


@pytest.fixture
def ws_upstream(pki):
    up = WsUpstream(tls_server_context(certs.make_server_cert(ca=pki.upstream_ca)))
    yield up
    up.close()


@pytest.fixture
def bundle(pki, tmp_path):
    """A copy of the workload trust bundle that a test may replace (the session PKI stays intact)."""
    path = tmp_path / "bundle.pem"
    shutil.copy(pki.trust_bundle, path)
    return path


def _config(pki, bundle, port: int, admin_port: int, *, rules: list[str]) -> dict:
    known = {
        "ws": {"name": "ws", "workloads": [BILLING], "to": {"host": "localhost", "port": port},
               "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}},
        "ws-open": {"name": "ws-open", "workloads": [BILLING], "to": {"host": "localhost", "port": port},
                    "action": "allow"},
        "other": {"name": "other", "workloads": [BILLING], "to": {"host": "other.example"}, "action": "allow"},
    }
    cfg = base_config(pki, rules=[known[r] for r in rules], admin={"listen": f"127.0.0.1:{admin_port}"})
    cfg["identity"] = {**cfg["identity"], "trust_bundle": str(bundle)}
    return cfg


class WsClient:
    """wsproto client on a TLS socket through a CONNECT tunnel, with the workload's certificate."""

    def __init__(self, proxy, pki, port: int) -> None:
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        raw.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += raw.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head
        ctx = ssl.create_default_context(cafile=pki.interception_ca_cert)
        ctx.load_cert_chain(*pki.svid(BILLING))
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host=f"localhost:{port}", target="/ws")))
        [accepted] = self.events()
        assert isinstance(accepted, AcceptConnection), accepted

    def events(self, *, until_closed: bool = False) -> list:
        out: list = []
        while True:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLError, OSError):
                return out
            self.ws.receive_data(data or None)
            out += list(self.ws.events())
            if not data or (out and not until_closed):
                return out

    def say(self, text: str) -> list:
        self.sock.sendall(self.ws.send(TextMessage(data=text)))
        return self.events(until_closed=False)

    def close(self) -> None:
        self.sock.close()


def _wait_reloads(proxy, n: int) -> None:
    deadline = time.monotonic() + 15
    while proxy.output().count("config reloaded") < n:
        assert time.monotonic() < deadline, proxy.output()
        time.sleep(0.1)


def _denied(proxy) -> list[str]:
    return [json.loads(line)["reason"] for line in proxy.output().splitlines()
            if line.startswith("{") and '"request.denied"' in line]


@pytest.fixture
def admin_port() -> int:
    return free_port()


class TestWebSocketRejudged:
    def test_removed_ca_closes_an_open_websocket(self, proxy_factory, pki, bundle, ws_upstream, admin_port):
        """After the workload's CA leaves the bundle, the next message is not relayed: the WebSocket is
        closed (1008) on both sides, audited identity_untrusted and counted."""
        proxy = proxy_factory(_config(pki, bundle, ws_upstream.port, admin_port, rules=["ws"]))
        client = WsClient(proxy, pki, ws_upstream.port)
        assert [e.data for e in client.say("before") if isinstance(e, Message)] == ["echo: before"]
        assert f"Bearer {SECRET}".encode() in ws_upstream.heads[0]  # the session carries the credential
        bundle.write_bytes(certs.make_ca(common_name="another CA").cert_pem())
        _wait_reloads(proxy, 1)
        got = client.say("after-removal") + client.events(until_closed=True)
        time.sleep(0.3)
        assert ws_upstream.messages == ["before"]
        assert not any(isinstance(e, Message) for e in got)
        assert [e.code for e in got if isinstance(e, CloseConnection)][:1] == [1008]  # then EOF (1006)
        assert _denied(proxy) == ["identity_untrusted"]
        assert metric(admin_port, "secretless_denied_total", reason="identity_untrusted") == 1
        client.close()

    def test_removed_rule_closes_an_open_websocket(self, proxy_factory, pki, bundle, ws_upstream, admin_port, tmp_path):
        """After a reload without the rule that admitted it, the next message is not relayed (no_rule)."""
        proxy = proxy_factory(_config(pki, bundle, ws_upstream.port, admin_port, rules=["ws-open"]))
        client = WsClient(proxy, pki, ws_upstream.port)
        assert [e.data for e in client.say("before") if isinstance(e, Message)] == ["echo: before"]
        (tmp_path / "config0.yaml").write_text(yaml.safe_dump(
            _config(pki, bundle, ws_upstream.port, admin_port, rules=["other"]), sort_keys=False))
        _wait_reloads(proxy, 1)
        got = client.say("after-reload") + client.events(until_closed=True)
        time.sleep(0.3)
        assert ws_upstream.messages == ["before"]
        assert [e.code for e in got if isinstance(e, CloseConnection)][:1] == [1008]  # then EOF (1006)
        assert _denied(proxy) == ["no_rule"]
        client.close()

    def test_reload_that_keeps_trust_and_rule_keeps_the_websocket(self, proxy_factory, pki, bundle, ws_upstream,
                                                                   admin_port, tmp_path):
        """A reload that changes something else (a new rule) leaves an open WebSocket working."""
        proxy = proxy_factory(_config(pki, bundle, ws_upstream.port, admin_port, rules=["ws"]))
        client = WsClient(proxy, pki, ws_upstream.port)
        assert [e.data for e in client.say("before") if isinstance(e, Message)] == ["echo: before"]
        (tmp_path / "config0.yaml").write_text(yaml.safe_dump(
            _config(pki, bundle, ws_upstream.port, admin_port, rules=["ws", "other"]), sort_keys=False))
        _wait_reloads(proxy, 1)
        assert [e.data for e in client.say("after-reload") if isinstance(e, Message)] == ["echo: after-reload"]
        assert ws_upstream.messages == ["before", "after-reload"]
        assert _denied(proxy) == []
        client.close()


class TestMessageBounds:
    """Everything a WebSocket buffers is bounded (hostile review 4.13): a message assembled from
    fragments past its bound, and a backlog written while a message is judged, close both sides with
    1009 instead of growing the proxy by what was sent; nothing of the over-bound message is relayed."""

    @pytest.fixture
    def proxy(self, proxy_factory, pki, bundle, ws_upstream):
        cfg = _config(pki, bundle, ws_upstream.port, free_port(), rules=["ws"])
        cfg["limits"] = {"max_request_body_bytes": 65536, "max_response_scan_bytes": 65536}
        return proxy_factory(cfg)

    @staticmethod
    def _close_code(c: WsClient) -> int | None:
        """The code of the close frame the proxy sends (None if the connection ends without one)."""
        c.sock.settimeout(10)
        while True:
            try:
                data = c.sock.recv(65536)
            except (TimeoutError, OSError):
                return None
            c.ws.receive_data(data or None)
            for event in c.ws.events():
                if isinstance(event, CloseConnection):
                    return event.code
            if not data:
                return None

    def test_fragments_past_the_bound_close_both_sides(self, proxy, pki, ws_upstream):
        from wsproto.frame_protocol import FrameProtocol

        c = WsClient(proxy, pki, ws_upstream.port)
        fp = FrameProtocol(client=True, extensions=[])
        try:
            c.sock.sendall(fp.send_data("x" * 16384, fin=False))
            for _ in range(16):  # 272 KiB of continuation frames, never FIN
                c.sock.sendall(fp.send_data("x" * 16384, fin=False))
        except OSError:
            pass  # the proxy may close while we still write
        code = self._close_code(c)
        c.close()
        assert code == 1009
        assert ws_upstream.messages == []
        assert "over its size bound: both sides closed (1009)" in proxy.output()

    def test_a_backlog_written_while_a_message_is_judged_closes_both_sides(self, proxy, pki, ws_upstream):
        c = WsClient(proxy, pki, ws_upstream.port)
        batch = b"".join(c.ws.send(TextMessage(data="m" * 1024)) for _ in range(2048))  # 2 MiB in one write
        try:
            c.sock.sendall(batch)
        except OSError:
            pass
        code = self._close_code(c)
        c.close()
        assert code == 1009
        assert len(ws_upstream.messages) < 2048
        assert "while a message was judged: both sides closed (1009)" in proxy.output()

    def test_messages_within_the_bounds_pass(self, proxy, pki, ws_upstream):
        c = WsClient(proxy, pki, ws_upstream.port)
        for n in range(50):
            [echo] = c.say(f"hello {n}")
            assert echo.data == f"echo: hello {n}"
        c.close()


class TestNoExtensions:
    def test_the_client_offer_is_dropped_and_an_unasked_extension_refused(self, proxy_factory, pki, bundle):
        """The handshake goes upstream without Sec-WebSocket-Extensions, and a 101 that enables one anyway
        (permessage-deflate: a compressed frame inflated 148 MiB before the message bound, hostile
        review 5.08) is refused with 502 upstream_protocol_error; no WebSocket opens."""
        class DeflatingUpstream(WsUpstream):
            def handle(self, conn):
                head = recv_head(conn)
                self.heads.append(head)
                key = head_field(head, b"sec-websocket-key") or b""
                accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Extensions: permessage-deflate\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
                conn.recv(1)

        up = DeflatingUpstream(tls_server_context(certs.make_server_cert(ca=pki.upstream_ca)))
        try:
            proxy = proxy_factory(_config(pki, bundle, up.port, free_port(), rules=["ws"]))
            raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            raw.sendall(f"CONNECT localhost:{up.port} HTTP/1.1\r\nHost: localhost:{up.port}\r\n\r\n".encode())
            assert raw.recv(4096).startswith(b"HTTP/1.1 200")
            ctx = ssl.create_default_context(cafile=pki.interception_ca_cert)
            ctx.load_cert_chain(*pki.svid(BILLING))
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(f"GET /ws HTTP/1.1\r\nHost: localhost:{up.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                          "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n".encode())
                answer = b""
                while b"}" not in answer:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
        finally:
            up.close()
        assert answer.startswith(b"HTTP/1.1 502"), answer[:100]
        assert b"upstream_protocol_error" in answer
        assert b"sec-websocket-extensions" not in up.heads[0].lower()
