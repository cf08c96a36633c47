"""A request head is judged only if it has one meaning (RFC 9112 §2.2, §5; hostile review 12, 14).

Two ways a head could mean one thing to the proxy and another to the upstream, or be refused
outside the error contract:

- **Control characters.** mitmproxy splits header lines on LF only, so ``X: 1<CR>Content-Length:
  9`` is one header ``X`` to the proxy and forwarded as is; an upstream that splits on a bare CR
  (Python's ``http.client``) sees a ``Content-Length`` the proxy never judged. RFC 9112 §2.2 lets a
  recipient reject such a message; the proxy does, for any CTL but HTAB in the request line, a
  header name or value, and for obs-fold (a line starting with SP/HTAB, §5.2), on every rule,
  before anything is forwarded: ``400 header_invalid``.
- **mitmproxy's own parse refusals** (``Content-Length`` with ``Transfer-Encoding``, an unknown
  transfer coding, a header name with a space, ``Content-Length: 3, 30``): mitmproxy answers them
  with its HTML page, unaudited. The same checks run here first, so they are refused in the error
  contract: ``400 protocol_refused``, audited and counted.

``head_lines`` and ``parse_head`` are for the HTTP/1 server (edge/httplayers.py), on the bytes as they
arrived; ``parsed_refusal`` is for the addon hook, on what any HTTP version parsed into.
"""

from __future__ import annotations

import re

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.net.http.validate import validate_headers

from secretless_proxy.edge.layerguard import clean_message
from secretless_proxy.reasons import Reason
from secretless_proxy.refusal import Refusal

_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # every control character but HTAB (RFC 5234 CTL)
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # a header name (RFC 9110 §5.1)
_BLANK_LINE = re.compile(rb"\n\r?\n")  # where h11's receive buffer ends a head

CTL_MESSAGE = "the request line or a header contains a control character (CR, LF, NUL, ...): RFC 9112 forbids them"
# flow.metadata key: why the HTTP layer found the request's framing false (GuardedHttpStream sets it,
# parsed_refusal answers it, in the error contract like every other head refusal).
MALFORMED = "secretless.malformed"
EMPTY_WITH_LENGTH_MESSAGE = ("the request ended with its headers but declares a Content-Length other than 0 "
                             "(a malformed HTTP/2 request, RFC 9113 §8.1.1)")
FRAGMENT_MESSAGE = "the request target contains '#': a fragment is never part of a request (RFC 9112 §3.2); send %23 for a literal #"
FOLD_MESSAGE = "a header line starts with whitespace (obsolete line folding, RFC 9112 §5.2): send each header on one line"


def head_lines(data: bytes) -> list[bytes] | None:
    """The lines of the complete head at the start of ``data`` as mitmproxy will read them, or None."""
    if data[:1] == b"\n" or data[:2] == b"\r\n":
        return None  # an empty line before the request line: mitmproxy drops it first
    m = _BLANK_LINE.search(data)
    if m is None:
        return None
    lines = data[:m.end()].split(b"\n")[:-2]
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def parse_head(lines: list[bytes]) -> Refusal | tuple[http.Request, int | None]:
    """An HTTP/1 head (its lines, without line ends) parsed once: the request and its expected body
    size (mitmproxy's ``expected_http_body_size``), or why it must be refused.

    The HTTP/1 server hands the parsed request on instead of letting mitmproxy parse the same
    lines again (a second parse was ~5 % of the proxy's CPU per request in a py-spy profile).
    """
    for i, line in enumerate(lines):
        if _CTL.search(line):
            return Refusal(400, Reason.HEADER_INVALID, CTL_MESSAGE)
        if i and line[:1] in (b" ", b"\t"):
            return Refusal(400, Reason.HEADER_INVALID, FOLD_MESSAGE)
    try:
        request = http1.read_request_head(lines)
        size = http1.expected_http_body_size(request)
        validate_headers(request)
    except ValueError as exc:
        return Refusal(400, Reason.PROTOCOL_REFUSED, f"the request head is not valid HTTP/1.1: {clean_message(str(exc))}")
    if request.scheme not in ("http", "https", ""):
        return Refusal(400, Reason.PROTOCOL_REFUSED, "the request target's scheme must be http or https")
    return request, size


def framing(request: http.Request, *, end_stream: bool) -> str | None:
    """Why the framing of an HTTP/2 (or HTTP/3) request is false, or None (hostile review 18).

    HEADERS with END_STREAM and ``content-length: 30``: mitmproxy forwards the header to an
    HTTP/1.1 upstream with no body, which then waits for 30 bytes the proxy will never send, and
    the two ends disagree on where the request ends. (A body longer or shorter than its
    Content-Length is caught by the h2 library when the stream ends.)
    """
    if end_stream and (request.is_http2 or request.is_http3):
        if any(v.strip() != "0" for v in request.headers.get_all("content-length")):
            return EMPTY_WITH_LENGTH_MESSAGE
    return None


ORIGIN_FORM_MESSAGE = ("the request target's path must start with / (origin form; HTTP/2 :path too), "
                       "or be * for OPTIONS; the destination is the tunnel's or the absolute-form authority")


def parsed_refusal(request: http.Request, metadata: dict | None = None) -> Refusal | None:
    """The same control-character rule on a parsed request (HTTP/1 or HTTP/2), or None; and a
    request target with a fragment, which no client sends (RFC 9112 §3.2, RFC 9113 §8.3.1): the
    policy and the audit would see the path before the ``#``, and an upstream that takes ``#`` as
    data and normalises what follows (``/v1/x#/../../admin``) another one (hostile review 17)."""
    data = request.data
    for part in (data.method, data.path, data.authority, data.scheme):
        # HTAB is allowed in a field value, never in the request line (an HTTP/2 :path with a tab
        # went to the HTTP/1.1 upstream as a request line the proxy's own parser refuses: review 25).
        if _CTL.search(part) or b" " in part or b"\t" in part:
            return Refusal(400, Reason.HEADER_INVALID, CTL_MESSAGE)
    if b"#" in data.path:
        return Refusal(400, Reason.PROTOCOL_REFUSED, FRAGMENT_MESSAGE)
    if not data.path.startswith(b"/") and not (data.path == b"*" and data.method == b"OPTIONS"):
        # An HTTP/2 :path in absolute form (https://other.example/x) or authority form went to the
        # HTTP/1.1 upstream as that request line, which an upstream routes by, over Host (RFC 9112
        # §3.2.2): the credential decided for :authority reached another virtual host (hostile
        # review 4.08). RFC 9113 §8.3.1: :path is origin form, or * for OPTIONS.
        return Refusal(400, Reason.PROTOCOL_REFUSED, ORIGIN_FORM_MESSAGE)
    if metadata and (why := metadata.get(MALFORMED)):
        return Refusal(400, Reason.PROTOCOL_REFUSED, why)
    for name, value in data.headers.fields:
        if not _TOKEN.match(name):
            return Refusal(400, Reason.HEADER_INVALID, "a header name is not a valid token (RFC 9110 §5.1)")
        if _CTL.search(value):
            return Refusal(400, Reason.HEADER_INVALID, CTL_MESSAGE)
    return None
