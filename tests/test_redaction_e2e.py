"""The redaction table, end to end: every echo form × every injection form × HTTP/1.1, HTTP/2, WebSocket.

A real proxy process, a real TLS upstream (tests/helpers/echo_forms.py) that echoes the credential it
received, re-encoded, in the status line, a header, Location, a plain/gzip/br/zstd body or
WebSocket messages; real clients (httpx over HTTP/1.1 and HTTP/2, a raw TLS socket + wsproto for
WebSocket). Everything that comes back, the proxy's log, its audit file and its metrics are
searched for the secret by an oracle that decodes what it finds (URL, JSON, base64 at every
offset, hex) rather than by the proxy's own needle list.

Set ``REDACTION_TABLE=/path`` to append one JSON line per (injection, protocol, place, form).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import os
import re
import ssl
import time
from pathlib import Path
from urllib.parse import unquote, unquote_plus

import httpx
import pytest
from helpers.clients import tunnel
from helpers.e2e_broker import AuthMoto
from helpers.echo_forms import (
    FORMS,
    PLACES,
    FormsUpstream,
    RawUpstream,
    bad_header_line_response,
    bad_status_line_response,
    trailers_response,
)
from helpers.net import TlsListener, free_port, recv_head
from helpers.proxy import SECRET, base_config
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Message, Ping, Pong

from secretless_proxy.dev import certs
from secretless_proxy.dev.echoserver import tls_server_context

BILLING = "spiffe://example.org/ns/prod/sa/billing"
INJECTIONS = {
    "header": ({"header": "Authorization", "format": "Bearer {secret}"}, ("auth", "token")),
    "basic": ({"basic": {"username": "billing", "password": "{secret}"}}, ("auth", "token", "password")),
    "query": ({"query": "api_key"}, ("query",)),
    "sigv4": ({"sigv4": {"region": "us-east-1", "service": "sts"}}, ("amz", "auth")),
}


@pytest.fixture(scope="module")
def forms_upstream(pki):
    with FormsUpstream(server_cert=certs.make_server_cert(ca=pki.upstream_ca)) as up:
        yield up


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with AuthMoto(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


# -- the oracle: does any of these texts still carry a secret, in any form? ---------------------

_B64_RUN = re.compile(r"[A-Za-z0-9+/_-]{8,}={0,2}")
_HEX_RUN = re.compile(r"(?:[0-9a-fA-F]{2}){6,}")


def _unescape(text: str) -> list[str]:
    out = [text, unquote(text), unquote_plus(text)]
    json_like = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text).replace("\\/", "/")
    out += [json_like, unquote(json_like)]
    return out


def _decodings(text: str) -> list[bytes]:
    found = []
    for t in _unescape(text):
        found.append(t.encode("utf-8", "surrogateescape"))
        for run in _B64_RUN.findall(t):
            std = run.replace("-", "+").replace("_", "/").rstrip("=")
            for skip in range(4):  # every character offset: an echo may start mid-group
                part = std[skip:]
                part = part[: len(part) - len(part) % 4]
                try:
                    found.append(base64.b64decode(part))
                except (binascii.Error, ValueError):
                    pass
        for run in _HEX_RUN.findall(t):
            for skip in (0, 1):
                part = run[skip:]
                found.append(bytes.fromhex(part[: len(part) - len(part) % 2]))
    return found


_WINDOW = 12


def leaks(text: str, secrets: set[str]) -> list[str]:
    """Which secrets (by any 12-byte window of them) can be recovered from ``text``."""
    grams: set[bytes] = set()
    for d in _decodings(text):
        grams.update(d[i:i + _WINDOW] for i in range(len(d) - _WINDOW + 1))
    hits = []
    for s in secrets:
        raw = s.encode()
        assert len(raw) >= _WINDOW, "the oracle needs secrets of 12 bytes or more"
        if any(raw[i:i + _WINDOW] in grams for i in range(len(raw) - _WINDOW + 1)):
            hits.append(s[:4] + "…")
    return hits


# -- clients -----------------------------------------------------------------------------------


def _proxy(proxy_factory, pki, forms_upstream, moto, tmp_path, injection: str):
    inject, _ = INJECTIONS[injection]
    creds = None
    env = {}
    if injection == "sigv4":
        creds = {"stripe": {"kind": "aws_sigv4", "role_arn": moto.role_arn,
                            "base_credentials": {"access_key_id": "env:TEST_AWS_KEY_ID",
                                                 "secret_access_key": "env:TEST_AWS_SECRET"},
                            "sts_endpoint": moto.url, "region": "us-east-1", "service": "sts"}}
        env = {"TEST_AWS_KEY_ID": moto.key_id, "TEST_AWS_SECRET": moto.secret}
    rule = {"name": "echo", "workloads": [BILLING], "to": {"host": "localhost", "port": forms_upstream.port},
            "inject": {"credential": "stripe", **inject}}
    audit = tmp_path / "audit.log"
    cfg = base_config(pki, rules=[rule], credentials=creds, audit={"sinks": [f"file:{audit}"]},
                      admin={"listen": f"127.0.0.1:{free_port()}"})
    return proxy_factory(cfg, env=env), audit, cfg["admin"]["listen"]


class _H2First(ssl.SSLContext):
    """httpx offers ALPN http/1.1 before h2, and mitmproxy honours the client's order: put h2 first."""

    def set_alpn_protocols(self, protocols):
        super().set_alpn_protocols(sorted(protocols, key=lambda p: p != "h2"))


