"""The admin listeners' HTTP: admission, one request per connection on h11, one answer, close.

Both admin listeners stand on it: ``admin.py`` (``/metrics`` and the probes, plain HTTP) and
``adminapi.py`` (grants and inventory, over mTLS). Neither is a general web server, so this one
is small and strict:

- **Admission** (``Listener``): connection caps per client and in all, oldest idle evicted first.
- **One request** (``Exchange.read``): h11 frames it and checks the grammar (request line, field
  names and values, ``Host`` on HTTP/1.1, ``Content-Length``), with a head of at most
  ``MAX_HEAD`` bytes. On top of h11 we refuse what RFC 9112 lets a recipient tolerate and these
  listeners never need, because each is a request-smuggling tool: bare LF and bare CR line ends
  (§2.2), obsolete line folding (§5.2), control characters in field values, a repeated ``Host``,
  ``Content-Length`` or ``Transfer-Encoding``, methods that are not upper-case, targets that are
  not origin-form, versions other than HTTP/1.0 and 1.1. A body is either refused outright
  (``max_body=None``) or read by ``Content-Length`` up to ``max_body`` bytes (411 for
  ``Transfer-Encoding``, 413 when larger). Bytes after the request — a pipelined second one —
  are never read: the connection closes after one answer.
- **One answer** (``Exchange.render``): h11 writes it with the ``http.HTTPStatus`` phrase,
  ``Content-Length``, ``Connection: close`` and ``X-Content-Type-Options: nosniff``; no body
  for ``HEAD``.

Deadlines belong to the caller, since the admin API's also covers its TLS handshake. Every
refusal is a ``refusal.Refusal`` with reason ``invalid_request``; ``text()`` and ``json_doc()``
render a refusal or a document.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import h11

from secretless_proxy.edge.connlimits import RateLimitedLog
from secretless_proxy.metrics import Metrics
from secretless_proxy.reasons import Reason
from secretless_proxy.refusal import Refusal

log = logging.getLogger("secretless.admin")
_REFUSALS = RateLimitedLog(log)  # one line per reason every 10 s, however many connections

MAX_HEAD = 8192
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
MAX_CONNECTIONS = 64

_METHOD = re.compile(rb"[A-Z]{1,16}")
# What h11 accepts and we refuse in a head (see the module docstring): a control character other
# than HTAB, CR without LF, LF without CR, a line that starts with whitespace (obs-fold).
_LOOSE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n|\n[ \t]")
_SINGLE = (b"host", b"content-length", b"transfer-encoding")
# RFC 9110 §15.5.14 renamed 413; Python's HTTPStatus follows from 3.13 on.
_PHRASES = {413: "Content Too Large"}
# h11's refusals, by how its message starts, in our words: h11's own quote the raw bytes. An
# h11 upgrade that words them otherwise falls back to "malformed request head" (still a 400).
_H11_MESSAGES = (
    ("illegal request line", "malformed request line"),
    ("no request line", "malformed request line"),
    ("illegal header line", "malformed header"),
    ("continuation line", "malformed header"),
    ("Missing mandatory Host", "missing Host header"),
    ("Found multiple Host", "duplicate header"),
    ("conflicting Content-Length", "duplicate header"),
    ("multiple Transfer-Encoding", "duplicate header"),
    ("bad Content-Length", "malformed Content-Length"),
)


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    headers: tuple[tuple[bytes, bytes], ...] = field(repr=False)  # names lower-cased, in order
    body: bytes = field(default=b"", repr=False)

    def header(self, name: bytes) -> bytes:
        """The value of header ``name`` (lower-case), the last if repeated; b"" when absent."""
        return next((v for n, v in reversed(self.headers) if n == name), b"")


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def text(status: int, message: str) -> Response:
    return Response(status, {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"},
                    message.encode())


def json_doc(status: int, doc: Any, *, cache: str = "no-store") -> Response:
    body = (json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n").encode()
    return Response(status, {"Content-Type": "application/json", "Cache-Control": cache}, body)


def refused_json(refusal: Refusal) -> Response:
    """The admin API's refusal: ``{"error": sentence, "reason": code}``, ``Allow`` on a 405."""
    response = json_doc(refusal.status, {"error": refusal.message, "reason": refusal.reason})
    return _with_allow(response, refusal)


def refused_text(refusal: Refusal) -> Response:
    """The plain admin listener's refusal: the sentence as text."""
    return _with_allow(text(refusal.status, f"{refusal.message}\n"), refusal)


def _with_allow(response: Response, refusal: Refusal) -> Response:
    if refusal.allow:  # RFC 9110 §15.5.6: a 405 names the methods the target supports
        response.headers["Allow"] = ", ".join(refusal.allow)
    return response


