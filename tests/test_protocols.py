"""In-process tests of the edge's parts (no sockets): the protocol gate, request target, owned headers."""

from __future__ import annotations

import pytest
from mitmproxy import exceptions
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.addons.tlsconfig import TlsConfig
from mitmproxy.test import taddons, tflow

from secretless_proxy.addon import Secretless
from secretless_proxy.edge import ownheaders, protocols, requesttarget


class TestClassify:
    @pytest.mark.parametrize("data", [b"", b"G", b"GE", b"GET", b"GET /inter", b"GET / HT", b"GET / HTTP/1.",
                                      b"\r\nGET / HTTP/1.1\r", b"\x16", b"\x16\x03"])
    def test_request_line_still_arriving_waits(self, data):
        """A prefix of a request line (a split write) or of a TLS record waits for more bytes."""
        assert protocols.classify(data, max_head=1024) == "more"

    @pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"POST /x?y HTTP/1.0\n", b"\r\nGET / HTTP/1.1\r\nHost"])
    def test_request_line_is_http(self, data):
        """A complete HTTP/1 request line is HTTP."""
        assert protocols.classify(data, max_head=1024) == "http"

    @pytest.mark.parametrize("data", [b"*1\r\n$4\r\nPING\r\n", b"PING\r\n", b"SET k v\r\n", b"\x00\x01",
                                      b"PRI * HTTP/2.0\r\n", b"SSH-2.0-OpenSSH\r\n", b"GET / HTTP/2\r\n", b"GET  / HTTP/1.1\r\n"])
    def test_anything_else_is_refused(self, data):
        """Redis, binary, SSH, the h2 preface and malformed request lines are refused."""
        assert protocols.classify(data, max_head=1024) == "refuse"

    def test_endless_request_line_is_refused(self):
        """A request line longer than the head limit without a newline is refused, not awaited."""
        assert protocols.classify(b"GET /" + b"a" * 2000, max_head=1024) == "refuse"


@pytest.fixture
def tctx():
    addon = Secretless()
    with taddons.context(Proxyserver(), TlsConfig(), addon) as ctx:
        yield ctx, addon


class TestOpenOptionsRefused:
    @pytest.mark.parametrize(("option", "value"), [
        ("ignore_hosts", [".*"]), ("allow_hosts", ["example.com"]), ("tcp_hosts", [".*"]), ("udp_hosts", [".*"]),
        ("mode", ["socks5"]), ("mode", ["reverse:https://example.com"]), ("mode", ["regular", "dns"]),
        ("validate_inbound_headers", False),
    ])
    def test_option_that_opens_a_relay_is_refused(self, tctx, option, value):
        """Every option value that opens a path around the policy is an OptionsError naming it."""
        ctx, addon = tctx
        with pytest.raises(exceptions.OptionsError, match=f"{option}=.* is not allowed with secretless-proxy"):
            ctx.configure(addon, **{option: value})

    def test_forced_options_cannot_be_reopened(self, tctx):
        """Once forced, rawtcp and connection_strategy cannot be switched back."""
        ctx, addon = tctx
        addon._forced = True
        with pytest.raises(exceptions.OptionsError, match="rawtcp=True is not allowed"):
            ctx.configure(addon, rawtcp=True)
        with pytest.raises(exceptions.OptionsError, match="connection_strategy='eager' is not allowed"):
            ctx.configure(addon, connection_strategy="eager")

    def test_regular_mode_on_a_port_is_fine(self, tctx):
        """`regular@8080` is the regular mode: accepted."""
        ctx, addon = tctx
        ctx.configure(addon, mode=["regular@8080"])


def req(method="GET", path="/", headers=(), http2=False):
    f = tflow.tflow()
    f.request.method = method
    f.request.path = path
    f.request.headers.clear()
    for k, v in headers:
        f.request.headers.add(k, v)
    if http2:
        f.request.http_version = "HTTP/2.0"
    return f.request


