"""HTTP/1 request bodies that cannot be read on (hostile review 21).

mitmproxy's ``Http1Connection.read_body`` (12.2) closes the client connection unanswered when h11's
body reader raises ``h11.ProtocolError`` (a chunk size line that is not hex, chunk data not
followed by CRLF, a chunk extension without ``;``, the connection closed before the declared
length) and raises ``NotImplementedError`` on chunked trailer fields; either way the request,
whose head was decided and may carry a credential, was never answered in the error contract and
was audited as ``credential.used``. ``BodyReader`` wraps the reader so that each of these is raised
as ``BodyRefused`` (a ``Refusal``: ``400 body_malformed``, trailers ``400 protocol_refused``) before
mitmproxy sees it; ``httplayers.GuardedHttp1Server`` stops reading and passes it to the request's
stream as ``UnreadableRequestBody``, and ``httplayers.GuardedHttpStream`` answers it.
"""

from __future__ import annotations

import dataclasses

import h11
from mitmproxy.proxy.layers.http._base import HttpEvent

from secretless_proxy.reasons import Reason
from secretless_proxy.refusal import Refusal

TRAILERS_REFUSED = "request trailers are not relayed by this proxy; send the fields as headers"


@dataclasses.dataclass
class UnreadableRequestBody(HttpEvent):
    """The HTTP/1 body of the request on ``stream_id`` cannot be read on (``GuardedHttp1Server``):
    the stream answers with ``reason`` and closes the connection; nothing more of it is read.

    Deliberately not a ``RequestProtocolError``: mitmproxy reads one queued while a hook runs as the
    client gone (``HttpStream.check_killed``) and kills the flow unanswered.
    """

    reason: Reason
    message: str


class BodyRefused(Refusal):
    """Raised by ``BodyReader`` through mitmproxy's ``read_body``, which does not catch it;
    ``GuardedHttp1Server`` passes it on to the stream as ``UnreadableRequestBody``."""


class BodyReader:
    """h11's body reader (mitmproxy's ``make_body_reader``) whose failures are raised as ``BodyRefused``."""

    __slots__ = ("_inner",)

    def __init__(self, inner) -> None:
        self._inner = inner

    def __call__(self, buf):
        try:
            event = self._inner(buf)
        except h11.ProtocolError as exc:
            raise _malformed(exc) from None
        if isinstance(event, h11.EndOfMessage) and event.headers:
            raise BodyRefused(400, Reason.PROTOCOL_REFUSED, TRAILERS_REFUSED)
        return event

    def read_eof(self):
        try:
            return self._inner.read_eof()
        except h11.ProtocolError as exc:
            raise _malformed(exc) from None


def _malformed(exc: h11.ProtocolError) -> BodyRefused:
    # h11's text up to its first colon: what failed, without the client's bytes it quotes after it
    # ("illegal chunk header: bytearray(b'zz\\r\\n')").
    what = str(exc).split(":", 1)[0].strip() or "invalid framing"
    return BodyRefused(400, Reason.BODY_MALFORMED, f"the request body is not valid HTTP/1.1 ({what}); the request was refused")


__all__ = ["TRAILERS_REFUSED", "BodyReader", "BodyRefused", "UnreadableRequestBody"]
