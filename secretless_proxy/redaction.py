"""What an upstream must never echo back to the workload, and how it is taken out.

A credential value travels in one form (a header, a query parameter, a basic-auth token), but an
upstream that echoes it may re-encode it on the way back: percent-encoded (``%3D`` or ``%3d``,
``+`` for a space), JSON-escaped (``\\/``, ``\\u003d`` as Gson does by default), base64 or
base64url (with or without padding, at any offset of a larger base64 blob), or hex. For each value
this module derives those forms once and compiles them into patterns that also accept any mix of
per-character escapes, so ``dXNlcjpwYXNz%3D`` and ``dXNlcjpwYXNz\\u003d`` are both caught.

The derived patterns are cached per value (keyed by a keyed digest, never by the value itself in
anything printable), so a request pays only for the scan. A ``Needles`` object never shows a
value in its ``repr``.

Public API: ``needles_for(*values, per_request=())`` → ``Needles``; ``Needles.redact_bytes`` /
``Needles.redact_str`` for any body or text (the edge's bounded scan calls these);
``redact_message`` for a whole response (status line, headers, trailers, body) and
``redact_websocket_message`` for a server→client WebSocket message.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable

from mitmproxy import http
from mitmproxy.websocket import WebSocketMessage

from secretless_proxy.edge import bodydecode

__all__ = ["MARKER", "Needles", "needles_for", "redact_message", "redact_websocket_message"]

MARKER = "[REDACTED]"
_MARKER_B = MARKER.encode()
# Derived forms shorter than this would match unrelated text (a 2-byte secret's hex is 4 chars).
_MIN_DERIVED = 8
# A literal run this long must appear for a form to possibly match: a fast memmem pre-check that
# lets a response without any echo skip the regex scan.
_MIN_ANCHOR = 4
_CACHE_SIZE = 1024
_DIGEST_KEY = os.urandom(32)  # the cache key is a keyed digest: nothing to learn from it
_ALNUM = re.compile(r"[A-Za-z0-9]+")


class _Form:
    """One form of a secret: a literal anchor and the pattern that matches it with any escapes.

    The pattern is compiled on first use (the first time the anchor shows up), so deriving a
    credential's forms costs microseconds and a response without an echo never compiles one.
    """

    __slots__ = ("length", "max_bytes", "anchor", "anchor_s", "_template", "_bpat", "_spat")

    def __init__(self, template: str) -> None:
        self.length = len(template)
        self.max_bytes = sum(_max_escaped(c) for c in template)
        runs = [r for r in _ALNUM.findall(template) if len(r) >= _MIN_ANCHOR]
        # 16 bytes of the longest literal run: CPython's short-needle search is the fastest.
        self.anchor: bytes | None = max(runs, key=len)[:16].encode() if runs else None
        self.anchor_s: str | None = self.anchor.decode() if self.anchor is not None else None
        self._template = template
        self._bpat: re.Pattern[bytes] | None = None
        self._spat: re.Pattern[str] | None = None

    def __repr__(self) -> str:
        return f"_Form(length={self.length})"

    def _pattern(self) -> str:
        return "".join(_char(c) for c in self._template)

    def sub_bytes(self, data: bytes) -> bytes:
        if self._bpat is None:
            self._bpat = re.compile(self._pattern().encode("utf-8", "surrogateescape"))
        return self._bpat.sub(_MARKER_B, data)

    def sub_str(self, text: str) -> str:
        if self._spat is None:
            self._spat = re.compile(self._pattern())
        return self._spat.sub(MARKER, text)


# An echo cut short (a 404 quoting the first 100 characters of the request target) brought all but
# the last character of a credential back, the workload sliding the cut by padding what precedes the
# value (hostile review 4.12); hex or base64 of it cut short the same (review 5.01). So each form
# longer than 12 characters is also cut into blocks of ``max(12, len / 8)`` characters that tile it
# (the last one ends with it), and every block is a form of its own. A piece that starts or ends with the
# form and holds at least a block has every whole block in it redacted, so at most ``block - 1``
# characters come back from either end, and ``2 * block - 2`` from the middle (an upstream that cuts
# both ends). Blocks are plain forms (no optional groups): the scan stays linear (review 5.02: a
# pattern with optional context reaching 64 characters stalled the loop for seconds on near-matches).
_MIN_BLOCK = 12  # shorter blocks match public prefixes: "sk_live_", or base64 of "sk_test" in a docs text
_BLOCKS = 8  # blocks per form at most


def _blocks(template: str) -> list[str]:
    if len(template) <= _MIN_BLOCK:
        return []  # the form itself is as short as a block
    block = max(_MIN_BLOCK, -(-len(template) // _BLOCKS))
    starts = list(range(0, len(template) - block + 1, block))
    if starts[-1] + block < len(template):
        starts.append(len(template) - block)  # the tail too: an echo that keeps the end of a form
    return [template[i:i + block] for i in starts]


def _forms(value: str) -> list[_Form]:
    templates = _templates(value)
    # Every form in blocks: the value, its hex (both cases), its base64 (both alphabets) and the base64
    # of it inside a larger blob at each byte offset, whose cut copy came back too (hostile review 6.01).
    pieces = [b for t in templates for b in _blocks(t)]
    return [_Form(t) for t in dict.fromkeys(templates + pieces)]


_PREFILTER_MAX = 4096  # texts up to this long are checked with one alternation of every anchor
_PREFILTER_CACHE: OrderedDict[tuple, tuple] = OrderedDict()  # forms (the cached objects) -> (ordered, str, bytes patterns)


def _ordered(forms: tuple[_Form, ...]) -> tuple[tuple[_Form, ...], re.Pattern[str] | None, re.Pattern[bytes] | None]:
    """``forms`` longest first, and the alternation of every anchor, built once per set of forms (a
    flow's Needles is made per request from the cached forms: building and compiling the alternation
    each time cost 5 % of a request, sorting the forms another few microseconds)."""
    hit = _PREFILTER_CACHE.get(forms)
    if hit is not None:
        return hit
    ordered = tuple(sorted(forms, key=lambda f: -f.length))
    anchors = {f.anchor_s for f in ordered}
    alternation = None if None in anchors or not anchors else \
        "|".join(re.escape(a) for a in sorted(anchors, key=len, reverse=True))  # type: ignore[arg-type]
    made = (ordered, *((re.compile(alternation), re.compile(alternation.encode())) if alternation else (None, None)))
    with _cache_lock:
        _PREFILTER_CACHE[forms] = made
        while len(_PREFILTER_CACHE) > _CACHE_SIZE:
            _PREFILTER_CACHE.popitem(last=False)
    return made


class Needles:
    """The compiled forms of the secrets a flow carries. ``repr`` shows only how many."""

    __slots__ = ("_forms", "_prefilter", "_prefilter_b")

    def __init__(self, forms: Iterable[_Form] = ()) -> None:
        # Longest first: a whole padded token goes before the unpadded prefix it contains. One search
        # for any anchor decides whether a short text (a header) needs the per-form loop (beyond
        # _PREFILTER_MAX an alternation of every anchor is slower than one memmem per form).
        self._forms, self._prefilter, self._prefilter_b = _ordered(tuple(forms))

    def __repr__(self) -> str:
        return f"Needles({len(self._forms)} forms)"

    def __bool__(self) -> bool:
        return bool(self._forms)

    @property
    def max_match_bytes(self) -> int:
        """The longest byte string any form can match (every character escaped): the overlap a
        chunked scan must keep between chunks so that no echo straddles a boundary unseen."""
        return max((f.max_bytes for f in self._forms), default=0)

    def __add__(self, other: Needles) -> Needles:
        return Needles(self._forms + other._forms)

    def redact_bytes(self, data: bytes) -> bytes:
        """``data`` with every form of every secret replaced by ``[REDACTED]``."""
        if self._prefilter_b is not None and len(data) < _PREFILTER_MAX and self._prefilter_b.search(data) is None:
            return data
        for f in self._forms:
            if f.anchor is None or f.anchor in data:
                data = f.sub_bytes(data)
        return data

    def redact_str(self, text: str) -> str:
        """``text`` with every form of every secret replaced by ``[REDACTED]``."""
        if self._prefilter is not None and len(text) < _PREFILTER_MAX and self._prefilter.search(text) is None:
            return text
        for f in self._forms:
            if f.anchor_s is None or f.anchor_s in text:
                text = f.sub_str(text)
        return text

    def may_occur_in(self, data: bytes) -> bool:
        """False when no form can occur in ``data`` (no anchor is there): the fast path."""
        if self._prefilter_b is not None and len(data) < _PREFILTER_MAX:
            return self._prefilter_b.search(data) is not None
        return any(f.anchor is None or f.anchor in data for f in self._forms)


def needles_for(*values: str, per_request: Iterable[str] = ()) -> Needles:
    """The needles for credential ``values`` (every form, derived once per value and cached).

    ``per_request`` values (a SigV4 Authorization value, whose signature changes every request)
    get the same forms without entering the cache, so they never evict a credential's entry.
    """
    forms: list[_Form] = []
    for v in values:
        if v:
            forms.extend(_cached_forms(v))
    for v in per_request:
        if v:
            forms.extend(_forms(v))
    return Needles(forms)


def redact_message(message: http.Message, needles: Needles, *, max_body: int = 16 * 1024 * 1024) -> None:
    """Redact the status line (reason), every header and trailer and the decoded body in place.

    The body is decoded by ``bodydecode`` (every gzip member, at most ``max_body`` decoded bytes).
    Raises ``bodydecode.Undecodable`` when the body's Content-Encoding cannot be decoded and ``bodydecode.TooLarge``
    when it decodes to more than ``max_body``: it cannot be checked, so the caller withholds the
    response (fail closed).
    """
    if isinstance(message, http.Response) and message.data.reason:
        reason = needles.redact_bytes(message.data.reason)
        if reason != message.data.reason:
            message.data.reason = reason
    _redact_headers(message.headers, needles)
    if message.trailers:
        _redact_headers(message.trailers, needles)
    if message.raw_content:
        # Every Content-Encoding field: a client applies two `gzip` fields as `gzip, gzip` (withheld).
        body = bodydecode.decode(message.raw_content, ", ".join(message.headers.get_all("content-encoding")), max_body)
        if body:
            clean = needles.redact_bytes(body)
            if clean != body:
                message.content = clean


def redact_websocket_message(message: WebSocketMessage, needles: Needles) -> None:
    """Redact a server→client WebSocket message in place; client→server messages pass unchanged."""
    if message.from_client:
        return
    clean = needles.redact_bytes(message.content)
    if clean != message.content:
        message.content = clean


def _redact_headers(headers: http.Headers, needles: Needles) -> None:
    # One anchor check over all fields (joined with a byte no form contains) before any per-field work.
    if not needles.may_occur_in(b"\n".join(b"%s: %s" % kv for kv in headers.fields)):
        return
    headers.fields = tuple((needles.redact_bytes(k), needles.redact_bytes(v)) for k, v in headers.fields)


# -- derivation ---------------------------------------------------------------------------------

_cache: OrderedDict[bytes, tuple[_Form, ...]] = OrderedDict()
_cache_lock = threading.Lock()


def _cached_forms(value: str) -> tuple[_Form, ...]:
    key = hashlib.blake2b(value.encode("utf-8", "surrogateescape"), key=_DIGEST_KEY, digest_size=16).digest()
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    forms = tuple(_forms(value))
    with _cache_lock:
        _cache[key] = forms
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return forms


def _templates(value: str) -> list[str]:
    """The strings a secret becomes in an echo, before per-character escapes."""
    raw = value.encode("utf-8", "surrogateescape")
    out = [value]
    derived = [raw.hex(), raw.hex().upper()]
    b64 = base64.b64encode(raw).decode()
    derived += [b64, b64.translate(_URLSAFE)]
    # Base64 of the secret inside a larger blob: at each of the three byte alignments, the output
    # characters that depend on the secret's bits alone (the edges mix in neighbouring bytes).
    # Alignment 0 is also the unpadded prefix of the secret's own base64 (basic-auth tokens).
    n = len(raw)
    for a in range(3):
        enc = base64.b64encode(b"\0" * a + raw).decode()
        stable = enc[-(-8 * a // 6):(8 * (a + n)) // 6]
        derived += [stable, stable.translate(_URLSAFE)]
    out += [d for d in derived if len(d) >= _MIN_DERIVED]
    return list(dict.fromkeys(out))


_URLSAFE = str.maketrans("+/", "-_")


def _char(c: str) -> str:
    """A pattern for ``c`` as itself or any escape an echo may give it (URL, JSON)."""
    if c.isascii() and c.isalnum():
        return c
    alts = [re.escape(c)]
    # Percent-encoding of each UTF-8 byte, either hex case; '+' for a space (quote_plus, forms).
    alts.append("".join("%" + _hex_any_case(b, 2) for b in c.encode("utf-8", "surrogateescape")))
    if c == " ":
        alts.append(r"\+")
    # JSON: \uXXXX of each UTF-16 code unit (Gson escapes = < > & '), and the short escapes.
    units = c.encode("utf-16-be", "surrogatepass")
    alts.append("".join(r"\\u" + _hex_any_case(int.from_bytes(units[i:i + 2]), 4) for i in range(0, len(units), 2)))
    if c in '/"\\':
        alts.append(re.escape("\\" + c))
    return "(?:" + "|".join(alts) + ")"


def _max_escaped(c: str) -> int:
    if c.isascii() and c.isalnum():
        return 1
    utf8 = len(c.encode("utf-8", "surrogateescape"))
    return max(3 * utf8, 6 * (len(c.encode("utf-16-be", "surrogatepass")) // 2))


def _hex_any_case(number: int, width: int) -> str:
    return "".join(f"[{d.upper()}{d}]" if d.isalpha() else d for d in f"{number:0{width}x}")
