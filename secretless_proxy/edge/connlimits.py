"""Admission and deadlines for client connections on the proxy port (issue 8 §4).

A sub-addon of ``Secretless`` (mitmproxy loads an addon's ``addons`` list), so it runs in
``secretless-proxy run`` and in ``mitmdump -s addons/secretless.py`` alike.

**Admission** happens in mitmproxy's ``client_connected`` hook, where setting ``client.error``
makes the server close the socket before any byte is read. A connection is refused when the
proxy holds ``max_connections`` (global), ``max_connections_per_client`` (same peer address),
or is draining for shutdown. The global cap is lowered to what the descriptor limit can carry
(each client connection may hold an upstream one, plus a reserve for the admin listeners, the
audit files and Redis): connections are refused *before* ``accept()`` hits ``EMFILE``, so the
established clients keep being served.

**Deadlines** replace mitmproxy's single 600 s inactivity timer (``tcp_timeout``), which a
client trickling one byte at a time never trips:

- ``handshake``: from accept to the CONNECT head (through the outer TLS handshake of a
  proxy-hop client), and again from the CONNECT head to the end of the inner TLS handshake;
- ``request_head``: from the first byte of a request to the end of its head;
- ``idle``: a kept-alive connection with no request in flight.

**Abuse** of an open connection closes it (invariant 7: one connection must not fill the audit
log or starve the event loop): ``ANONYMOUS_REFUSALS`` refused requests without a verified
identity (HTTP/2; an HTTP/1 refusal closes already), or more than ``RESETS_PER_WINDOW`` streams
reset by the client in ``RESET_WINDOW`` seconds (HTTP/2 rapid reset). Streams past the limit
are dropped by the HTTP layer before a flow exists (``admit_stream``, edge/httplayers.py); a request
already made is killed before the addon judges it (``admit_request``): neither is audited.
Counted in ``secretless_connections_closed_total{listener="proxy",reason}``.

No connection deadline runs while a request (or a WebSocket) is in flight, except for a request
refused on its head whose body has not arrived: it gets ``request_head`` again. A request's own
body has ``limits.request_body_timeout`` between two reads (``httplayers.GuardedHttpStream``: 408). A closed connection is counted in
``secretless_connection_timeouts_total{listener="proxy",reason}``; refusals in
``secretless_connections_refused_total``. Neither is audited: they are not requests, and an
audit record per refused socket would let anyone fill the audit log. The log gets at most one
line per reason every ``LOG_EVERY`` seconds, with the count since the last line.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import ctx, http, tls
from mitmproxy.connection import Client

from secretless_proxy.config.model import LimitsConfig
from secretless_proxy.metrics import Metrics

log = logging.getLogger("secretless.limits")

LOG_EVERY = 10.0  # seconds between two log lines about the same kind of refusal
# Abuse of one connection (invariant 7): a client without a verified identity gets this many refused
# requests, then the connection is closed; any client resetting more than RESETS_PER_WINDOW streams
# in RESET_WINDOW seconds (HTTP/2 "rapid reset", CVE-2023-44487) is closed too.
ANONYMOUS_REFUSALS = 8
RESETS_PER_WINDOW = 200
RESET_WINDOW = 10.0
CLOSE_DELAY = 0.2  # seconds: lets the refusals already decided reach the client before the close
TICK = 0.25  # deadline resolution
FD_RESERVE = 48  # listening sockets, epoll, log/audit files, Redis, provider HTTP clients
# Connections an admin listener holds unadmitted while full (admin/exchange.Listener), besides its
# limits.admin_max_connections: sockets without a transport, waiting for their request.
ADMIN_PENDING = 8
ADMIN_SOCKETS = 8  # listening sockets of one admin listener: its backlog split by client address


class RateLimitedLog:
    """One log line per key every ``every`` seconds, saying how many events it stands for."""

    def __init__(self, logger: logging.Logger, *, every: float = LOG_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self._every, self._clock = logger, every, clock
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, key: str, message: str, events: int = 1) -> None:
        """Log ``message`` for ``events`` events of ``key`` (the first one, the others counted)."""
        now = self._clock()
        if now - self._last.get(key, -self._every) < self._every:
            self._suppressed[key] += events
            return
        self._last[key] = now
        more = self._suppressed.pop(key, 0) + events - 1
        self._log.warning("%s%s", message, f" ({more} more since the last such line)" if more else "")


class _ClosedAcceptRetry(logging.Filter):
    """asyncio's report of a paused accept() retrying on a listening socket closed meanwhile."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, ValueError) and "_start_serving" in record.getMessage()
                    and "Invalid file descriptor" in str(exc))


