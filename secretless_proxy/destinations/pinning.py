"""Destinations are checked where the proxy connects: resolve once, check every address, connect
to exactly those addresses.

``admit(flow, decision)`` runs once per request, right after the policy decision and before any
credential is fetched. It resolves the decided host (or takes an IP literal as it is), classifies
every address (``addresses.py``) and refuses the request when any of them is not public and the
rule does not allow it (``to.private``, plus the operator's ``upstream.allow_private``), or when
one is the proxy's own listener. The checked addresses are then *pinned* to that flow: another
request's admission (another rule, a changed DNS answer) never changes them.

The HTTP layer (``httplayers.GuardedHttpLayer``) says which flow a new upstream connection is
opened for; mitmproxy's ``server_connect`` hook then replaces the host name in its address with
an address pinned for that flow, so the connection goes exactly where the check looked — a second
lookup between check and connect (DNS rebinding) never happens. SNI and certificate verification
still use the name (mitmproxy sets the SNI before ``server_connect``).

After the connection is open the name is put back into its address, so keep-alive reuse keeps
working; an open connection is reused for a request only if its peer address passes *that*
request's rule (otherwise a new connection is opened), and the connection a request is about to
be sent over is judged once more right before it goes (``send_refusal``).

Upstream connection failures become error-contract refusals (``upstream_refusal``) that never
name the resolved address; the proxy log keeps it.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

from secretless_proxy.destinations.addresses import (
    LOOPBACK,
    UNSPECIFIED,
    AddressClass,
    Allowance,
    IPAddress,
    classify,
    ip_literal,
    verdict,
)
from secretless_proxy.destinations.resolver import DnsError, DnsTimeout, Resolver, ResolverConfig
from secretless_proxy.reasons import Reason
from secretless_proxy.refusal import Refusal

if TYPE_CHECKING:
    from mitmproxy import http
    from mitmproxy.connection import Client, Server
    from mitmproxy.proxy.server_hooks import ServerConnectionHookData

    from secretless_proxy.config.model import Config
    from secretless_proxy.policy import Decision

log = logging.getLogger("secretless")

PROXY_LISTENER = "proxy_listener"  # the verdict for the proxy's own ports: never allowed
OWN_ERROR = "secretless-proxy: "  # prefix of the connection errors set here (and in addon.py)
FAILED_SECONDS = 30.0  # after a failed connect, the pin's other checked addresses are tried first


@dataclass(frozen=True, slots=True)
class Checked:
    address: IPAddress
    cls: AddressClass
    refused: str | None  # None: may be reached; else the class (or proxy_listener) that refuses it
    text: str = ""  # the address as text (rendered once, for flow metadata)


class Judged(NamedTuple):
    checked: tuple[Checked, ...]
    addresses: tuple[IPAddress, ...]
    refused: Checked | None  # the first refused address, if any
    texts: tuple[str, ...]


async def evaluate(host: str, port: int, *, resolver: Resolver, allowance: Allowance,
                   listeners: Iterable[tuple[str, int]]) -> Judged:
    """Every address ``host`` stands for, with its verdict. Raises DnsError / DnsTimeout."""
    literal = ip_literal(host)
    addrs = (literal,) if literal is not None else (await resolver.resolve(host)).addresses
    return judge(addrs, port, allowance, tuple(listeners))


@lru_cache(maxsize=4096)  # per request: a warm answer is judged once per (rule allowance, port)
def judge(addrs: tuple[IPAddress, ...], port: int, allowance: Allowance,
          listeners: tuple[tuple[str, int], ...]) -> Judged:
    out = []
    for a in addrs:
        cls = classify(a)
        refused = PROXY_LISTENER if _is_listener(cls, port, listeners) else verdict(cls, allowance)
        out.append(Checked(address=a, cls=cls, refused=refused, text=str(a)))
    return Judged(checked=tuple(out), addresses=addrs, refused=next((c for c in out if c.refused), None),
                  texts=tuple(c.text for c in out))


@lru_cache(maxsize=1024)
def _combined(rule: Allowance, operator: Allowance) -> Allowance:
    return rule.union(operator)


def _is_listener(cls: AddressClass, port: int, listeners: tuple[tuple[str, int], ...]) -> bool:
    """Does (address, port) reach one of the proxy's own listening sockets?"""
    addr = cls.effective
    for host, lport in listeners:
        if lport != port:
            continue
        if cls.kind in (LOOPBACK, UNSPECIFIED):
            return True  # a listener on any address answers there, or on 0.0.0.0 / ::
        bound = ip_literal(host)
        if bound is None or bound.is_unspecified:
            if _is_local(addr):  # bound to every interface (or a name): any local address is it
                return True
        elif bound == addr:
            return True
    return False


