"""The admin listeners' HTTP: admission, one request per connection on h11, one answer, close.

Both admin listeners stand on it: ``admin.py`` (``/metrics`` and the probes, plain HTTP) and
``adminapi.py`` (grants and inventory, over mTLS). Neither is a general web server, so this one
is small and strict:

- **Admission** (``Listener``): connection caps per client and in all; a silent connection makes
  room for one that has sent its request; the backlog split by client address (Linux).
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
import contextlib
import ctypes
import errno
import json
import logging
import re
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import h11

from secretless_proxy.edge.connlimits import ADMIN_PENDING, ADMIN_SOCKETS, RateLimitedLog
from secretless_proxy.metrics import Metrics
from secretless_proxy.reasons import Reason
from secretless_proxy.refusal import Refusal

log = logging.getLogger("secretless.admin")
_REFUSALS = RateLimitedLog(log)  # one line per reason every 10 s, however many connections

MAX_HEAD = 8192
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
MAX_CONNECTIONS = 64
BACKLOG = 4096  # listen(2), per socket; Linux caps it at net.core.somaxconn (4096 since 5.4)
ACCEPT_BATCH = 64  # connections taken from one socket's backlog per wakeup: the sockets take turns
ACCEPT_RETRY = 1.0  # seconds accept() pauses when out of descriptors, as asyncio's does
# Linux: the listen backlog is split over ADMIN_SOCKETS sockets (SO_REUSEPORT) by a classic BPF
# program that picks the socket from the client's address (its last 32 bits modulo the count), so a
# connect flood fills the queues of its own addresses, not the one a probe from another waits in.
_SO_ATTACH_REUSEPORT_CBPF = 51
_SKF_NET_OFF = -0x100000  # BPF_ABS offsets from the IP header
SWEEP = 0.05  # seconds between two looks at the held connections when no new one pushes them
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST

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
    """What the admin listeners share: the listening sockets, admission and the handler tasks.

    Admission (issue 8 §4): at most ``max_per_client`` connections from one address, and at
    most ``max_connections`` in all. A connection whose request has not yet been read is *silent*;
    one whose request was read is being answered and is never closed to make room.

    - Below both caps a connection is admitted.
    - At a cap, a newcomer that already holds its request (``complete_request`` on the bytes in
      the kernel's buffer) takes the slot of a silent connection: of its own address at the
      per-client cap (a probe from a sidecar or a node IP shares the address of whatever holds
      slots there), else of the address holding the most silent connections.
    - At the global cap, a newcomer from an address holding fewer silent connections than the
      address with the most takes the oldest silent slot of that address, if need be one whose
      request is in but not yet read: a flood from several addresses pays for itself, not the one
      connection of a probe from another (reviews 23, 34: a flood of whole requests or ClientHellos
      outpaces the handlers, so its slots always hold a request not yet read).
    - Any other newcomer waits, unadmitted, in a short queue of ``ADMIN_PENDING`` sockets with
      no transport and no task: it is admitted as soon as its request is in (or a slot frees),
      and closed (RST) when it falls off the queue still without one.

    The last rule is what keeps a connect flood cheap: turning a silent connection away costs
    an accept, two ``MSG_PEEK`` reads and a close, an order of magnitude less than a transport
    and a task, so the loop drains the listen backlog as fast as a flood fills it and a probe's
    SYN finds room (hostile review 23: with asyncio's server and its backlog of 100 the backlog
    stayed full and probes' SYNs were dropped). On Linux the listener is ``ADMIN_SOCKETS``
    sockets on one port (``SO_REUSEPORT``) and a classic BPF program picks one by the client's
    address, so a flood faster than any accept loop fills the queues of its own addresses and a
    probe from another is accepted from an empty one. Each has a backlog of ``BACKLOG`` (the
    kernel caps it at ``net.core.somaxconn``) and gives up to ``ACCEPT_BATCH`` connections per
    wakeup: the sockets take turns.

    Subclasses answer one connection in ``serve()``; errors listed in ``quiet`` mean the client
    went away, stalled or spoke another protocol: nothing to answer, nothing to log.
    """

    name = "admin"
    log = log
    quiet: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    max_connections = MAX_CONNECTIONS
    max_per_client = 32
    peek_size = MAX_HEAD + 1  # bytes looked at without taking them: enough for complete_request to judge
    _limit_metrics: Metrics | None = None  # where refusals are counted (set_limits)

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._sockets: list[socket.socket] = []
        self._closing = False
        self._handlers: set[asyncio.Task[None]] = set()
        self._peers: dict[asyncio.Task[None], str] = {}
        self._socks: dict[asyncio.Task[None], socket.socket] = {}
        self._readers: dict[asyncio.Task[None], asyncio.StreamReader] = {}
        self._count: Counter[str] = Counter()  # open connections per address
        # Per address, its silent connections oldest first: the evictable ones.
        self._silent: dict[str, dict[asyncio.Task[None], None]] = {}
        # Unadmitted, oldest first: (address, the cap it met, when accepted).
        self._pending: dict[socket.socket, tuple[str, str, float]] = {}
        self._sweep: asyncio.TimerHandle | None = None

    def set_limits(self, *, max_connections: int, max_per_client: int, metrics: Metrics | None) -> None:
        self.max_connections, self.max_per_client, self._limit_metrics = max_connections, max_per_client, metrics
        if metrics is not None:
            metrics.track_open_connections(self.name, lambda: len(self._handlers))

    def complete_request(self, data: bytes) -> bool:
        """Whether ``data``, the first bytes of a connection, hold its whole request (head)."""
        return False

    async def start(self) -> tuple[str, int]:
        """Listen; returns the bound (host, port) — port 0 picks a free one."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host or None, self.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        try:
            for family, kind, proto, _, addr in dict.fromkeys(infos):
                steer = _steering(family)
                for i in range(ADMIN_SOCKETS if steer else 1):
                    sock = socket.socket(family, kind, proto)
                    self._sockets.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    if steer:
                        try:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                            if i == 0:
                                sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, steer.program)
                        except OSError as exc:  # a kernel or sandbox without it: one socket, as before
                            self.log.warning("%s listener: no per-address backlog (%s)", self.name,
                                             exc.strerror or type(exc).__name__)
                            self._sockets.pop().close()
                            sock = socket.socket(family, kind, proto)
                            self._sockets.append(sock)
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                            if family == socket.AF_INET6:
                                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                            steer = None
                    if (self.port == 0 or i) and len(self._sockets) > 1:  # every socket on the port picked
                        addr = (addr[0], self._sockets[0].getsockname()[1], *addr[2:])
                    sock.bind(addr)
                    sock.listen(BACKLOG)
                    sock.setblocking(False)
                    if steer is None:
                        break
        except OSError:
            for sock in self._sockets:
                sock.close()
            self._sockets = []
            raise
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)
        host, port = self._sockets[0].getsockname()[:2]
        self.port = port
        self.listening(host, port)
        return host, port

    def listening(self, host: str, port: int) -> None:
        """Log where this listener is bound (tests and operators read the line)."""

    async def close(self) -> None:
        """Stop listening and drop open connections (no waiting for idle clients)."""
        if self._closing or not self._sockets:
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        if self._sweep is not None:
            self._sweep.cancel()
        for conn in self._pending:
            conn.close()
        self._pending.clear()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    task: asyncio.Task[None]) -> None:
        """Answer the one request on this connection; ``request_read(task)`` once it is in."""
        raise NotImplementedError

    # -- accept and admission ------------------------------------------------------------------
    # Per connection this path costs a few system calls and no allocation beyond the socket: the
    # closes of one wakeup are counted and logged once (a flood of 20,000 connections a second
    # against a loop that gets a quarter of a core is what it has to outrun).

    def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        closed: Counter[str] = Counter()
        now = time.monotonic()
        try:
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, peer = sock.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except ConnectionAbortedError:
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        # As asyncio's own accept loop does, in the words connlimits.AcceptErrors counts:
                        # pause this socket for a second rather than spin on a backlog it cannot take.
                        loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                                     "exception": exc, "socket": sock})
                        loop.remove_reader(sock.fileno())
                        loop.call_later(ACCEPT_RETRY, self._resume, sock)
                    else:
                        self.log.error("%s listener: accept() failed (%s)", self.name,
                                       exc.strerror or type(exc).__name__)
                    return
                conn.setblocking(False)
                host = peer[0] if isinstance(peer, tuple) and peer else "?"
                self._arrived(conn, host[7:] if host.startswith("::ffff:") else host, now, closed)
        finally:
            self._counted(closed)
            if self._pending and self._sweep is None and not self._closing:
                self._sweep = loop.call_later(SWEEP, self._sweep_pending)

    def _resume(self, sock: socket.socket) -> None:
        if not self._closing and sock.fileno() != -1:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)

    def _arrived(self, conn: socket.socket, addr: str, now: float, closed: Counter[str]) -> None:
        """Admit, hold or refuse a connection just accepted (see the class docstring)."""
        cap = self._cap(addr)
        if cap is None:
            self._open(conn, addr)
            return
        data = _peek(conn, self.peek_size)
        if data is not None and (self.complete_request(data) or (cap == "max_connections" and self._minority(addr))):
            if self._make_room(addr, cap, closed):
                self._open(conn, addr)
            else:
                self._refuse(conn, cap, closed)
            return
        if data is None:  # already gone
            self._refuse(conn, cap, closed)
            return
        self._pending[conn] = (addr, cap, now)
        if len(self._pending) > ADMIN_PENDING:
            self._settle(next(iter(self._pending)), closed, drop=True)

    def _settle(self, conn: socket.socket, closed: Counter[str], *, drop: bool) -> None:
        """Admit a held connection whose request is in (or for which a slot freed), or close it
        when it went away, ``drop`` (it falls off the queue) or it outstayed ``READ_TIMEOUT``."""
        addr, cap, since = self._pending[conn]
        data = _peek(conn, self.peek_size)
        now = self._cap(addr)
        if data is not None and (now is None or (self.complete_request(data) and self._make_room(addr, now, closed))):
            del self._pending[conn]
            self._open(conn, addr)
        elif data is None or drop or time.monotonic() - since > READ_TIMEOUT:
            del self._pending[conn]
            self._refuse(conn, now or cap, closed)

    def _sweep_pending(self) -> None:
        """Every ``SWEEP`` seconds while connections are held: settle each (no flood pushes them)."""
        self._sweep = None
        closed: Counter[str] = Counter()
        for conn in list(self._pending):
            self._settle(conn, closed, drop=False)
        self._counted(closed)
        if self._pending and not self._closing:
            self._sweep = asyncio.get_running_loop().call_later(SWEEP, self._sweep_pending)

    def _cap(self, addr: str) -> str | None:
        """Which cap a new connection from ``addr`` is at, if any."""
        if self._count[addr] >= self.max_per_client:
            return "max_connections_per_client"
        if len(self._handlers) >= self.max_connections:
            return "max_connections"
        return None

    def _minority(self, addr: str) -> bool:
        most = max((len(s) for s in self._silent.values()), default=0)
        return len(self._silent.get(addr, ())) < most

    def _make_room(self, addr: str, cap: str, closed: Counter[str]) -> bool:
        """Close a silent connection for one from ``addr``; False when every candidate is answering."""
        if cap == "max_connections_per_client":
            candidates = self._silent.get(addr, {})
        else:
            candidates = self._silent.get(max(self._silent, key=lambda a: len(self._silent[a]), default=""), {})
        victim = next((t for t in candidates if not self._has_request(t)), None)
        if victim is None and cap == "max_connections" and self._minority(addr):
            # Every slot of the address holding the most holds a request not yet read: on the admin API
            # a flood of whole ClientHellos, each stalled once its handshake is answered, keeps them so.
            # That address pays with its oldest, not a newcomer from an address holding fewer (review 34).
            victim = next(iter(candidates), None)
        if victim is None:
            return False
        self.request_read(victim)  # no longer a candidate while its handler closes the socket
        victim.cancel()
        closed[cap] += 1
        return True

    def _has_request(self, task: asyncio.Task[None]) -> bool:
        """Whether a silent connection's request is in, in the kernel or the stream, not yet read."""
        reader = self._readers.get(task)
        buffered = bytes(getattr(reader, "_buffer", b""))  # asyncio.StreamReader's, read on the next step
        sock = self._socks.get(task)
        data = (_peek(sock, self.peek_size) or b"") if sock is not None else b""
        return self.complete_request(buffered + data)

    def _open(self, conn: socket.socket, addr: str) -> None:
        task = asyncio.get_running_loop().create_task(self._run(conn))
        self._handlers.add(task)
        self._peers[task] = addr
        self._socks[task] = conn
        self._count[addr] += 1
        self._silent.setdefault(addr, {})[task] = None
        task.add_done_callback(self._forget)

    @staticmethod
    def _refuse(conn: socket.socket, cap: str, closed: Counter[str]) -> None:
        with contextlib.suppress(OSError):  # RST: nothing of this connection lingers in the kernel
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        conn.close()
        closed[cap] += 1

    def _counted(self, closed: Counter[str]) -> None:
        for reason, n in closed.items():
            self._refused(reason, n)

    async def _run(self, conn: socket.socket) -> None:
        task = asyncio.current_task()
        assert task is not None
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
            self._readers[task] = reader  # type: ignore[index]
            await self.serve(reader, writer, task)  # type: ignore[arg-type]
        except self.quiet:
            pass  # the client went away, stalled, or does not speak our protocol: nothing to answer
        except asyncio.CancelledError:
            pass  # evicted, or close(): shutting down
        except Exception as exc:  # noqa: BLE001 - one bad connection must not take down the listener
            self.log.error("%s connection failed (%s)", self.name, type(exc).__name__)
        finally:
            if writer is not None:
                writer.close()
            else:
                conn.close()

    def request_read(self, task: asyncio.Task[None]) -> None:
        """The request is in: this connection is being answered and no longer evictable."""
        addr = self._peers.get(task)
        silent = self._silent.get(addr) if addr is not None else None
        if silent is not None:
            silent.pop(task, None)
            if not silent:
                del self._silent[addr]  # type: ignore[arg-type]

    def _forget(self, task: asyncio.Task[None]) -> None:
        self.request_read(task)
        self._handlers.discard(task)
        self._socks.pop(task, None)
        self._readers.pop(task, None)
        addr = self._peers.pop(task, None)
        if addr is not None:
            self._count[addr] -= 1
            if self._count[addr] <= 0:
                del self._count[addr]

    def _refused(self, reason: str, n: int = 1) -> None:
        if self._limit_metrics is not None:
            self._limit_metrics.connection_refused(self.name, reason, n)
        _REFUSALS.warning(f"{self.name}:{reason}", f"{self.name} listener: closed a connection ({reason})", n)


def _peek(conn: socket.socket, size: int) -> bytes | None:
    """The bytes waiting on ``conn`` without taking them: b"" when none yet, None once it is gone."""
    try:
        data = conn.recv(size, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return b""
    except OSError:
        return None
    return data or None  # b"" from recv: the client closed



@dataclass(frozen=True)
class _Steering:
    program: bytes  # struct sock_fprog, pointing into filter
    filter: Any  # the ctypes buffer of struct sock_filter[]: kept alive with the program


def _steering(family: int) -> _Steering | None:
    """The reuseport program for ``family``, or None where the kernel has none (not Linux)."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT") or ADMIN_SOCKETS < 2:
        return None
    offset = {socket.AF_INET: 12, socket.AF_INET6: 20}.get(family)  # source address (IPv6: its last word)
    if offset is None:
        return None
    code = [(0x20, (_SKF_NET_OFF + offset) & 0xFFFFFFFF),  # A = 32-bit word at the IP header + offset
            (0x94, ADMIN_SOCKETS),                           # A %= ADMIN_SOCKETS
            (0x16, 0)]                                       # return A: the socket's index
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", op, 0, 0, k) for op, k in code))
    return _Steering(program=struct.pack("HL", len(code), ctypes.addressof(buf)), filter=buf)
