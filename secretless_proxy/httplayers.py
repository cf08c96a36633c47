"""mitmproxy's HTTP layer with the proxy's byte limits (issue 8 §2 and §3).

mitmproxy reads a request head of any size ("FIXME: protect against header size DoS" in its
HTTP/1 server), buffers a body even when the ``requestheaders`` hook has already answered the
request, buffers bodies without bound and forgets the scheme a client wrote in its request target.
These subclasses change exactly that, and nothing else:

- ``GuardedHttp1Server``: a request head over ``limits.max_request_head_bytes`` gets ``431
  head_too_large`` and the connection is closed;
- ``GuardedHttpStream``:
  - records the request target as the client wrote it (``flow.metadata[TARGET]``), before
    mitmproxy replaces scheme/host/port with the tunnel's destination (requesttarget.py checks it);
  - a request refused on its head is answered at once; its body is discarded unread into any
    buffer (and the connection closed after ``LINGER_BYTES``);
  - a request body over ``limits.max_request_body_bytes`` gets ``413 body_too_large``, buffered or
    streamed (a streamed one is aborted upstream);
  - a buffered response over ``flow.metadata[SCAN_LIMIT]`` (inject rules: the echo check needs the
    whole body) is withheld with ``502 response_too_large`` and the upstream stream is aborted.

The addon reports every refusal made here through ``on_refusal`` (audit, metric, log).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from mitmproxy import http
from mitmproxy.connection import Client
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    HttpLayer,
    HttpStream,
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    RequestTrailers,
    ResponseData,
    ResponseEndOfMessage,
    ResponseTrailers,
    SendHttp,
)
from mitmproxy.proxy.layers.http._hooks import HttpResponseHeadersHook
from mitmproxy.proxy.layers.http._http1 import Http1Server
from mitmproxy.proxy.utils import expect

from .config import LimitsConfig
from .refusal import BODY_TOO_LARGE, HEAD_TOO_LARGE, RESPONSE_TOO_LARGE, Refusal, error_response

TARGET = "secretless.target"  # (scheme, authority) of the request target as the client wrote it
SCAN_LIMIT = "secretless.scan_limit"  # bytes of response body the echo check may buffer
LINGER_BYTES = 1024 * 1024  # body bytes of a refused request read (and dropped) before closing


@dataclasses.dataclass(frozen=True)
class Guard:
    """What the guarded layers need from the addon."""

    limits: Callable[[], LimitsConfig]
    on_refusal: Callable[[http.HTTPFlow, Refusal], None]  # audit + metric + log of a flow's refusal
    report_connection: Callable[[layer.Context, str], str]  # same for a refusal before any flow; returns an id
    # The client reset a stream still in flight (HTTP/2 rapid reset): connlimits.ConnectionGuard counts it.
    on_reset: Callable[[Client], None] = lambda client: None
    # Whether the client may open one more stream (connlimits.ConnectionGuard.admit_stream): a stream
    # not admitted is dropped before mitmproxy makes a flow or runs a hook for it.
    admit_stream: Callable[[Client], bool] = lambda client: True


class GuardedHttpLayer(HttpLayer):
    def __init__(self, context: layer.Context, mode, *, guard: Guard) -> None:
        super().__init__(context, mode)
        self.guard = guard

    def _handle_event(self, event: events.Event):
        if isinstance(event, events.Start) and self.context.client.alpn not in (b"h2",) \
                and not (self.context.client.alpn or b"").startswith(b"h3"):
            self.connections.setdefault(self.context.client, GuardedHttp1Server(self.context.fork(), guard=self.guard))
        yield from super()._handle_event(event)

    def event_to_child(self, child, event: events.Event):
        # A reset reaches a stream mitmproxy still tracks: one whose response is not done yet (even
        # when the reset came in the same read as its HEADERS, before the request hooks ran).
        if isinstance(event, RequestProtocolError) and isinstance(child, HttpStream) \
                and "reset by client" in event.message:
            self.guard.on_reset(self.context.client)
        yield from super().event_to_child(child, event)

    def make_stream(self, stream_id: int) -> layer.CommandGenerator[None]:
        if not self.guard.admit_stream(self.context.client):
            return  # HttpLayer.event_to_child drops the events of a stream it does not hold
        self.streams[stream_id] = GuardedHttpStream(self.context.fork(), stream_id, guard=self.guard)
        yield from self.event_to_child(self.streams[stream_id], events.Start())


class GuardedHttp1Server(Http1Server):
    def __init__(self, context: layer.Context, *, guard: Guard) -> None:
        super().__init__(context)
        self.guard = guard

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        from .protocols import PROTOCOL_REFUSED, classify

        limit = self.guard.limits().max_request_head_bytes
        # Later requests on a kept-alive connection: bytes that are not a request line are refused
        # like the first ones (protocols.Gate), not with mitmproxy's own unaudited 400 page.
        # The buffer holds at most one head here (bounded below), so peeking at it is cheap.
        if isinstance(event, events.DataReceived) and classify(bytes(self.buf), max_head=limit) == "refuse" \
                and len(self.buf) <= limit:
            yield from self._refuse(Refusal(400, PROTOCOL_REFUSED, "only HTTP/1.1 and HTTP/2 requests pass this proxy; "
                                                                   "other bytes are refused"))
            return
        yield from super().read_headers(event)
        if self.state == self.read_headers and len(self.buf) > limit:  # still no end of head
            yield from self._refuse(Refusal(431, HEAD_TOO_LARGE,
                                            f"the request head is larger than limits.max_request_head_bytes ({limit} bytes)"))

    def _refuse(self, refusal: Refusal) -> layer.CommandGenerator[None]:
        from .protocols import refusal_bytes

        rid = self.guard.report_connection(self.context, refusal.reason)
        self.buf.maybe_extract_at_most(len(self.buf))
        yield commands.SendData(self.conn, refusal_bytes(rid, refusal))
        yield commands.CloseConnection(self.conn)
        self.state = self.done


class GuardedHttpStream(HttpStream):
    def __init__(self, context: layer.Context, stream_id: int, *, guard: Guard) -> None:
        super().__init__(context, stream_id)
        self.guard = guard
        self._request_bytes = 0
        self._response_bytes = 0
        self._discarded = 0

    @expect(RequestHeaders)
    def state_wait_for_request_headers(self, event: RequestHeaders) -> layer.CommandGenerator[None]:
        if event.replay_flow is None:
            # mitmproxy makes the flow itself, after overwriting the target with the tunnel's
            # destination; make it here to keep the target the client actually wrote.
            event = dataclasses.replace(event, replay_flow=http.HTTPFlow(self.context.client, self.context.server))
        assert event.replay_flow is not None
        event.replay_flow.metadata[TARGET] = (event.request.scheme, event.request.authority)
        yield from super().state_wait_for_request_headers(event)
        if self.flow.response is not None and self.client_state == self.state_consume_request_body:
            # Refused on its head: answer now, and never buffer the body.
            self.client_state = self.state_discard_request_body
            self.flow.response.headers["Connection"] = "close"
            yield HttpResponseHeadersHook(self.flow)
            yield from self.send_response()

    @expect(RequestData, RequestTrailers, RequestEndOfMessage)
    def state_discard_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestData):
            self._discarded += len(event.data)
            if self._discarded > LINGER_BYTES:
                yield commands.CloseConnection(self.context.client)
                self.client_state = self.server_state = self.state_errored
        elif isinstance(event, RequestEndOfMessage):
            self.client_state = self.state_done
            if self.server_state == self.state_done:
                yield from self.flow_done()

    @expect(RequestData, RequestTrailers, RequestEndOfMessage)
    def state_consume_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestData) and self._over_body_limit(event):
            return (yield from self._refuse_body(streaming=False))
        yield from super().state_consume_request_body(event)

    @expect(RequestData, RequestTrailers, RequestEndOfMessage)
    def state_stream_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestData) and self._over_body_limit(event):
            return (yield from self._refuse_body(streaming=True))
        yield from super().state_stream_request_body(event)

    def _over_body_limit(self, event: RequestData) -> bool:
        self._request_bytes += len(event.data)
        return self._request_bytes > self.guard.limits().max_request_body_bytes

    def _refuse_body(self, *, streaming: bool) -> layer.CommandGenerator[None]:
        limit = self.guard.limits().max_request_body_bytes
        self.request_body_buf.clear()
        refusal = Refusal(413, BODY_TOO_LARGE, f"the request body is larger than limits.max_request_body_bytes ({limit} bytes)",
                          self.flow.metadata.get("secretless.rule"))
        if streaming:  # the head (and part of the body) went upstream: abort that request there
            yield SendHttp(RequestProtocolError(self.stream_id, "request body too large", ErrorCode.REQUEST_TOO_LARGE),
                           self.context.server)
        self.guard.on_refusal(self.flow, refusal)
        if self.server_state == self.state_wait_for_response_headers or not streaming:
            self.flow.response = error_response(self.flow.id, refusal)
            self.flow.response.headers["Connection"] = "close"
            self.client_state = self.state_discard_request_body
            self._discarded = 0
            yield HttpResponseHeadersHook(self.flow)
            yield from self.send_response()
            if streaming:
                self.server_state = self.state_errored  # swallow what the aborted upstream still sends
        else:
            yield commands.CloseConnection(self.context.client)
            self.client_state = self.server_state = self.state_errored

    @expect(ResponseData, ResponseTrailers, ResponseEndOfMessage)
    def state_consume_response_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, ResponseData):
            self._response_bytes += len(event.data)
            limit = self.flow.metadata.get(SCAN_LIMIT)
            if isinstance(limit, int) and self._response_bytes > limit:
                return (yield from self._withhold_response(limit))
        yield from super().state_consume_response_body(event)

    def _withhold_response(self, limit: int) -> layer.CommandGenerator[None]:
        self.response_body_buf.clear()
        yield SendHttp(RequestProtocolError(self.stream_id, "response withheld", ErrorCode.RESPONSE_TOO_LARGE),
                       self.context.server)
        refusal = Refusal(502, RESPONSE_TOO_LARGE,
                          f"the response is larger than limits.max_response_scan_bytes ({limit} bytes), the most "
                          "this rule checks for an echoed credential; it was withheld (see inject.echo_check)",
                          self.flow.metadata.get("secretless.rule"))
        self.guard.on_refusal(self.flow, refusal)
        self.flow.response = error_response(self.flow.id, refusal)
        yield from self.send_response()
        self.server_state = self.state_errored  # swallow what the aborted upstream still sends


__all__ = ["Guard", "GuardedHttpLayer", "SCAN_LIMIT", "TARGET"]
