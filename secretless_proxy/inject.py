"""Put a credential into an outbound request, replacing whatever the client sent in its place.

Returns the exact strings that now carry the secret, so the response path can redact an
upstream that echoes them back (and the flow can be scrubbed after the request is sent).
"""

from __future__ import annotations

import base64
from urllib.parse import quote, quote_plus

from mitmproxy import http

from .config import Injection
from .secrets import Secret


def apply(request: http.Request, injection: Injection, secret: Secret) -> tuple[str, ...]:
    """Inject ``secret`` as ``injection`` says; returns the strings to redact downstream."""
    value = secret.reveal()
    # Proxy credentials are for the proxy hop only; they must never travel upstream.
    request.headers.pop("Proxy-Authorization", None)
    if injection.header is not None:
        # Headers.__setitem__ drops every earlier value of the header, in any letter case.
        request.headers[injection.header] = injection.format.replace("{secret}", value)
        return (value,)
    if injection.basic_password is not None:
        user = (injection.basic_username or "").replace("{secret}", value)
        password = injection.basic_password.replace("{secret}", value)
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        request.headers["Authorization"] = f"Basic {token}"
        return (value, token)
    assert injection.query is not None
    # The query is parsed with percent-decoding, so `api%5Fkey=x` is the same key as `api_key`
    # and is replaced too; set_all leaves exactly one value.
    request.query.set_all(injection.query, [value])
    return (value, quote(value, safe=""), quote_plus(value))


def redact(message: http.Message, needles: tuple[str, ...]) -> int:
    """Replace each needle in headers and body with a marker; returns how many were found."""
    found = 0
    for name, val in list(message.headers.items(multi=True)):
        if any(n in val for n in needles):
            new = val
            for n in needles:
                new = new.replace(n, "[REDACTED]")
            message.headers.set_all(name, [new if v == val else v for v in message.headers.get_all(name)])
            found += 1
    # strict: a body we cannot decode (an unknown Content-Encoding) cannot be checked for an
    # echoed credential, so it raises and the caller withholds the response (fail closed).
    raw = message.get_content(strict=True) if message.raw_content else None
    if raw:
        encoded = [n.encode() for n in needles]
        if any(n in raw for n in encoded):
            for n in encoded:
                raw = raw.replace(n, b"[REDACTED]")
            message.content = raw
            found += 1
    return found
