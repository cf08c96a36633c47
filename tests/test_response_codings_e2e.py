"""The response path against hostile upstreams: transfer codings, multi-member bodies, decompression
bombs and endless response heads (hostile review 04, 19, 08, 18).

A real proxy process, a raw TLS upstream (tests/helpers/echo_forms.py ``RawUpstream``) that answers with
exactly the bytes under test, echoing the Authorization it received, and a raw TLS client socket:
every byte the client gets is searched for the secret, also after decoding each gzip/zlib/brotli/
zstd stream found in it (every member) and by the URL/JSON/base64/hex oracle of the redaction table.
"""

from __future__ import annotations

import gzip
import json
import socket
import zlib

import brotli
import pytest
import zstandard
from helpers.clients import tunnel
from helpers.echo_forms import RawUpstream
from helpers.proxy import SECRET, base_config
from test_redaction_e2e import leaks

from secretless_proxy.dev import certs

BILLING = "spiffe://example.org/ns/prod/sa/billing"
INJECT = {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}


def _inflated(data: bytes) -> list[bytes]:
    """Every stream a client could decode out of ``data``: gzip/zlib at each magic, all members; br; zstd."""
    out = []
    for magic, wbits in ((b"\x1f\x8b", 47), (b"\x78", 15)):
        at = data.find(magic)
        while at != -1:
            rest, got = data[at:], b""
            try:
                while rest:
                    d = zlib.decompressobj(wbits)
                    got += d.decompress(rest, 64 << 20)
                    rest = d.unused_data
            except zlib.error:
                pass
            out.append(got)
            at = data.find(magic, at + 1)
    for blob in (data, data.partition(b"\r\n\r\n")[2]):
        for decode in (brotli.decompress, lambda b: zstandard.ZstdDecompressor().stream_reader(b, read_across_frames=True).read(64 << 20)):
            try:
                out.append(decode(blob))
            except Exception:  # noqa: BLE001 - not that coding
                pass
    return out


def assert_no_secret(got: bytes) -> None:
    for blob in (got, *_inflated(got)):
        assert SECRET.encode() not in blob
        assert not leaks(blob.decode("latin-1"), {SECRET})


def _read(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
            head, sep, body = got.partition(b"\r\n\r\n")
            if sep and b"content-length:" in head.lower():
                n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) >= n:
                    break
    except (TimeoutError, OSError):
        pass
    return got


def _json(got: bytes) -> tuple[int, dict]:
    head, _, body = got.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def _exchange(proxy_factory, pki, respond, *, rule: dict | None = None, limits: dict | None = None,
              requests: int = 1) -> tuple[list[bytes], object]:
    with RawUpstream(server_cert=certs.make_server_cert(ca=pki.upstream_ca), respond=respond) as up:
        r = {"name": "t", "workloads": [BILLING], "to": {"host": "localhost", "port": up.port}, **(rule or {"inject": INJECT})}
        p = proxy_factory(base_config(pki, rules=[r], **({"limits": limits} if limits else {})))
        got = []
        for _ in range(requests):
            s = tunnel(p.port, ("localhost", up.port), sni="localhost", ca=pki.interception_ca_cert, cert=pki.svid(BILLING))
            s.sendall(f"GET /v1/x HTTP/1.1\r\nHost: localhost:{up.port}\r\nAccept-Encoding: gzip, deflate, br, zstd\r\n\r\n".encode())
            got.append(_read(s))
            s.close()
    out = p.output()
    assert "Traceback" not in out and "has crashed" not in out
    assert not leaks(out, {SECRET})
    return got, p


def assert_refused(got: bytes, reason: str, error: str) -> None:
    """``got`` is the proxy's own 502 for rule t with ``reason`` and ``error`` in its message, and no
    decoding of it shows the credential."""
    assert_no_secret(got)
    status, body = _json(got)
    assert (status, body["reason"], body["rule"]) == (502, reason, "t")
    assert error in body["error"]


def audited(proxy, reason: str) -> bool:
    return any(json.loads(line).get("reason") == reason for line in proxy.output().splitlines()
               if line.startswith("{") and '"request.denied"' in line)


# -- 04: Transfer-Encoding other than chunked ---------------------------------------------------


def _te(coding: str, encode):
    def respond(auth: bytes) -> bytes:
        g = encode(b"you sent: " + auth)
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (coding.encode(), len(g), g)
    return respond


@pytest.mark.parametrize("rule", [{"inject": INJECT}, {"action": "allow"}], ids=["inject", "allow"])
@pytest.mark.parametrize("coding,encode", [("gzip, chunked", gzip.compress), ("deflate,chunked", zlib.compress),
                                           ("compress, chunked", lambda b: b)])
def test_transfer_coding_other_than_chunked_is_withheld(proxy_factory, pki, rule, coding, encode):
    """A response with Transfer-Encoding other than plain chunked is withheld: 502
    transfer_encoding_refused, audited, none of its bytes (in any decoding) reach the client."""
    [got], p = _exchange(proxy_factory, pki, _te(coding, encode), rule=rule)
    assert_refused(got, "transfer_encoding_refused", "Transfer-Encoding")
    assert audited(p, "transfer_encoding_refused")