_CLOSED_ACCEPT_RETRY = _ClosedAcceptRetry()


class AcceptErrors:
    """The event loop's exception handler, with ``accept()`` out of descriptors made one counted line.

    This is where the log flood at the descriptor limit came from (issue 8 §4: 444,593
    tracebacks in 30 s). On EMFILE/ENFILE, asyncio's ``_accept_connection`` (CPython 3.12)
    reports the error and schedules a retry in 1 s, *and keeps looping* over its backlog of
    100: up to 100 reports and 100 scheduled retries per wakeup, each of which mitmproxy's
    handler logs as "Unhandled error in task." with a traceback. Here each listening socket
    counts one pause per ``PAUSE`` seconds (``secretless_connections_refused_total{reason=
    "descriptor_limit"}``) and logs one line every ``LOG_EVERY`` seconds; the retries that fire
    after the socket was closed at shutdown ("Invalid file descriptor: -1") are dropped. Every
    other error goes to the previous handler (mitmproxy's).
    """

    MESSAGE = "socket.accept() out of system resource"
    PAUSE = 0.5

    def __init__(self, metrics: Metrics, rlog: RateLimitedLog) -> None:
        self.metrics, self.rlog = metrics, rlog
        self.listeners: dict[int, str] = {}  # port -> listener label; anything else is the proxy port
        self._previous: Callable | None = None
        self._last: dict[str, float] = {}

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self)
        # After mitmproxy puts its own handler back (run() ending), a retry scheduled before the
        # sockets closed can still fire while asyncio finishes shutting down: drop that one too.
        if _CLOSED_ACCEPT_RETRY not in logging.getLogger("asyncio").filters:
            logging.getLogger("asyncio").addFilter(_CLOSED_ACCEPT_RETRY)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if context.get("message") == self.MESSAGE:
            self._out_of_descriptors(context)
            return
        if isinstance(exc, ValueError) and "_start_serving" in repr(context.get("handle")):
            return  # a paused accept() retrying on a socket closed meanwhile (shutdown): nothing to do
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def _out_of_descriptors(self, context: dict) -> None:
        try:
            port = context["socket"].getsockname()[1]
        except Exception:  # noqa: BLE001 - a closed socket has no name: count it on the proxy port
            port = None
        listener = self.listeners.get(port, "proxy") if port is not None else "proxy"
        now = time.monotonic()
        if now - self._last.get(listener, -self.PAUSE) >= self.PAUSE:
            self._last[listener] = now
            self.metrics.connection_refused(listener, "descriptor_limit")
        self.rlog.warning("emfile:" + listener, f"{listener} listener: out of file descriptors, accept() "
                          "paused for 1 s; new connections wait in the listen backlog (raise the descriptor "
                          "limit or lower limits.max_connections)")


@dataclass
class _Conn:
    peer: str
    phase: str  # handshake | request_head | idle | active
    deadline: float | None
    idle_since: float = 0.0
    activity_seen: float = 0.0  # mitmproxy's last-activity stamp (wall clock) when last looked at
    tunnelled: bool = False
    in_flight: int = 0
    refused: int = 0  # requests refused while the connection had no verified identity
    anonymous_streams: int = 0  # requests (streams) opened while it had none
    resets: int = 0  # streams the client reset in the window that began at reset_window
    reset_window: float = 0.0
    closing: str | None = None  # why the connection is being closed: no request is decided any more


