"""Name → addresses, once per request, through a bounded cache that respects TTLs.

Two back ends behind one call, ``await resolver.resolve(name)``:

- ``system`` (default): the operating system's resolver (``getaddrinfo`` in the event loop's
  executor, so it never blocks the loop). It reports no TTL, so answers are kept for
  ``upstream.resolver.system_cache_seconds``.
- nameservers from ``upstream.resolver.nameservers``: queried with dnspython (A and AAAA
  concurrently), answers kept for their TTL, clamped to ``[min_ttl, max_ttl]``.

Concurrent lookups of one name share one query (single flight). Failures are not cached.
Errors are ``DnsError`` (the name does not resolve) and ``DnsTimeout``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from secretless_proxy.destinations.addresses import IPAddress
from secretless_proxy.errors import SecretlessError


class DnsError(SecretlessError):
    """The name could not be resolved (no such name, no address, server failure)."""


class DnsTimeout(DnsError):
    """The resolver did not answer within its timeout."""


@dataclass(frozen=True, kw_only=True)
class ResolverConfig:
    nameservers: tuple[tuple[str, int], ...] = ()  # empty: the system resolver
    timeout: float = 2.0  # per lookup, all nameservers and both record types together
    cache_size: int = 1024  # names kept
    min_ttl: float = 0.0
    max_ttl: float = 300.0
    system_cache_seconds: float = 5.0  # getaddrinfo reports no TTL


@dataclass(frozen=True, slots=True)
class Answer:
    name: str
    addresses: tuple[IPAddress, ...]
    expires: float = field(compare=False)  # monotonic


class Resolver:
    def __init__(self, config: ResolverConfig) -> None:
        self.config = config
        self._cache: OrderedDict[str, Answer] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Answer]] = {}
        self._dns = _dnspython(config) if config.nameservers else None

    async def resolve(self, name: str) -> Answer:
        """Addresses of ``name`` (normalised, not an IP literal), in the resolver's order."""
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is not None and hit.expires > now:
            self._cache.move_to_end(name)
            return hit
        pending = self._inflight.get(name)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._inflight[name] = fut
        try:
            answer = await asyncio.wait_for(self._lookup(name), self.config.timeout)
        except (TimeoutError, DnsTimeout) as exc:
            err: DnsError = DnsTimeout(f"no answer for {name} within {self.config.timeout:g} s")
            fut.set_exception(err)
            raise err from exc
        except DnsError as exc:
            fut.set_exception(exc)
            raise
        except asyncio.CancelledError:
            fut.cancel()  # the waiters fail too, rather than wait forever
            raise
        except Exception as exc:  # noqa: BLE001 - a resolver bug or OS error is a failed lookup
            err = DnsError(f"{name} could not be resolved ({type(exc).__name__})")
            fut.set_exception(err)
            raise err from exc
        else:
            fut.set_result(answer)
            self._store(answer)
            return answer
        finally:
            del self._inflight[name]
            if fut.done() and not fut.cancelled():
                fut.exception()  # marks it retrieved: asyncio would log an unawaited failure

    def _store(self, answer: Answer) -> None:
        if answer.expires <= time.monotonic():
            return  # TTL 0: used once, never cached
        self._cache[answer.name] = answer
        self._cache.move_to_end(answer.name)
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)

    async def _lookup(self, name: str) -> Answer:
        if self._dns is not None:
            return await self._dnspython_lookup(name)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno == getattr(socket, "EAI_AGAIN", None):
                raise DnsTimeout(f"the system resolver gave no answer for {name} (try again later)") from None
            raise DnsError(f"{name} does not resolve ({exc.strerror or 'no address'})") from None
        addrs = _unique(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos)
        if not addrs:
            raise DnsError(f"{name} has no address")
        return Answer(name=name, addresses=addrs, expires=time.monotonic() + self.config.system_cache_seconds)

    async def _dnspython_lookup(self, name: str) -> Answer:
        import dns.asyncresolver
        import dns.exception
        import dns.resolver

        assert isinstance(self._dns, dns.asyncresolver.Resolver)

        async def one(rdtype: str):
            try:
                return await self._dns.resolve(name + ".", rdtype, search=False)  # type: ignore[union-attr]
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                return None

        try:
            answers = await asyncio.gather(one("A"), one("AAAA"))
        except dns.exception.Timeout:
            raise DnsTimeout(f"the nameservers gave no answer for {name}") from None
        except dns.resolver.LifetimeTimeout:
            raise DnsTimeout(f"the nameservers gave no answer for {name}") from None
        except dns.exception.DNSException as exc:
            raise DnsError(f"{name} could not be resolved ({type(exc).__name__})") from None
        found = [a for a in answers if a is not None]
        addrs = _unique(ipaddress.ip_address(r.address) for a in found for r in a)
        if not addrs:
            raise DnsError(f"{name} does not resolve (no A or AAAA record)")
        ttl = min(a.rrset.ttl for a in found)
        ttl = min(max(ttl, self.config.min_ttl), self.config.max_ttl)
        return Answer(name=name, addresses=addrs, expires=time.monotonic() + ttl)


def _unique(addrs) -> tuple[IPAddress, ...]:
    return tuple(dict.fromkeys(addrs))


def _dnspython(config: ResolverConfig):
    import dns.asyncresolver
    import dns.nameserver

    r = dns.asyncresolver.Resolver(configure=False)  # never read /etc/resolv.conf: only what is configured
    r.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in config.nameservers]
    r.lifetime = config.timeout
    r.timeout = config.timeout
    r.cache = None  # our cache: bounded, and shared by A and AAAA
    return r
