"""mitmproxy's HTTP layer with the proxy's byte limits (issue 8 §2 and §3).

mitmproxy reads a request head of any size ("FIXME: protect against header size DoS" in its
HTTP/1 server), buffers a body even when the ``requestheaders`` hook has already answered the
request, buffers bodies without bound and forgets the scheme a client wrote in its request target.
These subclasses change exactly that, and nothing else:

- ``GuardedHttp1Server``: a request head over ``limits.max_request_head_bytes`` gets ``431
  head_too_large`` and the connection is closed; a body that cannot be read on (h11's body reader
  fails: a bad chunk size line, chunk data not followed by CRLF, a chunk extension, the connection
  closed before the declared length; or chunked trailer fields) is not closed unanswered, as
  mitmproxy does, nor answered with its HTML page: it stops reading and passes
  ``UnreadableRequestBody`` (edge/requestbody.py) to the stream, which answers it (below);
- ``GuardedHttpStream``:
  - records the request target as the client wrote it (``flow.metadata[TARGET]``), before
    mitmproxy replaces scheme/host/port with the tunnel's destination (edge/requesttarget.py checks it);
  - a request refused on its head is answered at once; its body is discarded unread into any
    buffer (and the connection closed after ``LINGER_BYTES``);
  - a request body over ``limits.max_request_body_bytes`` gets ``413 body_too_large``, buffered or
    streamed (a streamed one is aborted upstream);
  - an unreadable HTTP/1 body (``UnreadableRequestBody``) gets ``400 body_malformed`` (trailers:
    ``400 protocol_refused``) and the connection is closed. A body that failed while the request hooks
    ran never goes upstream (its credential is dropped through ``Guard.unsent``, not audited as used); a
    request already streaming is aborted upstream, and its credential was used (it went with the head);
  - a buffered response over ``flow.metadata[SCAN_LIMIT]`` (inject rules: the echo check needs the
    whole body) is withheld with ``502 response_too_large`` and the upstream stream is aborted;
  - a response whose ``Transfer-Encoding`` is anything but plain ``chunked`` (``gzip, chunked``: a
    coding the echo check would not decode and the client would) is withheld with ``502
    transfer_encoding_refused``, on every rule;
  - a response head over ``limits.max_response_head_bytes`` (cut by ``layerguard``) gets ``502
    response_head_too_large``.

- ``GuardedHttpLayer.get_connection`` / ``GuardedHttpStream.make_server_connection``: the
  connection a request is sent over is judged for that request (``destination.Destinations``): a
  new connection is tagged with the flow it is opened for, an open one is reused only if its peer
  passes the flow's own rule, and the connection given to the flow is checked once more before the
  request goes out. A failed upstream connection is answered with the error contract
  (``on_upstream_failure``), not mitmproxy's HTML page naming the resolved address.

The addon reports every refusal made here through ``on_refusal`` (audit, metric, log).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from collections.abc import Callable
from typing import Protocol

import h2.errors
from mitmproxy import http
from mitmproxy.connection import Client, ConnectionState, Server
from mitmproxy.net.http import url
from mitmproxy.net.http.validate import validate_headers
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import (
    DropStream,
    ErrorCode,
    GetHttpConnection,
    GetHttpConnectionCompleted,
    HttpLayer,
    HTTPMode,
    HttpStream,
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    RequestTrailers,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    ResponseTrailers,
    SendHttp,
    validate_request,
)
from mitmproxy.proxy.layers.http._base import HttpEvent, ReceiveHttp
from mitmproxy.proxy.layers.http._hooks import HttpResponseHeadersHook
from mitmproxy.proxy.layers.http._http1 import Http1Server, make_body_reader
from mitmproxy.proxy.layers.http._http2 import Http2Server
from mitmproxy.proxy.utils import expect

from secretless_proxy.config.model import LimitsConfig
from secretless_proxy.edge import layerguard, requesthead
from secretless_proxy.edge.requestbody import TRAILERS_REFUSED, BodyReader, BodyRefused, UnreadableRequestBody
from secretless_proxy.reasons import Reason
from secretless_proxy.refusal import Refusal, error_response

TARGET = "secretless.target"  # (scheme, authority) of the request target as the client wrote it
SCAN_LIMIT = "secretless.scan_limit"  # bytes of response body the echo check may buffer
LINGER_BYTES = 1024 * 1024  # body bytes of a refused request read (and dropped) before closing
CONNECTION_WINDOWS = 1  # scan windows one client connection may hold buffered at once, its HTTP/2 streams together
SENT = "secretless.sent"  # set once the request's head goes upstream: only then was a credential used


class Upstreams(Protocol):
    """Which upstream connection a flow may use (destination.Destinations)."""

    def opening(self, flow: http.HTTPFlow, server: Server) -> None: ...
    def reusable(self, flow: http.HTTPFlow, server: Server) -> bool: ...
    def send_refusal(self, flow: http.HTTPFlow, server: Server) -> Refusal | None: ...
    def opened_as(self, server: Server) -> tuple[str, int] | None: ...


@dataclasses.dataclass(frozen=True)
class Guard:
    """What the guarded layers need from the addon."""

    limits: Callable[[], LimitsConfig]
    on_refusal: Callable[[http.HTTPFlow, Refusal], None]  # audit + metric + log of a flow's refusal
    report_connection: Callable[[layer.Context, str], str]  # same for a refusal before any flow; returns an id
    upstreams: Upstreams | None = None
    # A failed upstream connection (mitmproxy's error text) → the refusal to answer with (audited, counted).
    on_upstream_failure: Callable[[http.HTTPFlow, str], Refusal] | None = None
    # The client reset a stream still in flight (HTTP/2 rapid reset): connlimits.ConnectionGuard counts it.
    on_reset: Callable[[Client], None] = lambda client: None
    # Whether the client may open one more stream (connlimits.ConnectionGuard.admit_stream): a stream
    # not admitted is dropped before mitmproxy makes a flow or runs a hook for it.
    admit_stream: Callable[[Client], bool] = lambda client: True
    # A request that will never go upstream although its head was decided (its body was unreadable):
    # its injected credential (or pending signature) is dropped, so it is not audited as used.
    unsent: Callable[[http.HTTPFlow], None] = lambda flow: None


class Buffered:
    """What the streams of one client connection hold: response bytes for the echo check
    (``SCAN_LIMIT``) and request body bytes queued while a hook runs."""

    __slots__ = ("total", "queued", "pending")

    def __init__(self) -> None:
        self.total = 0
        self.queued = 0  # request body bytes its streams queued while their hooks ran
        self.pending = 0  # PROCESS only: bytes written to clients they have not read (connlimits, every tick)


# Response bytes every stream of the process holds for the echo check: bounded by
# limits.max_response_scan_total_bytes (hostile review 5.11: 32 connections of one window each grew
# the proxy by 602 MiB; the per-connection bound times the connection caps is no bound).
PROCESS = Buffered()


def _release_process(box: list[int]) -> None:
    if box[0]:
        PROCESS.total -= box[0]
        box[0] = 0


class GuardedHttpLayer(HttpLayer):
    def __init__(self, context: layer.Context, mode, *, guard: Guard) -> None:
        super().__init__(context, mode)
        self.guard = guard
        self.buffered = Buffered()  # shared by this connection's streams (HTTP/2: many at once)

    # These two return mitmproxy's generator instead of delegating to it with ``yield from``: every
    # event and command of every stream passes here, and one more generator frame each was measurable.
    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start) and not (self.context.client.alpn or b"").startswith(b"h3"):
            server = GuardedHttp2Server if self.context.client.alpn == b"h2" else GuardedHttp1Server
            self.connections.setdefault(self.context.client, server(self.context.fork(), guard=self.guard))
        return super()._handle_event(event)

    def event_to_child(self, child, event: events.Event) -> layer.CommandGenerator[None]:
        # A reset reaches a stream mitmproxy still tracks: one whose response is not done yet (even
        # when the reset came in the same read as its HEADERS, before the request hooks ran).
        if isinstance(event, RequestProtocolError) and isinstance(child, HttpStream) \
                and "reset by client" in event.message:
            self.guard.on_reset(self.context.client)
        return super().event_to_child(child, event)

    def make_stream(self, stream_id: int) -> layer.CommandGenerator[None]:
        if not self.guard.admit_stream(self.context.client):
            return  # HttpLayer.event_to_child drops the events of a stream it does not hold
        self.streams[stream_id] = GuardedHttpStream(self.context.fork(), stream_id, guard=self.guard,
                                                    buffered=self.buffered)
        yield from self.event_to_child(self.streams[stream_id], events.Start())

    def get_connection(self, event: GetHttpConnection, *, reuse: bool = True) -> layer.CommandGenerator[None]:
        """mitmproxy's choice, except that a connection is reused only for a flow whose rule allows
        its peer, and a new one is tagged with its flow before ``server_connect`` runs."""
        upstreams = self.guard.upstreams
        flow = getattr(self.command_sources.get(event), "flow", None)
        if upstreams is None or not isinstance(flow, http.HTTPFlow):
            yield from super().get_connection(event, reuse=reuse)
            return
        if reuse:
            # mitmproxy's reuse, in its order, but only of a connection this flow's rule allows; one
            # still being opened counts under the name it was opened for (server_connect put an
            # address in its place until it is open).
            mine = next((c for c in self._reuse_candidates(event, upstreams) if upstreams.reusable(flow, c)), None)
            if mine is not None and mine in self.waiting_for_establishment:
                self.waiting_for_establishment[mine].append(event)
                return
            if mine is not None:
                stream = self.command_sources.pop(event)
                reply = (None, mine.error) if mine.error else (mine, None)
                yield from self.event_to_child(stream, GetHttpConnectionCompleted(event, reply))  # type: ignore[arg-type]
                return
        for command in super().get_connection(event, reuse=False):  # a new connection, for this flow
            if isinstance(command, commands.OpenConnection) and isinstance(command.connection, Server):
                upstreams.opening(flow, command.connection)
            yield command

    def _reuse_candidates(self, event: GetHttpConnection, upstreams: Upstreams) -> list[Server]:
        """The connections mitmproxy's get_connection would consider for ``event``, in its order."""
        out = []
        for c in self.connections:
            if not isinstance(c, Server) or c.tls != event.tls or c.via != event.via \
                    or c.transport_protocol != event.transport_protocol:
                continue
            if c.address != event.address and upstreams.opened_as(c) != event.address:
                continue
            if c in self.waiting_for_establishment or c.error or \
                    (c.connected and not (self.context.client.alpn == b"h2" and c.alpn != b"h2")):
                out.append(c)
        return out