def _invalid(status: int, message: str) -> Refusal:
    return Refusal(status, Reason.INVALID_REQUEST, message)


class Exchange:
    """One request and its answer on one connection; the caller owns the socket and deadlines.

    ``recv`` returns the next bytes from the client, b"" at its end. ``max_body`` None refuses
    any body; ``single`` names more headers that may appear only once.
    """

    def __init__(self, recv: Callable[[], Awaitable[bytes]], *, max_body: int | None,
                 single: tuple[bytes, ...] = ()) -> None:
        self._recv = recv
        self._max_body = max_body
        self._single = _SINGLE + single
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._method = b""  # once h11 parsed the request line

    async def read(self) -> Request:
        """The request, or Refusal (400/411/413/431); ConnectionResetError when nothing came."""
        raw = bytearray()  # at most MAX_HEAD and one read more: h11 refuses a longer incomplete head
        while (event := self._next()) is h11.NEED_DATA:
            data = await self._recv()
            if not data:
                if raw:
                    raise _invalid(400, "incomplete request")
                raise ConnectionResetError("the client sent no request")
            raw += data
            self._h11.receive_data(data)
        assert isinstance(event, h11.Request)
        self._method = event.method
        head = bytes(raw[:len(raw) - len(self._h11.trailing_data[0])])
        if len(head) > MAX_HEAD:  # a whole head in one read is never "incomplete" to h11
            raise _invalid(431, "request head too large")
        headers = tuple(event.headers)
        _check(event, head, self._single)
        return Request(method=event.method.decode(), target=event.target.decode(), headers=headers,
                       body=await self._body(headers))

    def render(self, response: Response) -> bytes:
        """The answer's bytes; after a HEAD request without the body."""
        status = HTTPStatus(response.status)
        headers = [("Content-Length", str(len(response.body))), ("Connection", "close"),
                   ("X-Content-Type-Options", "nosniff"), *response.headers.items()]
        reason = _PHRASES.get(status, status.phrase)
        out = self._h11.send(h11.Response(status_code=status.value, reason=reason, headers=headers)) or b""
        if self._method != b"HEAD":  # h11 refuses a body after HEAD, as RFC 9110 §9.3.2 does
            out += self._h11.send(h11.Data(data=response.body)) or b""
        return out + (self._h11.send(h11.EndOfMessage()) or b"")

    def _next(self) -> Any:
        try:
            return self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            message = str(exc)
            ours = next((m for prefix, m in _H11_MESSAGES if message.startswith(prefix)), None)
            if ours is not None:
                raise _invalid(400, ours) from None
            if exc.error_status_hint == 431:
                raise _invalid(431, "request head too large") from None
            if exc.error_status_hint == 501:  # a transfer coding other than chunked
                raise self._no_transfer_encoding() from None
            raise _invalid(400, "malformed request head") from None

    def _no_transfer_encoding(self) -> Refusal:
        if self._max_body is None:
            return _invalid(400, "request bodies are not accepted")
        return _invalid(411, "send the body with Content-Length, not Transfer-Encoding")

    async def _body(self, headers: tuple[tuple[bytes, bytes], ...]) -> bytes:
        names = {n for n, _ in headers}
        length = next((v for n, v in headers if n == b"content-length"), b"0")
        if b"transfer-encoding" in names:
            raise self._no_transfer_encoding()
        if self._max_body is None:
            if length != b"0":
                raise _invalid(400, "request bodies are not accepted")
            return b""
        if len(length) > 9:  # h11 takes up to 20 digits
            raise _invalid(400, "malformed Content-Length")
        if int(length) > self._max_body:
            raise _invalid(413, f"request body larger than {self._max_body} bytes")
        body = bytearray()
        while not isinstance(event := self._next(), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                body += event.data
                continue
            data = await self._recv()
            if not data:
                raise _invalid(400, "incomplete request body")
            self._h11.receive_data(data)
        return bytes(body)


def _check(request: h11.Request, head: bytes, single: tuple[bytes, ...]) -> None:
    """Refuse what h11 accepted and these listeners do not (see the module docstring)."""
    if (_METHOD.fullmatch(request.method) is None or not request.target.startswith(b"/")
            or request.http_version not in (b"1.0", b"1.1")):
        raise _invalid(400, "malformed request line")
    if _LOOSE.search(head):
        raise _invalid(400, "malformed header")
    # h11 folds a repeated Content-Length with one value into one: count the lines as sent.
    names = [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:] if line]
    if any(names.count(name) > 1 for name in single):
        raise _invalid(400, "duplicate header")


