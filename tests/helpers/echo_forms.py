"""A real TLS upstream that echoes the credential it received, re-encoded, wherever it is asked to.

``GET /v1/echo/<place>/<form>/<source>``:

- ``source``: what it echoes: ``auth`` (the whole Authorization value), ``token`` (Authorization
  after its scheme word), ``password`` (the decoded basic-auth password), ``query`` (the
  ``api_key`` parameter), ``amz`` (the X-Amz-Security-Token header);
- ``form``: one of ``FORMS`` (raw, URL-encoded both ways, JSON-escaped, base64 and base64url with
  and without padding and at odd offsets, hex);
- ``place``: one of ``PLACES``: the HTTP/1.1 reason phrase, a header, ``Location``, the body
  (plain, gzip, br, zstd), or ``ws``: a WebSocket upgrade after which every form is sent as its
  own server message, then a ping with the value as payload; the client's first message is echoed
  back and the server closes with the value as close reason; client pings are answered.

Every value it received is kept in ``FormsUpstream.seen`` so a test can search what came back.
Only the standard library plus brotli/zstandard/wsproto, which mitmproxy already depends on.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus

import brotli
import zstandard
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage

from helpers.net import TlsListener, head_field, recv_head
from secretless_proxy.dev.certs import Issued
from secretless_proxy.dev.echoserver import tls_server_context


def _gson(s: str) -> str:
    # Gson's default HTML-safe escaping: < > & = ' as \u00XX; '/' left alone.
    out = json.dumps(s)[1:-1]
    for c in "<>&='":
        out = out.replace(c, f"\\u{ord(c):04x}")
    return out


def _php(s: str) -> str:
    # PHP json_encode / some Java encoders: '/' as '\/', and '+' as \u002B (upper-case hex).
    return json.dumps(s)[1:-1].replace("/", "\\/").replace("+", "\\u002B")


def _lower_escapes(s: str) -> str:
    q = quote(s, safe="")
    parts = q.split("%")
    return parts[0] + "".join("%" + p[:2].lower() + p[2:] for p in parts[1:])


def _b64(data: bytes, *, url: bool = False, pad: bool = True) -> str:
    out = (base64.urlsafe_b64encode if url else base64.b64encode)(data).decode()
    return out if pad else out.rstrip("=")


FORMS: dict[str, Callable[[str], str]] = {
    "raw": lambda s: s,
    "url": lambda s: quote(s, safe=""),
    "url_lower": _lower_escapes,
    "url_plus": quote_plus,
    "url_path": lambda s: quote(s),  # '/' kept, the rest escaped
    "json_gson": _gson,
    "json_slash": _php,
    "b64": lambda s: _b64(s.encode()),
    "b64_nopad": lambda s: _b64(s.encode(), pad=False),
    "b64url": lambda s: _b64(s.encode(), url=True),
    "b64url_nopad": lambda s: _b64(s.encode(), url=True, pad=False),
    "b64_offset1": lambda s: _b64(b"{" + s.encode() + b"}"),
    "b64_offset2": lambda s: _b64(b'{"' + s.encode() + b'"}'),
    "b64_in_url": lambda s: quote(_b64(s.encode()), safe=""),
    "hex": lambda s: s.encode().hex(),
    "hex_upper": lambda s: s.encode().hex().upper(),
}
PLACES = ("reason", "header", "location", "body", "gzip", "br", "zstd")
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body are two writes: with Nagle's algorithm the body waits for the ACK of the head,
    # which the proxy delays (40 ms per response on Linux, most of this table's run time).
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path, _, query = self.path.partition("?")
        parts = path.split("/")
        if len(parts) != 6 or parts[:3] != ["", "v1", "echo"]:
            self.send_error(404)
            return
        place, form, source = parts[3:]
        value = self._source(source, dict(parse_qsl(query)))
        self.server.seen.add(value)
        if place == "ws":
            self._websocket(value)
            return
        echo = FORMS[form](value)
        body = f'{{"echo": "{echo}"}}'.encode()
        status, reason, headers = 200, "OK", [("Content-Type", "application/json")]
        if place == "reason":
            reason = f"echo {echo}"
        elif place == "header":
            headers.append(("X-Echo", echo))
        elif place == "location":
            status = 302
            headers.append(("Location", f"https://example.com/next?from={echo}&x=1"))
        elif place in ("gzip", "br", "zstd"):
            body = {"gzip": gzip.compress, "br": brotli.compress,
                    "zstd": zstandard.ZstdCompressor().compress}[place](body)
            headers.append(("Content-Encoding", place))
        self.send_response_only(status, reason)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _source(self, source: str, query: dict[str, str]) -> str:
        auth = self.headers.get("Authorization", "")
        if source == "auth":
            return auth
        if source == "token":
            return auth.partition(" ")[2]
        if source == "password":
            return base64.b64decode(auth.partition(" ")[2]).decode().partition(":")[2]
        if source == "query":
            return query.get("api_key", "")
        if source == "amz":
            return self.headers.get("X-Amz-Security-Token", "")
        raise ValueError(source)

    def _websocket(self, value: str) -> None:
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        self.send_response_only(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        ws = Connection(ConnectionType.SERVER)
        out = b"".join(ws.send(TextMessage(data=f"{name}: {fn(value)}")) for name, fn in FORMS.items())
        out += ws.send(BytesMessage(data=b"binary: " + value.encode()))
        # A text message split over three frames: mitmproxy reassembles it before the hook.
        text = f"fragmented: {value}"
        third = len(text) // 3
        out += ws.send(TextMessage(data=text[:third], message_finished=False))
        out += ws.send(TextMessage(data=text[third:2 * third], message_finished=False))
        out += ws.send(TextMessage(data=text[2 * third:], message_finished=True))
        out += ws.send(Ping(payload=value.encode()[:120]))  # control frames echo too
        self.connection.sendall(out)
        while True:
            data = self.connection.recv(65536)
            if not data:
                return
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, Message):
                    reply = f"client said: {event.data}" if isinstance(event, TextMessage) else b"client said: " + event.data
                    self.connection.sendall(ws.send(TextMessage(data=reply) if isinstance(reply, str) else BytesMessage(data=reply)))
                    # ...and the close reason (at most 123 bytes) carries the echo as well.
                    self.connection.sendall(ws.send(CloseConnection(code=1000, reason=value[:100])))
                elif isinstance(event, Ping):
                    self.connection.sendall(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self.connection.sendall(ws.send(event.response()))
                    return


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.seen: set[str] = set()
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            with self.ctx.wrap_socket(request, server_side=True) as conn:
                super().finish_request(conn, client_address)
        except OSError:
            pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Silenced: clients disconnect mid-stream on purpose."""


