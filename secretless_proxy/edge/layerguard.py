"""Gaps in mitmproxy 12.2's HTTP/1 and WebSocket layers that reach the workload, closed at their source.

1. **Trailers.** ``Http1Connection.read_body`` raises ``NotImplementedError("HTTP trailers are
   not implemented yet.")`` when a chunked message ends with trailer fields (mitmproxy
   ``proxy/layers/http/_http1.py``, unchanged up to its main branch). The exception escapes the
   layer, mitmproxy logs "mitmproxy has crashed!" with a traceback, and the stream is left with
   no event: the client waits until its own timeout (600 s in the reported case). Here a response
   with trailers ends its stream with a protocol error instead (a 502 for the client) and the
   upstream connection is closed. Request trailers are refused before mitmproxy's reader sees them,
   in the error contract, by ``httplayers.GuardedHttp1Server`` (every HTTP/1 client connection of
   the proxy); an unguarded server would only be closed, never answered with mitmproxy's HTML page.
   The trailer fields are never read, so never relayed.
2. **Parse errors quote the peer's bytes.** "Cannot parse HTTP response: Bad HTTP response line:
   b'HTTP/1.1 200 echo Bearer sk_…'" is sent to the client in mitmproxy's error page and kept in
   ``flow.error`` (which the addon logs): an upstream could echo a credential through a
   malformed status or header line. Protocol-error and log messages from this layer are cut
   before the first quoted value.

3. **WebSocket control frames.** Pings and close frames are relayed without any hook (only data
   messages reach ``websocket_message``), so a server could echo a credential in a ping payload
   or a close reason (up to 123 bytes) and mitmproxy logs ping payloads. Toward the client, ping
   payloads and close reasons are emptied, and a pong keeps its payload only when it answers a
   ping the client itself sent on that connection (keep-alive libraries match them).
4. **Response heads.** ``Http1Client.read_headers`` buffers an upstream's status line and headers
   without bound (150 MiB of header lines were accepted). A head still unfinished past
   ``response_head_limit()`` bytes ends the stream with ``RESPONSE_HEAD_TOO_LARGE`` and the upstream
   connection is closed; ``httplayers.GuardedHttpStream`` answers the client with ``502
   response_head_too_large``. (HTTP/2 upstream heads are bounded by h2's header list limit, 64 KiB.)

4. **Killing a WebSocket.** ``WebsocketLayer.relay_messages`` never looks at ``flow.kill()``
   after the ``websocket_message`` hook: a killed WebSocket goes on relaying. Here a flow killed
   in that hook gets the message dropped, a close frame (1008, policy violation) on both sides
   and both connections closed (edge/wsjudge.py kills a WebSocket whose trust or rule is gone).

5. **Hook arguments** (speed, not safety). ``Hook.args`` calls ``dataclasses.fields`` for every
   addon a hook reaches, on every hook of every request (2.7 % of the proxy's CPU in a py-spy
   profile of bench case (c)). The field names of each hook class are looked up once instead;
   the arguments are the same list.

6. **Message type checks** (speed, not safety). ``MessageData.__post_init__`` (debug builds, i.e.
   always but under ``python -O``) checks every field of every request and response with
   ``typecheck.check_option_type``, which formats its TypeError message before it knows whether
   the check fails: 6.5 % of the proxy's CPU in a profile of bench case (c). Each dataclass's
   fields are compiled once into ``isinstance`` checks (plain classes, ``X | None``); a value that
   fails one, or a field of another shape, goes to mitmproxy's own check, which raises the same
   TypeError as before.

7. **Request framing toward an HTTP/1.1 upstream.** ``Http1Client.send`` turns an HTTP/2 (or
   HTTP/3) request head into HTTP/1.1 as it is, and writes the DATA bytes raw after it. An HTTP/2
   request needs no ``content-length``, so a head without one went out with no framing at all: the
   upstream read an empty body and parsed the DATA as further requests that no rule had judged
   (``DELETE /admin`` behind an allowed ``POST /v1/x``: hostile review 28). A request with a body
   and no ``content-length`` is framed here: ``Content-Length`` when its whole body is already
   buffered (an upstream such as S3 refuses chunked uploads), ``Transfer-Encoding: chunked``
   when it is streamed.

8. **Interim responses.** ``Http1Client.read_headers`` takes the first head an upstream sends as its
   response: a ``103 Early Hints`` (or an unsolicited ``100 Continue``) became the client's answer,
   the final response was dropped as unexpected data and the client waited until it gave up (hostile
   review 4.03). Interim 1xx heads (not ``101 Switching Protocols``) are dropped whole before
   mitmproxy's reader sees them; the client gets the final response. RFC 9110 §15.2 asks a proxy
   to forward them; this one does not, so their headers are never a place an echo can hide.

9. **WebSocket messages.** mitmproxy assembles a fragmented message in ``frame_buf`` without bound
   (and keeps every message of the connection in ``flow.websocket.messages``: the addon trims that
   list to the message being judged). A message whose fragments pass ``websocket_limit`` (a
   client's: ``limits.max_request_body_bytes``; an upstream's: ``limits.max_response_scan_bytes``)
   closes both sides with ``1009`` (message too big); nothing more of it is buffered or relayed
   (hostile review 4.13).

``install()`` wraps these methods once per process; they are pinned to mitmproxy 12.2
(``pyproject.toml``), and ``tests/test_redaction.py`` fails if the wrapped code changes shape.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import time
import types
import typing
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

import wsproto.connection
import wsproto.events
from mitmproxy import hooks
from mitmproxy import http as mhttp
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import websocket
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import ErrorCode, RequestHeaders, RequestProtocolError, ResponseProtocolError
from mitmproxy.utils import typecheck

__all__ = ["RESPONSE_HEAD_TOO_LARGE", "RESPONSE_TRAILERS", "REQUEST_TRAILERS", "clean_message", "install"]

RESPONSE_TRAILERS = "the upstream sent HTTP/1.1 trailer fields, which this proxy does not relay"
REQUEST_TRAILERS = "HTTP/1.1 request trailer fields are not supported by this proxy"
RESPONSE_HEAD_TOO_LARGE = "the upstream's response head is larger than limits.max_response_head_bytes"
_DEFAULT_HEAD_LIMIT = 64 * 1024
_BLANK_LINE = re.compile(rb"\n\r?\n")  # the end of a head, as h11's ReceiveBuffer finds it
_head_limit: Callable[[], int] = lambda: _DEFAULT_HEAD_LIMIT  # noqa: E731 - replaced by install()
_ws_limit: Callable[[bool], int] = lambda from_client: 16 * 1024 * 1024  # noqa: E731 - replaced by install()
_QUOTED = re.compile(r"""(?::\s*)?b?['"].*""", re.S)
_installed = False


_PEER_DATA = re.compile(r"additional_data:[^,>\s]*")  # an HTTP/2 GOAWAY's debug data, as h2 prints it (hex)


def clean_message(message: str) -> str:
    """``message`` cut before its first quoted value (the peer's bytes), e.g. ``b'...'``, and without
    an HTTP/2 GOAWAY's debug data, which h2's repr prints unquoted in hex (hostile review 4.04)."""
    return _PEER_DATA.sub("additional_data:(withheld)", _QUOTED.sub("", message)) or "protocol error"


def install(response_head_limit: Callable[[], int] | None = None,
            websocket_limit: Callable[[bool], int] | None = None) -> None:
    """Wrap mitmproxy's HTTP/1 body and response-head readers (idempotent); ``response_head_limit``
    gives the current bound on an upstream's response head, ``websocket_limit(from_client)`` the
    bound on one WebSocket message (the proxy has one config per process)."""
    global _installed, _head_limit, _ws_limit
    if response_head_limit is not None:
        _head_limit = response_head_limit
    if websocket_limit is not None:
        _ws_limit = websocket_limit
    if _installed:
        return
    _http1.Http1Connection.read_body = _guarded(_http1.Http1Connection.read_body)  # type: ignore[method-assign]
    _http1.Http1Client.read_headers = _bounded_head(_without_interim(_guarded(_http1.Http1Client.read_headers)))  # type: ignore[method-assign]
    _http1.Http1Client.send = _framed_requests(_http1.Http1Client.send)  # type: ignore[method-assign]
    websocket.WebsocketLayer.relay_messages = _bounded_messages(_guarded(websocket.WebsocketLayer.relay_messages, trailers=False, ends=_killed_ending))  # type: ignore[method-assign]
    websocket.WebsocketConnection.events = _recording_client_pings(websocket.WebsocketConnection.events)  # type: ignore[method-assign]
    websocket.WebsocketLayer.handle_event = _bounded_backlog(websocket.WebsocketLayer.handle_event)  # type: ignore[method-assign]
    websocket.WebsocketConnection.send2 = _control_frames_scrubbed(websocket.WebsocketConnection.send2)  # type: ignore[method-assign]
    hooks.Hook.args = _hook_args  # type: ignore[method-assign]
    if hasattr(mhttp.MessageData, "__post_init__"):  # absent under python -O: nothing to speed up
        mhttp.MessageData.__post_init__ = _checked_fields  # type: ignore[method-assign]
    _installed = True


_FIELD_CHECKS: dict[type, tuple[tuple[str, Any, tuple[type, ...] | None, bool], ...]] = {}


def _compile(cls: type) -> tuple[tuple[str, Any, tuple[type, ...] | None, bool], ...]:
    """(name, declared type, classes an isinstance check accepts or None, None allowed) per field."""
    out = []
    for f in dataclasses.fields(cls):
        t = f.type
        parts = typing.get_args(t) if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union else (t,)
        classes = tuple(p for p in parts if p is not type(None))
        plain = all(isinstance(p, type) and not typing.get_args(p) for p in classes)
        if float in classes:
            classes += (int,)  # check_option_type accepts an int (and so a bool) for a float
        out.append((f.name, t, classes if plain and classes else None, type(None) in parts))
    return tuple(out)


def _checked_fields(self: Any) -> None:
    """``MessageData.__post_init__``: the same checks, compiled per dataclass (see 6. above)."""
    checks = _FIELD_CHECKS.get(type(self))
    if checks is None:
        checks = _FIELD_CHECKS[type(self)] = _compile(type(self))
    for name, declared, classes, optional in checks:
        value = getattr(self, name)
        if classes is not None and (isinstance(value, classes) or (optional and value is None)):
            continue
        typecheck.check_option_type(name, value, declared)  # raises mitmproxy's TypeError, or passes


_HOOK_FIELDS: dict[type, tuple[str, ...]] = {}


def _hook_args(self: hooks.Hook) -> list[Any]:
    """``Hook.args`` with each hook class's field names looked up once (they never change)."""
    names = _HOOK_FIELDS.get(type(self))
    if names is None:
        names = _HOOK_FIELDS[type(self)] = tuple(f.name for f in dataclasses.fields(self))  # type: ignore[arg-type]
    return [getattr(self, name) for name in names]


_Ending = Callable[[Any, Any], Generator[Any, Any, None] | None]


def _guarded(method: Callable[..., Generator[Any, Any, Any]], *, trailers: bool = True,
             ends: _Ending | None = None) -> Callable[..., Generator[Any, Any, Any]]:
    """``method``'s commands with their messages cleaned, and a trailers error answered when ``trailers``.

    ``ends(self, cmd)``, asked once each command has been answered, may return the commands that
    end the layer instead: then ``method``'s generator is closed and those go out (uncleaned, as
    they are ours).
    """
    @functools.wraps(method)
    def wrapper(self: Any, event: Any) -> Generator[Any, Any, Any]:
        gen = method(self, event)
        sent: Any = None
        while True:
            try:
                cmd = gen.send(sent)
            except StopIteration as stop:
                return stop.value
            except NotImplementedError:  # trailers: the only NotImplementedError in these readers
                if not trailers:
                    raise
                yield from _end_with_trailers(self)
                return None
            sent = yield _clean(cmd)
            if ends is not None and (ending := ends(self, cmd)) is not None:
                gen.close()
                yield from ending
                return None

    wrapper.__secretless_guard__ = True  # type: ignore[attr-defined]
    return wrapper


def _bounded_head(method: Callable[..., Generator[Any, Any, Any]]) -> Callable[..., Generator[Any, Any, Any]]:
    @functools.wraps(method)
    def wrapper(self: _http1.Http1Client, event: Any) -> Generator[Any, Any, Any]:
        # The buffer already holds this event's bytes: the head is what precedes the first blank
        # line (as h11 finds it), or all of it while there is none. The buffer is at most one read
        # past the bound, so searching it is cheap.
        if isinstance(event, events.DataReceived) and self.request is not None and self.stream_id is not None:
            end = _BLANK_LINE.search(bytes(self.buf))
            if (end.end() if end else len(self.buf)) > _head_limit():
                self.buf.maybe_extract_at_most(len(self.buf))
                self.state = self.done
                yield commands.CloseConnection(self.conn)
                yield ReceiveHttp(ResponseProtocolError(self.stream_id, RESPONSE_HEAD_TOO_LARGE,
                                                        ErrorCode.GENERIC_SERVER_ERROR))
                return None
        return (yield from method(self, event))

    wrapper.__secretless_guard__ = True  # type: ignore[attr-defined]
    return wrapper


_INTERIM = re.compile(rb"HTTP/1\.[01] 1(?!01)\d\d[ \r\n]")  # 1xx but 101 Switching Protocols


def _without_interim(method: Callable[..., Generator[Any, Any, Any]]) -> Callable[..., Generator[Any, Any, Any]]:
    @functools.wraps(method)
    def wrapper(self: _http1.Http1Client, event: Any) -> Generator[Any, Any, Any]:
        # Interim responses (103 Early Hints, an unsolicited 100 Continue) are dropped whole, before
        # mitmproxy's reader takes the first head it finds for the final response (point 8).
        if isinstance(event, events.DataReceived) and self.request is not None:
            while _INTERIM.match(head := bytes(self.buf)) and (end := _BLANK_LINE.search(head)):
                self.buf.maybe_extract_at_most(end.end())
            if not self.buf or _INTERIM.match(bytes(self.buf)):
                return None  # nothing after them yet, or the rest of an interim head is still to come
        return (yield from method(self, event))

    wrapper.__secretless_guard__ = True  # type: ignore[attr-defined]
    return wrapper


def _framed_requests(send: Callable[..., Generator[Any, Any, Any]]) -> Callable[..., Generator[Any, Any, Any]]:
    @functools.wraps(send)
    def wrapper(self: _http1.Http1Client, event: Any) -> Generator[Any, Any, Any]:
        if isinstance(event, RequestHeaders) and not event.end_stream:
            request = event.request
            # HTTP/1 requests keep the framing they were read with (Content-Length or chunked, or
            # no body); the check is for the ones converted from HTTP/2 or HTTP/3 (point 7).
            if (request.is_http2 or request.is_http3) and "content-length" not in request.headers:
                if request.raw_content is not None:  # buffered: the whole body is what follows
                    request.headers["content-length"] = str(len(request.raw_content))
                else:
                    request.headers["transfer-encoding"] = "chunked"
        return send(self, event)

    wrapper.__secretless_guard__ = True  # type: ignore[attr-defined]
    return wrapper


def _end_with_trailers(conn: _http1.Http1Connection) -> Generator[Any, Any, None]:
    conn.state = conn.done
    if isinstance(conn, _http1.Http1Server):
        # Not reached behind httplayers.GuardedHttp1Server, which answers request trailers in the
        # error contract (JSON, request id, audited) before mitmproxy's reader raises. mitmproxy's
        # own HTML page (no request id, not audited) is never the answer.
        yield commands.CloseConnection(conn.conn)
        yield ReceiveHttp(RequestProtocolError(conn.stream_id, REQUEST_TRAILERS, ErrorCode.GENERIC_CLIENT_ERROR))
    else:
        yield commands.CloseConnection(conn.conn)
        yield ReceiveHttp(ResponseProtocolError(conn.stream_id, RESPONSE_TRAILERS, ErrorCode.GENERIC_SERVER_ERROR))


def _clean(cmd: Any) -> Any:
    if isinstance(cmd, ReceiveHttp) and isinstance(cmd.event, (RequestProtocolError, ResponseProtocolError)):
        cmd.event.message = clean_message(cmd.event.message)
    elif isinstance(cmd, commands.Log):
        cmd.message = clean_message(cmd.message)
    return cmd


# -- WebSocket control frames --------------------------------------------------------------------

_PINGS_KEPT = 16  # client pings remembered per connection, for their pongs


def _recording_client_pings(events: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(events)
    def wrapper(self: websocket.WebsocketConnection) -> Any:
        for event in events(self):
            if not self.client and isinstance(event, wsproto.events.Ping):  # a ping from the workload
                self.__dict__.setdefault("_secretless_pings", deque(maxlen=_PINGS_KEPT)).append(bytes(event.payload))
            elif isinstance(event, wsproto.events.Message) and _over_message_limit(self, event):
                self.__dict__["_secretless_too_big"] = True  # relay_messages closes both sides (point 9)
                return
            yield event

    wrapper.__secretless_guard__ = True  # type: ignore[attr-defined]
    return wrapper


def _control_frames_scrubbed(send2: Callable[..., commands.SendData]) -> Callable[..., commands.SendData]:
    @functools.wraps(send2)
    def wrapper(self: websocket.WebsocketConnection, event: wsproto.events.Event) -> commands.SendData:
        if not self.client:  # this side talks to the workload
            if isinstance(event, wsproto.events.Ping) and event.payload:
                event = wsproto.events.Ping(payload=b"")
            elif isinstance(event, wsproto.events.Pong) and event.payload:
                pings = self.__dict__.get("_secretless_pings", ())
                if bytes(event.payload) in pings:
                    pings.remove(bytes(event.payload))
                else:
                    event = wsproto.events.Pong(payload=b"")
            elif isinstance(event, wsproto.events.CloseConnection) and event.reason:
                event = wsproto.events.CloseConnection(code=event.code, reason=None)
        return send2(self, event)

    wrapper.__secretless_guard__ = True  # type: ignore[attr-defined]
    return wrapper


def _over_message_limit(conn: websocket.WebsocketConnection, event: wsproto.events.Message) -> bool:
    """Whether the message under way, with this fragment, passes the bound of the side it comes from:
    the client's is a request body's, the upstream's the scan window's. A running count per
    connection (reset when a message ends): summing ``frame_buf`` at each fragment was quadratic, and
    60,000 one-byte fragments held the event loop 40 s (hostile review 5.07)."""
    data = event.data
    size = conn.__dict__.get("_secretless_size", 0) + (len(data.encode()) if isinstance(data, str) else len(data))
    conn.__dict__["_secretless_size"] = 0 if event.message_finished else size
    return size > _ws_limit(not conn.client)


MESSAGE_TOO_BIG = 1009  # RFC 6455 §7.4.1


def _bounded_messages(relay: Callable[..., Generator[Any, Any, Any]]) -> Callable[..., Generator[Any, Any, Any]]:
    @functools.wraps(relay)
    def wrapper(self: websocket.WebsocketLayer, event: Any) -> Generator[Any, Any, Any]:
        yield from relay(self, event)
        if self._handle_event != self.done and any(  # type: ignore[comparison-overlap]
                ws.__dict__.get("_secretless_too_big") for ws in (self.client_ws, self.server_ws)):
            side = "client" if self.client_ws.__dict__.get("_secretless_too_big") else "upstream"
            yield commands.Log(f"a WebSocket message from the {side} is over its size bound: both sides closed (1009)",
                               logging.WARNING)
            yield from _close_both(self, MESSAGE_TOO_BIG)

    wrapper.__secretless_guard__ = True  # type: ignore[attr-defined]
    return wrapper


def _bounded_backlog(handle_event: Callable[..., Generator[Any, Any, Any]]) -> Callable[..., Generator[Any, Any, Any]]:
    """While a ``websocket_message`` hook runs the layer is paused, and mitmproxy goes on reading: what
    the peers send meanwhile waits in ``_paused_event_queue`` without bound (a client writing 1 KiB
    messages faster than each is judged grew the proxy by what it sent). Past the larger of the two
    message bounds, both sides are closed (1009) and nothing queued is relayed."""
    @functools.wraps(handle_event)
    def wrapper(self: websocket.WebsocketLayer, event: Any) -> Generator[Any, Any, Any]:
        if self.__dict__.get("_secretless_closed"):
            return None  # closed below: the hook's reply and anything else still in flight are dropped
        if self._paused is not None and isinstance(event, events.DataReceived):
            queued = self.__dict__.get("_secretless_queued", 0) + len(event.data)
            self.__dict__["_secretless_queued"] = queued
            if queued > max(_ws_limit(True), _ws_limit(False)) and self._handle_event != self.done:  # type: ignore[comparison-overlap]
                self._paused_event_queue.clear()
                self.__dict__["_secretless_closed"] = True
                yield commands.Log("a WebSocket peer sent more than the message bound while a message was judged: "
                                   "both sides closed (1009)", logging.WARNING)
                yield from _close_both(self, MESSAGE_TOO_BIG)
                return None
        elif self._paused is None:
            self.__dict__["_secretless_queued"] = 0
        return (yield from handle_event(self, event))

    wrapper.__secretless_guard__ = True  # type: ignore[attr-defined]
    return wrapper


# -- killed WebSocket flows ----------------------------------------------------------------------

POLICY_VIOLATION = 1008  # RFC 6455 §7.4.1


def _killed_ending(layer: websocket.WebsocketLayer, cmd: Any) -> Generator[Any, Any, None] | None:
    """Once the ``websocket_message`` hook has run on a flow it killed: the message is never relayed
    (the relay is closed) and both sides are closed instead."""
    if isinstance(cmd, websocket.WebsocketMessageHook) and _killed(layer.flow):
        return _close_both(layer)
    return None


def _killed(flow: Any) -> bool:
    return bool(flow.error and flow.error.msg == flow.error.KILLED_MESSAGE)


def _close_both(layer: websocket.WebsocketLayer, code: int = POLICY_VIOLATION) -> Generator[Any, Any, None]:
    ws_data = layer.flow.websocket
    if ws_data is not None:
        ws_data.timestamp_end = time.time()
        ws_data.close_code = code
    for ws in (layer.server_ws, layer.client_ws):
        if ws.state in (wsproto.connection.ConnectionState.OPEN, wsproto.connection.ConnectionState.REMOTE_CLOSING):
            yield ws.send2(wsproto.events.CloseConnection(code=code))
        yield commands.CloseConnection(ws.conn)
    yield websocket.WebsocketEndHook(layer.flow)
    layer._handle_event = layer.done  # type: ignore[method-assign]
