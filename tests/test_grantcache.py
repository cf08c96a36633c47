"""The per-replica grant cache (secretless_proxy/store/grantcache.py) on real redis-server processes.

Two ``RedisStore`` clients on one server stand for two replicas. Redis's own ``INFO
commandstats`` says how many ``EVALSHA`` (the grant lookup script) each step cost. Clocks the
cache reads (wall for a grant's expiry, monotonic for staleness) are injected where a test
would otherwise wait them out; the store keeps the real ones.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers.redis_server import RedisServer
from redis.asyncio import Redis
from test_store import raw, redis_server

from secretless_proxy.grants import Grant, new_grant
from secretless_proxy.store import MemoryStore, StoreError
from secretless_proxy.store.grantcache import DEFAULT_TTL, GrantCache
from secretless_proxy.store.redis import RedisStore
from secretless_proxy.store.sealing import Sealer

pytestmark = pytest.mark.e2e  # starts redis-server processes

SEALER = Sealer({"k1": os.urandom(32)}, "k1")
W = "spiffe://example.org/ns/prod/sa/billing"
RULE = "ops-grant"


def grant(**kw: Any) -> Grant:
    return new_grant(**({"workload": W, "rule": RULE, "ttl": 3600, "reason": "INC-1", "issued_by": "alice"} | kw))


class Clock:
    """A clock a test moves by hand."""

    def __init__(self, start: float) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


async def until(predicate: Any, timeout: float = 5.0) -> float:
    """Wait for ``predicate()``; returns how long it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def evalsha_calls(raw: Redis) -> int:
    """EVALSHA commands the server has executed since it started (INFO commandstats)."""
    stats = await raw.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Replica A's and replica B's store clients, subscribed."""
    a, b = RedisStore(redis_server.url, sealer=SEALER), RedisStore(redis_server.url, sealer=SEALER)
    await a.start()
    await b.start()
    assert await a.wait_subscribed(5) and await b.wait_subscribed(5)
    yield a, b
    await a.close()
    await b.close()


__all__ = ["raw", "redis_server"]  # fixtures shared with test_store.py


def cache_on(store: RedisStore, **kw: Any) -> tuple[GrantCache, list[str]]:
    """A subscribed GrantCache on ``store`` and the list of its lookup results (hit, miss, bypass)."""
    results: list[str] = []
    cache = GrantCache(store, on_lookup=results.append, **kw)
    store.subscribe(cache.on_event)
    return cache, results


async def cached(store: RedisStore, *, start: float = 0.0,
                 **kw: Any) -> tuple[Grant, GrantCache, list[str], Clock]:
    """A grant put through ``store`` and a subscribed cache on it whose monotonic clock a test moves."""
    g = grant()
    assert await store.put_grant(g)
    mono = Clock(start)
    cache, results = cache_on(store, monotonic=mono, **kw)
    return g, cache, results, mono


class TestHits:
    async def test_a_cached_grant_costs_no_evalsha(self, stores, raw: Redis) -> None:
        """One EVALSHA fills the cache; the next 50 checks are hits that send Redis nothing."""
        a, _ = stores
        g = grant()
        assert await a.put_grant(g)
        cache, results = cache_on(a, ttl=60)
        await a.find_grant(W, RULE)  # the script loaded (a first EVALSHA answers NOSCRIPT)
        before = await evalsha_calls(raw)
        assert (await cache.find(W, RULE)).id == g.id
        assert await evalsha_calls(raw) - before == 1
        for _ in range(50):
            assert (await cache.find(W, RULE)).id == g.id
        assert await evalsha_calls(raw) - before == 1
        assert results == ["miss"] + ["hit"] * 50

    async def test_concurrent_misses_share_one_lookup(self, stores, raw: Redis) -> None:
        """20 checks arriving together when the entry is stale send one EVALSHA, not 20 (single flight)."""
        a, _ = stores
        g, cache, results, mono = await cached(a, ttl=DEFAULT_TTL)
        await a.find_grant(W, RULE)  # the script loaded
        assert (await cache.find(W, RULE)).id == g.id
        mono.t += DEFAULT_TTL  # stale
        before = await evalsha_calls(raw)
        found = await asyncio.gather(*(cache.find(W, RULE) for _ in range(20)))
        assert [x.id for x in found] == [g.id] * 20
        assert await evalsha_calls(raw) - before == 1
        assert results == ["miss"] * 21

    async def test_an_old_hit_refreshes_ahead_in_the_background(self, stores, raw: Redis) -> None:
        """A hit at 80 % of the bound is served at once and starts one lookup; its answer renews the entry."""
        a, _ = stores
        g, cache, results, mono = await cached(a, ttl=1.0)
        await a.find_grant(W, RULE)  # the script loaded
        assert (await cache.find(W, RULE)).id == g.id
        before = await evalsha_calls(raw)
        mono.t = 0.85
        assert (await cache.find(W, RULE)).id == g.id  # served from memory, not after the lookup
        await until(lambda: not cache._inflight)
        assert await evalsha_calls(raw) - before == 1
        mono.t = 1.5  # past the first lookup's bound, within the refresh's (confirmed at 0.85)
        assert (await cache.find(W, RULE)).id == g.id
        assert results == ["miss", "hit", "hit"]

    async def test_a_refresh_ahead_that_finds_nothing_ends_the_entry(self, stores) -> None:
        """The background lookup finds the grant gone (an event this cache did not hear): the entry goes with it."""
        a, b = stores
        g = grant()
        assert await a.put_grant(g)
        mono = Clock(0.0)
        cache = GrantCache(a, ttl=1.0, monotonic=mono)  # not subscribed: only the refresh can tell it
        assert await cache.find(W, RULE) is not None
        await b.revoke_grant(g.id, reason="gone")
        mono.t = 0.9
        assert await cache.find(W, RULE) is not None  # a hit (the addon's revoked-id check refuses it), the refresh starts
        await until(lambda: len(cache) == 0)

    async def test_no_grant_is_never_cached(self, stores, raw: Redis) -> None:
        """A refusal asks the store every time, so a grant created anywhere is honoured at the next request."""
        a, b = stores
        cache, results = cache_on(a, ttl=60)
        assert await cache.find(W, RULE) is None
        assert await cache.find(W, RULE) is None
        g = grant()
        assert await b.put_grant(g)  # through the other replica: no event needed for this
        assert (await cache.find(W, RULE)).id == g.id
        assert results == ["miss", "miss", "miss"]

    async def test_ttl_zero_and_memory_store_always_ask_the_store(self, stores, raw: Redis) -> None:
        """ttl=0 turns the cache off: every check is one EVALSHA; the memory store works through it unchanged."""
        a, _ = stores
        assert await a.put_grant(grant())
        cache, results = cache_on(a, ttl=0)
        await a.find_grant(W, RULE)  # the script loaded (a first EVALSHA answers NOSCRIPT)
        before = await evalsha_calls(raw)
        for _ in range(5):
            assert await cache.find(W, RULE) is not None
        assert await evalsha_calls(raw) - before == 5 and results == ["miss"] * 5
        mem = MemoryStore()
        g = grant()
        assert await mem.put_grant(g)
        assert (await GrantCache(mem, ttl=0).find(W, RULE)).id == g.id


class TestBounds:
    async def test_a_missed_revocation_is_honoured_after_the_staleness_bound(self, stores, raw: Redis) -> None:
        """Revoked in Redis with no event (a lost message): served until the bound, refused from then on."""
        a, _ = stores
        g, cache, results, mono = await cached(a, start=1000.0, ttl=DEFAULT_TTL)
        assert (await cache.find(W, RULE)).id == g.id
        # What revoke_grant writes, minus its PUBLISH: no replica hears of it.
        ms = int(time.time() * 1000)
        await raw.hset(f"secretless:grant:{g.id}", mapping={"revoked_at": ms, "revoke_reason": "lost event"})
        await raw.zadd("secretless:revoked", {g.id: ms})
        mono.t += DEFAULT_TTL * 0.9
        assert (await cache.find(W, RULE)).id == g.id  # within the bound: from memory
        mono.t += DEFAULT_TTL * 0.1
        assert await cache.find(W, RULE) is None  # the bound reached: the store's answer
        assert results == ["miss", "hit", "miss"]

    async def test_a_grant_expiring_while_cached_is_not_served(self, stores) -> None:
        """The grant's own expires_at (wall clock) ends a cache entry, however fresh it is."""
        a, _ = stores
        g = grant()
        assert await a.put_grant(g)
        wall = Clock(time.time())
        cache, results = cache_on(a, ttl=60, now=wall)
        assert (await cache.find(W, RULE)).id == g.id
        wall.t = g.expires_at - 0.001
        assert (await cache.find(W, RULE)).id == g.id
        wall.t = g.expires_at
        await cache.find(W, RULE)  # the store keeps its own clock (not expired there yet): asked again
        assert results == ["miss", "hit", "miss"]

    async def test_staleness_is_measured_on_the_monotonic_clock(self, stores) -> None:
        """A wall-clock step backwards does not stretch an entry's life; the monotonic clock ends it."""
        a, _ = stores
        assert await a.put_grant(grant())
        wall, mono = Clock(time.time()), Clock(50.0)
        cache, results = cache_on(a, ttl=1.0, now=wall, monotonic=mono)
        await cache.find(W, RULE)
        wall.t -= 3600  # NTP steps the wall clock back an hour
        mono.t += 1.0
        await cache.find(W, RULE)
        assert results == ["miss", "miss"]