class FormsUpstream:
    """Context manager: the echo-forms server over TLS on 127.0.0.1 (``url`` names localhost)."""

    def __init__(self, *, server_cert: Issued) -> None:
        self._server = _Server(tls_server_context(server_cert))
        self.port = self._server.server_address[1]
        self.url = f"https://localhost:{self.port}"

    @property
    def seen(self) -> set[str]:
        return self._server.seen

    def __enter__(self) -> FormsUpstream:
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def trailers_response(auth: bytes) -> bytes:
    """A chunked response whose trailer fields echo the Authorization received."""
    return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Echo\r\n"
            b"Content-Type: text/plain\r\n\r\n5\r\nhello\r\n0\r\nX-Echo: " + auth + b"\r\n\r\n")


def bad_status_line_response(auth: bytes) -> bytes:
    """A status line mitmproxy cannot parse, quoting the Authorization received."""
    return b"HTTP/1.1 2x0 echo " + auth + b"\r\nContent-Length: 0\r\n\r\n"


def bad_header_line_response(auth: bytes) -> bytes:
    """A header line without a colon, quoting the Authorization received."""
    return b"HTTP/1.1 200 OK\r\nX-Echo " + auth + b"\r\nContent-Length: 0\r\n\r\n"


class RawUpstream(TlsListener):
    """An HTTP/1.1 TLS upstream answering each request with ``respond(authorization)`` bytes as they are."""

    def __init__(self, *, server_cert: Issued, respond: Callable[[bytes], bytes], hang_up: bool = False) -> None:
        super().__init__(tls_server_context(server_cert))
        self._respond = respond
        self._hang_up = hang_up  # close the connection right after the response bytes
        self.url = f"https://localhost:{self.port}"
        self.requests = 0

    def __enter__(self) -> RawUpstream:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def handle(self, conn: ssl.SSLSocket) -> None:
        head = recv_head(conn, 4096)
        if not head:
            return
        self.requests += 1
        conn.sendall(self._respond(head_field(head, b"authorization") or b""))
        if not self._hang_up:
            conn.recv(4096)  # wait for the proxy to close
