"""A per-replica cache of grant lookups: a grant rule's request without a store round trip (issue 12 §2).

``find_grant(workload, rule)`` on a Redis store is one ``EVALSHA`` per request. ``GrantCache``
keeps a *found* grant in memory and serves it until the earliest of:

- the grant's own ``expires_at`` (wall clock, as the store compares it: grants carry epoch times
  shared by every replica);
- ``ttl`` seconds after the store last confirmed it (monotonic clock: a clock step never stretches
  it). This is the bound on a revocation whose event never arrives: the entry was confirmed before
  the revocation, so it is served at most ``ttl`` after it. The default (``DEFAULT_TTL``, 0.5 s)
  keeps "a revocation reaches every replica in under a second" even for a missed event, with room
  for the request in flight; at ~1,000 req/s it leaves one ``EVALSHA`` per pair per half second;
- a ``grant_revoked`` event for its id;
- a ``grant_created`` event (a new grant may be the better answer for its pair: the event names
  only an id, so every entry goes) or a ``resync`` (events may have been missed: every entry goes).

It fails closed: the cache is dropped and bypassed while the store is not ``healthy`` or its event
subscription is down (``event_epoch`` is None), and after every (re)subscription (a new epoch),
because events published in the gap are lost. A lookup that started before an invalidation (an
event, a new epoch) does not fill the cache with its answer. Only found grants are cached: a
refusal always asks the store, so a grant just created is honoured at once. Concurrent misses for
one pair share one lookup (single flight), and a hit older than ``REFRESH_AT`` of ``ttl`` starts
that lookup in the background, so under load no request waits for the store. ``ttl=0`` turns the
cache off (the memory store needs none: its lookup never leaves the process).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from secretless_proxy.grants import Grant
from secretless_proxy.store.base import Store

log = logging.getLogger(__name__)

DEFAULT_TTL = 0.5
REFRESH_AT = 0.8  # of ttl: a hit this old also starts a lookup in the background
MAX_ENTRIES = 10_000  # (workload, rule) pairs with a grant in use; beyond it the cache starts over


class GrantCache:
    """``find`` = ``store.find_grant`` served from memory within the bounds of the module docstring."""

    def __init__(self, store: Store, *, ttl: float = DEFAULT_TTL,
                 now: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 on_lookup: Callable[[str], None] | None = None) -> None:
        self._store, self.ttl, self._on_lookup = store, ttl, on_lookup
        self._now, self._monotonic = now, monotonic  # wall: a grant's expiry; monotonic: staleness
        self._entries: dict[tuple[str, str], tuple[Grant, float]] = {}  # pair -> (grant, confirmed at, monotonic)
        self._generation = 0  # bumped by every invalidation: an answer read across one is not kept
        self._epoch: int | None = None  # the store's event epoch the entries were read under
        self._inflight: dict[tuple[str, str], tuple[int, asyncio.Task[Grant | None]]] = {}  # single flight

    def __repr__(self) -> str:
        return f"GrantCache(ttl={self.ttl:g}, entries={len(self._entries)})"

    def __len__(self) -> int:
        return len(self._entries)

    async def find(self, workload: str, rule: str) -> Grant | None:
        """The active grant for (workload, rule), or None; raises ``StoreError`` like the store."""
        if self.ttl <= 0:
            self._count("miss")
            return await self._store.find_grant(workload, rule)
        epoch = self._store.event_epoch if self._store.healthy else None
        if epoch is None or epoch != self._epoch:
            self._drop()  # events may be missed now, or were in the gap: nothing held is trusted
            self._epoch = epoch
        key = (workload, rule)
        entry = self._entries.get(key)
        if entry is not None and epoch is not None:
            grant, confirmed = entry
            age = self._monotonic() - confirmed
            if age < self.ttl and self._now() < grant.expires_at:
                self._count("hit")
                if age >= REFRESH_AT * self.ttl:
                    self._flight(key, epoch)  # refresh ahead: no request waits when the entry runs out
                return grant
            del self._entries[key]
        self._count("miss" if epoch is not None else "bypass")
        if epoch is None:
            return await self._store.find_grant(workload, rule)
        # Single flight: when an entry goes stale under load, every request in flight for the pair
        # would send its own EVALSHA; they share one lookup instead, if it started after the last
        # invalidation (an older one may predate a revocation or a new grant).
        return await asyncio.shield(self._flight(key, epoch))

    def _flight(self, key: tuple[str, str], epoch: int) -> asyncio.Task[Grant | None]:
        """The lookup in flight for ``key`` that started after the last invalidation, or a new one."""
        flight = self._inflight.get(key)
        if flight is None or flight[0] != self._generation:
            task = asyncio.ensure_future(self._lookup(key, epoch))
            flight = self._inflight[key] = (self._generation, task)
            task.add_done_callback(lambda t, key=key: self._landed(key, t))
        return flight[1]

    async def _lookup(self, key: tuple[str, str], epoch: int) -> Grant | None:
        generation, started = self._generation, self._monotonic()
        try:
            grant = await self._store.find_grant(*key)
        except BaseException:
            self._entries.pop(key, None)  # a refresh ahead that fails ends the entry too: fail closed
            raise
        if grant is None:
            self._entries.pop(key, None)  # a refresh ahead that finds nothing ends the entry at once
        elif (generation == self._generation and self._store.healthy and self._store.event_epoch == epoch):
            if len(self._entries) >= MAX_ENTRIES:
                self._drop()
            self._entries[key] = (grant, started)  # confirmed no later than when the lookup was sent
        return grant

    def _landed(self, key: tuple[str, str], task: asyncio.Task[Grant | None]) -> None:
        flight = self._inflight.get(key)
        if flight is not None and flight[1] is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter got it already (or there is none left)

    def on_event(self, event: dict[str, Any]) -> None:
        """A store event (subscribe this): drop what it could change. Synchronous: no await between
        the event's arrival and the invalidation."""
        kind = event.get("type")
        if kind == "grant_revoked":
            self._generation += 1
            gid = event.get("id")
            for key in [k for k, (g, _) in self._entries.items() if g.id == gid]:
                del self._entries[key]
        elif kind in ("grant_created", "resync"):
            self._drop()

    def _drop(self) -> None:
        self._generation += 1
        self._entries.clear()

    def _count(self, result: str) -> None:
        if self._on_lookup is not None:
            try:
                self._on_lookup(result)
            except Exception as exc:  # noqa: BLE001 - a metrics hook must not break a grant check
                log.warning("grant cache on_lookup hook raised %s", type(exc).__name__)