class GuardedHttp2Server(Http2Server):
    """mitmproxy's HTTP/2 server side, plus: a protocol error of the client's is refused like any
    other bad request, audited and counted (hostile review 29). The h2 library refuses a malformed
    request (DATA that contradicts its content-length, a connection-specific header such as
    ``connection`` or ``transfer-encoding``) with a connection error, so there is no stream left to
    carry the JSON refusal: the GOAWAY's debug data names the problem and the request id of the
    audit record. The requests still open on the connection end there; one whose head had not
    gone upstream is not audited as a use of its credential (``SENT``)."""

    def __init__(self, context: layer.Context, *, guard: Guard) -> None:
        super().__init__(context)
        self.guard = guard

    def protocol_error(self, message: str, error_code: int = h2.errors.ErrorCodes.PROTOCOL_ERROR) -> layer.CommandGenerator[None]:
        rid = self.guard.report_connection(self.context, Reason.PROTOCOL_REFUSED)
        return super().protocol_error(f"{layerguard.clean_message(message)} (request id {rid})", error_code)

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, ResponseProtocolError) and event.code.http_status_code() is not None \
                and not self.is_closed(event.stream_id) and self.is_open_for_us(event.stream_id) \
                and not self.h2_conn.streams[event.stream_id].state_machine.headers_sent:
            return self._answer(event)
        return super()._handle_event(event)

    def _answer(self, event: ResponseProtocolError) -> layer.CommandGenerator[None]:
        """What mitmproxy would answer with its HTML error page, in the error contract (``unanswered``)."""
        refusal = unanswered(event)
        response = error_response(self.guard.report_connection(self.context, refusal.reason), refusal)
        yield from super()._handle_event(ResponseHeaders(event.stream_id, response, False))
        yield from super()._handle_event(ResponseData(event.stream_id, response.content or b""))
        yield from super()._handle_event(ResponseEndOfMessage(event.stream_id))