def _http_rows(p, pki, up, injection: str, http2: bool) -> list[dict]:
    cert, key = pki.svid(BILLING)
    ctx = (_H2First if http2 else ssl.SSLContext)(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.interception_ca_cert)
    ctx.load_cert_chain(cert, key)
    rows = []
    # http1 stays on for the CONNECT to the proxy; inside the tunnel ALPN picks the protocol.
    with httpx.Client(proxy=p.url, verify=ctx, trust_env=False, http2=http2,
                      follow_redirects=False, timeout=15) as c:
        for source in INJECTIONS[injection][1]:
            for place in PLACES:
                for form in FORMS:
                    try:
                        r = c.get(f"{up.url}/v1/echo/{place}/{form}/{source}?api_key=client-own")
                    except httpx.HTTPError as exc:
                        raise AssertionError(f"{place}/{form}/{source}: {type(exc).__name__}: {exc}") from None
                    assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
                    raw_reason = r.extensions.get("reason_phrase", b"").decode("latin-1")
                    texts = [raw_reason, *(f"{k.decode('latin-1')}: {v.decode('latin-1')}" for k, v in r.headers.raw),
                             r.content.decode("utf-8", "replace")]
                    rows.append({"injection": injection, "protocol": "h2" if http2 else "h1.1", "place": place,
                                 "form": form, "source": source, "status": r.status_code, "texts": texts})
    return rows


def _ws_rows(p, pki, up, injection: str) -> list[dict]:
    cert, key = pki.svid(BILLING)
    rows = []
    for source in INJECTIONS[injection][1]:
        sock = tunnel(p.port, ("localhost", up.port), sni="localhost", ca=pki.interception_ca_cert, cert=(cert, key))
        key_b64 = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET /v1/echo/ws/all/{source}?api_key=client-own HTTP/1.1\r\nHost: localhost:{up.port}\r\n"
                      f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key_b64}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        ws = Connection(ConnectionType.CLIENT)
        ws.receive_data(rest)
        messages: list[str | bytes] = []
        partial: str | bytes | None = None
        control: list[bytes | str] = []  # ping payloads and the close reason the client got
        pongs: list[bytes] = []
        want = len(FORMS) + 2
        sent_client = closed = False
        sock.settimeout(10)
        while not closed:
            for event in ws.events():
                if isinstance(event, Message):
                    partial = partial + event.data if partial is not None else event.data
                    if event.message_finished:  # frames of one message are joined, as an app sees them
                        messages.append(partial)
                        partial = None
                elif isinstance(event, Ping):
                    control.append(bytes(event.payload))
                    sock.sendall(ws.send(event.response()))
                elif isinstance(event, Pong):
                    pongs.append(bytes(event.payload))
                elif isinstance(event, CloseConnection):
                    control.append(event.reason or "")
                    sock.sendall(ws.send(event.response()))
                    closed = True
            if len(messages) >= want and control and not sent_client:
                sock.sendall(ws.send(Ping(payload=b"keepalive-1")))
                sock.sendall(ws.send(Message(data="hello from the client, Bearer x+y/z=")))
                sent_client = True
            if closed:
                break
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            ws.receive_data(data)
        sock.close()
        assert closed, "the server's close frame did not arrive"
        assert len(messages) == want + 1, f"got {len(messages)} WebSocket messages, wanted {want + 1}"
        assert messages[-1] == "client said: hello from the client, Bearer x+y/z="  # client→server unchanged
        assert pongs == [b"keepalive-1"]  # a pong answering the client's own ping keeps its payload
        rows.append({"injection": injection, "protocol": "ws", "place": "ws ping payload, close reason",
                     "form": "raw", "source": source, "status": 101,
                     "texts": [c.decode("utf-8", "replace") if isinstance(c, bytes) else c for c in control]})
        names = [*FORMS, "binary", "fragmented"]
        for name, msg in zip(names, messages, strict=False):
            text = msg if isinstance(msg, str) else msg.decode("utf-8", "replace")
            rows.append({"injection": injection, "protocol": "ws", "place": "ws message", "form": name,
                         "source": source, "status": 101, "texts": [text]})
    return rows