class TestUpgrades:
    @pytest.mark.parametrize("headers", [[("Upgrade", "h2c"), ("HTTP2-Settings", "AAA")], [("Upgrade", "tcp")],
                                         [("Upgrade", "websocket, h2c")], [("HTTP2-Settings", "AAA")]])
    def test_non_websocket_upgrades_refused(self, headers):
        """h2c and any other protocol upgrade is refused upgrade_refused."""
        refusal = protocols.upgrade_refusal(req(headers=headers))
        assert refusal is not None and refusal.reason == "upgrade_refused"

    def test_websocket_on_get_allowed(self):
        """Upgrade: websocket on GET is left to policy."""
        assert protocols.upgrade_refusal(req(headers=[("Upgrade", "WebSocket")])) is None

    def test_websocket_on_post_refused(self):
        """A WebSocket handshake is a GET (RFC 6455 §4.1); anything else is refused."""
        assert protocols.upgrade_refusal(req("POST", headers=[("Upgrade", "websocket")])) is not None


class TestOwnedHeaders:
    def test_strips_proxy_namespace_and_hop_by_hop(self):
        """Proxy-Authorization, X-Secretless-*, hop-by-hop and Connection-named headers go; the rest stays."""
        r = req(headers=[("Proxy-Authorization", "Basic x"), ("X-Secretless-Rule", "a"), ("x-secretless-request-id", "b"),
                         ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "5"), ("TE", "gzip"),
                         ("Content-Length", "0"), ("X-Keep", "1")])
        ownheaders.strip(r, websocket=False)
        assert [k.lower() for k in r.headers] == ["content-length", "x-keep"]

    def test_connection_close_is_the_one_token_kept(self):
        """`Connection: close, X-Hop` leaves exactly `Connection: close` (mitmproxy closes the client's
        connection after the answer from it); X-Hop still goes. HTTP/2 has no Connection header."""
        r = req(headers=[("Connection", "close, X-Hop"), ("X-Hop", "1"), ("X-Keep", "1")])
        ownheaders.strip(r, websocket=False)
        assert list(r.headers.items()) == [("X-Keep", "1"), ("Connection", "close")]
        h2 = req(headers=[("Connection", "close")])
        h2.http_version = "HTTP/2.0"
        ownheaders.strip(h2, websocket=False)
        assert "connection" not in h2.headers

    def test_websocket_keeps_its_upgrade_pair(self):
        """A WebSocket handshake keeps Upgrade and gets exactly `Connection: Upgrade`."""
        r = req(headers=[("Upgrade", "websocket"), ("Connection", "Upgrade, X-Hop"), ("X-Hop", "1")])
        ownheaders.strip(r, websocket=True)
        assert dict(r.headers) == {"Upgrade": "websocket", "Connection": "Upgrade"}

    def test_h2_te_trailers_kept(self):
        """`te: trailers` is the one TE value HTTP/2 allows (gRPC): kept."""
        r = req(headers=[("te", "trailers")], http2=True)
        ownheaders.strip(r, websocket=False)
        assert r.headers["te"] == "trailers"

    @pytest.mark.parametrize("method", [b"get", b"Get", b"pOST"])
    def test_non_canonical_method_refused(self, method):
        """Methods are case-sensitive: a method token not in upper case is refused."""
        r = req()
        r.data.method = method
        refusal = ownheaders.method_refusal(r)
        assert refusal is not None and refusal.reason == "method_not_canonical"
        assert "upper case" in refusal.message

    def test_canonical_method_passes(self):
        """An upper-case token, standard or not, is left to policy."""
        r = req()
        r.data.method = b"PURGE"
        assert ownheaders.method_refusal(r) is None


class TestRequestTarget:
    @pytest.mark.parametrize("target", [("https", "attacker.example"), ("https", "localhost:444"), ("http", ""),
                                        ("https", "localhost:443@x"), ("", "other:443")])
    def test_target_naming_another_destination_refused(self, target):
        """A scheme or authority in the request target that differs from the bound destination raises."""
        with pytest.raises(ValueError):
            requesttarget.check(target, host="localhost", port=443, scheme="https")

    @pytest.mark.parametrize("target", [("", ""), ("https", "localhost"), ("https", "LOCALHOST:443"),
                                        ("https", "localhost.:443")])
    def test_target_naming_the_destination_passes(self, target):
        """Origin form, or an absolute form naming the bound destination (any spelling), passes."""
        requesttarget.check(target, host="localhost", port=443, scheme="https")

    def test_rewrite_to_origin_form_with_the_decided_host(self):
        """HTTP/1 goes upstream in origin form with the decided Host."""
        r = req(headers=[("Host", "LocalHost")])
        r.scheme, r.authority = "https", "localhost:443"
        requesttarget.rewrite(r, host="localhost", port=443)
        assert r.authority == "" and r.headers["Host"] == "localhost"