def upstream_failure(message: str) -> str:
    """A fixed description of mitmproxy's text about an upstream's failed response."""
    if message == layerguard.RESPONSE_TRAILERS:
        return "it sent HTTP/1.1 trailer fields, which this proxy does not relay"
    if message.startswith("Cannot parse HTTP response"):
        return "its status line or a header line does not parse"
    if message.startswith(("server closed connection", "unexpected server response")):
        return "it closed the connection before its response head was complete"
    if message.startswith("HTTP/2 connection closed"):
        return "it closed the HTTP/2 connection (GOAWAY)"
    if "reset" in message.lower():
        return "it reset the stream"
    return "a protocol error"


# What a stream that mitmproxy ends with an error of its own (ResponseProtocolError) is answered with
# when no layer of the proxy answered it first: mitmproxy's page is HTML, unaudited, and may name an
# address or quote bytes. The streams answer every known case themselves (GuardedHttpStream); this is
# the net under them, so no path left in mitmproxy can send its page.
_UNANSWERED = {
    400: (Reason.PROTOCOL_REFUSED, "the proxy could not handle this request"),
    413: (Reason.BODY_TOO_LARGE, "the request body is larger than this proxy accepts"),
}


def unanswered(event: ResponseProtocolError) -> Refusal:
    status = event.code.http_status_code() or 502
    reason, message = _UNANSWERED.get(status, (Reason.UPSTREAM_PROTOCOL_ERROR, "the request could not be completed"))
    return Refusal(status, reason, message)