class TestEvents:
    async def test_revocation_on_b_drops_the_entry_on_a(self, stores) -> None:
        """Revoked through replica B: A's warm entry goes on the event, A refuses, long before its 60 s bound."""
        a, b = stores
        g = grant()
        assert await a.put_grant(g)
        cache, results = cache_on(a, ttl=60)
        assert (await cache.find(W, RULE)).id == g.id
        assert len(cache) == 1
        await b.revoke_grant(g.id, reason="INC-1 done")
        took = await until(lambda: len(cache) == 0)
        assert took < 1.0
        assert await cache.find(W, RULE) is None
        assert results == ["miss", "miss"]

    async def test_a_new_grant_for_the_pair_is_seen(self, stores) -> None:
        """grant_created drops every entry: a grant made through B that expires later is the answer on A."""
        a, b = stores
        short = grant(ttl=600)
        assert await a.put_grant(short)
        cache, _ = cache_on(a, ttl=60)
        assert (await cache.find(W, RULE)).id == short.id
        longer = grant(ttl=7200)
        assert await b.put_grant(longer)
        await until(lambda: len(cache) == 0)
        assert (await cache.find(W, RULE)).id == longer.id

    async def test_an_answer_read_across_an_invalidation_is_not_kept(self, stores, redis_server) -> None:
        """A lookup in flight when an event arrives returns its answer but does not fill the cache."""
        a, _ = stores
        assert await a.put_grant(grant())
        cache, results = cache_on(a, ttl=60)
        redis_server.pause()  # the lookup is sent and its answer held back
        try:
            task = asyncio.ensure_future(cache.find(W, RULE))
            await asyncio.sleep(0.1)
            cache.on_event({"type": "grant_revoked", "id": "some-other-grant-id"})
        finally:
            redis_server.resume()
        assert await task is not None
        assert len(cache) == 0
        await cache.find(W, RULE)
        assert results == ["miss", "miss"]


