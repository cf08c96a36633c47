"""The request target must name the bound destination (issue 8 §2, RFC 9112 §3.2).

Inside a tunnel mitmproxy connects to the CONNECT target, but forwards the request target as the
client wrote it. An absolute-form target (``GET https://attacker.example/ HTTP/1.1``) overrides
``Host`` at the upstream (RFC 9112 §3.2.2), so a shared front end (CDN, gateway, nginx with
virtual hosts) routes the credential to the name in the target. HTTP/2's ``:authority`` and
``:scheme`` are forwarded the same way. So the target's authority and scheme, when present, must
equal the destination the policy decided on; and what goes upstream is rewritten to carry only
that destination: origin form with the decided ``Host`` (HTTP/1), or the decided ``:authority``.
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.net.http import url

from secretless_proxy.matching import normalize_host


def check(client_target: tuple[str, str], *, host: str, port: int, scheme: str) -> None:
    """Raise ValueError if the client's (scheme, authority) names another destination."""
    t_scheme, authority = client_target
    if t_scheme and t_scheme.lower() != scheme:
        raise ValueError("scheme")
    if authority:
        a_host, a_port = url.parse_authority(authority, check=True)
        if normalize_host(a_host) != host:
            raise ValueError("authority host")
        if (a_port if a_port is not None else url.default_port(t_scheme or scheme)) != port:
            raise ValueError("authority port")


def rewrite(request: http.Request, *, host: str, port: int) -> None:
    """Make the request carry only the decided destination upstream."""
    hostport = url.hostport(request.scheme, host, port)
    if request.is_http2 or request.is_http3:
        request.authority = hostport  # :authority; mitmproxy adds Host from it for an HTTP/1 upstream
        request.headers.pop("host", None)
    else:
        request.authority = ""  # origin form
        request.headers["Host"] = hostport