class Listener:
    """What the admin listeners share: the asyncio server, admission and the handler tasks.

    Admission (issue 8 §4): at most ``max_per_client`` connections from one address, and at
    most ``max_connections`` in all. A new connection is always admitted if a connection that has
    not yet sent its request can be closed to make room, and is refused only when every slot it
    could take is answering a request. The one closed is the oldest silent one: of the same
    address when that address is at its cap (a probe from a sidecar or a node IP shares the
    address of whatever holds slots there), else of the address holding the most silent
    connections (a flood from several addresses pays for itself, not the one connection of a
    probe from another). A probe sends its request at once and is answered in milliseconds, so
    idle or trickling connections can never starve ``/healthz``, ``/readyz`` or the admin API,
    whoever opens them (hostile review 22, 23).

    Subclasses answer one connection in ``serve()``; errors listed in ``quiet`` mean the client
    went away, stalled or spoke another protocol: nothing to answer, nothing to log.
    """

    name = "admin"
    log = log
    quiet: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    max_connections = MAX_CONNECTIONS
    max_per_client = 32
    _limit_metrics: Metrics | None = None  # where refusals are counted (set_limits)

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._peers: dict[asyncio.Task[None], str] = {}
        self._waiting: dict[asyncio.Task[None], None] = {}  # still reading their request, oldest first: evictable

    def set_limits(self, *, max_connections: int, max_per_client: int, metrics: Metrics | None) -> None:
        self.max_connections, self.max_per_client, self._limit_metrics = max_connections, max_per_client, metrics
        if metrics is not None:
            metrics.track_open_connections(self.name, lambda: len(self._handlers))

    async def start(self) -> tuple[str, int]:
        """Listen; returns the bound (host, port) — port 0 picks a free one."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.port = port
        self.listening(host, port)
        return host, port

    def listening(self, host: str, port: int) -> None:
        """Log where this listener is bound (tests and operators read the line)."""

    async def close(self) -> None:
        """Stop listening and drop open connections (wait_closed would wait for idle clients)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        await server.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    task: asyncio.Task[None]) -> None:
        """Answer the one request on this connection; ``request_read(task)`` once it is in."""
        raise NotImplementedError

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = self._admit(writer)
        if task is None:
            return
        try:
            await self.serve(reader, writer, task)
        except self.quiet:
            pass  # the client went away, stalled, or does not speak our protocol: nothing to answer
        except asyncio.CancelledError:
            pass  # close(): shutting down
        except Exception as exc:  # noqa: BLE001 - one bad connection must not take down the listener
            self.log.error("%s connection failed (%s)", self.name, type(exc).__name__)
        finally:
            self._handlers.discard(task)
            writer.close()

    def _admit(self, writer: asyncio.StreamWriter) -> asyncio.Task[None] | None:
        """Track this connection's handler task, or close it (see the class docstring)."""
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        addr = str(peer[0]) if peer else "?"
        reason = None
        if sum(1 for p in self._peers.values() if p == addr) >= self.max_per_client:
            reason = self._make_room("max_connections_per_client",
                                     next((t for t in self._waiting if self._peers.get(t) == addr), None))
        elif len(self._handlers) >= self.max_connections:
            reason = self._make_room("max_connections", self._fair_victim())
        if reason is not None:
            writer.close()
            self._refused(reason)
            return None
        self._handlers.add(task)  # type: ignore[arg-type]
        self._peers[task] = addr  # type: ignore[index]
        self._waiting[task] = None  # type: ignore[index]
        task.add_done_callback(self._forget)
        return task  # type: ignore[return-value]

    def _make_room(self, reason: str, victim: asyncio.Task[None] | None) -> str | None:
        """Close ``victim`` (a silent connection) for the new one, or say why the new one is refused."""
        if victim is None:
            return reason
        self._waiting.pop(victim, None)
        victim.cancel()  # its handler closes the socket
        self._refused(reason)
        return None

    def _fair_victim(self) -> asyncio.Task[None] | None:
        """The oldest silent connection of the address holding the most silent connections."""
        counts: dict[str, int] = {}
        for task in self._waiting:
            peer = self._peers.get(task, "?")
            counts[peer] = counts.get(peer, 0) + 1
        if not counts:
            return None
        most = max(counts.values())
        return next(t for t in self._waiting if counts[self._peers.get(t, "?")] == most)

    def request_read(self, task: asyncio.Task[None]) -> None:
        """The request is in: this connection is being answered and no longer evictable."""
        self._waiting.pop(task, None)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        self._peers.pop(task, None)
        self._waiting.pop(task, None)

    def _refused(self, reason: str) -> None:
        if self._limit_metrics is not None:
            self._limit_metrics.connection_refused(self.name, reason)
        _REFUSALS.warning(f"{self.name}:{reason}", f"{self.name} listener: closed a connection ({reason})")