def _record(rows: list[dict], secrets: set[str]) -> list[str]:
    failures = []
    out = os.environ.get("REDACTION_TABLE")
    for row in rows:
        found = [h for t in row["texts"] for h in leaks(t, secrets)]
        row["result"] = "LEAK" if found else "redacted"
        if found:
            failures.append(f"{row['injection']}/{row['protocol']}/{row['place']}/{row['form']}/{row['source']}")
        if out:
            with open(out, "a") as fh:
                fh.write(json.dumps({k: v for k, v in row.items() if k != "texts"}) + "\n")
    return failures


def _secrets(up, injection: str) -> set[str]:
    secrets = set(up.seen) - {"", "client-own"}
    if injection != "sigv4":
        secrets.add(SECRET)
    # The whole Authorization value is a secret only through its credential part.
    return {s.partition(" ")[2] if s.startswith(("Bearer ", "Basic ")) else s for s in secrets
            if not s.startswith("AWS4-HMAC-SHA256")} | {s.rpartition("Signature=")[2] for s in secrets
                                                        if s.startswith("AWS4-HMAC-SHA256")}


@pytest.mark.parametrize("protocol", ["h1.1", "h2", "ws"])
@pytest.mark.parametrize("injection", list(INJECTIONS))
def test_redaction_table(proxy_factory, pki, forms_upstream, moto, tmp_path, injection, protocol):
    """No echo form of the injected credential comes back, in any place, over any protocol, or in logs, audit, metrics."""
    forms_upstream.seen.clear()
    p, audit, admin = _proxy(proxy_factory, pki, forms_upstream, moto, tmp_path, injection)
    if protocol == "ws":
        rows = _ws_rows(p, pki, forms_upstream, injection)
    else:
        rows = _http_rows(p, pki, forms_upstream, injection, http2=protocol == "h2")
    secrets = _secrets(forms_upstream, injection)
    assert secrets and all(len(s) >= 16 for s in secrets), "the upstream did not receive the credential"
    assert all(r["status"] in (101, 200, 302) for r in rows), {r["status"] for r in rows}
    failures = _record(rows, secrets)
    assert not failures, f"{len(failures)} of {len(rows)} echoes leaked: {failures[:20]}"
    metrics = httpx.get(f"http://{admin}/metrics", trust_env=False).text
    for name, text in (("proxy log", p.output()), ("audit", Path(audit).read_text()), ("metrics", metrics)):
        assert not leaks(text, secrets), f"a secret is in the {name}"
    p.secrets = (*p.secrets, *secrets)  # the fixture's teardown searches the log for them too


