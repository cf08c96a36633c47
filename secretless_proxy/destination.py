"""Destinations are checked where the proxy connects: resolve once, check every address, connect
to exactly those addresses.

``admit(flow, decision)`` runs once per request, right after the policy decision and before any
credential is fetched. It resolves the decided host (or takes an IP literal as it is), classifies
every address (``addresses.py``) and refuses the request when any of them is not public and the
rule does not allow it (``to.private``, plus the operator's ``upstream.allow_private``), or when
one is the proxy's own listener. The checked addresses are then *pinned* for the client
connection and host. mitmproxy's ``server_connect`` hook replaces the host name in the new
server connection's address with a pinned address, so the connection goes exactly where the
check looked — a second lookup between check and connect (DNS rebinding) never happens. SNI and
certificate verification still use the name (mitmproxy sets the SNI before ``server_connect``).

After the connection is open the name is put back into its address, so keep-alive reuse keeps
working; a request that would reuse an open connection has that connection's peer address
checked against its own rule first.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

from .addresses import LOOPBACK, UNSPECIFIED, Allowance, AddressClass, IPAddress, classify, ip_literal, verdict
from .refusal import DESTINATION_PRIVATE, DNS_FAILED, DNS_TIMEOUT, Refusal
from .resolver import DnsError, DnsTimeout, Resolver, ResolverConfig

if TYPE_CHECKING:
    from mitmproxy import http
    from mitmproxy.connection import Client, Server
    from mitmproxy.proxy.server_hooks import ServerConnectionHookData

    from .config import Config
    from .policy import Decision

log = logging.getLogger("secretless")

PROXY_LISTENER = "proxy_listener"  # the verdict for the proxy's own ports: never allowed
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


@dataclass(slots=True)
class _ClientPins:
    pins: dict[tuple[str, int], Pin] = field(default_factory=dict)
    servers: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # connections we opened


class Destinations:
    """Per-process destination checks; reads the live config on every call (reloads apply)."""

    def __init__(self, *, config: Callable[[], Config | None], listeners: Callable[[], list[tuple[str, int]]]) -> None:
        self._config = config
        self._listeners = listeners
        self._resolver: Resolver | None = None
        self._clients: weakref.WeakKeyDictionary[Client, _ClientPins] = weakref.WeakKeyDictionary()
        self._opened: weakref.WeakKeyDictionary[Server, Pin] = weakref.WeakKeyDictionary()
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
        """The proxy's own listening addresses, asked again after a reload or a second (ports opening)."""
        now = time.monotonic()
        if self._own is not None and self._own[0] is cfg and now - self._own[1] < 1.0:
            return self._own[2]
        own = (*self._listeners(), *(a for a in (cfg.admin_listen, cfg.admin_api_listen) if a))
        self._own = (cfg, now, own)
        return own

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
            raise Refusal(504, DNS_TIMEOUT, f"the proxy's resolver did not answer for {host} in time", rule.name) from None
        except DnsError as exc:
            log.info("request %s: %s", flow.id, exc)
            raise Refusal(502, DNS_FAILED, f"{host} could not be resolved by the proxy", rule.name) from None
        c = checked.refused
        if c is not None:
            log.info("request %s refused: %s:%d resolves to %s (%s), which rule %s does not allow", flow.id,
                     host, port, c.address, c.cls.describe(), rule.name)
            raise Refusal(403, DESTINATION_PRIVATE, _message(host, c, len(checked.checked)), rule.name)
        state = self._clients.get(flow.client_conn)
        if state is None:
            state = self._clients[flow.client_conn] = _ClientPins()
        elif len(state.servers):
            self._recheck_open(state, host, port, allowance, rule.name, cfg)
        addresses = checked.addresses
        pin = state.pins.get((host, port))
        if pin is None or pin.addresses != addresses or pin.allowance is not allowance or pin.rule != rule.name:
            state.pins[(host, port)] = Pin(host=host, port=port, addresses=addresses, allowance=allowance, rule=rule.name)
        flow.metadata["secretless.addresses"] = list(checked.texts)

    def _recheck_open(self, state: _ClientPins, host: str, port: int, allowance: Allowance, rule: str,
                      cfg: Config) -> None:
        """A request that would reuse an open connection must be allowed to reach its peer too."""
        for server in list(state.servers):
            if server.timestamp_end is not None:
                state.servers.discard(server)  # closed: never reused
                continue
            if not server.connected or server.address != (host, port) or not server.peername:
                continue
            cls = classify(server.peername[0].split("%", 1)[0])
            why = PROXY_LISTENER if _is_listener(cls, port, self.own_listeners(cfg)) else verdict(cls, allowance)
            if why:
                log.info("refused: the open connection to %s:%d reaches %s (%s), which rule %s does not allow",
                         host, port, cls.address, cls.describe(), rule)
                raise Refusal(403, DESTINATION_PRIVATE, f"the open connection to {host} reaches a {_kind(why)} "
                              "address, which this rule does not allow (to.private)", rule)

    # -- mitmproxy's server connection hooks ----------------------------------------------------

    def server_connect(self, data: ServerConnectionHookData) -> None:
        """Point the new connection at a checked address; no checked address: no connection."""
        server = data.server
        if server.address is None:
            return
        host, port = server.address
        state = self._clients.get(data.client)
        pin = state.pins.get((host, port)) if state else None
        if pin is None or not pin.addresses:
            log.error("refusing an upstream connection to %s:%d that no request admitted", host, port)
            server.error = "secretless-proxy: no checked address for this destination"
            return
        now = time.monotonic()
        target = next((a for a in pin.addresses if self._failed.get(a, 0.0) <= now), pin.addresses[0])
        cfg = self._config()
        cls = classify(target)
        if cfg is None or _is_listener(cls, port, self.own_listeners(cfg)) or verdict(cls, pin.allowance):
            log.error("refusing an upstream connection to %s (%s) for %s:%d", target, cls.describe(), host, port)
            server.error = "secretless-proxy: the checked address is not allowed"
            return
        assert state is not None
        state.servers.add(server)
        self._opened[server] = pin
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
            server.error = "secretless-proxy: connected to an unchecked address"  # never reused
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


def proxy_listeners() -> list[tuple[str, int]]:
    """The (host, port) pairs mitmproxy's proxyserver listens on right now."""
    from mitmproxy import ctx

    ps = ctx.master.addons.get("proxyserver")
    return [(str(a[0]), int(a[1])) for a in ps.listen_addrs()] if ps is not None else []
