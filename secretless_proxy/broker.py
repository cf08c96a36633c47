"""The credential broker: cache, single flight, refresh-ahead, expiry and revocation.

``Broker.get(name, ctx)`` returns a credential that is valid for at least ``config.skew`` more
seconds, or raises ``CredentialError`` (reason ``credential_unavailable``; the addon answers 503).
It never returns an expired or about-to-expire credential, even when the provider is down: a
stale token sent upstream is worse than an honest refusal (Envoy's SDS shipped that bug).

- Cache key: (credential name, definition digest, ``provider.scope(ctx)``); scope None means per
  request, never cached. The digest (``definition.py``) covers everything that shapes the issued
  credential, so a changed definition never finds a token minted under the old one, in process or
  in the shared store (whose key carries it too); ``retire_stale()`` evicts and revokes those.
- Single flight: concurrent misses for one key share one provider call; a waiter that is
  cancelled does not cancel the call for the others (``asyncio.shield``).
- Refresh-ahead: after ``refresh_at`` of the lifetime (plus jitter, so replicas and credentials
  do not refresh in lockstep) a hit starts one background refresh and returns the cached value;
  a failed refresh keeps the old value until it expires and is retried after a backoff.
- Each provider call runs under ``config.timeout``, with ``config.retries`` extra attempts and
  capped, fully jittered exponential backoff (``calls.py``). A provider's own exception text may
  hold a secret, so only its type is logged and our own sentence is raised.
- A failing provider is damped (``breaker.py``): after a failed fill, that key's provider calls
  follow the breaker's backoff schedule (one single-attempt probe per step), and requests in
  between are refused at once with ``Backoff.retry_after``. No request waits longer than
  ``config.max_wait`` for a fill; the fill goes on for the requests that come next.

Everything runs on one event loop and is not thread-safe; event sinks are called inline and must
not block (their exceptions are logged by type and ignored).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from secretless_proxy import calls
from secretless_proxy.breaker import CLOSED, Backoff, Breakers
from secretless_proxy.config.model import BrokerConfig
from secretless_proxy.credentials.base import IssuedCredential, Provider, ProviderError, RequestContext
from secretless_proxy.errors import CredentialError
from secretless_proxy.reasons import REVOCATION_REASONS, Reason
from secretless_proxy.sharedcache import (
    credential_family,
    credential_key,
    credential_prefix,
    decode_credential,
    shared_fetch,
)
from secretless_proxy.store.base import Store, StoreError

log = logging.getLogger(__name__)

# The closed vocabulary of revocation reasons (a metric label: keep it bounded).
REASONS = REVOCATION_REASONS
GRANT_MARK = "#grant="  # scope suffix of credentials brokered under a grant
PER_REQUEST = "\x00per-request"  # the breaker key's scope for credentials minted per request

_Key = tuple[str, str, str]  # (credential name, definition digest, scope)
class BrokerEvents:
    """No-op base; metrics and audit subclass it. The broker wraps every call: a sink may not break it."""

    def fetched(self, *, credential: str, kind: str, outcome: str, seconds: float) -> None:
        """One provider attempt ended; ``outcome`` is "success", "error" or "timeout"."""

    def cache(self, *, credential: str, result: str) -> None:
        """One ``get``: "hit", "miss" (waited for a fetch) or "refresh" (a hit that started a refresh)."""

    def issued(self, cred: IssuedCredential, *, cached: bool = True) -> None:
        """A provider produced a new credential."""

    def revoked(self, cred: IssuedCredential, *, reason: str) -> None:
        """A cached credential was dropped; ``reason`` is one of ``REASONS``."""

    def breaker(self, *, credential: str, failing: int) -> None:
        """A circuit breaker of the credential changed state; ``failing`` of its scopes are now open or half-open."""

    def backoff(self, *, credential: str) -> None:
        """A request was refused without a provider call (breaker open, or a probe already out)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CachedInfo:
    """What the broker holds for one cache key, without the value (admin endpoint, CLI)."""

    name: str
    kind: str
    scope: str
    expires_at: float | None
    issued_at: float
    last_used: float