class TestFailClosed:
    async def test_server_killed_the_warm_cache_is_dropped_at_once(self, stores, redis_server: RedisServer) -> None:
        """Redis killed: within milliseconds the subscription is down, the entry dropped, the check raises StoreError."""
        a, _ = stores
        assert await a.put_grant(grant())
        cache, results = cache_on(a, ttl=60)
        assert await cache.find(W, RULE) is not None
        redis_server.stop()
        took = await until(lambda: a.event_epoch is None, timeout=2)
        assert took < 0.2, took  # the socket closes with the process: no ping timeout to wait out
        with pytest.raises(StoreError, match="unavailable"):
            await cache.find(W, RULE)
        assert len(cache) == 0 and results == ["miss", "bypass"]

    async def test_a_failed_store_call_bypasses_the_cache(self, stores, redis_server: RedisServer) -> None:
        """Any store operation failing (the store unhealthy) stops the cache even before the subscription notices."""
        a, _ = stores
        assert await a.put_grant(grant())
        cache, results = cache_on(a, ttl=60)
        assert await cache.find(W, RULE) is not None
        redis_server.pause()  # a partition: the subscription notices only after its missed pings
        try:
            with pytest.raises(StoreError):
                await a.get_credential("anything")  # another request's store call times out
            assert a.event_epoch is not None and not a.healthy
            with pytest.raises(StoreError):
                await cache.find(W, RULE)
            assert len(cache) == 0 and results == ["miss", "bypass"]
        finally:
            redis_server.resume()

    async def test_reconnect_drops_the_cache(self, stores, redis_server: RedisServer) -> None:
        """Redis restarted empty with no check in the gap: after the reconnect the grant it lost is not served."""
        a, _ = stores
        assert await a.put_grant(grant())
        cache, results = cache_on(a, ttl=60)
        assert await cache.find(W, RULE) is not None
        epoch = a.event_epoch
        redis_server.restart()  # the grant is gone with the dataset
        await until(lambda: a.event_epoch not in (None, epoch), timeout=5)
        assert await cache.find(W, RULE) is None
        assert results == ["miss", "miss"]

    async def test_a_new_epoch_alone_drops_the_cache(self, stores, redis_server: RedisServer) -> None:
        """Even without the resync event reaching it, a cache sees the new epoch and starts over."""
        a, _ = stores
        assert await a.put_grant(grant())
        cache = GrantCache(a, ttl=60)  # not subscribed: only the epoch can tell it
        assert await cache.find(W, RULE) is not None
        epoch = a.event_epoch
        redis_server.restart()
        await until(lambda: a.event_epoch not in (None, epoch), timeout=5)
        assert await cache.find(W, RULE) is None