class GuardedHttp1Server(Http1Server):
    def __init__(self, context: layer.Context, *, guard: Guard) -> None:
        super().__init__(context)
        self.guard = guard

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        from secretless_proxy.edge.protocols import classify

        limit = self.guard.limits().max_request_head_bytes
        # Later requests on a kept-alive connection: bytes that are not a request line are refused
        # like the first ones (protocols.Gate), not with mitmproxy's own unaudited 400 page.
        # The buffer holds at most one head here (bounded below), so peeking at it is cheap.
        if isinstance(event, events.DataReceived) and classify(bytes(self.buf), max_head=limit) == "refuse" \
                and len(self.buf) <= limit:
            yield from self._refuse(Refusal(400, Reason.PROTOCOL_REFUSED, "only HTTP/1.1 and HTTP/2 requests pass this proxy; "
                                                                   "other bytes are refused"))
            return
        if isinstance(event, events.DataReceived):
            # Empty lines before a request line are ignored (RFC 9112 §2.2); mitmproxy drops one
            # per event and then waits for more bytes, even when a whole head is buffered.
            while bytes(self.buf)[:1] == b"\n" or bytes(self.buf)[:2] == b"\r\n":
                self.buf.maybe_extract_lines()
        if isinstance(event, events.DataReceived) and (lines := requesthead.head_lines(bytes(self.buf))) is not None:
            # A complete head: control characters and what mitmproxy's parser would refuse with
            # its own HTML page are refused here, in the error contract (edge/requesthead.py).
            parsed = requesthead.parse_head(lines)
            if isinstance(parsed, Refusal):
                yield from self._refuse(parsed)
                return
            # Accepted: what mitmproxy's Http1Server.read_headers (12.2) does after its own parse
            # of the same lines, with the request parsed once here. The bytes taken from the buffer
            # must be exactly the head that was judged; if h11 ever split it otherwise, the rest
            # would be read as the body, so refuse rather than forward (fail closed).
            taken = self.buf.maybe_extract_lines()
            if taken is None or [bytes(x) for x in taken] != lines:
                yield from self._refuse(Refusal(400, Reason.PROTOCOL_REFUSED,
                                                "the request head could not be read consistently; it was not forwarded"))
                return
            self.request, size = parsed
            yield ReceiveHttp(RequestHeaders(self.stream_id, self.request, size == 0))
            self.body_reader = make_body_reader(size)
            self.state = self.read_body
            yield from self.state(event)
            return
        yield from super().read_headers(event)
        if self.state == self.read_headers and len(self.buf) > limit:  # still no end of head
            yield from self._refuse(Refusal(431, Reason.HEAD_TOO_LARGE,
                                            f"the request head is larger than limits.max_request_head_bytes ({limit} bytes)"))

    def read_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if not isinstance(self.body_reader, BodyReader):  # once per request
            self.body_reader = BodyReader(self.body_reader)
        try:
            yield from super().read_body(event)
        except BodyRefused as exc:
            yield from self._unreadable_body(exc)

    def _unreadable_body(self, exc: BodyRefused) -> layer.CommandGenerator[None]:
        # Nothing after a body that cannot be parsed is read: it is not a next request.
        self.buf.maybe_extract_at_most(len(self.buf))
        self.state = self.done
        if self.response is not None and self.response.status_code >= 200:  # not `100 Continue`
            # An answer has started on this connection (the request was refused on its head or over
            # the body limit, or the upstream answered early): it cannot be replaced. Closed, as
            # mitmproxy does; the stream already answered or relays what it has.
            yield commands.CloseConnection(self.conn)
            yield ReceiveHttp(RequestProtocolError(self.stream_id, exc.message, ErrorCode.GENERIC_CLIENT_ERROR))
            return
        # The request side is over; the stream answers and closes the connection (even after an EOF
        # the client may still read: a half-closed connection).
        self.request_done = True
        yield ReceiveHttp(UnreadableRequestBody(self.stream_id, exc.reason, exc.message))

    def send(self, event: HttpEvent) -> layer.CommandGenerator[None]:
        if isinstance(event, ResponseProtocolError) and not self.response and event.code.http_status_code() is not None \
                and self.conn.state & ConnectionState.CAN_WRITE:
            return self._refuse(unanswered(event))  # never mitmproxy's HTML page (see ``unanswered``)
        return super().send(event)

    def _refuse(self, refusal: Refusal) -> layer.CommandGenerator[None]:
        from secretless_proxy.edge.protocols import refusal_bytes

        rid = self.guard.report_connection(self.context, refusal.reason)
        self.buf.maybe_extract_at_most(len(self.buf))
        yield commands.SendData(self.conn, refusal_bytes(rid, refusal))
        yield commands.CloseConnection(self.conn)
        self.state = self.done


_RESPONSE_EVENTS = (ResponseHeaders, ResponseData, ResponseTrailers, ResponseEndOfMessage)


def _nothing() -> layer.CommandGenerator[None]:
    yield from ()


def _websocket_switch(request: http.Request, response: http.Response) -> bool:
    """Whether a 101 answers the WebSocket upgrade this request asked for, with no extension: the
    proxy offers none (``ownheaders.strip``), and a compressed frame inflated past the message bound
    before it was judged (hostile review 5.08)."""
    return request.headers.get("upgrade", "").strip().lower() == "websocket" \
        and response.headers.get("upgrade", "").strip().lower() == "websocket" \
        and "sec-websocket-extensions" not in response.headers