@dataclass(kw_only=True, slots=True)
class _Entry:
    cred: IssuedCredential
    provider: Provider  # the one that issued it: revocation goes back there, even after a reload
    refresh_after: float  # a hit from then on starts a background refresh
    last_used: float
    retry_after: float = 0.0  # after a failed refresh: no new attempt before this
    failures: int = 0


class Broker:
    """Hands out valid credentials for (name, request context); see the module docstring."""

    sweep_interval = 5.0  # seconds between expiry sweeps
    retry_base, retry_cap = 0.1, 2.0  # provider retries: full-jitter exponential backoff (s)
    refresh_backoff_base, refresh_backoff_cap = 1.0, 60.0  # after a failed background refresh (s)
    refresh_jitter = 0.05  # up to this fraction of the lifetime is added to refresh_at
    breaker_base, breaker_cap = 0.5, 30.0  # circuit breaker open delays (s): base * 2**(n-1), capped

    def __init__(self, providers: Mapping[str, Provider], *, config: BrokerConfig,
                 events: BrokerEvents | None = None, now: Callable[[], float] = time.time,
                 rng: Callable[[], float] = random.random) -> None:
        self._providers = dict(providers)
        self._config = config
        self._events = events or BrokerEvents()
        self._now = now
        self._rng = rng
        self._cache: dict[_Key, _Entry] = {}
        self._inflight: dict[_Key, asyncio.Task[IssuedCredential]] = {}
        # Bumped by evict()/replace_providers(): a fetch started before must not repopulate the cache.
        self._epoch = 0
        self._gen: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._revoking: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self._issuing = True  # False once stop_issuing() ran (shutdown revocation): nothing new goes out
        self._last_fills: set[asyncio.Task[IssuedCredential]] = set()
        self._shared: Store | None = None
        self._breakers = Breakers(base=self.breaker_base, cap=self.breaker_cap, rng=rng, clock=now,
                                  on_change=lambda name, n: self._emit("breaker", credential=name, failing=n))

    def __repr__(self) -> str:
        return f"Broker(credentials={sorted(self._providers)!r}, cached={len(self._cache)})"

    def attach_store(self, store: Store | None) -> None:
        """Share credentials with other replicas through ``store`` (None: this process only).

        The broker's own cache is the L1; a miss asks the store before the provider, and a
        fetch is single-flight across replicas (``sharedcache.shared_fetch``).
        """
        self._shared = store

    def drop_local(self, store_key: str | None = None) -> int:
        """Forget cached entries (one store key, or all) without revoking: another replica evicted
        them, or the store asks for a resync. The next get reads the store again."""
        keys = [k for k in self._cache if store_key is None or self._store_key(k) == store_key]
        for key in keys:
            del self._cache[key]
        return len(keys)

    async def evict_grant(self, grant_id: str, *, reason: str) -> int:
        """Drop and revoke every credential brokered under ``grant_id`` (revoked or expired grant)."""
        mark = f"{GRANT_MARK}{grant_id}"
        keys = [k for k in self._cache if k[2].endswith(mark)]
        for key in keys:
            self._drop(key, reason, revoke=True)
            await self._forget_shared(key)
        return len(keys)

    async def _forget_shared(self, key: _Key) -> None:
        if self._shared is not None:
            try:
                await self._shared.delete_credential(self._store_key(key))
            except StoreError:
                pass  # it expires in the store on its own; replicas still check grants per request

    def reconfigure(self, config: BrokerConfig) -> None:
        """New skew, refresh point, timeout, retries and budget (hot reload); cached entries stay.

        Changed settings reset the circuit breakers: an operator who raised the timeout for a slow
        provider wants it tried at once, with the new settings, not after the old backoff."""
        if config != self._config:
            self._breakers.retain(lambda _key: False)
        self._config = config

    async def get(self, name: str, ctx: RequestContext) -> IssuedCredential:
        """A credential valid for at least ``skew`` more seconds; CredentialError when there is none."""
        if self._closed or not self._issuing:
            raise CredentialError(Reason.CREDENTIAL_UNAVAILABLE, "the credential broker is shut down; no credential can be issued")
        provider = self._providers.get(name)
        if provider is None:
            raise CredentialError(Reason.CREDENTIAL_UNAVAILABLE, f"unknown credential '{name}': it is not in the configuration")
        self._ensure_sweeper()
        try:
            scope = provider.scope(ctx)
        except Exception as exc:  # noqa: BLE001 - a provider bug is a refusal, never a crash
            raise self._unexpected(name, provider, exc, retryable=False) from None
        if scope is None:  # minted per request: never cached, never shared
            self._emit("cache", credential=name, result="miss")
            cred = await self._fetch_once(name, provider, ctx, (name, provider.digest, PER_REQUEST))
            self._emit("issued", cred, cached=False)
            return cred
        if ctx.grant_id is not None:  # credentials brokered under a grant go when the grant goes
            scope = f"{scope}{GRANT_MARK}{ctx.grant_id}"
        key = (name, provider.digest, scope)
        now = self._now()
        entry = self._cache.get(key)
        if entry is not None:
            if entry.cred.valid_at(now, self._config.skew):
                entry.last_used = now
                if (now >= entry.refresh_after and now >= entry.retry_after and key not in self._inflight
                        and self._breakers.admit(key) is None):
                    self._emit("cache", credential=name, result="refresh")
                    self._start_fill(key, provider, ctx, refresh=True)
                else:
                    self._emit("cache", credential=name, result="hit")
                return entry.cred
            self._drop(key, "expired")
        self._emit("cache", credential=name, result="miss")
        task = self._inflight.get(key)
        if task is None:
            if (wait := self._breakers.admit(key)) is not None:
                raise self._backoff(name, provider, wait)
            task = self._start_fill(key, provider, ctx, refresh=False)
        elif self._breakers.state(key) != CLOSED:  # the fill out is the half-open probe: do not queue behind it
            raise self._backoff(name, provider, self._breakers.retry_after(key) or 1.0)
        budget = self._config.max_wait
        try:
            async with asyncio.timeout(budget) as deadline:
                cred = await asyncio.shield(task)
        except TimeoutError:
            if deadline.expired():  # the fill goes on for whoever comes next; this request stops waiting
                raise Backoff(f"no credential '{name}' from the {provider.kind} provider within the "
                              f"{budget:g} s wait budget (broker.max_wait_seconds)", retry_after=1.0) from None
            raise
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                # The shared fetch was cancelled by aclose(), not this request: refuse, do not vanish.
                raise ProviderError(f"credential '{name}': the broker shut down during the fetch") from None
            raise
        except Backoff:
            raise
        except ProviderError as exc:
            error = exc
        else:
            return cred
        # Outside the except block: the refusal carries no chained context (no provider text).
        if (retry := self._breakers.retry_after(key)) is None:
            raise error
        raise Backoff(str(error), retry_after=retry)

    async def _fetch_once(self, name: str, provider: Provider, ctx: RequestContext,
                          key: _Key) -> IssuedCredential:
        """A per-request credential (never cached): through the breaker, within the wait budget."""
        breakers = self._breakers
        if (wait := breakers.admit(key)) is not None:
            raise self._backoff(name, provider, wait)
        attempts = 1 if breakers.is_probe(key) else None
        try:
            async with asyncio.timeout(self._config.max_wait) as deadline:
                cred = await self._fetch(name, provider, ctx, attempts=attempts)
        except TimeoutError:
            if not deadline.expired():
                breakers.cancelled(key)
                raise
            detail = (f"no credential '{name}' from the {provider.kind} provider within the "
                      f"{self._config.max_wait:g} s wait budget (broker.max_wait_seconds)")
        except ProviderError as exc:
            detail = str(exc)
        except BaseException:
            breakers.cancelled(key)
            raise
        else:
            breakers.succeeded(key)
            return self._issued_while_issuing(name, provider, cred)
        raise Backoff(detail, retry_after=breakers.failed(key))

    def _backoff(self, name: str, provider: Provider, wait: float) -> Backoff:
        self._emit("backoff", credential=name)
        return Backoff(f"the {provider.kind} provider for credential '{name}' is failing; no new attempt "
                       f"for {wait:.1f} s (circuit breaker)", retry_after=wait)

    async def evict(self, names: Iterable[str] | None = None, *, reason: str) -> int:
        """Drop cached credentials (all when ``names`` is None); revoke revocable ones in the background."""
        if reason not in REASONS:
            raise ValueError(f"unknown revocation reason {reason!r} (use: {', '.join(sorted(REASONS))})")
        wanted = None if names is None else set(names)
        if wanted is None:
            self._epoch += 1
        else:
            for n in wanted:
                self._gen[n] = self._gen.get(n, 0) + 1
        for key in [k for k in self._inflight if wanted is None or k[0] in wanted]:
            del self._inflight[key]  # later gets start a fresh fetch (with the new provider, if any)
        keys = [k for k in self._cache if wanted is None or k[0] in wanted]
        for key in keys:
            self._drop(key, reason, revoke=True)
            await self._forget_shared(key)
        return len(keys)

    def replace_providers(self, providers: Mapping[str, Provider]) -> None:
        """Swap in reloaded providers. Call ``evict()`` for changed names first; removed names are dropped here."""
        new = dict(providers)
        for key in [k for k in self._cache if k[0] not in new]:
            self._drop(key, "config_changed", revoke=True)
        for name in {k[0] for k in self._inflight} - new.keys():
            self._gen[name] = self._gen.get(name, 0) + 1
        self._inflight = {k: t for k, t in self._inflight.items() if k[0] in new}
        self._providers = new
        # A new definition starts with closed breakers (a fixed token_url is tried at once).
        self._breakers.retain(lambda k: k[0] in new and new[k[0]].digest == k[1])

    def snapshot(self) -> list[CachedInfo]:
        """What is cached, without values, ordered by (name, scope)."""
        return [CachedInfo(name=k[0], kind=e.cred.kind, scope=k[2], expires_at=e.cred.expires_at,
                           issued_at=e.cred.issued_at, last_used=e.last_used)
                for k, e in sorted(self._cache.items(), key=lambda item: item[0])]

    def sweep(self) -> int:
        """Drop every entry that may no longer be served (reason "expired"), and entries filled under
        a definition that has changed since (a fetch that was in flight across a reload); returns how many."""
        now = self._now()
        stale = [k for k, e in self._cache.items() if not e.cred.valid_at(now, self._config.skew)]
        for key in stale:
            self._drop(key, "expired")
        retired = [k for k in self._cache if not self._current(k)]
        for key in retired:
            self._drop(key, "config_changed", revoke=True)
        self._breakers.prune()  # the breaker table stays as small as what is failing now
        return len(stale) + len(retired)

    async def retire_stale(self, names: Iterable[str] | None = None) -> int:
        """Evict, and revoke where the kind supports it, credentials minted under a definition that is
        not the current one, in process and in the shared store (all names, or ``names``; a name no
        longer configured loses every entry). Run after start and after a reload; returns how many."""
        wanted = set(self._providers) if names is None else set(names)
        keys = [k for k in self._cache if k[0] in wanted and not self._current(k)]
        for key in keys:
            self._drop(key, "config_changed", revoke=True)
            await self._forget_shared(key)
        count = len(keys)
        if self._shared is None:
            return count
        for name in sorted(wanted):
            provider = self._providers.get(name)
            keep = None if provider is None else credential_prefix(name, provider.digest, self._shared.key_digest)
            try:
                swept = await self._shared.sweep_credentials(credential_family(name), keep)
            except StoreError:
                log.warning("credential '%s': the shared store could not be swept of entries under older "
                            "definitions; they are never served and expire on their own", name)
                continue
            for _key, data in swept:
                try:
                    cred = decode_credential(data)
                except ValueError:
                    continue
                count += 1
                self._emit("revoked", cred, reason="config_changed")
                if (provider is not None and provider.revocable and cred.kind == provider.kind and not self._closed
                        and calls.revokes_where_issued(provider, cred)):
                    # The old definition is gone (a restart): revoke through the current one, and only
                    # if it revokes where this token was issued (never send it to another server).
                    self._spawn_revoke(provider, cred)
        return count

    async def revocations_settled(self) -> None:
        """Wait for the revocations under way, at most ``broker.timeout_seconds`` (each is bounded by it)."""
        if self._revoking:
            await asyncio.wait(set(self._revoking), timeout=self._config.timeout)

    async def aclose(self) -> None:
        """Stop: let pending revocations finish (bounded by the timeout), cancel and await every task."""
        self._closed = True
        await self.revocations_settled()
        tasks = self._tasks | self._revoking
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._cache.clear()
        self._inflight.clear()

    # -- internals --------------------------------------------------------------------------

    def _start_fill(self, key: _Key, provider: Provider, ctx: RequestContext, *,
                    refresh: bool) -> asyncio.Task[IssuedCredential]:
        task = self._spawn(self._fill(key, provider, ctx, refresh=refresh))
        self._inflight[key] = task
        return task

    async def _fill(self, key: _Key, provider: Provider, ctx: RequestContext, *, refresh: bool) -> IssuedCredential:
        name = key[0]
        generation = (self._epoch, self._gen.get(name, 0))
        attempts = 1 if self._breakers.is_probe(key) else None  # a probe is one attempt: bounded by the schedule
        try:
            if self._shared is not None:
                entry = self._cache.get(key)
                cred = await shared_fetch(
                    self._shared, self._store_key(key), lambda: self._fetch(name, provider, ctx, attempts=attempts),
                    min_valid=self._config.skew, lock_ttl=self._config.timeout * (1 + self._config.retries) + 2,
                    replacing=entry.cred if refresh and entry is not None else None)
            else:
                cred = await self._fetch(name, provider, ctx, attempts=attempts)
        except ProviderError:
            self._breakers.failed(key)
            entry = self._cache.get(key)
            if refresh and entry is not None:  # keep serving the old credential until it expires
                entry.failures += 1
                delay = min(self.refresh_backoff_cap, self.refresh_backoff_base * 2 ** (entry.failures - 1))
                entry.retry_after = self._now() + delay * (0.5 + 0.5 * self._rng())
                log.warning("credential '%s': background refresh failed; serving the cached credential "
                            "until it expires, next attempt in %.1f s", name, entry.retry_after - self._now())
            raise
        except BaseException:
            self._breakers.cancelled(key)  # cancelled (shutdown): the next request may probe
            raise
        finally:
            if self._inflight.get(key) is asyncio.current_task():
                del self._inflight[key]
        self._breakers.succeeded(key)
        self._emit("issued", cred)
        if generation == (self._epoch, self._gen.get(name, 0)) and not self._closed and self._issuing:
            self._store(key, cred, provider)
        return self._issued_while_issuing(name, provider, cred)

    def _issued_while_issuing(self, name: str, provider: Provider, cred: IssuedCredential) -> IssuedCredential:
        """``cred``, unless it arrived after ``stop_issuing()``: then it is revoked (where the provider
        can) and never handed out, so no credential outlives the shutdown revocation (hostile review
        4.13: a fetch under way while the cache was revoked returned a fresh token, never revoked)."""
        if self._issuing:
            return cred
        if provider.revocable:
            self._spawn_revoke(provider, cred)
        raise ProviderError(f"credential '{name}': the broker stopped issuing for shutdown during the fetch")

    def stop_issuing(self) -> None:
        """Shutdown with revocation: no credential is handed out from now on, fetched or cached. The
        fetches under way are remembered (``evict`` forgets them) for ``fetches_settled``."""
        self._issuing = False
        self._last_fills = set(self._inflight.values())

    async def fetches_settled(self) -> None:
        """Wait for the fetches that were under way at ``stop_issuing``, at most ``broker.timeout_seconds``:
        what they bring is revoked, and that revocation is then awaited by ``revocations_settled``."""
        if self._last_fills:
            await asyncio.wait(self._last_fills, timeout=self._config.timeout)

    def _store(self, key: _Key, cred: IssuedCredential, provider: Provider) -> None:
        now = self._now()
        refresh_after = math.inf
        if cred.expires_at is not None:
            start = min(cred.issued_at, now)  # a provider clock ahead of ours must not delay refresh
            frac = self._config.refresh_at + self.refresh_jitter * self._rng()
            refresh_after = start + (cred.expires_at - start) * frac
            deadline = cred.expires_at - self._config.skew
            if refresh_after >= deadline:  # short lifetime vs skew: refresh within what we may serve
                refresh_after = start + (deadline - start) * frac
        self._cache[key] = _Entry(cred=cred, provider=provider, refresh_after=refresh_after, last_used=now)

    async def _fetch(self, name: str, provider: Provider, ctx: RequestContext, *,
                     attempts: int | None = None) -> IssuedCredential:
        """One credential from the provider (``calls.call``): timeout per attempt, retries, checked result."""
        return await calls.call(name, provider, ctx, config=self._config, attempts=attempts, now=self._now,
                                rng=self._rng, backoff=(self.retry_base, self.retry_cap), emit=self._emit)

    _unexpected = staticmethod(calls.unexpected)

    def _drop(self, key: _Key, reason: str, *, revoke: bool = False) -> None:
        entry = self._cache.pop(key)
        self._emit("revoked", entry.cred, reason=reason)
        provider = entry.provider
        if revoke and provider.revocable and not self._closed:
            self._spawn_revoke(provider, entry.cred)

    def _spawn_revoke(self, provider: Provider, cred: IssuedCredential) -> None:
        task = self._spawn(self._revoke(provider, cred))
        self._tasks.discard(task)
        self._revoking.add(task)

    def _current(self, key: _Key) -> bool:
        """Whether ``key`` was filled under the definition its name has now."""
        provider = self._providers.get(key[0])
        return provider is not None and provider.digest == key[1]

    def _store_key(self, key: _Key) -> str:
        digest = self._shared.key_digest if self._shared is not None else None
        return credential_key(key[0], key[1], key[2], digest)

    async def _revoke(self, provider: Provider, cred: IssuedCredential) -> None:
        try:
            async with asyncio.timeout(self._config.timeout):
                await provider.revoke(cred)
        except Exception as exc:  # noqa: BLE001 - best effort: it still expires on its own
            log.warning("credential '%s': revoking at the %s provider failed (%s); it stays valid "
                        "until it expires", cred.name, provider.kind, type(exc).__name__)

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None and not self._closed:
            self._sweeper = self._spawn(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                self.sweep()
            except Exception as exc:  # noqa: BLE001 - one failure must not end sweeping for good
                log.error("credential broker: expiry sweep failed (%s)", type(exc).__name__)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._revoking.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: waiters got it already; a refresh failure was logged

    def _emit(self, event: str, *args: Any, **kw: Any) -> None:
        try:
            getattr(self._events, event)(*args, **kw)
        except Exception as exc:  # noqa: BLE001 - a sink must not break a request
            log.warning("credential broker: event sink %s.%s raised %s", type(self._events).__name__,
                        event, type(exc).__name__)