@lru_cache(maxsize=256)
def _is_local(addr: IPAddress) -> bool:
    """Is ``addr`` one of this machine's own addresses? (Binding to it succeeds only then.)"""
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((str(addr), 0))
        return True
    except OSError:
        return False


@dataclass(slots=True)
class Pin:
    """The addresses one admitted request may connect to, and what its rule allows."""

    host: str
    port: int
    addresses: tuple[IPAddress, ...]
    allowance: Allowance
    rule: str


MAX_HOSTS_PER_CLIENT = 64  # (host, port) pairs remembered per client connection (oldest dropped)
MAX_PINS_PER_HOST = 8  # distinct (rule, allowance) pins kept per (host, port) on one client connection


@dataclass(slots=True)
class _ClientPins:
    """Pins of one client connection, for connections opened without a flow (in-process callers).

    Connections the HTTP layer opens carry their flow's own pin (``opening``) and never read this."""

    pins: OrderedDict[tuple[str, int], OrderedDict[tuple[str, Allowance], Pin]] = field(default_factory=OrderedDict)

    def remember(self, pin: Pin) -> None:
        key = (pin.host, pin.port)
        per_host = self.pins.pop(key, None) or OrderedDict()
        self.pins[key] = per_host  # most recently used last
        per_host.pop((pin.rule, pin.allowance), None)
        per_host[(pin.rule, pin.allowance)] = pin
        while len(per_host) > MAX_PINS_PER_HOST:
            per_host.popitem(last=False)
        while len(self.pins) > MAX_HOSTS_PER_CLIENT:
            self.pins.popitem(last=False)


_UNADMITTED = None  # the pin of a connection opened for a flow that admit() never passed


