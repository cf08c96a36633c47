"""Headers and tokens the proxy owns (issue 8 §6).

Whatever the rule, a forwarded request carries none of the client's proxy credentials
(``Proxy-Authorization``, also from ``curl --proxy-user``), nothing in the proxy's own
``X-Secretless-`` namespace and no hop-by-hop header (RFC 9110 §7.6.1): those are for the hop to
the proxy, and an upstream must not read meaning into them. The exceptions: the ``Connection:
Upgrade`` / ``Upgrade: websocket`` pair of a WebSocket handshake that passed policy, and
``Connection: close`` (alone), so that the client's connection is closed after the answer.

Methods are case-sensitive (RFC 9110 §9.1): ``get`` is not ``GET``. mitmproxy upper-cases the
method it shows the policy but forwards the bytes the client sent, so a ``GET`` rule would let
``get`` through with the credential and the upstream might treat it differently. The proxy refuses
a method token that is not upper case (``method_not_canonical``) instead of guessing what the
client meant.
"""

from __future__ import annotations

from mitmproxy import http

from secretless_proxy.reasons import Reason
from secretless_proxy.refusal import Refusal

OWN_PREFIX = "x-secretless-"
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate",
    "te", "upgrade", "http2-settings",
})


def method_refusal(request: http.Request) -> Refusal | None:
    """A refusal for a method token that is not in canonical (upper-case) form, or None."""
    raw = request.data.method
    if raw != raw.upper():
        return Refusal(400, Reason.METHOD_NOT_CANONICAL,
                       "HTTP methods are case-sensitive: send the method in upper case (e.g. GET, not get)")
    return None


def strip(request: http.Request, *, websocket: bool) -> None:
    """Remove the headers the proxy owns from a request about to be forwarded."""
    named: set[str] = set()
    for value in request.headers.get_all("connection"):
        named.update(t.strip().lower() for t in value.split(",") if t.strip())
    # A client's `Connection: close` is for the hop to the proxy, but mitmproxy decides whether to
    # close that hop from this same request: without it the connection stayed open after the answer.
    close = "close" in named and not (request.is_http2 or request.is_http3)
    keep = {"upgrade"} if websocket else set()
    # Connection may name end-to-end framing headers too; mitmproxy owns those, never drop them.
    named -= {"content-length", "transfer-encoding", "host"} | keep
    for name in list(dict.fromkeys(k.lower() for k in request.headers)):
        if name in keep:
            continue
        if name in HOP_BY_HOP or name in named or name.startswith(OWN_PREFIX):
            if name == "te" and [v.strip().lower() for v in request.headers.get_all("te")] == ["trailers"] \
                    and (request.is_http2 or request.is_http3):
                continue  # the one TE value HTTP/2 allows (gRPC relies on it)
            request.headers.pop(name, None)
    if websocket:
        request.headers["Connection"] = "Upgrade"
        # No permessage-deflate (or any extension): every message is judged and redacted here, and a
        # compressed frame inflated a read's worth (148 MiB) before the message bound applied
        # (hostile review 5.08). Without the offer the upstream sends plain frames.
        request.headers.pop("sec-websocket-extensions", None)
    elif close:
        request.headers["Connection"] = "close"  # the one token kept: the upstream hop closes too