class TestUpstreamProtocolErrors:
    def _get_twice(self, proxy_factory, pki, respond, *, hang_up: bool = False):
        with RawUpstream(server_cert=certs.make_server_cert(ca=pki.upstream_ca), respond=respond, hang_up=hang_up) as up:
            rule = {"name": "t", "workloads": [BILLING], "to": {"host": "localhost", "port": up.port},
                    "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}}
            p = proxy_factory(base_config(pki, rules=[rule]))
            cert, key = pki.svid(BILLING)
            ctx = ssl.create_default_context(cafile=pki.interception_ca_cert)
            ctx.load_cert_chain(cert, key)
            with httpx.Client(proxy=p.url, verify=ctx, trust_env=False, timeout=10) as c:
                first = c.get(f"{up.url}/v1/x")
                again = c.get(f"{up.url}/v1/y")  # the proxy is still serving
            assert up.requests == 2
        out = p.output()
        denied = {json.loads(line)["request_id"]: json.loads(line) for line in out.splitlines()
                  if line.startswith("{") and '"request.denied"' in line}
        used = [json.loads(line) for line in out.splitlines() if line.startswith("{") and '"credential.used"' in line]
        for r in (first, again):
            assert r.status_code == 502
            assert not leaks(r.text + str(r.headers) + r.reason_phrase, {SECRET})
            # The error contract, not mitmproxy's HTML page: JSON naming the reason and the request id
            # of its audit record (hostile review 32); the credential went upstream, so it was used.
            body = r.json()
            assert r.headers["x-secretless-request-id"] == body["request_id"]
            assert denied[body["request_id"]]["reason"] == body["reason"] == "upstream_protocol_error"
            assert [u["status"] for u in used if u["request_id"] == body["request_id"]] == [502]
        assert not leaks(out, {SECRET})
        assert "Traceback" not in out and "has crashed" not in out
        return first

    def test_http1_trailers_end_promptly_with_502_and_nothing_leaks(self, proxy_factory, pki):
        """An upstream's chunked trailers end the request at once with a 502 naming why; the echo in them never arrives."""
        r = self._get_twice(proxy_factory, pki, trailers_response)  # httpx's timeout is 10 s: no 600 s hang
        assert "trailer fields" in r.text

    @pytest.mark.parametrize("respond", [bad_status_line_response, bad_header_line_response])
    def test_malformed_response_error_does_not_quote_the_upstream(self, proxy_factory, pki, respond):
        """A status or header line mitmproxy cannot parse gives a 502 that names the problem, not the line's bytes."""
        r = self._get_twice(proxy_factory, pki, respond)
        assert "does not parse" in r.json()["error"]

    @pytest.mark.parametrize("upgrade", [b"h2c", b"websocket"])
    def test_a_switch_the_request_did_not_ask_for_is_a_json_502(self, proxy_factory, pki, upgrade):
        """101 Switching Protocols to a plain GET that asked for no upgrade: 502 in the error contract,
        nothing after the switch relayed (hostile review 4.10: the bare 101 was relayed, then closed)."""
        def respond(auth: bytes) -> bytes:
            return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: %s\r\nConnection: Upgrade\r\n\r\necho %s" % (upgrade, auth)
        r = self._get_twice(proxy_factory, pki, respond)
        assert "switched protocols without being asked" in r.json()["error"]

    def test_response_with_conflicting_framing_is_a_json_502(self, proxy_factory, pki):
        """Content-Length with Transfer-Encoding in the upstream's head (smuggling-shaped): 502 in the error
        contract, audited (hostile review 4.01: mitmproxy's HTML page, unaudited)."""
        def respond(auth: bytes) -> bytes:
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        r = self._get_twice(proxy_factory, pki, respond)
        assert "framing headers" in r.json()["error"]

    def test_http2_goaway_debug_data_never_reaches_the_workload(self, proxy_factory, pki, tmp_path):
        """An HTTP/2 upstream that echoes the credential in its GOAWAY's debug data: the 502 names the
        GOAWAY in words of the proxy's, and neither the body nor the log carries the data, in any
        encoding (hostile review 4.04: h2's repr put it, hex-encoded, into the error text)."""
        from helpers.h2_upstream import H2Upstream

        def goaway(conn, stream_id, headers):
            conn.close_connection(error_code=1, additional_data=headers.get("authorization", "").encode())

        srv = certs.make_server_cert(ca=pki.upstream_ca)
        certs.write_svid(srv, tmp_path / "srv", ca=pki.upstream_ca)
        up = H2Upstream(("127.0.0.1",), cert_file=str(tmp_path / "srv/svid.pem"),
                        key_file=str(tmp_path / "srv/svid-key.pem"), respond=goaway)
        try:
            rule = {"name": "t", "workloads": [BILLING], "to": {"host": "localhost", "port": up.port},
                    "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}}
            p = proxy_factory(base_config(pki, rules=[rule]))
            ctx = ssl.create_default_context(cafile=pki.interception_ca_cert)
            ctx.load_cert_chain(*pki.svid(BILLING))
            with httpx.Client(proxy=p.url, verify=ctx, trust_env=False, timeout=10, http2=True) as c:
                r = c.get(f"https://localhost:{up.port}/v1/x")
        finally:
            up.close()
        assert up.seen and up.seen[0][2] == f"Bearer {SECRET}"  # the credential went up, and came back in the GOAWAY
        out = p.output()
        for form in (SECRET, SECRET.encode().hex(), SECRET[:8].encode().hex()):
            assert form not in r.text and form not in out, form
        assert (r.status_code, r.json()["reason"]) == (502, "upstream_protocol_error")
        assert "GOAWAY" in r.json()["error"]

    @pytest.mark.parametrize("respond", [lambda auth: b"", lambda auth: b"HTTP/1.1 200 OK\r\nContent-Le"],
                             ids=["closed_unanswered", "head_cut_short"])
    def test_upstream_closing_before_its_response_is_a_json_502(self, proxy_factory, pki, respond):
        """An upstream that closes before its response head is complete gets the client a 502 in the error contract."""
        r = self._get_twice(proxy_factory, pki, respond, hang_up=True)
        assert "could not be read" in r.json()["error"]


class _EarlyAnswer(TlsListener):
    """Answers each connection's first request at once, before its body is in, then writes ``extra``
    (a stray CRLF, a second response) while the body still streams; then reads until the peer closes."""

    def __init__(self, server_cert, extra: bytes) -> None:
        super().__init__(tls_server_context(server_cert))
        self.extra = extra
        self.connections = 0

    def handle(self, conn: ssl.SSLSocket) -> None:
        self.connections += 1
        if not recv_head(conn):
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")
        time.sleep(0.3)
        conn.sendall(self.extra)
        while conn.recv(65536):
            pass


class TestUpstreamAfterItsResponse:
    @pytest.mark.parametrize("extra", [b"\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSPOOF", b"\x00garbage"],
                             ids=["crlf", "second_response", "raw_bytes"])
    def test_bytes_after_an_early_response_are_dropped_and_never_answer_the_next_request(self, proxy_factory, pki,
                                                                                       extra):
        """An upstream that answers before the upload is in and then writes more: the client gets the
        response and finishes its upload, the proxy logs no traceback (hostile review 4.02: mitmproxy's
        layer crashed once per request), and the next request on the connection is not answered with
        what the upstream wrote after its response (that upstream connection is never reused)."""
        up = _EarlyAnswer(certs.make_server_cert(ca=pki.upstream_ca), extra)
        up.start()
        try:
            rule = {"name": "t", "workloads": [BILLING], "to": {"host": "localhost", "port": up.port},
                    "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}}
            p = proxy_factory(base_config(pki, rules=[rule]))
            t = tunnel(p.port, ("localhost", up.port), sni="localhost", ca=pki.interception_ca_cert, cert=pki.svid(BILLING))
            for n in range(2):
                t.sendall(f"POST /v1/up{n} HTTP/1.1\r\nHost: localhost:{up.port}\r\nContent-Length: 100\r\n\r\nabc".encode())
                time.sleep(0.6)  # the early answer and the extra bytes arrive while the body is unsent
                t.sendall(b"d" * 97)
                resp = http.client.HTTPResponse(t)
                resp.begin()
                assert (resp.status, resp.read()) == (200, b"early")
            t.close()
        finally:
            up.close()
        assert up.connections == 2  # the second request went over a new upstream connection
        out = p.output()
        assert "Traceback" not in out and "has crashed" not in out


def _get_through_inject_rule(proxy_factory, pki, respond, path: str, **kw):
    """One GET through a proxy whose rule injects the static credential for a ``RawUpstream(respond)``."""
    with RawUpstream(server_cert=certs.make_server_cert(ca=pki.upstream_ca), respond=respond) as up:
        rule = {"name": "t", "workloads": [BILLING], "to": {"host": "localhost", "port": up.port},
                "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}}
        p = proxy_factory(base_config(pki, rules=[rule]))
        ctx = ssl.create_default_context(cafile=pki.interception_ca_cert)
        ctx.load_cert_chain(*pki.svid(BILLING))
        with httpx.Client(proxy=p.url, verify=ctx, trust_env=False, timeout=10) as c:
            return c.get(f"{up.url}{path}", **kw), p


class TestInterimResponses:
    @pytest.mark.parametrize("interim", [
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\nX-Echo: %s\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nX-Echo: %s\r\n\r\n",
    ], ids=["early_hints", "continue_and_processing"])
    def test_interim_heads_are_dropped_and_the_final_response_arrives(self, proxy_factory, pki, interim):
        """1xx heads before the final response (hostile review 4.03: the 103 became the answer, the 200 was
        dropped and the client hung): the client gets the final response, and the echo in the 1xx never."""
        def respond(auth: bytes) -> bytes:
            return interim.replace(b"%s", auth) + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"

        r, p = _get_through_inject_rule(proxy_factory, pki, respond, "/v1/x")
        assert (r.status_code, r.text) == (200, "final")
        assert not leaks(str(r.headers), {SECRET})
        assert any('"credential.used"' in line and '"status":200' in line.replace(" ", "") for line in p.output().splitlines())


class _QuotesTheTarget(TlsListener):
    """Answers 404 quoting the first ``cut`` characters of the request target, as many APIs do."""

    def __init__(self, server_cert, cut: int = 100) -> None:
        super().__init__(tls_server_context(server_cert))
        self.cut = cut

    def handle(self, conn: ssl.SSLSocket) -> None:
        head = recv_head(conn)
        if not head:
            return
        target = head.split(b" ")[1]
        body = b'{"error": "no route for ' + target[:self.cut] + b'"}'
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(body), body))


def test_an_echo_cut_short_gives_back_at_most_a_block_of_the_credential(proxy_factory, pki):
    """An upstream quoting the first 100 characters of the target, with the credential injected as a
    query parameter: the workload pads the path to slide the cut across the whole credential, and no
    response carries more than block - 1 (here 11) of its characters (hostile review 4.12: 38 of 39)."""
    up = _QuotesTheTarget(certs.make_server_cert(ca=pki.upstream_ca))
    up.start()
    try:
        rule = {"name": "t", "workloads": [BILLING], "to": {"host": "localhost", "port": up.port},
                "inject": {"credential": "stripe", "query": "api_key"}}
        p = proxy_factory(base_config(pki, rules=[rule]))
        ctx = ssl.create_default_context(cafile=pki.interception_ca_cert)
        ctx.load_cert_chain(*pki.svid(BILLING))
        longest = 0
        with httpx.Client(proxy=p.url, verify=ctx, trust_env=False, timeout=10) as c:
            for pad in range(40, 100):
                text = c.get(f"https://localhost:{up.port}/" + "p" * pad).text
                longest = max([longest] + [k for k in range(1, len(SECRET) + 1) if SECRET[:k] in text])
    finally:
        up.close()
    assert longest <= 11, longest


class _SlowLargeBody(TlsListener):
    """Answers each request with ``size`` bytes, 64 KiB every 30 ms, so responses overlap in time."""

    def __init__(self, server_cert, size: int) -> None:
        super().__init__(tls_server_context(server_cert))
        self.size = size

    def handle(self, conn: ssl.SSLSocket) -> None:
        while recv_head(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.size)
            for sent in range(0, self.size, 65536):
                conn.sendall(b"x" * min(65536, self.size - sent))
                time.sleep(0.03)


def _h2_statuses(sock: ssl.SSLSocket, authority: str, paths: list[str]) -> list[int]:
    """The status of each path, opened as concurrent streams of one HTTP/2 connection (bodies read and acked)."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    for i, path in enumerate(paths):
        conn.send_headers(1 + 2 * i, [(":method", "GET"), (":scheme", "https"), (":authority", authority),
                                      (":path", path)], end_stream=True)
    sock.sendall(conn.data_to_send())
    status: dict[int, int] = {}
    done: set[int] = set()
    sock.settimeout(20)
    while len(done) < len(paths):
        data = sock.recv(65535)
        assert data, "connection closed"
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status[ev.stream_id] = int(dict(ev.headers)[":status"])
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                done.add(ev.stream_id)
        sock.sendall(conn.data_to_send())
    return [status.get(1 + 2 * i, 0) for i in range(len(paths))]


def test_concurrent_http2_responses_share_one_scan_window(proxy_factory, pki):
    """The scan window bounds what one connection buffers at once, its HTTP/2 streams together (hostile
    review 4.14: 40 streams of 12 MiB, each under the 16 MiB window, grew the proxy by 190 MiB and on):
    three concurrent 700 KiB responses against a 1 MiB window are not all buffered; alone, one passes."""
    up = _SlowLargeBody(certs.make_server_cert(ca=pki.upstream_ca), 700 * 1024)
    up.start()
    try:
        rule = {"name": "t", "workloads": [BILLING], "to": {"host": "localhost", "port": up.port},
                "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}}
        p = proxy_factory(base_config(pki, rules=[rule], limits={"max_response_scan_bytes": 1024 * 1024}))
        authority = f"localhost:{up.port}"
        results = []
        for paths in (["/v1/one"], ["/v1/a", "/v1/b", "/v1/c"]):
            with tunnel(p.port, ("localhost", up.port), sni="localhost", ca=pki.interception_ca_cert,
                        cert=pki.svid(BILLING), alpn=["h2"]) as s:
                results.append(_h2_statuses(s, authority, paths))
        alone, together = results
    finally:
        up.close()
    assert alone == [200]
    assert 502 in together, together
    assert any('"request.denied"' in line and '"response_too_large"' in line for line in p.output().splitlines())


def test_a_partial_response_on_an_echo_checked_rule_is_withheld(proxy_factory, pki):
    """206 Partial Content on an inject rule whose responses are checked: a part is checked alone, and
    parts at chosen offsets (a vendor's own range header, x-ms-range) rebuilt the credential from
    slices shorter than a block (hostile review 5.12). Withheld: 502 response_too_large."""
    def respond(auth: bytes) -> bytes:
        body = b"request log: authorization=" + auth
        return b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-%d/99\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body) - 1, len(body), body)

    r, _ = _get_through_inject_rule(proxy_factory, pki, respond, "/v1/log", headers={"x-ms-range": "bytes=27-33"})
    assert (r.status_code, r.json()["reason"]) == (502, "response_too_large")
    assert "(206)" in r.json()["error"] and SECRET[:6] not in r.text


def test_the_process_checks_at_most_its_total_of_responses_at_once(proxy_factory, pki):
    """Responses buffered for the echo check count against one process-wide total too (hostile review
    5.11: 32 connections of one scan window each grew the proxy by 602 MiB): with a 1 MiB total, three
    700 KiB responses over three connections at once are not all buffered; one alone passes."""
    up = _SlowLargeBody(certs.make_server_cert(ca=pki.upstream_ca), 700 * 1024)
    up.start()
    try:
        rule = {"name": "t", "workloads": [BILLING], "to": {"host": "localhost", "port": up.port},
                "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}}
        p = proxy_factory(base_config(pki, rules=[rule], limits={"max_response_scan_bytes": 1024 * 1024,
                                                                 "max_response_scan_total_bytes": 1024 * 1024}))
        ctx = ssl.create_default_context(cafile=pki.interception_ca_cert)
        ctx.load_cert_chain(*pki.svid(BILLING))

        def get(path: str) -> int:
            with httpx.Client(proxy=p.url, verify=ctx, trust_env=False, timeout=20) as c:
                return c.get(f"https://localhost:{up.port}{path}").status_code

        alone = get("/v1/one")
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(get, ["/v1/a", "/v1/b", "/v1/c"]))
        time.sleep(0.6)  # what was written to the clients is measured again at the next tick (0.25 s)
        again = get("/v1/two")  # the total was given back: the proxy serves on
    finally:
        up.close()
    assert alone == 200 and again == 200
    assert 502 in together, together
