"""Two gaps in mitmproxy 12.2's HTTP/1 layer that reach the workload, closed at their source.

1. **Trailers.** ``Http1Connection.read_body`` raises ``NotImplementedError("HTTP trailers are
   not implemented yet.")`` when a chunked message ends with trailer fields (mitmproxy
   ``proxy/layers/http/_http1.py``, unchanged up to its main branch). The exception escapes the
   layer, mitmproxy logs "mitmproxy has crashed!" with a traceback, and the stream is left with
   no event: the client waits until its own timeout (600 s in the reported case). Here a message
   with trailers ends its stream with a protocol error instead: a 502 from an upstream, a 400 for
   a client, and the connection is closed. The trailer fields are never read, so never relayed.
2. **Parse errors quote the peer's bytes.** "Cannot parse HTTP response: Bad HTTP response line:
   b'HTTP/1.1 200 echo Bearer sk_…'" is sent to the client in mitmproxy's error page and kept in
   ``flow.error`` (which the addon logs): an upstream could echo a credential through a
   malformed status or header line. Protocol-error and log messages from this layer are cut
   before the first quoted value.

``install()`` wraps the two generator methods once per process; they are pinned to mitmproxy
12.2 (``pyproject.toml``), and ``tests/test_h1guard.py`` fails if the wrapped code changes shape.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Generator
from typing import Any

from mitmproxy.proxy import commands
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import ErrorCode, RequestProtocolError, ResponseProtocolError

__all__ = ["RESPONSE_TRAILERS", "REQUEST_TRAILERS", "clean_message", "install"]

RESPONSE_TRAILERS = "the upstream sent HTTP/1.1 trailer fields, which this proxy does not relay"
REQUEST_TRAILERS = "HTTP/1.1 request trailer fields are not supported by this proxy"
_QUOTED = re.compile(r"""(?::\s*)?b?['"].*""", re.S)
_installed = False


def clean_message(message: str) -> str:
    """``message`` cut before its first quoted value (the peer's bytes), e.g. ``b'...'``."""
    return _QUOTED.sub("", message) or "protocol error"


def install() -> None:
    """Wrap mitmproxy's HTTP/1 body and response-head readers (idempotent)."""
    global _installed
    if _installed:
        return
    _http1.Http1Connection.read_body = _guarded(_http1.Http1Connection.read_body)  # type: ignore[method-assign]
    _http1.Http1Client.read_headers = _guarded(_http1.Http1Client.read_headers)  # type: ignore[method-assign]
    _installed = True


def _guarded(method: Callable[..., Generator[Any, Any, Any]]) -> Callable[..., Generator[Any, Any, Any]]:
    @functools.wraps(method)
    def wrapper(self: _http1.Http1Connection, event: Any) -> Generator[Any, Any, Any]:
        gen = method(self, event)
        sent: Any = None
        while True:
            try:
                cmd = gen.send(sent)
            except StopIteration as stop:
                return stop.value
            except NotImplementedError:  # trailers: the only NotImplementedError in these readers
                yield from _end_with_trailers(self)
                return None
            sent = yield _clean(cmd)

    wrapper.__secretless_guard__ = True  # type: ignore[attr-defined]
    return wrapper


def _end_with_trailers(conn: _http1.Http1Connection) -> Generator[Any, Any, None]:
    conn.state = conn.done
    if isinstance(conn, _http1.Http1Server):
        yield commands.SendData(conn.conn, _http1.make_error_response(400, REQUEST_TRAILERS))
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