class Destinations:
    """Per-process destination checks; reads the live config on every call (reloads apply).

    A request is only ever sent over a connection whose peer was judged against *its own* rule:
    each admitted flow has its own pin (``admit``); the HTTP layer tells us which flow a new
    connection is opened for (``opening``), asks before reusing an open connection for another
    flow (``reusable``) and checks again right before the request goes out (``send_refusal``).
    """

    def __init__(self, *, config: Callable[[], Config | None], listeners: Callable[[], list[tuple[str, int]]]) -> None:
        self._config = config
        self._listeners = listeners
        self._resolver: Resolver | None = None
        self._flows: weakref.WeakKeyDictionary[http.HTTPFlow, Pin] = weakref.WeakKeyDictionary()
        self._clients: weakref.WeakKeyDictionary[Client, _ClientPins] = weakref.WeakKeyDictionary()
        self._for: weakref.WeakKeyDictionary[Server, Pin | None] = weakref.WeakKeyDictionary()  # opened for
        self._opened: weakref.WeakKeyDictionary[Server, Pin] = weakref.WeakKeyDictionary()
        self._target: weakref.WeakKeyDictionary[Server, IPAddress] = weakref.WeakKeyDictionary()
        self._own: tuple[object, float, tuple[tuple[str, int], ...]] | None = None
        # Addresses whose last connection attempt failed → until when to prefer the pin's others
        # (a dual-stack name whose first address is unreachable must not fail every request).
        self._failed: dict[IPAddress, float] = {}

    def resolver(self, cfg: ResolverConfig) -> Resolver:
        if self._resolver is not None and self._resolver.config is cfg:
            return self._resolver
        if self._resolver is None or self._resolver.config != cfg:
            self._resolver = Resolver(cfg)  # a changed resolver section starts with an empty cache
        else:
            self._resolver.config = cfg  # same settings after a reload: keep the cache
        return self._resolver

    def own_listeners(self, cfg: Config) -> tuple[tuple[str, int], ...]:
        """The proxy's own listening addresses as bound (port 0 resolved), asked again after a
        reload, a second, or ``listeners_changed()``."""
        now = time.monotonic()
        if self._own is not None and self._own[0] is cfg and now - self._own[1] < 1.0:
            return self._own[2]
        # The configured admin addresses count too until their listeners are bound (a port 0 in the
        # config is no port: the bound one comes from ``listeners``).
        configured = (a for a in (cfg.admin_listen, cfg.admin_api_listen) if a and a[1])
        own = tuple(dict.fromkeys((*self._listeners(), *configured)))
        self._own = (cfg, now, own)
        return own

    def listeners_changed(self) -> None:
        self._own = None

    async def admit(self, flow: http.HTTPFlow, decision: Decision) -> None:
        """Check where ``flow`` would go and pin it; raises Refusal (403/502/504) otherwise."""
        cfg = self._config()
        assert cfg is not None
        rule = decision.rule
        host, port = flow.request.host, flow.request.port
        allowance = _combined(rule.to.private, cfg.allow_private)
        try:
            checked = await evaluate(host, port, resolver=self.resolver(cfg.resolver), allowance=allowance,
                                     listeners=self.own_listeners(cfg))
        except DnsTimeout as exc:
            log.warning("request %s: %s", flow.id, exc)
            raise Refusal(504, Reason.DNS_TIMEOUT, f"the proxy's resolver did not answer for {host} in time", rule.name) from None
        except DnsError as exc:
            log.info("request %s: %s", flow.id, exc)
            raise Refusal(502, Reason.DNS_FAILED, f"{host} could not be resolved by the proxy", rule.name) from None
        c = checked.refused
        if c is not None:
            log.info("request %s refused: %s:%d resolves to %s (%s), which rule %s does not allow", flow.id,
                     host, port, c.address, c.cls.describe(), rule.name)
            raise Refusal(403, Reason.DESTINATION_PRIVATE, _message(host, c, len(checked.checked)), rule.name)
        pin = Pin(host=host, port=port, addresses=checked.addresses, allowance=allowance, rule=rule.name)
        self._flows[flow] = pin  # this flow's own: another flow's admission never changes it
        state = self._clients.get(flow.client_conn)
        if state is None:
            state = self._clients[flow.client_conn] = _ClientPins()
        state.remember(pin)
        flow.metadata["secretless.addresses"] = list(checked.texts)

    # -- the HTTP layer's connection choice (httplayers.GuardedHttpLayer) -------------------------

    def opening(self, flow: http.HTTPFlow, server: Server) -> None:
        """``server`` is a new connection opened to send ``flow``: it goes where ``flow`` was checked."""
        self._for[server] = self._flows.get(flow, _UNADMITTED)

    def opened_as(self, server: Server) -> tuple[str, int] | None:
        """The (host, port) a connection we pointed at an address was opened for."""
        pin = self._opened.get(server)
        return (pin.host, pin.port) if pin is not None else None

    def reusable(self, flow: http.HTTPFlow, server: Server) -> bool:
        """May ``flow`` be sent over the open (or opening) connection ``server``?"""
        return self._why_not(flow, server) is None

    def send_refusal(self, flow: http.HTTPFlow, server: Server) -> Refusal | None:
        """The last check, with the connection ``flow`` is about to be sent over."""
        why = self._why_not(flow, server)
        if why is None:
            return None
        pin = self._flows.get(flow)
        log.error("request %s refused: its upstream connection to %s:%d reaches %s, which rule %s does not allow",
                  flow.id, flow.request.host, flow.request.port, why, pin.rule if pin else "?")
        return Refusal(403, Reason.DESTINATION_PRIVATE, f"the upstream connection to {flow.request.host} reaches an address "
                       "this rule does not allow (to.private)", pin.rule if pin else None)

    def _why_not(self, flow: http.HTTPFlow, server: Server) -> str | None:
        pin = self._flows.get(flow)
        if pin is None:
            return "an unadmitted request"
        if (flow.request.host, flow.request.port) != (pin.host, pin.port):
            return "a destination other than the admitted one"  # changed after admit (another addon)
        if server.peername:
            addr: IPAddress | None = ipaddress.ip_address(server.peername[0].split("%", 1)[0])
        else:
            addr = self._target.get(server)
        if addr is None:
            # Not pointed anywhere yet: it will go where the flow it was opened for was checked,
            # which is fine for this flow only if its rule allows the same.
            other = self._for.get(server)
            if other is not None and other.allowance == pin.allowance and other.port == pin.port:
                return None
            return "an address checked for another rule"
        cfg = self._config()
        cls = classify(addr)
        if cfg is None or _is_listener(cls, pin.port, self.own_listeners(cfg)):
            return f"{addr} (the proxy itself)"
        why = verdict(cls, pin.allowance)
        return f"{addr} ({cls.describe()})" if why else None

    # -- mitmproxy's server connection hooks ----------------------------------------------------

    def server_connect(self, data: ServerConnectionHookData) -> None:
        """Point the new connection at a checked address; no checked address: no connection."""
        server = data.server
        if server.address is None:
            return
        host, port = server.address
        if server in self._for:  # opened by the HTTP layer for one flow: that flow's pin, only
            pin = self._for[server]
            pins = [pin] if pin is not None and (pin.host, pin.port) == (host, port) else []
        else:  # no flow known: an address every pin of this client for the host allows
            state = self._clients.get(data.client)
            pins = list(reversed(state.pins.get((host, port), {}).values())) if state else []
        if not pins or not any(p.addresses for p in pins):
            log.error("refusing an upstream connection to %s:%d that no request admitted", host, port)
            server.error = OWN_ERROR + "no checked address for this destination"
            return
        now = time.monotonic()
        cfg = self._config()
        own = self.own_listeners(cfg) if cfg is not None else ()

        def allowed(a: IPAddress) -> bool:
            cls = classify(a)
            return cfg is not None and not _is_listener(cls, port, own) and all(not verdict(cls, p.allowance) for p in pins)
        candidates = [a for p in pins for a in p.addresses]
        target = next((a for a in candidates if self._failed.get(a, 0.0) <= now and allowed(a)), None) \
            or next((a for a in candidates if allowed(a)), None)
        if target is None:
            log.error("refusing an upstream connection to %s:%d: no checked address is allowed for every rule "
                      "that may use it (%s)", host, port, ", ".join(sorted({p.rule for p in pins})))
            server.error = OWN_ERROR + "the checked address is not allowed"
            return
        pin = next(p for p in pins if target in p.addresses)
        self._opened[server] = pin
        self._target[server] = target
        server.address = (str(target), port)
        log.info("upstream connection to %s:%d at %s (rule %s)", host, port, target, pin.rule)

    def server_connected(self, data: ServerConnectionHookData) -> None:
        """Check the peer is the pinned address, then give the connection its name back for reuse."""
        server = data.server
        pin = self._opened.get(server)
        if pin is None:
            return
        peer = server.peername[0].split("%", 1)[0] if server.peername else None
        if peer is None or ipaddress.ip_address(peer) != ipaddress.ip_address(server.address[0]):
            log.error("upstream connection for %s:%d reached %s, not the checked %s", pin.host, pin.port, peer,
                      server.address[0])
            server.error = OWN_ERROR + "connected to an unchecked address"  # never reused
            return
        # mitmproxy refuses to change the address of an open connection (Server.__setattr__) because
        # it would no longer say where the connection goes; here it returns to the name the request
        # used — exactly what mitmproxy itself records when it resolves — so that keep-alive reuse,
        # which matches on (host, port), keeps working. The peer stays in server.peername.
        object.__setattr__(server, "address", (pin.host, pin.port))

    def server_connect_error(self, data: ServerConnectionHookData) -> None:
        pin = self._opened.pop(data.server, None)
        if pin is not None and data.server.address:
            if len(self._failed) >= 1024:
                self._failed.clear()  # bounded; forgetting only means trying the first address again
            try:
                self._failed[ipaddress.ip_address(data.server.address[0])] = time.monotonic() + FAILED_SECONDS
            except ValueError:
                pass
            log.warning("upstream connection to %s:%d at %s failed: %s", pin.host, pin.port,
                        data.server.address[0] if data.server.address else "?", data.server.error)


