"""Only HTTP leaves (issue 8 §1): the protocol gate in front of every mitmproxy layer decision.

mitmproxy relays anything it does not recognise as HTTP as raw TCP (``rawtcp``), passes TLS
through for ``ignore_hosts``/``allow_hosts``, relays ``tcp_hosts``/``udp_hosts``, speaks DNS to
port 53 and offers other proxy modes. None of those paths runs the ``request`` hooks where identity
and policy live, so each one is a relay around the policy. The gate closes them in two places:

- ``check_options`` refuses, in ``configure()``, every option value that would open such a path,
  so ``mitmdump -s addons/secretless.py`` cannot be configured open;
- ``Gate.next_layer`` runs after mitmproxy's own ``next_layer`` addon and replaces any decision
  other than TLS interception or HTTP: bytes that start an HTTP/1 request line go to the guarded
  HTTP layer (a request written in two segments, ``GE`` then ``T /…``, is still HTTP and is judged
  like any other), anything else gets a ``protocol_refused`` answer and the connection is closed.
  No upstream connection is ever opened for it (the proxy connects lazily).

The gate does not depend on the options being right: even with ``rawtcp`` on, no raw relay is built.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable

from mitmproxy import exceptions, http
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import ClientTLSLayer, HttpLayer, ServerTLSLayer
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.mode_specs import ProxyMode, RegularMode

from secretless_proxy.reasons import Reason
from secretless_proxy.refusal import Refusal, error_response

log = logging.getLogger("secretless.protocols")

# Option values that open a path around the policy: (option, is_open(value), why). Options that a
# given master does not have (the lean master has no map_remote) are skipped.
_OPEN_VALUES: tuple[tuple[str, Callable[[object], bool], str], ...] = (
    ("ignore_hosts", bool, "TLS passthrough relays bytes that no rule has judged"),
    ("allow_hosts", bool, "hosts outside allow_hosts are passed through as raw TLS, unjudged"),
    ("tcp_hosts", bool, "a raw TCP relay carries bytes that no rule has judged"),
    ("udp_hosts", bool, "a raw UDP relay carries bytes that no rule has judged"),
    ("mode", lambda v: any(not isinstance(ProxyMode.parse(m), RegularMode) for m in v),  # type: ignore[attr-defined]
     "only the regular (HTTP CONNECT) proxy mode is supported"),
    ("validate_inbound_headers", lambda v: not v, "unvalidated headers allow request smuggling past the policy"),
    ("map_remote", bool, "it rewrites the destination after the policy decided on it"),
    ("map_local", bool, "it answers requests from files instead of the policy"),
    ("modify_headers", bool, "it rewrites headers after the policy decided on them"),
    ("modify_body", bool, "it rewrites bodies after the policy decided on them"),
    ("client_replay", bool, "replayed flows would be sent without a workload identity"),
    ("upstream_auth", bool, "the proxy's credentials come from rules, not from an option"),
)

# Forced by the addon once its config is loaded; changing them afterwards reopens a path.
FORCED = {"rawtcp": False, "connection_strategy": "lazy", "websocket": True}


def check_options(options, updated: set[str], *, forced: bool) -> None:
    """Raise OptionsError if an option in ``updated`` now has a value that opens a relay."""
    for name, is_open, why in _OPEN_VALUES:
        if name in updated and name in options:
            value = getattr(options, name)
            try:
                bad = is_open(value)
            except ValueError:  # an unparseable mode: mitmproxy rejects it too
                bad = True
            if bad:
                raise exceptions.OptionsError(f"{name}={value!r} is not allowed with secretless-proxy: {why}")
    if forced:
        for name, wanted in FORCED.items():
            if name in updated and name in options and getattr(options, name) != wanted:
                raise exceptions.OptionsError(
                    f"{name}={getattr(options, name)!r} is not allowed with secretless-proxy "
                    f"(it must stay {wanted!r}: no relay and no upstream connection before a request passed policy)")


# An HTTP/1 request line (RFC 9112 §3): method token, one space, a target, one space, HTTP/1.x.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_REQUEST_LINE = re.compile(rb"%s+ [^\x00-\x20\x7f]+ HTTP/1\.[01]\r?\n" % _TOKEN)
# What a request line can start with while it is still arriving (``GE``, ``GET /inter``, ``GET / HT``).
_REQUEST_LINE_PREFIX = re.compile(
    rb"%s*(?: [^\x00-\x20\x7f]*(?: (?:H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[01]\r?)?)?)?)?)?)?)?)?)?)?\Z" % _TOKEN)


def classify(data: bytes, *, max_head: int) -> str:
    """``http`` (an HTTP/1 request line), ``more`` (could still become one) or ``refuse``."""
    data = data.lstrip(b"\r\n")  # RFC 9112 §2.2: ignore empty lines before a request line
    if len(data) < 3 and b"\x16\x03"[:len(data)] == data:
        return "more"  # a TLS record header still arriving (mitmproxy needs 3 bytes to see TLS)
    nl = data.find(b"\n")
    if nl < 0:
        if len(data) > max_head:
            return "refuse"
        return "more" if _REQUEST_LINE_PREFIX.match(data) else "refuse"
    return "http" if _REQUEST_LINE.match(data, 0, nl + 1) else "refuse"


class Gate:
    """Decides the next layer and owns the refusals that happen below HTTP flows."""

    def __init__(self, *, max_head: Callable[[], int], report: Callable[[layer.Context, str, str], None],
                 make_http: Callable[..., HttpLayer]) -> None:
        self._max_head = max_head
        self._report = report
        self._make_http = make_http  # the guarded HTTP layer (head and body limits, client target)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        chosen = nextlayer.layer
        self._decide(nextlayer)
        if nextlayer.layer is not chosen and chosen is not None:
            # mitmproxy's discarded choice registered itself in the shared context: take it out,
            # so the layer stack says what actually runs (HttpStream finds its parent by position).
            ctx_layers = nextlayer.context.layers
            for lay in _chain(chosen):
                for i, existing in enumerate(ctx_layers):
                    if existing is lay:
                        del ctx_layers[i]
                        break

    def _decide(self, nextlayer: layer.NextLayer) -> None:
        ctx = nextlayer.context
        chosen = nextlayer.layer
        if not isinstance(ctx.client.proxy_mode, RegularMode) or ctx.client.transport_protocol != "tcp":
            nextlayer.layer = self.refusal_layer(ctx, Reason.PROTOCOL_REFUSED, "only HTTP through an HTTP CONNECT proxy is supported")
            return
        if isinstance(chosen, (ClientTLSLayer, ServerTLSLayer)):
            # TLS interception: the proxy terminates the client's TLS and decides again inside it.
            chain = _chain(chosen)
            if any(isinstance(lay, ServerTLSLayer) and not any(lay is c for c in chain) for lay in ctx.layers):
                # TLS inside the intercepted TLS would wrap the upstream connection twice and
                # replace the SNI the destination was bound to: there is no use for it.
                nextlayer.layer = self.refusal_layer(ctx, Reason.PROTOCOL_REFUSED, "TLS inside an intercepted TLS tunnel is not supported")
            elif not self._guard_tls_stack(chosen):
                nextlayer.layer = self.refusal_layer(ctx, Reason.PROTOCOL_REFUSED, "TLS passthrough is not supported")
            return
        if type(chosen) is HttpLayer and ctx.client.alpn == b"h2":
            nextlayer.layer = self._make_http(ctx, chosen.mode)  # HTTP/2, negotiated by ALPN
            return
        mode = chosen.mode if type(chosen) is HttpLayer and chosen.mode is HTTPMode.regular else HTTPMode.transparent
        if chosen is not None and not isinstance(chosen, HttpLayer) and ctx.server.address is None:
            nextlayer.layer = self.refusal_layer(ctx, Reason.PROTOCOL_REFUSED, "the connection has no HTTP destination")
            return
        # Anything else (raw TCP, DNS, UDP, QUIC, a deferred decision): the bytes decide.
        verdict = classify(nextlayer.data_client(), max_head=self._max_head())
        if verdict == "more":
            nextlayer.layer = None  # wait for the rest of the request line (a split write)
        elif verdict == "http":
            # The proxy's own port (CONNECT, absolute-form requests) or a request inside a tunnel.
            nextlayer.layer = self._make_http(ctx, mode)
        elif len(nextlayer.data_client()) > self._max_head():
            nextlayer.layer = self.refusal_layer(ctx, Reason.HEAD_TOO_LARGE, "the request line is too long", status=431)
        else:
            nextlayer.layer = self.refusal_layer(
                ctx, Reason.PROTOCOL_REFUSED, "only HTTP/1.1 and HTTP/2 requests pass this proxy; other bytes are refused")

    def _guard_tls_stack(self, top: layer.Layer) -> bool:
        """Whether ``top`` is a plain interception stack; its HTTP layer (proxy hop) is guarded."""
        if isinstance(top, ServerTLSLayer):
            if type(top) is not ServerTLSLayer or type(top.child_layer) is not ClientTLSLayer:
                return False
            top = top.child_layer
        if type(top) is not ClientTLSLayer:
            return False
        child = top.child_layer
        if type(child) is HttpLayer:
            layers = child.context.layers
            for i, existing in enumerate(layers):
                if existing is child:  # it registered itself in the shared context: take it out
                    del layers[i]
                    break
            top.child_layer = self._make_http(child.context, child.mode)
            return True
        return type(child) is layer.NextLayer

    def clienthello(self, data) -> None:
        """``tls_clienthello``: never pass a TLS connection through, never connect upstream first."""
        data.ignore_connection = False
        data.establish_server_tls_first = False

    def refusal_layer(self, ctx, reason: str, message: str, *, status: int = 400) -> RefuseLayer:
        return RefuseLayer(ctx, refusal=Refusal(status, reason, message), report=self.report)

    def report(self, ctx: layer.Context, reason: str) -> str:
        """Report a refusal made before any HTTP flow exists (audit, metric, log); returns its id."""
        rid = uuid.uuid4().hex
        try:
            self._report(ctx, reason, rid)
        except Exception as exc:  # noqa: BLE001 - reporting must never keep a refused connection open
            log.error("reporting a refused connection failed (%s)", type(exc).__name__)
        return rid


def _chain(top: layer.Layer | None) -> list[layer.Layer]:
    """``top`` and the layers already stacked under it (TLS layers' children)."""
    out: list[layer.Layer] = []
    while top is not None and not isinstance(top, layer.NextLayer) and not any(top is o for o in out):
        out.append(top)
        top = getattr(top, "child_layer", None)
    return out


def refusal_bytes(request_id: str, refusal: Refusal) -> bytes:
    """A complete HTTP/1.1 refusal (error contract) that closes the connection."""
    resp = error_response(request_id, refusal)
    resp.headers["Connection"] = "close"
    return http1.assemble_response(resp)


class RefuseLayer(layer.Layer):
    """Answers with one refusal, closes the client connection and ignores whatever else arrives."""

    def __init__(self, context, *, refusal: Refusal, report: Callable[[layer.Context, str], str]) -> None:
        super().__init__(context)
        self.refusal = refusal
        self._report_fn = report
        self._done = False

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self._done or not isinstance(event, (events.Start, events.DataReceived)):
            return
        self._done = True
        rid = self._report_fn(self.context, self.refusal.reason)
        yield commands.SendData(self.context.client, refusal_bytes(rid, self.refusal))
        yield commands.CloseConnection(self.context.client)


_HTTP1_ALPNS = (b"http/1.1", b"http/1.0")


def only_http_alpn(tls_start) -> None:
    """Let the client's TLS negotiate HTTP/2 or HTTP/1.x only (the ``tls_start_client`` hook, after
    mitmproxy's tlsconfig): its ALPN choice takes any HTTP protocol the client offers, ``h3`` too,
    and an ``h3`` inside a TCP tunnel started mitmproxy's HTTP/3 layer there, which crashed on the
    first event, unanswered (hostile review 4.15). A client that offers no other protocol gets no
    ALPN; what it then sends is judged like any other bytes (``Gate``)."""
    conn = tls_start.ssl_conn
    data = conn.get_app_data() if conn is not None else None
    if not isinstance(data, dict) or data.get("client_alpn") is not None:
        return  # mitmproxy already chose (HTTP/1.1 on the proxy hop)
    offers = tls_start.context.client.alpn_offers or ()
    allowed = (b"h2", *_HTTP1_ALPNS) if data.get("http2") else _HTTP1_ALPNS
    if offers:
        data["client_alpn"] = next((a for a in offers if a in allowed), b"")  # b"": no protocol in common


def connect_refusal(flow: http.HTTPFlow) -> Refusal | None:
    """Why a CONNECT must not open a tunnel, or None.

    HTTP/2 CONNECT streams (and RFC 8441 extended CONNECT, ``:protocol``) multiplex several
    tunnels over one client connection, whose identity and bound destination are per connection.
    """
    if flow.request.is_http2 or flow.request.is_http3:
        return Refusal(400, Reason.PROTOCOL_REFUSED, "CONNECT over HTTP/2 is not supported; use HTTP/1.1 to the proxy")
    return None


def upgrade_refusal(request: http.Request) -> Refusal | None:
    """Why a request's ``Upgrade`` must be refused, or None. Only WebSocket may follow a request
    that passed identity and a rule; ``h2c`` and every other protocol would leave HTTP's hooks."""
    values = request.headers.get_all("upgrade")
    if request.headers.get_all("http2-settings"):
        return Refusal(400, Reason.UPGRADE_REFUSED, "h2c upgrades are not supported; use HTTP/2 over TLS")
    if not values:
        return None
    tokens = [t.strip().lower() for v in values for t in v.split(",") if t.strip()]
    if tokens == ["websocket"] and request.method == "GET" and not (request.is_http2 or request.is_http3):
        return None
    return Refusal(400, Reason.UPGRADE_REFUSED, "only WebSocket upgrades are supported (Upgrade: websocket on GET)")
