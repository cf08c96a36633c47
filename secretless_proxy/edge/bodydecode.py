"""A response body decoded for the echo check: every member, never more than a bound.

mitmproxy's ``get_content`` is the wrong tool for a check that must see what the client will see:

- gzip: it stops at the end of the first member (RFC 1952 allows several, and urllib3, Python's
  ``gzip`` and zlib-based clients decode them all), so an echo in a second member went unchecked;
- every coding: it inflates without bound, so ~100 KiB of gzip grew the proxy by hundreds of MiB
  although ``limits.max_response_scan_bytes`` bounded the compressed bytes.

``decode(raw, content_encoding, limit)`` decodes incrementally with a maximum output of ``limit``
bytes (over it: ``TooLarge``), decodes every gzip member, deflate stream and zstd frame in the body,
and raises ``Undecodable`` (a ``ValueError``) for anything it cannot decode whole (a truncated stream, trailing bytes
that are not another member, an unknown or stacked coding): the caller withholds the response.
"""

from __future__ import annotations

import io
import zlib

import brotli
import zstandard

from secretless_proxy.errors import SecretlessError

__all__ = ["TooLarge", "Undecodable", "decode"]

# RFC 9659 (zstd in HTTP) asks decoders for windows up to 8 MiB; a larger window only costs memory.
_ZSTD_MAX_WINDOW = 8 * 1024 * 1024
_READ = 64 * 1024


class TooLarge(SecretlessError):
    """The decoded body is larger than the bound."""


class Undecodable(SecretlessError, ValueError):
    """The body cannot be decoded whole for its Content-Encoding (unknown, stacked, truncated, trailing bytes)."""


def decode(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    """``raw`` decoded per ``content_encoding``, at most ``limit`` bytes (else ``TooLarge``)."""
    enc = (content_encoding or "").strip().lower()
    if enc in ("", "identity", "none"):
        out = raw
    elif enc in ("gzip", "x-gzip"):
        out = _zlib_members(raw, 16 + zlib.MAX_WBITS, limit)
    elif enc == "deflate":
        # zlib-wrapped as the RFC says, or raw deflate as some servers send (clients accept both).
        try:
            out = _zlib_members(raw, zlib.MAX_WBITS, limit)
        except ValueError:
            out = _zlib_members(raw, -zlib.MAX_WBITS, limit)
    elif enc == "br":
        out = _brotli(raw, limit)
    elif enc == "zstd":
        out = _zstd(raw, limit)
    else:
        raise Undecodable("unsupported content-encoding")  # includes stacked codings ("gzip, gzip")
    if len(out) > limit:
        raise TooLarge
    return out


def _zlib_members(raw: bytes, wbits: int, limit: int) -> bytes:
    out = bytearray()
    data = raw
    while True:
        d = zlib.decompressobj(wbits)
        buf = data
        try:
            while not d.eof:
                chunk = d.decompress(buf, limit + 1 - len(out))  # max_length >= 1: never unbounded
                out += chunk
                if len(out) > limit:
                    raise TooLarge
                if not chunk and len(d.unconsumed_tail) == len(buf):
                    raise Undecodable("truncated compressed body")
                buf = d.unconsumed_tail
        except zlib.error as exc:
            raise Undecodable("undecodable compressed body") from exc
        data = d.unused_data
        if not data.strip(b"\0"):  # the end (zero padding is what gzip tools tolerate too)
            return bytes(out)


def _brotli(raw: bytes, limit: int) -> bytes:
    d = brotli.Decompressor()
    out = bytearray()
    try:
        chunk = d.process(raw, output_buffer_limit=_READ)
        while True:
            out += chunk
            if len(out) > limit:
                raise TooLarge
            if d.is_finished() or (not chunk and d.can_accept_more_data()):
                break
            chunk = d.process(b"", output_buffer_limit=_READ)
    except brotli.error as exc:
        raise Undecodable("undecodable brotli body") from exc
    if not d.is_finished():
        raise Undecodable("truncated brotli body")
    return bytes(out)


def _zstd(raw: bytes, limit: int) -> bytes:
    dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
    out = bytearray()
    try:
        with dctx.stream_reader(io.BytesIO(raw), read_across_frames=True, read_size=_READ) as reader:
            while chunk := reader.read(min(_READ, limit + 1 - len(out))):
                out += chunk
                if len(out) > limit:
                    raise TooLarge
    except zstandard.ZstdError as exc:
        raise Undecodable("undecodable zstd body") from exc
    return bytes(out)