def test_plain_chunked_still_passes(proxy_factory, pki):
    """Transfer-Encoding: chunked (any case) is relayed, and an echo in it redacted."""
    [got], _ = _exchange(proxy_factory, pki, _te("Chunked", lambda b: b))
    assert got.startswith(b"HTTP/1.1 200") and b"you sent: Bearer [REDACTED]" in got
    assert_no_secret(got)


# -- 19: every member of a multi-member body ----------------------------------------------------

_ZSTD = zstandard.ZstdCompressor()
MEMBERS = {
    "gzip": lambda parts: b"".join(gzip.compress(p) for p in parts),
    "deflate": lambda parts: b"".join(zlib.compress(p) for p in parts),
    "zstd": lambda parts: b"".join(_ZSTD.compress(p) for p in parts),
}


def _members(coding: str, parts) -> object:
    def respond(auth: bytes) -> bytes:
        body = MEMBERS[coding]([p.replace(b"AUTH", auth) for p in parts])
        return b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s" % (coding.encode(), len(body), body)
    return respond


@pytest.mark.parametrize("coding", sorted(MEMBERS))
def test_echo_in_a_later_member_is_redacted(proxy_factory, pki, coding):
    """An echo in the second gzip member / deflate stream / zstd frame is found and redacted;
    the client decodes the whole body and finds no credential."""
    [got], _ = _exchange(proxy_factory, pki, _members(coding, [b"ok\n", b"you sent: AUTH"]))
    assert got.startswith(b"HTTP/1.1 200")
    assert_no_secret(got)
    assert any(b"ok\nyou sent: Bearer [REDACTED]" in d for d in _inflated(got))


@pytest.mark.parametrize(("coding", "make"), [
    ("gzip", lambda auth: gzip.compress(b"ok") + b"\x1f\x8b\x08garbage" + auth),  # trailing bytes, not a member
    ("compress", lambda auth: b"ok " + auth),  # a coding the check does not know
    ("gzip, identity", lambda auth: gzip.compress(b"ok " + auth)),  # stacked codings
])
def test_a_body_the_check_cannot_decode_is_withheld_audited_and_counted(proxy_factory, pki, coding, make):
    """A body that does not decode whole for its Content-Encoding cannot be checked, so it is withheld
    with 502 response_undecodable, for the rule that decided it, audited and counted (hostile review
    4.11: internal_error, rule null, no audit record of the refusal)."""
    def respond(auth: bytes) -> bytes:
        body = make(auth)
        return b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            coding.encode(), len(body), body)
    [got], p = _exchange(proxy_factory, pki, respond)
    assert_refused(got, "response_undecodable", "does not decode")
    assert audited(p, "response_undecodable")


# -- 08: decompression bombs --------------------------------------------------------------------

SCAN = 1024 * 1024
BOMBS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": _ZSTD.compress,
}


@pytest.mark.parametrize("coding", sorted(BOMBS))
def test_body_that_decodes_past_the_scan_window_is_withheld(proxy_factory, pki, coding):
    """A small compressed body that decodes past max_response_scan_bytes (the secret at its end)
    is withheld with 502 response_too_large, audited; the proxy never inflates it whole."""
    def respond(auth: bytes) -> bytes:
        body = BOMBS[coding](b"\0" * (8 * SCAN) + auth)
        assert len(body) < SCAN  # the compressed bytes are within the window: only decoding finds it too large
        return b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s" % (coding.encode(), len(body), body)
    [got], p = _exchange(proxy_factory, pki, respond, limits={"max_response_scan_bytes": SCAN})
    assert_refused(got, "response_too_large", "decodes to more than limits.max_response_scan_bytes")
    assert audited(p, "response_too_large")


# -- 18: response head bound --------------------------------------------------------------------


def test_response_head_over_the_limit_is_refused(proxy_factory, pki):
    """An upstream head over max_response_head_bytes (echoing the credential in its header lines)
    gets 502 response_head_too_large, audited, nothing of it relayed; the proxy keeps serving."""
    def respond(auth: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\n" + (b"X-Echo: " + auth + b"\r\n") * 4096  # ~200 KiB, never ends
    got, p = _exchange(proxy_factory, pki, respond, limits={"max_response_head_bytes": 16 * 1024}, requests=2)
    for g in got:
        assert_refused(g, "response_head_too_large", "max_response_head_bytes (16384 bytes)")
    assert audited(p, "response_head_too_large")


def test_complete_head_over_the_limit_in_one_read_is_refused(proxy_factory, pki):
    """A head over max_response_head_bytes is refused also when it ends (blank line) in the same read."""
    def respond(auth: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\n" + (b"X-Echo: " + auth + b"\r\n") * 800 + b"Content-Length: 2\r\n\r\nok"
    [got], _ = _exchange(proxy_factory, pki, respond, limits={"max_response_head_bytes": 16 * 1024})
    assert_no_secret(got)
    assert _json(got)[1]["reason"] == "response_head_too_large"


def test_response_head_under_the_limit_passes(proxy_factory, pki):
    """A large head under max_response_head_bytes is relayed (its echoes redacted)."""
    def respond(auth: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\n" + (b"X-Echo: " + auth + b"\r\n") * 100 + b"Content-Length: 2\r\n\r\nok"
    [got], _ = _exchange(proxy_factory, pki, respond, limits={"max_response_head_bytes": 16 * 1024})
    assert got.startswith(b"HTTP/1.1 200") and got.count(b"X-Echo: Bearer [REDACTED]") == 100
    assert_no_secret(got)