def descriptor_budget(nofile: int, admin_listeners: int, admin_max: int) -> int:
    """How many proxy client connections ``nofile`` descriptors can carry (two each: client, upstream)."""
    return max(1, (nofile - FD_RESERVE - admin_listeners * (admin_max + ADMIN_PENDING + ADMIN_SOCKETS)) // 2)


class ConnectionGuard:
    """mitmproxy hooks that admit, time and close client connections on the proxy port."""

    def __init__(self, metrics: Metrics, limits: Callable[[], LimitsConfig | None], *,
                 identified: Callable[[Client], bool] = lambda client: False) -> None:
        self.metrics = metrics
        self._limits = limits
        self._identified = identified  # whether the client connection has a verified workload identity
        self._conns: weakref.WeakKeyDictionary[Client, _Conn] = weakref.WeakKeyDictionary()
        self._per_peer: Counter[str] = Counter()
        self._task: asyncio.Task | None = None
        self.draining = False
        self.fd_cap: int | None = None  # set in start(): what the descriptor limit allows
        self.rlog = RateLimitedLog(log)
        self.accept_errors = AcceptErrors(metrics, self.rlog)
        metrics.track_open_connections("proxy", lambda: len(self._conns))

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, *, admin_listeners: dict[int, str]) -> None:
        """Size the cap to the descriptor limit and start the deadline watchdog (in ``running()``).

        ``admin_listeners``: port → listener label of the admin listeners, for the EMFILE counter.
        """
        limits = self.limits
        self.accept_errors.listeners = dict(admin_listeners)
        self.accept_errors.install(asyncio.get_running_loop())
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile != resource.RLIM_INFINITY:
            self.fd_cap = descriptor_budget(nofile, len(admin_listeners), limits.admin_max_connections)
            if self.fd_cap < limits.max_connections:
                log.warning("at most %d client connections (limits.max_connections is %d): the descriptor "
                            "limit is %d; raise it (ulimit -n, LimitNOFILE=) to admit more",
                            self.fd_cap, limits.max_connections, nofile)
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        # The loop exception handler stays: accept() retries asyncio scheduled before the listeners
        # closed still fire during shutdown, and mitmproxy restores its own saved one when run() ends.
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @property
    def limits(self) -> LimitsConfig:
        return self._limits() or LimitsConfig()

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def in_flight(self) -> int:
        """Requests in flight on the proxy port (what a graceful shutdown waits for)."""
        return sum(c.in_flight for c in self._conns.values())

    def max_connections(self) -> int:
        cap = self.limits.max_connections
        return min(cap, self.fd_cap) if self.fd_cap is not None else cap

    # -- admission -------------------------------------------------------------------------

    def client_connected(self, client: Client) -> None:
        try:
            peer = _peer(client)
            reason = self._refusal(peer) or (None if _on_a_listener(client) else "not_listening")
        except Exception as exc:  # noqa: BLE001 - a bug here must close the connection, not admit it
            log.error("connection admission failed (%s); connection closed", type(exc).__name__)
            client.error = "admission failed"
            return
        if reason is not None:
            client.error = f"refused: {reason}"
            self.metrics.connection_refused("proxy", reason)
            self.rlog.warning(reason, f"refusing client connections ({reason}; {len(self._conns)} open)")
            return
        lim = self.limits
        self._conns[client] = _Conn(peer=peer, phase="handshake", deadline=time.monotonic() + lim.handshake_timeout)
        self._per_peer[peer] += 1

    def _refusal(self, peer: str) -> str | None:
        if self.draining:
            return "shutting_down"
        if len(self._conns) >= self.max_connections():
            return "max_connections"
        if self._per_peer[peer] >= self.limits.max_connections_per_client:
            return "max_connections_per_client"
        return None

    def client_disconnected(self, client: Client) -> None:
        conn = self._conns.pop(client, None)
        if conn is not None:
            self._per_peer[conn.peer] -= 1
            if self._per_peer[conn.peer] <= 0:
                del self._per_peer[conn.peer]

    # -- phases ----------------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        conn = self._conns.get(flow.client_conn)
        if conn is not None:  # the CONNECT head is in: now the inner handshake, on a fresh clock
            conn.anonymous_streams = 0  # the CONNECT itself was a stream: count the requests inside
            conn.tunnelled = True
            conn.phase, conn.deadline = "handshake", time.monotonic() + self.limits.handshake_timeout

    def tls_established_client(self, data: tls.TlsData) -> None:
        conn = self._conns.get(data.conn)  # type: ignore[call-overload]
        if conn is not None and conn.tunnelled and conn.in_flight == 0:
            self._idle(conn)

    def admit_request(self, flow: http.HTTPFlow) -> bool:
        """False (and the flow killed) when its connection is being closed for abuse.

        Called by ``Secretless.requestheaders`` before anything is decided, so a request that
        arrives after the limit is neither judged, logged nor audited: the audit records per
        anonymous connection stay at most ``ANONYMOUS_REFUSALS``.
        """
        conn = self._conns.get(flow.client_conn)
        if conn is None or conn.closing is None:
            return True
        if conn.closing == "anonymous_refusals" and conn.refused < ANONYMOUS_REFUSALS:
            return True  # one of the requests admit_stream let in: it gets its (audited) refusal
        if flow.killable:
            flow.kill()
        self._close_soon(flow.client_conn)
        return False

    def admit_stream(self, client: Client) -> bool:
        """Whether the HTTP layer may open a stream (a request) on ``client`` (``httplayers``).

        Without an identity every request is refused, so a connection gets ``ANONYMOUS_REFUSALS``
        of them: the next one closes it before a flow is made. This bounds the work of one read of
        HTTP/2 frames (thousands of HEADERS frames in 64 KiB), not only the audit records.
        """
        conn = self._conns.get(client)
        if conn is None:
            return True
        if conn.closing is None and not self._identified(client):
            conn.anonymous_streams += 1
            if conn.anonymous_streams > ANONYMOUS_REFUSALS:
                if conn.closing is None:
                    # Closed a little later: the refusals of the requests let in are answered first.
                    self._closing(client, conn, "anonymous_refusals", f"closed a client connection without "
                                  f"identity after {ANONYMOUS_REFUSALS} requests", delay=CLOSE_DELAY)
                return False
        return conn.closing is None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        conn = self._conns.get(flow.client_conn)
        if conn is not None and flow.request.method != "CONNECT":
            conn.in_flight += 1
            if flow.response is not None and conn.in_flight == 1:
                # Refused on its head (Secretless runs first): all that is left is a body nobody
                # will forward. A client that withholds it gets request_head_timeout, not 600 s.
                conn.phase, conn.deadline = "request_head", time.monotonic() + self.limits.request_head_timeout
            else:
                conn.phase, conn.deadline = "active", None
            if flow.response is not None and not self._identified(flow.client_conn):
                conn.refused += 1
                if conn.refused >= ANONYMOUS_REFUSALS and conn.closing is None:
                    # (An HTTP/1 refusal on the head closes its connection already: edge/httplayers.py.)
                    self._closing(flow.client_conn, conn, "anonymous_refusals", f"closed a client connection "
                                  f"without identity after {conn.refused} refused requests")

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        # A WebSocket is a request in flight for as long as it is open: no idle deadline cuts it.
        conn = self._conns.get(flow.client_conn)
        if conn is not None:
            conn.in_flight += 1
            conn.phase, conn.deadline = "active", None

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._request_over(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._request_over(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._request_over(flow)

    def stream_reset(self, client: Client) -> None:
        """The client reset a stream before its response was sent (``httplayers.GuardedHttpLayer``)."""
        conn = self._conns.get(client)
        if conn is None or conn.closing is not None:
            return
        now = time.monotonic()
        if now - conn.reset_window >= RESET_WINDOW:
            conn.reset_window, conn.resets = now, 0
        conn.resets += 1
        if conn.resets > RESETS_PER_WINDOW:
            self._closing(client, conn, "stream_resets", f"closed a client connection that reset more than "
                          f"{RESETS_PER_WINDOW} streams in {RESET_WINDOW:.0f} s")

    def _closing(self, client: Client, conn: _Conn, reason: str, message: str, *, delay: float = 0.0) -> None:
        conn.closing = reason
        self.metrics.connection_closed("proxy", reason)
        self.rlog.warning("abuse:" + reason, message)
        self._close_soon(client, delay)

    def _close_soon(self, client: Client, delay: float = 0.0) -> None:
        """Close after the current hook: the response it decided is written first (its stream ends)."""
        def close() -> None:
            ps = ctx.master.addons.get("proxyserver")
            close_connection(getattr(ps, "connections", {}).get(client.id), client, "closed for abuse")
        asyncio.get_running_loop().call_later(delay, close)

    def _request_over(self, flow: http.HTTPFlow) -> None:
        conn = self._conns.get(flow.client_conn)
        if conn is None or flow.request.method == "CONNECT" or conn.in_flight == 0:
            return
        conn.in_flight -= 1
        if conn.in_flight == 0:
            self._idle(conn)

    def _idle(self, conn: _Conn) -> None:
        now = time.monotonic()
        # Draining: a connection whose last request was answered is closed at the next tick.
        conn.phase, conn.deadline, conn.idle_since = "idle", now if self.draining else now + self.limits.idle_timeout, now

    def close_all(self) -> None:
        """Shutdown past its drain: close every client connection, requests in flight too (next tick)."""
        now = time.monotonic()
        for conn in self._conns.values():
            conn.deadline = now

    def close_idle(self) -> None:
        """Shutdown: close every connection with no request in flight (at the next tick)."""
        now = time.monotonic()
        for conn in self._conns.values():
            if conn.in_flight == 0:
                conn.deadline = now

    # -- deadlines -------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                self._expire(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - the watchdog must outlive one bad pass
                log.error("connection deadline check failed (%s)", type(exc).__name__)

    def _expire(self, now: float) -> None:
        ps = ctx.master.addons.get("proxyserver")
        handlers = getattr(ps, "connections", {})
        pending = 0
        for client, conn in list(self._conns.items()):
            pending += _unsent_bytes(handlers.get(client.id), client)
            if not self.draining and conn.phase == "idle" and self._head_started(conn, handlers.get(client.id), client):
                # Bytes of the next request are buffered: its head has request_head_timeout from now.
                conn.phase, conn.deadline = "request_head", now + self.limits.request_head_timeout
            if conn.deadline is None or now < conn.deadline:
                continue
            conn.deadline = None  # closed once
            if self.draining:
                close_connection(handlers.get(client.id), client, "shutting down")
                continue
            self.metrics.connection_timed_out("proxy", conn.phase)
            self.rlog.warning("timeout:" + conn.phase, f"closed a client connection: {conn.phase} timeout")
            close_connection(handlers.get(client.id), client, f"{conn.phase} timeout")
        from secretless_proxy.edge import httplayers  # (the HTTP layers never import this module)

        # What clients have not read yet counts against the echo check's process-wide total: a checked
        # body is written whole, and one a client never reads stays in memory (hostile review 5.11).
        httplayers.PROCESS.pending = pending


    @staticmethod
    def _head_started(conn: _Conn, handler, client: Client) -> bool:
        # Walk the layers only when mitmproxy saw an event on this connection since the last look
        # (its inactivity watchdog stamps every one): idle keep-alive pools cost nothing per tick.
        stamp = getattr(getattr(handler, "timeout_watchdog", None), "last_activity", None)
        if stamp is not None and stamp <= conn.activity_seen:
            return False
        conn.activity_seen = stamp if stamp is not None else conn.activity_seen
        return _head_started(handler, client)


def _on_a_listener(client: Client) -> bool:
    """Whether ``client`` arrived on an address the proxy listens on now.

    Under ``mitmdump -s``, mitmdump binds its default ``*:8080`` before the script applies the
    config's ``listen``; connections it accepted there just before the rebind reach the addon
    after it (hostile review 19). They are on no address the operator chose: refused. An
    address bound to every interface (``0.0.0.0``, ``::``) takes any local address of its port.
    """
    master = getattr(ctx, "master", None)
    ps = master.addons.get("proxyserver") if master is not None else None
    if ps is None or not client.sockname:
        return True  # no proxyserver (in-process tests): nothing to compare with
    host, port = _unmapped(str(client.sockname[0])), client.sockname[1]
    for addr in ps.listen_addrs():
        bound_host, bound_port = _unmapped(str(addr[0])), addr[1]
        if bound_port == port and bound_host in ("", "0.0.0.0", "::", host):
            return True
    return False


def _unmapped(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") else host


def _peer(client: Client) -> str:
    return _unmapped(str(client.peername[0])) if client.peername else "?"  # IPv4-mapped IPv6 is the IPv4 client


def _unsent_bytes(handler, client: Client) -> int:
    """Bytes written to ``client`` that its socket has not taken yet (the transport's write buffer)."""
    io = getattr(handler, "transports", {}).get(client) if handler is not None else None
    transport = getattr(getattr(io, "writer", None), "transport", None)
    try:
        return transport.get_write_buffer_size() if transport is not None else 0
    except Exception:  # noqa: BLE001 - a closing transport: nothing to count
        return 0


def close_connection(handler, client: Client, why: str) -> None:
    """Cancel the client's connection task, as mitmproxy's own inactivity timeout does."""
    io = getattr(handler, "transports", {}).get(client) if handler is not None else None
    task = getattr(io, "handler", None)
    if task is not None:
        task.cancel(why)


def _head_started(handler, client: Client) -> bool:
    """Whether an HTTP/1 request head has started arriving on ``client`` (bytes in the parser's buffer).

    Walks mitmproxy's layer tree from ``handler.layer`` (NextLayer.layer, tunnel and stream
    ``child_layer``, HttpLayer ``connections``/``streams``, a mode layer's delegate) to the innermost ``Http1Server`` of
    this client and looks at its receive buffer. HTTP/2 has no such buffer: an idle h2
    connection is bound by the idle deadline only. Unknown shapes answer False (idle rules).
    """
    from mitmproxy.proxy.layers.http._http1 import Http1Server

    todo: list = [getattr(handler, "layer", None)]
    seen: set[int] = set()
    found = False
    while todo and len(seen) < 64:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, Http1Server) and node.conn is client:
            found = found or len(node.buf) > 0
            continue
        # modes.HttpProxy hands its events to its NextLayer by rebinding _handle_event to it.
        delegate = getattr(getattr(node, "_handle_event", None), "__self__", None)
        todo += [getattr(node, "layer", None), getattr(node, "child_layer", None), delegate]
        for name in ("connections", "streams"):
            children = getattr(node, name, None)
            if isinstance(children, dict):
                todo += list(children.values())
    return found