def _kind(refused: str) -> str:
    return "proxy listener" if refused == PROXY_LISTENER else refused.replace("_", "-")


def _message(host: str, c: Checked, total: int) -> str:
    what = "is" if ip_literal(host) is not None else ("resolves to" if total == 1 else "has among its addresses")
    if c.refused == PROXY_LISTENER:
        return f"{host} {what} the proxy itself, which no rule may reach"
    return f"{host} {what} a {_kind(c.refused or '')} address, which this rule does not allow (to.private)"


_TLS_WORDS = ("tls", "ssl", "certificate", "handshake", "alpn")


def upstream_refusal(error: str, *, host: str, rule: str | None) -> Refusal:
    """The error-contract answer for a failed upstream connection. ``error`` is mitmproxy's text
    (it may name the resolved address): it goes to the proxy log, never into the answer."""
    text = error.lower()
    if text.startswith(OWN_ERROR):
        if "destination check failed" in text or "no checked address" in text:
            return Refusal(502, Reason.INTERNAL_ERROR, "the proxy failed to open the upstream connection", rule)
        return Refusal(403, Reason.DESTINATION_PRIVATE, f"the upstream connection to {host} would reach an address this "
                       "rule does not allow (to.private)", rule)
    if "timed out" in text or "timeout" in text or f"[errno {errno.ETIMEDOUT}]" in text:  # asyncio: "[Errno 110] Connect call failed"
        return Refusal(504, Reason.UPSTREAM_TIMEOUT, f"the upstream {host} did not answer in time", rule)
    if any(w in text for w in _TLS_WORDS):
        return Refusal(502, Reason.UPSTREAM_TLS_FAILED, f"no verified TLS connection to the upstream {host} could be made", rule)
    return Refusal(502, Reason.UPSTREAM_UNREACHABLE, f"the upstream {host} could not be reached", rule)


def proxy_listeners() -> list[tuple[str, int]]:
    """The (host, port) pairs mitmproxy's proxyserver listens on right now."""
    from mitmproxy import ctx

    ps = ctx.master.addons.get("proxyserver")
    return [(str(a[0]), int(a[1])) for a in ps.listen_addrs()] if ps is not None else []
