"""Put a credential into an outbound request, replacing whatever the client sent in its place.

Returns the ``Needles`` of what now carries the secret (``redaction`` derives every encoding an
echo may take), so the response path can redact an upstream that echoes it back.
"""

from __future__ import annotations

import base64

from mitmproxy import http

from secretless_proxy.config.model import Injection
from secretless_proxy.redaction import Needles, needles_for
from secretless_proxy.secretrefs import Secret


def apply(request: http.Request, injection: Injection, secret: Secret) -> Needles:
    """Inject ``secret`` as ``injection`` says; returns the needles to redact downstream."""
    value = secret.reveal()
    # Proxy credentials are for the proxy hop only; they must never travel upstream.
    request.headers.pop("Proxy-Authorization", None)
    if injection.header is not None:
        # Headers.__setitem__ drops every earlier value of the header, in any letter case.
        request.headers[injection.header] = injection.format.replace("{secret}", value)
        return needles_for(value)
    if injection.basic_password is not None:
        user = (injection.basic_username or "").replace("{secret}", value)
        password = injection.basic_password.replace("{secret}", value)
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        request.headers["Authorization"] = f"Basic {token}"
        # "user:password" yields the token, its unpadded prefix and base64 at any offset.
        return needles_for(value, password, f"{user}:{password}", token)
    assert injection.query is not None
    # The query is parsed with percent-decoding, so `api%5Fkey=x` is the same key as `api_key`
    # and is replaced too; set_all leaves exactly one value.
    request.query.set_all(injection.query, [value])
    return needles_for(value)  # percent-encoded forms are matched by the needles themselves

