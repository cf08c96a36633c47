"""bodydecode: a response body decoded for the echo check, every member, never past the bound."""

from __future__ import annotations

import gzip
import zlib

import brotli
import pytest
import zstandard

from secretless_proxy import redaction
from secretless_proxy.edge import bodydecode
from secretless_proxy.edge.bodydecode import TooLarge, decode

SECRET = b"sk_test_51SECRETvalue0123456789"
_Z = zstandard.ZstdCompressor()
ENCODE = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress, "zstd": _Z.compress}


def _raw_deflate(data: bytes) -> bytes:
    co = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return co.compress(data) + co.flush()


@pytest.mark.parametrize("coding", sorted(ENCODE))
def test_round_trip(coding):
    """Each supported Content-Encoding decodes back to the original bytes."""
    assert decode(ENCODE[coding](b"hello " + SECRET), coding, 1024) == b"hello " + SECRET


def test_raw_deflate_and_identity():
    """Raw deflate (what some servers send as `deflate`) and identity are decoded too."""
    assert decode(_raw_deflate(SECRET), "deflate", 1024) == SECRET
    assert decode(SECRET, None, 1024) == decode(SECRET, "identity", 1024) == SECRET


@pytest.mark.parametrize("coding", ["gzip", "deflate", "zstd"])
def test_every_member_is_decoded(coding):
    """Concatenated gzip members, zlib streams and zstd frames are all decoded, not just the first."""
    body = ENCODE[coding](b"ok\n") + ENCODE[coding](SECRET) + ENCODE[coding](b"!")
    assert decode(body, coding, 1024) == b"ok\n" + SECRET + b"!"


def test_gzip_zero_padding_accepted():
    """Zero bytes after the last gzip member (tolerated by gzip tools) end the body."""
    assert decode(gzip.compress(SECRET) + b"\0" * 8, "gzip", 1024) == SECRET


@pytest.mark.parametrize("coding", sorted(ENCODE))
def test_bomb_stops_at_the_bound(coding):
    """A body decoding past the bound raises TooLarge (the decoder never inflates it whole)."""
    with pytest.raises(TooLarge):
        decode(ENCODE[coding](b"\0" * (32 << 20)), coding, 1 << 20)


@pytest.mark.parametrize("coding", sorted(ENCODE))
def test_exactly_the_bound_passes(coding):
    """A body decoding to exactly the bound is accepted."""
    assert len(decode(ENCODE[coding](b"a" * 4096), coding, 4096)) == 4096


@pytest.mark.parametrize(("body", "coding", "match"), [
    (gzip.compress(SECRET)[:-4], "gzip", "truncated"),
    (gzip.compress(b"ok") + b"\x1f\x8b\x08junk", "gzip", "undecodable"),
    (gzip.compress(b"ok") + b"trailing", "gzip", "undecodable"),
    (brotli.compress(SECRET)[:-2], "br", "brotli"),
    (b"\x28\xb5\x2f\xfd" + b"\xff" * 16, "zstd", "zstd"),
    (gzip.compress(gzip.compress(SECRET)), "gzip, gzip", "unsupported content-encoding"),
    (SECRET, "x-secret", "unsupported content-encoding"),
], ids=["gzip-truncated", "gzip-junk-member", "gzip-trailing-bytes", "br-truncated", "zstd-garbage", "gzip-twice",
        "unknown-coding"])  # gzip bodies carry the time: ids that do not, so every xdist worker collects the same
def test_undecodable_raises(body, coding, match):
    """What cannot be decoded whole raises ValueError: the caller withholds the response."""
    with pytest.raises(ValueError, match=match):
        decode(body, coding, 1024)


def test_redact_message_finds_an_echo_in_a_second_member():
    """redact_message redacts an echo in the second gzip member and re-encodes the body."""
    from mitmproxy import http

    r = http.Response.make(200, b"", {"Content-Encoding": "gzip"})
    r.raw_content = gzip.compress(b"ok\n") + gzip.compress(b"you sent: " + SECRET)
    redaction.redact_message(r, redaction.needles_for(SECRET.decode()))
    assert gzip.decompress(r.raw_content) == b"ok\nyou sent: [REDACTED]"


def test_redact_message_bounds_the_decoded_body():
    """redact_message raises TooLarge for a body that decodes past max_body."""
    from mitmproxy import http

    r = http.Response.make(200, b"", {"Content-Encoding": "gzip"})
    r.raw_content = gzip.compress(b"\0" * (4 << 20) + SECRET)
    with pytest.raises(bodydecode.TooLarge):
        redaction.redact_message(r, redaction.needles_for(SECRET.decode()), max_body=1 << 20)


def test_two_content_encoding_fields_are_stacked_codings():
    """Two `Content-Encoding: gzip` fields mean gzip twice to a client: not checkable, ValueError."""
    from mitmproxy import http

    r = http.Response.make(200, b"")
    r.headers = http.Headers([(b"Content-Encoding", b"gzip"), (b"Content-Encoding", b"gzip")])
    r.raw_content = gzip.compress(gzip.compress(SECRET))
    with pytest.raises(ValueError, match="unsupported content-encoding"):
        redaction.redact_message(r, redaction.needles_for(SECRET.decode()))