class GuardedHttpStream(HttpStream):
    # The state overrides that only look at an event before mitmproxy's handler return that
    # handler's generator (or the refusal's) instead of delegating with ``yield from``: one
    # generator frame less for every event of every request.
    def __init__(self, context: layer.Context, stream_id: int, *, guard: Guard, buffered: Buffered | None = None) -> None:
        super().__init__(context, stream_id)
        self.guard = guard
        self._buffered = buffered if buffered is not None else Buffered()
        self._held = 0  # this stream's part of self._buffered.total (and of PROCESS.total)
        self._held_box: list[int] = [0]  # the same, for the finalizer that returns it to PROCESS
        self._request_bytes = 0
        self._response_bytes = 0
        self._discarded = 0
        self._answered = False  # withheld while the request body was still streaming (_withhold)
        self._body_clock: commands.RequestWakeup | None = None
        self._spoiled = False  # the upstream sent more after its response (_after_the_response)
        self._queued = 0  # request body bytes queued while a hook runs (handle_event)
        self._body_seen = 0.0  # when the last request body bytes arrived (time.monotonic)

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        # While a request hook runs (the credential may take seconds), the stream is paused and
        # mitmproxy queues every body event that arrives: without a bound, a body sent meanwhile was
        # held whole in memory. Past the body limit the rest is dropped here: it is over the limit
        # already, which the queued part shows when the hook returns (start_request_stream: 413).
        # The streams of one HTTP/2 connection queue side by side (hostile review 5.06: 48 streams
        # queued 189 MiB): past twice the body limit for the whole connection, it is closed.
        paused = self._paused
        if paused is not None:
            if isinstance(event, RequestData):
                limit = self.guard.limits().max_request_body_bytes
                if self._queued > limit:
                    return _nothing()  # what is queued is over the limit already (the event that crossed it included)
                self._queued += len(event.data)
                self._buffered.queued += len(event.data)
                if self._buffered.queued > 2 * limit:
                    return self._close_for_queued(limit)
            elif self._queued and isinstance(event, events.CommandCompleted) and event.command is paused.command:
                self._buffered.queued -= self._queued  # the hook is done: the queue is read now
                self._queued = 0
        return super().handle_event(event)

    def _close_for_queued(self, limit: int) -> layer.CommandGenerator[None]:
        yield commands.Log(f"closed a client connection whose requests sent more than twice "
                           f"limits.max_request_body_bytes ({2 * limit} bytes) while their heads were decided",
                           logging.WARNING)
        yield commands.CloseConnection(self.context.client)

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, UnreadableRequestBody):
            return self._refuse_unreadable(event)
        if isinstance(event, events.Wakeup) and event.command is self._body_clock:
            return self._body_clock_rang()
        if self.server_state == self.state_done and isinstance(event, _RESPONSE_EVENTS):
            return self._after_the_response(event)
        return super()._handle_event(event)

    def _after_the_response(self, event: events.Event) -> layer.CommandGenerator[None]:
        """The upstream went on after a complete response (a stray CRLF, a second response, raw bytes),
        typically while the client's body was still streaming: mitmproxy's done state asserted and its
        layer crashed with a traceback per request (hostile review 4.02). Dropped: the client already
        has the whole response, and the upload it is still sending goes on to its end. That upstream
        connection is closed once the request is over, never reused: what it sent could be taken as
        the response to the next request."""
        self._spoiled = True
        if self.client_state in (self.state_done, self.state_errored) and self.context.server.connected:
            yield commands.CloseConnection(self.context.server)

    def flow_done(self) -> layer.CommandGenerator[None]:
        return self._done_and_closed() if self._spoiled else super().flow_done()

    def _done_and_closed(self) -> layer.CommandGenerator[None]:
        yield from super().flow_done()
        if self.context.server.connected:
            yield commands.CloseConnection(self.context.server)

    # -- the request body's deadline (hostile review 35) -----------------------------------------
    # A client that sends a head and then stalls inside its body held the connection, and on a
    # streamed request an upstream connection and stream too, until mitmproxy's 600 s tcp_timeout:
    # no connection deadline runs while a request is in flight. The body gets
    # limits.request_body_timeout between two reads; one wakeup at a time per request.

    def _start_body_clock(self) -> layer.CommandGenerator[None]:
        self._body_seen = time.monotonic()
        self._body_clock = commands.RequestWakeup(self.guard.limits().request_body_timeout)
        yield self._body_clock

    def _body_clock_rang(self) -> layer.CommandGenerator[None]:
        self._body_clock = None
        if self.client_state not in (self.state_consume_request_body, self.state_stream_request_body):
            return  # the body is in (or was refused): nothing to time
        timeout = self.guard.limits().request_body_timeout
        waited = time.monotonic() - self._body_seen
        if waited < timeout:
            self._body_clock = commands.RequestWakeup(timeout - waited)
            yield self._body_clock
            return
        refusal = Refusal(408, Reason.BODY_TIMEOUT, f"no request body bytes arrived for limits.request_body_timeout "
                          f"({timeout:g} s); the request was refused", self.flow.metadata.get("secretless.rule"))
        if self.client_state == self.state_consume_request_body:
            self.guard.unsent(self.flow)  # never sent: its credential was not used
            yield from self._refuse_body(streaming=False, refusal=refusal)
        else:
            yield from self._refuse_body(streaming=True, refusal=refusal, abort=ErrorCode.GENERIC_CLIENT_ERROR)
        if self.context.client.alpn == b"h2":
            # The answer is complete; the client's half of the stream is reset (RFC 9113 §8.1), the
            # connection and its other streams go on.
            yield SendHttp(ResponseProtocolError(self.stream_id, "request body timeout", ErrorCode.CANCEL),
                           self.context.client)
        else:
            yield commands.CloseConnection(self.context.client)  # the rest of this body is never read
        self.client_state = self.server_state = self.state_errored
        self.flow.live = False
        yield DropStream(self.stream_id)

    @expect(RequestHeaders)
    def state_wait_for_request_headers(self, event: RequestHeaders) -> layer.CommandGenerator[None]:
        if event.replay_flow is None:
            # mitmproxy makes the flow itself, after overwriting the target with the tunnel's
            # destination; make it here to keep the target the client actually wrote.
            event = dataclasses.replace(event, replay_flow=http.HTTPFlow(self.context.client, self.context.server))
        assert event.replay_flow is not None
        event.replay_flow.metadata[TARGET] = (event.request.scheme, event.request.authority)
        if (why := requesthead.framing(event.request, end_stream=event.end_stream)) is not None:
            event.replay_flow.metadata[requesthead.MALFORMED] = why  # refused by the addon on the head
        yield from super().state_wait_for_request_headers(event)
        if self.flow.response is not None and self.client_state == self.state_consume_request_body:
            # Refused on its head: answer now, and never buffer the body.
            self.client_state = self.state_discard_request_body
            self.flow.response.headers["Connection"] = "close"
            yield HttpResponseHeadersHook(self.flow)
            yield from self.send_response()
        elif not event.end_stream and self.client_state in (self.state_consume_request_body, self.state_stream_request_body):
            yield from self._start_body_clock()  # a body is owed

    def start_request_stream(self) -> layer.CommandGenerator[None]:
        # The body already failed while the request hooks ran (the event waits in the queue mitmproxy's
        # check_killed reads too), or the part of it that came with the head is already over the body
        # limit (hostile review 30: head and body in one write): nothing goes upstream, not even the
        # head with its credential. The body is consumed instead, so the queued events are refused as
        # for a buffered request, whose credential was never used.
        queued = self._paused_event_queue
        if any(isinstance(e, UnreadableRequestBody) for e in queued) or \
                sum(len(e.data) for e in queued if isinstance(e, RequestData)) > self.guard.limits().max_request_body_bytes:
            self.client_state = self.state_consume_request_body
            return
        yield from super().start_request_stream()

    def _refuse_unreadable(self, event: UnreadableRequestBody) -> layer.CommandGenerator[None]:
        """Answer a request whose HTTP/1 body cannot be read (``GuardedHttp1Server``), then close."""
        rule = self.flow.metadata.get("secretless.rule")
        refusal = Refusal(400, event.reason, event.message, rule)
        if self.client_state == self.state_consume_request_body:
            self.guard.unsent(self.flow)  # never sent: its credential was not used
            yield from self._refuse_body(streaming=False, refusal=refusal)
        elif self.client_state == self.state_stream_request_body:
            yield from self._refuse_body(streaming=True, refusal=refusal, abort=ErrorCode.GENERIC_CLIENT_ERROR)
        # Any other state was answered already (refused on its head, over the body limit, no upstream).
        # What follows on the connection is the rest of this body: it is closed, never read on.
        yield commands.CloseConnection(self.context.client)
        self.client_state = self.server_state = self.state_errored
        self.flow.live = False
        yield DropStream(self.stream_id)

    def make_server_connection(self) -> layer.CommandGenerator[bool]:
        """mitmproxy's, plus: a failed connection is answered with the error contract, and the
        connection the request will go over is judged for this request right before it is sent."""
        upstreams, on_failure = self.guard.upstreams, self.guard.on_upstream_failure
        if upstreams is None or on_failure is None:
            ok = yield from super().make_server_connection()
            if ok:
                self.flow.metadata[SENT] = True
            return ok
        connection, err = yield GetHttpConnection(
            (self.flow.request.host, self.flow.request.port),
            self.flow.request.scheme == "https",
            self.flow.server_conn.via,
            self.flow.server_conn.transport_protocol,
        )
        if err:
            refusal = on_failure(self.flow, err)  # logs mitmproxy's text; the answer never names the address
        else:
            assert isinstance(connection, Server)
            refusal = upstreams.send_refusal(self.flow, connection)
            if refusal is None:
                self.context.server = self.flow.server_conn = connection
                self.flow.metadata[SENT] = True  # mitmproxy's callers send the head next, at once
                return True
            self.guard.on_refusal(self.flow, refusal)
        streaming = self.client_state == self.state_wait_for_request_headers or self.flow.request.stream
        self.flow.response = error_response(self.flow.id, refusal)
        if streaming and self.context.client.alpn != b"h2":  # HTTP/2 has no Connection header; the stream ends
            self.flow.response.headers["Connection"] = "close"  # the body may still come: never read it
        yield from self.send_response()
        return False  # mitmproxy's callers stop here (a streamed body is then ignored)

    @expect(RequestData, RequestTrailers, RequestEndOfMessage)
    def state_discard_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestData):
            self._discarded += len(event.data)
            if self._discarded > LINGER_BYTES:
                yield commands.CloseConnection(self.context.client)
                self.client_state = self.server_state = self.state_errored
        elif isinstance(event, RequestEndOfMessage):
            self.client_state = self.state_done
            if self.server_state == self.state_done or self._answered:
                yield from self.flow_done()

    @expect(RequestData, RequestTrailers, RequestEndOfMessage)
    def state_consume_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        return self._judge_body_event(event, super().state_consume_request_body, streaming=False)

    @expect(RequestData, RequestTrailers, RequestEndOfMessage)
    def state_stream_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        return self._judge_body_event(event, super().state_stream_request_body, streaming=True)

    def _judge_body_event(self, event: events.Event, relay: Callable[[events.Event], layer.CommandGenerator[None]],
                          *, streaming: bool) -> layer.CommandGenerator[None]:
        """Refuse a body over the limit and request trailers; ``relay`` (mitmproxy's state) takes the rest."""
        if isinstance(event, RequestData):
            self._body_seen = time.monotonic()
            if self._over_body_limit(event):
                return self._refuse_body(streaming=streaming)
        if isinstance(event, RequestTrailers):
            return self._refuse_body(streaming=streaming, refusal=self._trailers_refusal())
        return relay(event)

    def _trailers_refusal(self) -> Refusal:
        # HTTP/2 request trailers: mitmproxy's HTTP/1.1 upstream client has no case for them and
        # crashed with a traceback after the request had gone out (hostile review 24). Refused like
        # HTTP/1 chunked trailers (``BodyReader``): never read, never relayed.
        return Refusal(400, Reason.PROTOCOL_REFUSED, TRAILERS_REFUSED, self.flow.metadata.get("secretless.rule"))

    def _over_body_limit(self, event: RequestData) -> bool:
        self._request_bytes += len(event.data)
        return self._request_bytes > self.guard.limits().max_request_body_bytes

    def _refuse_body(self, *, streaming: bool, refusal: Refusal | None = None,
                     abort: ErrorCode = ErrorCode.REQUEST_TOO_LARGE) -> layer.CommandGenerator[None]:
        """Refuse the request over its body (too large by default; ``refusal`` for another reason);
        a streamed one is aborted upstream with ``abort``."""
        if refusal is None:
            limit = self.guard.limits().max_request_body_bytes
            refusal = Refusal(413, Reason.BODY_TOO_LARGE, f"the request body is larger than limits.max_request_body_bytes "
                              f"({limit} bytes)", self.flow.metadata.get("secretless.rule"))
        self.request_body_buf.clear()
        self._release()  # any response buffered so far is dropped, not written
        if streaming:  # the head (and part of the body) went upstream: abort that request there
            yield SendHttp(RequestProtocolError(self.stream_id, "request body refused", abort), self.context.server)
        else:
            self.guard.unsent(self.flow)  # a buffered request never went upstream: its credential was not used
        self.guard.on_refusal(self.flow, refusal)
        # Answered while the client has none of the upstream's response (an inject rule's response is
        # buffered for the echo check until it is complete: withheld, never sent in part).
        if not streaming or self.server_state in (self.state_wait_for_response_headers, self.state_consume_response_body):
            self.response_body_buf.clear()
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

    @expect(ResponseHeaders)
    def state_wait_for_response_headers(self, event: ResponseHeaders) -> layer.CommandGenerator[None]:
        if event.response.status_code == 101 and not _websocket_switch(self.flow.request, event.response):
            # A switch the request did not ask for (Upgrade: h2c to a plain GET): mitmproxy relayed the
            # bare 101 and closed; the only upgrade this proxy relays is the WebSocket it judged
            # (hostile review 4.10). The upstream connection is closed: it speaks something else now.
            self.flow.response = event.response
            return self._withhold_and_close(Refusal(
                502, Reason.UPSTREAM_PROTOCOL_ERROR, "the upstream's response could not be read (it switched "
                "protocols without being asked: only a requested WebSocket upgrade, with no extension, is relayed); nothing of "
                "it was relayed", self.flow.metadata.get("secretless.rule")))
        codings = [c.strip().lower() for v in event.response.headers.get_all("transfer-encoding") for c in v.split(",")]
        if codings and codings != ["chunked"]:
            self.flow.response = event.response
            return self._withhold(Refusal(
                502, Reason.TRANSFER_ENCODING_REFUSED, "the upstream sent a Transfer-Encoding other than chunked, which this "
                "proxy does not relay", self.flow.metadata.get("secretless.rule")))
        return super().state_wait_for_response_headers(event)

    def handle_protocol_error(self, event: RequestProtocolError | ResponseProtocolError) -> layer.CommandGenerator[None]:
        self._release()
        # The upstream's response failed before the client got any of it (a head that does not parse,
        # trailers, a connection closed or reset before the response ended): answered in the error
        # contract, audited and counted, not with mitmproxy's HTML page (hostile review 32). Once part
        # of the response went to the client, the client connection (or HTTP/2 stream) is cut, as in mitmproxy.
        if isinstance(event, ResponseProtocolError) and self.client_state != self.state_errored \
                and self.server_state in (self.state_wait_for_response_headers, self.state_consume_response_body) \
                and event.code is not ErrorCode.CONNECT_FAILED and event.code.http_status_code() is not None:
            return self._withhold(self._upstream_error(event), abort_upstream=False)  # that connection is closed
        return super().handle_protocol_error(event)

    def _upstream_error(self, event: ResponseProtocolError) -> Refusal:
        rule = self.flow.metadata.get("secretless.rule")
        if event.message == layerguard.RESPONSE_HEAD_TOO_LARGE:
            limit = self.guard.limits().max_response_head_bytes
            return Refusal(502, Reason.RESPONSE_HEAD_TOO_LARGE, f"the upstream's response head is larger than "
                           f"limits.max_response_head_bytes ({limit} bytes)", rule)
        # What failed, in words of ours: never mitmproxy's text, which can carry the upstream's own
        # bytes (an HTTP/2 GOAWAY's debug data, hex-encoded: hostile review 4.04).
        return Refusal(502, Reason.UPSTREAM_PROTOCOL_ERROR, f"the upstream's response could not be read "
                       f"({upstream_failure(event.message)}); nothing of it was relayed", rule)

    def _destination_unknown(self) -> bool:
        """mitmproxy's test for a request it cannot route (origin form to the proxy, no usable Host)."""
        if self.mode is HTTPMode.transparent or self.flow.request.host:
            return False
        try:
            url.parse_authority(self.flow.request.host_header or "", check=True)
        except ValueError:
            return True
        return False

    def check_invalid(self, request: bool) -> layer.CommandGenerator[bool]:
        """mitmproxy's check of a request head, answered in the error contract (hostile review 33): a
        CONNECT inside a tunnel, a request target whose scheme is not http(s), framing headers its
        smuggling check refuses; and a request with no destination at all (origin form sent to the proxy
        without a Host header), which mitmproxy refuses a step later. mitmproxy answered each with its
        HTML page, unaudited, naming its own options."""
        if not request:  # the upstream's response head: withheld in the error contract, audited
            if not self.context.options.validate_inbound_headers:
                return False
            try:
                validate_headers(self.flow.response)  # type: ignore[arg-type]
            except ValueError:
                yield commands.CloseConnection(self.flow.server_conn)  # never read on: framing unknown
                yield from self._withhold(Refusal(
                    502, Reason.UPSTREAM_PROTOCOL_ERROR, "the upstream's response could not be read (its framing "
                    "headers conflict or do not parse, e.g. Content-Length with Transfer-Encoding); nothing of it "
                    "was relayed", self.flow.metadata.get("secretless.rule")), abort_upstream=False)
                return True
            return False
        err = validate_request(self.mode, self.flow.request, self.context.options.validate_inbound_headers)
        if err is None and not self._destination_unknown():
            return False
        if err is None:
            refusal = Refusal(400, Reason.PROTOCOL_REFUSED, "the request names no destination (no Host header); "
                              "send it through a CONNECT tunnel or in absolute form")
        elif self.flow.request.method == "CONNECT":
            refusal = Refusal(400, Reason.PROTOCOL_REFUSED, "CONNECT inside a tunnel is not supported; "
                              "open one tunnel per destination")
        elif self.flow.request.scheme not in ("http", "https", ""):
            refusal = Refusal(400, Reason.PROTOCOL_REFUSED, "the request target's scheme is not http or https")
        else:
            refusal = Refusal(400, Reason.HEADER_INVALID, "the request's framing headers are invalid "
                              "(refused: a request that could be read two ways is never forwarded)")
        self.guard.on_refusal(self.flow, refusal)
        self.flow.response = error_response(self.flow.id, refusal)
        if self.context.client.alpn != b"h2":  # HTTP/2 has no Connection header; the stream ends
            self.flow.response.headers["Connection"] = "close"  # nothing after it is read
        self.client_state = self.state_discard_request_body  # its end of message (or body) still comes: dropped
        self.server_state = self.state_wait_for_response_headers
        yield HttpResponseHeadersHook(self.flow)
        yield from self.send_response()
        return True

    @expect(ResponseData, ResponseTrailers, ResponseEndOfMessage)
    def state_consume_response_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, ResponseData):
            self._response_bytes += len(event.data)
            limit = self.flow.metadata.get(SCAN_LIMIT)
            if isinstance(limit, int):
                if self._response_bytes > limit:
                    return self._withhold_response(limit)
                # The scan window bounds one response; HTTP/2 streams buffer side by side, so one
                # connection holds at most one window in all, as an HTTP/1.1 one does (hostile review 4.14: 40 streams of
                # 12 MiB grew the proxy by 190 MiB and on).
                n = len(event.data)
                if not self._held:
                    # Released when the stream goes, whatever path it takes: a count the process never
                    # got back would refuse every inject-rule response in the end.
                    self._held_box = box = [0]
                    weakref.finalize(self, _release_process, box)
                self._held += n
                self._held_box[0] += n
                self._buffered.total += n
                PROCESS.total += n
                if self._buffered.total > CONNECTION_WINDOWS * limit:
                    return self._withhold_over_budget(
                        f"the responses this connection receives at once are together larger than "
                        f"limits.max_response_scan_bytes ({CONNECTION_WINDOWS * limit} bytes), the most one "
                        "connection may have checked for an echoed credential at a time; this one was withheld "
                        "(send fewer at once)")
                total = self.guard.limits().max_response_scan_total_bytes
                if PROCESS.total + PROCESS.pending > total:
                    return self._withhold_over_budget(
                        f"the responses this proxy is checking for echoed credentials at once are together larger "
                        f"than limits.max_response_scan_total_bytes ({total} bytes); this one was withheld")
        return super().state_consume_response_body(event)

    def _release(self, *, sent: bool = False) -> None:
        if self._held:
            if sent:  # written to the client now: it waits there until the client reads it (next tick measures)
                PROCESS.pending += self._held
            self._buffered.total -= self._held
            self._held = 0
            _release_process(self._held_box)

    def _withhold_over_budget(self, message: str) -> layer.CommandGenerator[None]:
        return self._withhold(Refusal(502, Reason.RESPONSE_TOO_LARGE, message, self.flow.metadata.get("secretless.rule")))

    def send_response(self, already_streamed: bool = False) -> layer.CommandGenerator[None]:
        self._release(sent=True)  # the buffered body is the client's now (a withheld one was released before)
        return super().send_response(already_streamed)

    def _withhold_response(self, limit: int) -> layer.CommandGenerator[None]:
        yield from self._withhold(Refusal(
            502, Reason.RESPONSE_TOO_LARGE, f"the response is larger than limits.max_response_scan_bytes ({limit} bytes), the "
            "most this rule checks for an echoed credential; it was withheld (see inject.echo_check)",
            self.flow.metadata.get("secretless.rule")))

    def _withhold_and_close(self, refusal: Refusal) -> layer.CommandGenerator[None]:
        yield commands.CloseConnection(self.context.server)
        yield from self._withhold(refusal, abort_upstream=False)

    def _withhold(self, refusal: Refusal, *, abort_upstream: bool = True) -> layer.CommandGenerator[None]:
        """Answer the client with ``refusal`` instead of the upstream's response, of which it gets nothing."""
        self._release()  # what was buffered of it is dropped, not written: it counts as nothing sent
        self.response_body_buf.clear()
        if abort_upstream:
            yield SendHttp(RequestProtocolError(self.stream_id, "response withheld", ErrorCode.RESPONSE_TOO_LARGE),
                           self.context.server)
        self.guard.on_refusal(self.flow, refusal)
        self.flow.response = error_response(self.flow.id, refusal)
        if self.client_state == self.state_stream_request_body:  # the upstream ended before the request did
            if self.context.client.alpn != b"h2":
                self.flow.response.headers["Connection"] = "close"
            self.client_state = self.state_discard_request_body  # the rest of the body goes nowhere
            self._discarded = 0
            self._answered = True
        yield from self.send_response()
        self.server_state = self.state_errored  # swallow what the aborted upstream still sends


__all__ = ["Guard", "GuardedHttpLayer", "SCAN_LIMIT", "TARGET"]
