"""In-process redaction tables: every echo form × secret shape × injection form × place (no sockets)."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import inspect
import zlib

import brotli
import pytest
import zstandard
from helpers.echo_forms import FORMS
from mitmproxy import http
from mitmproxy.proxy.layers import websocket
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.test import tflow
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode

from secretless_proxy import inject, redaction
from secretless_proxy.config.model import Injection
from secretless_proxy.edge import layerguard
from secretless_proxy.redaction import MARKER, needles_for
from secretless_proxy.secretrefs import Secret

SECRETS = {
    "stripe": "sk_test_51SECRETvalue0123456789",
    "plus_slash_eq": "ab+cd/ef=gh+ij/kl==mn",
    "space_and_quote": "pass word \"quoted\" & <tag> 'x'",
    "non_ascii": "clé-secrète-€-0123456789",
}


def _recoverable(data: bytes, secret: str) -> bool:
    """Whether ``secret`` (or a base64/hex of a 12-byte piece of it) is still in ``data``."""
    raw = secret.encode()
    w = min(12, len(raw))
    for i in range(len(raw) - w + 1):
        piece = raw[i:i + w]
        if piece in data or piece.hex().encode() in data.lower():
            return True
    return False


def injection(**kw) -> Injection:
    return Injection(credential="c", **kw)


class TestForms:
    @pytest.mark.parametrize("form", list(FORMS))
    @pytest.mark.parametrize("name", list(SECRETS))
    def test_every_form_of_every_secret_is_redacted(self, name, form):
        """Each echo form of the secret, between other text, is replaced and the text around it kept."""
        secret = SECRETS[name]
        echo = FORMS[form](secret)
        out = needles_for(secret).redact_bytes(f"before {echo} after".encode())
        assert MARKER.encode() in out
        assert out.startswith(b"before ") and out.endswith(b" after")
        assert echo.encode() not in out

    @pytest.mark.parametrize("offset", range(6))
    def test_base64_at_any_offset_inside_a_larger_blob(self, offset):
        """Base64 of a document holding the secret at any byte offset loses every 12-byte piece of it."""
        secret = SECRETS["stripe"]
        blob = base64.b64encode(b"x" * offset + f'{{"auth": "Bearer {secret}"}}'.encode()).decode()
        out = needles_for(secret).redact_str(blob)
        assert MARKER in out
        core = out.replace(MARKER, "")
        for i in range(0, len(core) - 3):
            try:
                decoded = base64.b64decode(core[i:][: (len(core) - i) // 4 * 4])
            except ValueError:
                continue
            assert not _recoverable(decoded, secret)

    def test_mixed_escapes_in_one_echo(self):
        """A token whose '=' is %3D and whose '/' is \\/ in the same echo is still caught."""
        secret = SECRETS["plus_slash_eq"]
        echo = secret.replace("=", "%3d", 1).replace("/", "\\/", 1).replace("+", "\\u002B", 1)
        assert needles_for(secret).redact_str(f"x{echo}y") == f"x{MARKER}y"

    def test_unrelated_text_is_left_alone(self):
        """Text without the secret comes back byte for byte (no false positives on short forms)."""
        body = b'{"id": 1, "items": ["a", "b"], "note": "c2tfdGVzdA== is not it", "hex": "deadbeef"}'
        assert needles_for(SECRETS["stripe"]).redact_bytes(body) == body

    @pytest.mark.parametrize("length", [15, 39, 64, 200])
    def test_an_echo_cut_short_brings_back_at_most_a_block_less_one(self, length):
        """A piece of the secret that starts or ends with it (an upstream quoting the first or last N
        characters of what it got, the workload choosing the cut: hostile review 4.12) comes back with
        at most block - 1 of its characters; any piece of 2 * block - 1 or more is redacted."""
        secret = ("sk_live_" + hashlib.sha512(b"a").hexdigest() + hashlib.sha512(b"b").hexdigest())[:length]
        n = needles_for(secret)
        block = max(12, -(-length // 8))
        bound = block - 1

        def left(text: str) -> int:  # the longest run of the secret's characters still in text
            return max((j - i for i in range(len(text)) for j in range(i + 1, len(text) + 1) if text[i:j] in secret),
                       default=0)

        for k in range(1, length + 1):  # '#' frames the echo: a character no secret here holds
            assert left(n.redact_str(f"#{secret[:k]}#")) <= min(k, bound), k
            assert left(n.redact_str(f"#{secret[-k:]}#")) <= min(k, bound), k
        for a in range(0, length - (2 * block - 1) + 1, 3):
            piece = secret[a:a + 2 * block - 1]
            assert piece not in n.redact_str(f"x{piece}y"), a

    @pytest.mark.parametrize("encode", [lambda b: b.hex(), lambda b: b.hex().upper(),
                                        lambda b: base64.b64encode(b).decode()], ids=["hex", "HEX", "base64"])
    def test_an_encoded_echo_cut_short_brings_back_at_most_a_block_less_one(self, encode):
        """Hex or base64 of the credential, cut short at any point (hostile review 5.01: 37 of 39 bytes
        came back in hex): at most block - 1 characters of the encoding, from either end."""
        secret = "sk_live_" + hashlib.sha512(b"c").hexdigest()[:31]
        form = encode(secret.encode())
        n = needles_for(secret)
        block = max(12, -(-len(form) // 8))
        for k in range(1, len(form) + 1):
            for piece in (form[:k], form[-k:]):
                out = n.redact_str(f"#{piece}#")
                left = max((j - i for i in range(len(out)) for j in range(i + 1, len(out) + 1) if out[i:j] in form),
                           default=0)
                assert left <= min(k, block - 1), (k, out)

    @pytest.mark.parametrize("offset", [0, 1, 2])
    def test_a_base64_blob_cut_short_brings_back_at_most_a_block_less_one(self, offset):
        """The credential inside a base64-encoded dump at any byte offset, the dump cut at any point
        (hostile review 6.01: at offsets 1 and 2 mod 3, 38 of 40 characters came back): at most
        block - 1 characters of the credential's part of the encoding survive."""
        secret = "ghp_" + hashlib.sha512(b"e").hexdigest()[:36]
        blob = base64.b64encode(b"x" * (30 + offset) + secret.encode() + b" and the rest of the dump").decode()
        start = (30 + offset) * 4 // 3 + 2
        part = blob[start:start + len(secret) * 4 // 3 - 4]  # characters that depend on the secret alone
        n = needles_for(secret)
        block = max(12, -(-len(part) // 8))
        for cut in range(start + 1, len(blob) + 1, 3):
            out = n.redact_str(blob[:cut])
            left = max((j - i for i in range(len(out)) for j in range(i + 1, len(out) + 1) if out[i:j] in part),
                       default=0)
            assert left <= block + 2, (cut, left)

    def test_no_form_has_an_optional_group(self):
        """Every form's pattern is a sequence of per-character alternatives, with no optional or repeated
        group: its scan is linear in the body (hostile review 5.02: optional context reaching 64
        characters held the event loop for seconds on a body of near-matches)."""
        secret = "sk_live_" + hashlib.sha512(b"d").hexdigest()[:31]
        for form in redaction._cached_forms(secret):
            pattern = form._pattern()
            assert ")?" not in pattern and ")*" not in pattern and ")+" not in pattern, pattern[:80]

    def test_a_piece_in_an_escaped_echo_is_redacted_too(self):
        """The fragment forms take the same escapes as the whole value (JSON \\/, percent-encoding)."""
        secret = "tok/" + "A1b2C3d4E5f6G7h8" + "+end=="
        echo = secret[:18].replace("/", "\\/")
        assert echo not in needles_for(secret).redact_str(f'{{"seen": "{echo}"}}')

    def test_repr_and_cache_show_no_secret(self):
        """Needles print only a count, and the cache is keyed by a keyed digest, not the value."""
        n = needles_for(SECRETS["stripe"])
        assert SECRETS["stripe"] not in repr(n) and "Needles(" in repr(n)
        assert all(isinstance(k, bytes) and SECRETS["stripe"].encode() not in k for k in redaction._cache)

    def test_max_match_bytes_bounds_every_escaped_form(self):
        """A fully escaped echo is never longer than max_match_bytes (the overlap a chunked scan keeps)."""
        secret = SECRETS["space_and_quote"]
        n = needles_for(secret)
        longest = max(len(FORMS[f](secret).encode()) for f in FORMS)
        escaped_all = "".join(f"\\u{ord(c):04x}" if not c.isalnum() else c for c in secret)
        assert longest <= n.max_match_bytes and len(escaped_all) <= n.max_match_bytes
        assert n.redact_str(escaped_all) == MARKER

    def test_derived_once_per_value(self):
        """A second request with the same credential value reuses the compiled forms."""
        a = redaction._cached_forms("sk_live_reused_value_123456")
        b = redaction._cached_forms("sk_live_reused_value_123456")
        assert a is b


class TestInjectionForms:
    """What inject.apply returns covers the value as it travels and as an echo re-encodes it."""

    def _needles_and_echoes(self, kind: str, secret: str):
        req = tflow.treq()
        if kind == "header":
            n = inject.apply(req, injection(header="Authorization", format="Bearer {secret}"), Secret(secret))
            return n, [req.headers["Authorization"], secret]
        if kind == "basic":
            n = inject.apply(req, injection(basic_username="billing", basic_password="{secret}"), Secret(secret))
            token = req.headers["Authorization"].partition(" ")[2]
            return n, [token, token.rstrip("="), secret, f"billing:{secret}"]
        n = inject.apply(req, injection(query="api_key"), Secret(secret))
        return n, [req.query["api_key"], secret]

    @pytest.mark.parametrize("form", list(FORMS))
    @pytest.mark.parametrize("kind", ["header", "basic", "query"])
    def test_injected_value_in_every_form(self, kind, form):
        """Whatever travels (Bearer value, basic token and its unpadded prefix, query value) is redacted in every form."""
        secret = SECRETS["plus_slash_eq"]
        needles, echoes = self._needles_and_echoes(kind, secret)
        for echo in echoes:
            out = needles.redact_bytes(f"<{FORMS[form](echo)}>".encode())
            assert not _recoverable(out, secret), (echo, out)

    def test_url_encoded_basic_token_in_location(self):
        """The issue's case: a basic token whose '=' padding became %3D in a Location header."""
        req = tflow.treq()
        needles = inject.apply(req, injection(basic_username="u", basic_password="{secret}"), Secret("p@ss-word"))
        token = req.headers["Authorization"].partition(" ")[2]
        assert token.endswith("=")
        resp = tflow.tresp()
        resp.headers["Location"] = "https://x.example/cb?t=" + token.replace("=", "%3D")
        redaction.redact_message(resp, needles)
        assert resp.headers["Location"] == f"https://x.example/cb?t={MARKER}"


class TestMessage:
    S = SECRETS["stripe"]

    @pytest.mark.parametrize("encoding,compress", [
        ("identity", lambda b: b), ("gzip", gzip.compress), ("br", brotli.compress),
        ("deflate", zlib.compress), ("zstd", zstandard.ZstdCompressor().compress)])
    def test_body_in_every_content_encoding(self, encoding, compress):
        """The decoded body is redacted and re-encoded in its own encoding."""
        resp = tflow.tresp()
        resp.headers["Content-Encoding"] = encoding
        resp.raw_content = compress(f"echo {base64.b64encode(self.S.encode()).decode()}".encode())
        redaction.redact_message(resp, needles_for(self.S))
        assert resp.headers["Content-Encoding"] == encoding
        assert resp.get_content() == f"echo {MARKER}".encode()

    def test_unknown_encoding_raises(self):
        """A body that cannot be decoded cannot be checked: ValueError, so the caller withholds it."""
        resp = tflow.tresp()
        resp.headers["Content-Encoding"] = "x-unknown"
        resp.raw_content = self.S.encode()
        with pytest.raises(ValueError):
            redaction.redact_message(resp, needles_for(self.S))

    def test_reason_headers_names_and_trailers(self):
        """The reason phrase, header values and names, and trailers are all redacted."""
        resp = tflow.tresp()
        resp.reason = f"echo Bearer {self.S}"
        resp.headers["X-Echo"] = self.S.encode().hex()
        resp.headers[f"X-{self.S}"] = "1"
        resp.trailers = http.Headers(grpc_message=f"bad token {self.S}".encode())
        redaction.redact_message(resp, needles_for(self.S))
        assert resp.reason == f"echo Bearer {MARKER}"
        assert resp.headers["X-Echo"] == MARKER
        assert f"X-{MARKER}" in resp.headers
        assert resp.trailers["grpc-message"] == f"bad token {MARKER}"

    def test_websocket_server_message_redacted_client_message_kept(self):
        """A server→client WebSocket message is redacted; a client→server one is relayed as sent."""
        n = needles_for(self.S)
        server = WebSocketMessage(Opcode.TEXT, False, f"you are {self.S}".encode())
        client = WebSocketMessage(Opcode.TEXT, True, f"I am {self.S}".encode())
        redaction.redact_websocket_message(server, n)
        redaction.redact_websocket_message(client, n)
        assert server.text == f"you are {MARKER}"
        assert client.text == f"I am {self.S}"


class TestLayerGuard:
    def test_quoted_peer_bytes_are_cut_from_protocol_errors(self):
        """mitmproxy's parse errors quote the upstream's line; the quoted part never reaches the client."""
        msg = "Cannot parse HTTP response: Bad HTTP response line: b'HTTP/1.1 2x0 echo Bearer sk_live'"
        assert layerguard.clean_message(msg) == "Cannot parse HTTP response: Bad HTTP response line"
        assert layerguard.clean_message("peer closed connection (incomplete chunked read)") == \
            "peer closed connection (incomplete chunked read)"

    def test_goaway_debug_data_is_cut_from_protocol_errors(self):
        """h2 prints a GOAWAY's debug data unquoted, in hex: it is withheld, the rest of the text kept."""
        msg = ("HTTP/2 connection closed: <ConnectionTerminated error_code:1, last_stream_id:1, "
               "additional_data:42656172657220736b5f>")
        assert layerguard.clean_message(msg) == ("HTTP/2 connection closed: <ConnectionTerminated error_code:1, "
                                                 "last_stream_id:1, additional_data:(withheld)>")

    def test_websocket_message_size_is_a_running_count(self):
        """The message bound is checked in constant time per fragment, never by summing what is buffered
        (hostile review 5.07: 60,000 one-byte fragments held the event loop 40 s)."""
        import wsproto.events

        class Conn:
            client = False  # the side facing the workload: the client's bound
            @property
            def frame_buf(self):
                raise AssertionError("the buffered fragments were read")

        conn, limit = Conn(), 16 * 1024 * 1024
        layerguard.install()
        over = [layerguard._over_message_limit(conn, wsproto.events.TextMessage(data="x", message_finished=False))
                for _ in range(1000)]
        assert not any(over)
        assert layerguard._over_message_limit(conn, wsproto.events.BytesMessage(data=b"y" * limit, message_finished=False))
        assert not layerguard._over_message_limit(Conn(), wsproto.events.TextMessage(data="z", message_finished=True))

    def test_wraps_the_readers_that_raise_on_trailers(self):
        """The wrapped mitmproxy readers are the ones that raise on trailers (fails if mitmproxy changes shape)."""
        layerguard.install()
        body = _http1.Http1Connection.read_body
        assert getattr(body, "__secretless_guard__", False)
        assert "HTTP trailers are not implemented" in inspect.getsource(body.__wrapped__)
        assert getattr(_http1.Http1Client.read_headers, "__secretless_guard__", False)
        assert "Cannot parse HTTP response" in inspect.getsource(_http1.Http1Client.read_headers.__wrapped__)
        relay = inspect.getsource(websocket.WebsocketLayer.relay_messages.__wrapped__)
        assert "wsproto.events.Ping" in relay and "yield dst_ws.send2(ws_event)" in relay
        assert getattr(websocket.WebsocketConnection.send2, "__secretless_guard__", False)
        send = _http1.Http1Client.send
        assert getattr(send, "__secretless_guard__", False)
        assert "Convert to an HTTP/1 request" in inspect.getsource(send.__wrapped__)

    @pytest.mark.parametrize("content, framing", [
        (None, b"transfer-encoding: chunked\r\n\r\n16\r\nDELETE /x HTTP/1.1\r\n\r\n\r\n0\r\n\r\n"),
        (b"DELETE /x HTTP/1.1\r\n\r\n", b"content-length: 22\r\n\r\nDELETE /x HTTP/1.1\r\n\r\n"),
    ], ids=["streamed", "buffered"])
    def test_http2_body_without_content_length_is_framed_for_http1(self, content, framing):
        """An HTTP/2 request with a body and no content-length goes to an HTTP/1.1 upstream framed:
        chunked when streamed, Content-Length when buffered; its bytes never read as a request (review 28)."""
        from mitmproxy.connection import Client, Server
        from mitmproxy.options import Options
        from mitmproxy.proxy import commands, context
        from mitmproxy.proxy.layers.http._events import RequestData, RequestEndOfMessage, RequestHeaders
        from mitmproxy.test import tutils

        layerguard.install()
        req = tutils.treq(http_version=b"HTTP/2.0", headers=((b"host", b"localhost"),), content=None)
        req.data.content = content
        ctx = context.Context(Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2), timestamp_start=0), Options())
        ctx.server = Server(address=("localhost", 443))
        client = _http1.Http1Client(ctx)
        out = b""
        for event in (RequestHeaders(1, req, False), RequestData(1, b"DELETE /x HTTP/1.1\r\n\r\n"), RequestEndOfMessage(1)):
            out += b"".join(c.data for c in client.send(event) if isinstance(c, commands.SendData))
        assert out == b"GET /path HTTP/1.1\r\nhost: localhost\r\n" + framing


class TestMessageTypeChecks:
    """layerguard's compiled MessageData checks accept and refuse exactly what mitmproxy's do."""

    CASES = [
        dict(port="x"), dict(port=1.5), dict(host=b"h"), dict(method="GET"), dict(content="text"),
        dict(timestamp_start="0"), dict(timestamp_end=b"1"), dict(headers={}), dict(trailers=[]),
        dict(port=True), dict(timestamp_start=1), dict(timestamp_start=True), dict(timestamp_end=None),
        dict(content=None), dict(trailers=None), dict(content=b"x"), dict(timestamp_end=2.5),
    ]

    @staticmethod
    def outcome(post_init, **kw) -> str:
        from mitmproxy import http as mhttp

        fields = dict(host="h", port=443, method=b"GET", scheme=b"https", authority=b"", path=b"/",
                      http_version=b"HTTP/1.1", headers=mhttp.Headers(), content=b"", trailers=None,
                      timestamp_start=0.0, timestamp_end=None) | kw
        data = object.__new__(mhttp.RequestData)
        for k, v in fields.items():
            object.__setattr__(data, k, v)
        try:
            post_init(data)
        except TypeError as exc:
            return f"TypeError: {exc}"
        return "ok"

    @pytest.mark.parametrize("kw", CASES, ids=[",".join(f"{k}={v!r}" for k, v in c.items()) for c in CASES])
    def test_same_verdict_and_message_as_mitmproxy(self, kw) -> None:
        """Each field value: the compiled check and mitmproxy's give the same result, the same TypeError text."""
        from mitmproxy import http as mhttp
        from mitmproxy.utils import typecheck

        def theirs(data) -> None:
            for f in dataclasses.fields(mhttp.RequestData):
                typecheck.check_option_type(f.name, getattr(data, f.name), f.type)

        layerguard.install()
        assert self.outcome(layerguard._checked_fields, **kw) == self.outcome(theirs, **kw)
