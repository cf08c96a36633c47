"""The shared-state store (secretless_proxy/store/): one protocol, memory and real redis-server processes.

Protocol tests run against both implementations (the ``backend`` fixture); the Redis-only
classes check what only a shared server can get wrong: ciphertext at rest, TTLs, several
clients, outages, restarts and partitions of a real ``redis-server`` started by the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.redis_server import RedisServer
from redis.asyncio import Redis

from secretless_proxy.config import yamlsource
from secretless_proxy.config.model import StoreConfig, TlsFiles
from secretless_proxy.config.store import parse_store_section
from secretless_proxy.credentials.base import IssuedCredential, ProviderError
from secretless_proxy.dev import certs
from secretless_proxy.grants import Grant, new_grant
from secretless_proxy.secretrefs import Secret, SecretRef
from secretless_proxy.sharedcache import (
    credential_family,
    credential_key,
    credential_prefix,
    decode_credential,
    encode_credential,
    shared_fetch,
)
from secretless_proxy.store import MemoryStore, StoreError, open_store
from secretless_proxy.store.base import Store
from secretless_proxy.store.redis import SCRIPTS, RedisStore
from secretless_proxy.store.redisurl import parse_url
from secretless_proxy.store.sealing import Sealer

SEALER = Sealer({"k1": os.urandom(32)}, "k1")
W = "spiffe://example.org/ns/prod/sa/billing"
RULE = "billing-to-prod-db"
MARKER = "sk_live_PLAINTEXT_MARKER_0123456789"


def grant(**kw: Any) -> Grant:
    args = {"workload": W, "rule": RULE, "ttl": 3600, "reason": "incident 42", "issued_by": "alice"} | kw
    return new_grant(**args)


def cred(secret: str = MARKER, *, ttl: float = 300, **kw: Any) -> IssuedCredential:
    now = time.time()
    return IssuedCredential(name="stripe", kind="oauth2_client_credentials", secret=Secret(secret),
                            expires_at=now + ttl, issued_at=now, **kw)


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


async def until_async(predicate: Callable[[], Awaitable[Any]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client that sees what is really in Redis."""
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


Make = Callable[..., Awaitable[Any]]


@contextlib.asynccontextmanager
async def redis_replicas(server: RedisServer) -> AsyncIterator[Make]:
    """Makes started RedisStores on ``server``, as separate replicas would hold; all closed at the end."""
    made: list[RedisStore] = []

    async def make(**kw: Any) -> RedisStore:
        store = RedisStore(kw.pop("url", server.url), sealer=kw.pop("sealer", SEALER), **kw)
        made.append(store)
        await store.start()
        return store
    try:
        yield make
    finally:
        for store in made:
            await store.close()


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[Make]:
    """Started RedisStores on the test's server; all closed at teardown."""
    async with redis_replicas(redis_server) as make:
        yield make


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.e2e)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    """Makes "replicas": in memory they share the one store, on Redis each is its own client."""
    if request.param == "memory":
        mem = MemoryStore()

        async def same(**kw: Any) -> Store:
            return mem
        yield same
        await mem.close()
        return
    async with redis_replicas(request.getfixturevalue("redis_server")) as make:
        yield make


@pytest.fixture
async def store(backend: Make) -> Store:
    return await backend()


class TestCredentials:
    async def test_round_trip(self, store: Store) -> None:
        """A stored value comes back byte for byte; a missing key is None."""
        await store.put_credential("stripe/a", b"value\x00bytes", expires_at=time.time() + 60)
        assert await store.get_credential("stripe/a") == b"value\x00bytes"
        assert await store.get_credential("stripe/b") is None

    async def test_expires(self, store: Store) -> None:
        """A value is gone once its credential expires."""
        await store.put_credential("k", b"v", expires_at=time.time() + 0.3)
        assert await store.get_credential("k") == b"v"
        await asyncio.sleep(0.45)
        assert await store.get_credential("k") is None

    async def test_expired_not_stored(self, store: Store) -> None:
        """An already expired value is never written."""
        await store.put_credential("k", b"v", expires_at=time.time() - 1)
        assert await store.get_credential("k") is None

    async def test_delete_publishes(self, store: Store) -> None:
        """Deleting evicts everywhere: the value is gone and credential_evicted reaches subscribers."""
        events: list[dict] = []
        store.subscribe(events.append)
        await store.put_credential("k", b"v", expires_at=time.time() + 60)
        assert await store.delete_credential("k") is True
        assert await store.get_credential("k") is None
        assert await store.delete_credential("k") is False
        await until(lambda: len(events) == 2)
        assert [(e["type"], e["key"]) for e in events] == [("credential_evicted", "k")] * 2

    @pytest.mark.parametrize("key", ["", "line\nbreak", "x" * 513])
    async def test_invalid_key(self, store: Store, key: str) -> None:
        """Keys are printable and bounded."""
        with pytest.raises(ValueError, match="invalid store key"):
            await store.get_credential(key)

    def test_credential_key(self) -> None:
        """Store keys name the credential and hash definition and scope (bounded, no workload ID in Redis)."""
        key = credential_key("stripe", "d1", W)
        assert key.startswith("stripe/") and W not in key and len(key) == len("stripe/") + 24 + 1 + 32
        assert key != credential_key("stripe", "d1", "")
        assert key != credential_key("stripe", "d2", W)  # another definition: another key
        assert key.startswith(credential_prefix("stripe", "d1")) and not key.startswith(credential_prefix("stripe", "d2"))

    def test_credential_key_uses_the_stores_keyed_digest(self, store: Store) -> None:
        """With the store's key_digest, a key name is no plain hash of what it was made of."""
        keyed = credential_key("stripe", "d1", W, store.key_digest)
        assert keyed != credential_key("stripe", "d1", W) and keyed.startswith("stripe/")
        assert keyed == credential_key("stripe", "d1", W, store.key_digest)  # stable

    async def test_sweep_keeps_the_current_definition_only(self, store: Store) -> None:
        """sweep_credentials deletes a family's entries under other definitions, returns them, keeps the rest."""
        old, new = credential_key("api", "old", W), credential_key("api", "new", W)
        other = credential_key("apix", "old", W)  # another family sharing the name prefix
        for key in (old, new, other):
            await store.put_credential(key, key.encode(), expires_at=time.time() + 60)
        swept = await store.sweep_credentials(credential_family("api"), credential_prefix("api", "new"))
        assert swept == [(old, old.encode())]
        assert await store.get_credential(old) is None
        assert await store.get_credential(new) == new.encode() and await store.get_credential(other) == other.encode()
        assert await store.sweep_credentials(credential_family("api"), None) == [(new, new.encode())]

    async def test_sweep_publishes_evictions(self, store: Store) -> None:
        """Each swept entry is announced as credential_evicted, so every replica drops its copy."""
        seen: list[dict[str, str]] = []
        store.subscribe(seen.append)
        key = credential_key("api", "old", W)
        await store.put_credential(key, b"v", expires_at=time.time() + 60)
        await store.sweep_credentials(credential_family("api"), None)
        await until(lambda: any(e.get("key") == key for e in seen))
        assert [e["type"] for e in seen if e.get("key") == key] == ["credential_evicted"]


class TestCodec:
    def test_round_trip(self) -> None:
        """A credential survives encode/decode with its parts and metadata."""
        c = cred(parts={"access_key_id": Secret("AKIA1")}, meta={"token_type": "Bearer"}, scope=W)
        back = decode_credential(encode_credential(c))
        assert back == c

    def test_malformed(self) -> None:
        """Malformed data is refused without echoing it."""
        with pytest.raises(ValueError, match="^a stored credential is malformed$"):
            decode_credential(b'{"v": 1, "secret": "' + MARKER.encode() + b'"}')


class TestLocks:
    async def test_exclusive(self, backend: Make) -> None:
        """Only one replica holds a lock; release needs the owner's token."""
        a, b = await backend(), await backend()
        token = await a.acquire_lock("k", 5)
        assert token
        assert await b.acquire_lock("k", 5) is None
        assert await b.release_lock("k", "not-the-token") is False
        assert await a.release_lock("k", token) is True
        assert await b.acquire_lock("k", 5)

    async def test_expires(self, backend: Make) -> None:
        """A lock frees itself after its ttl, and the old owner cannot release the new one."""
        a, b = await backend(), await backend()
        old = await a.acquire_lock("k", 0.2)
        await asyncio.sleep(0.3)
        new = await b.acquire_lock("k", 5)
        assert new and new != old
        assert await a.release_lock("k", old) is False
        assert await b.release_lock("k", new) is True


class TestGrants:
    async def test_create_find_list(self, store: Store) -> None:
        """A stored grant is found for its exact workload and rule, listed and read back."""
        g = grant()
        assert await store.put_grant(g) is True
        assert await store.find_grant(W, RULE) == g
        assert await store.find_grant(W, "other-rule") is None
        assert await store.find_grant("spiffe://example.org/ns/prod/sa/other", RULE) is None
        assert await store.get_grant(g.id) == g
        assert await store.list_grants() == [g]

    async def test_find_prefers_latest_expiry(self, store: Store) -> None:
        """With several active grants, the one expiring last is returned."""
        short, long = grant(ttl=600), grant(ttl=7200)
        await store.put_grant(long)
        await store.put_grant(short)
        assert (await store.find_grant(W, RULE)).id == long.id

    async def test_revoke(self, store: Store) -> None:
        """A revoked grant is never found again; reading it shows when and why it was revoked."""
        g = grant()
        await store.put_grant(g)
        revoked = await store.revoke_grant(g.id, reason="incident closed")
        assert revoked is not None and revoked.revoked and revoked.revoke_reason == "incident closed"
        assert await store.find_grant(W, RULE) is None
        got = await store.get_grant(g.id)
        assert got is not None and got.revoked_at == pytest.approx(revoked.revoked_at, abs=0.002)
        assert [x.id for x in await store.list_grants() if x.revoked] == [g.id]
        assert g.id in store.revoked_grant_ids()

    async def test_revoked_id_stays_revoked(self, store: Store) -> None:
        """Writing a revoked grant back is refused: a revoked id never becomes active again."""
        g = grant()
        await store.put_grant(g)
        await store.revoke_grant(g.id, reason="done")
        assert await store.put_grant(g) is False
        assert await store.put_grant(dataclasses.replace(g, expires_at=g.expires_at + 60)) is False
        assert await store.find_grant(W, RULE) is None

    async def test_revoke_unknown_blocks_later_put(self, store: Store) -> None:
        """Revoking an id nobody stored yet returns None and still forbids that id for good."""
        g = grant()
        assert await store.revoke_grant(g.id, reason="pre-emptive") is None
        assert await store.put_grant(g) is False

    async def test_first_revocation_wins(self, store: Store) -> None:
        """Revoking twice keeps the first time and reason."""
        g = grant()
        await store.put_grant(g)
        first = await store.revoke_grant(g.id, reason="first")
        await asyncio.sleep(0.01)
        second = await store.revoke_grant(g.id, reason="second")
        assert second.revoke_reason == "first"
        assert second.revoked_at == pytest.approx(first.revoked_at, abs=0.002)

    async def test_expiry(self, store: Store) -> None:
        """An expired grant is not found, listed or stored."""
        g = dataclasses.replace(grant(), expires_at=time.time() + 0.3)
        assert await store.put_grant(g) is True
        assert await store.find_grant(W, RULE) == g
        await asyncio.sleep(0.4)
        assert await store.find_grant(W, RULE) is None
        assert await store.get_grant(g.id) is None
        assert await store.list_grants() == []
        assert await store.put_grant(g) is False

    async def test_outliving_tombstone_refused(self, store: Store) -> None:
        """A grant that would outlive its revocation tombstone is a programming error."""
        g = dataclasses.replace(grant(), expires_at=time.time() + 31 * 86400)
        with pytest.raises(ValueError, match="may not outlive its revocation tombstone"):
            await store.put_grant(g)

    async def test_bad_ids(self, store: Store) -> None:
        """Malformed ids are never looked up, and cannot be revoked."""
        assert await store.get_grant("../etc") is None
        with pytest.raises(ValueError, match="invalid grant id"):
            await store.revoke_grant("a b", reason="x")
        with pytest.raises(ValueError, match="revoke reason is required"):
            await store.revoke_grant(grant().id, reason=" ")

    async def test_events(self, store: Store) -> None:
        """Creating and revoking a grant announce it to subscribers."""
        events: list[dict] = []
        store.subscribe(events.append)
        g = grant()
        await store.put_grant(g)
        await store.revoke_grant(g.id, reason="done")
        await until(lambda: len(events) == 2)
        assert [(e["type"], e["id"]) for e in events] == [("grant_created", g.id), ("grant_revoked", g.id)]


class TestEvents:
    async def test_publish_subscribe(self, backend: Make) -> None:
        """An event from one replica reaches another's callbacks, sync and async, with its origin."""
        a, b = await backend(), await backend()
        seen: list[dict] = []
        done = asyncio.Event()

        async def slow(event: dict) -> None:
            done.set()
        b.subscribe(seen.append)
        b.subscribe(slow)
        await a.publish({"type": "grant_revoked", "id": "abcdefgh12"})
        await until(lambda: seen and done.is_set())
        assert seen == [{"type": "grant_revoked", "id": "abcdefgh12", "origin": a.origin}]

    async def test_failing_callback_isolated(self, store: Store) -> None:
        """A callback that raises does not stop the others; unsubscribing stops delivery."""
        seen: list[dict] = []

        def bad(event: dict) -> None:
            raise RuntimeError("boom")
        store.subscribe(bad)
        stop = store.subscribe(seen.append)
        await store.publish({"type": "resync"})
        await until(lambda: len(seen) == 1)
        stop()
        await store.publish({"type": "resync"})
        await asyncio.sleep(0.1)
        assert len(seen) == 1

    @pytest.mark.parametrize(("event", "message"), [
        ({"type": "grant_minted", "id": "x"}, "unknown event type 'grant_minted'"),
        ({"type": "credential_evicted"}, "needs a non-empty string 'key'"),
        ({"type": "grant_revoked", "id": 7}, "needs a non-empty string 'id'"),
    ])
    async def test_invalid(self, store: Store, event: dict, message: str) -> None:
        """Only known events with their field are published."""
        with pytest.raises(ValueError, match=message):
            await store.publish(event)


class TestAudit:
    async def test_xadd(self, store: Store) -> None:
        """Audit records get increasing ids."""
        first = await store.audit_xadd("audit", {"event": "credential.used"}, maxlen=10)
        second = await store.audit_xadd("audit", {"event": "credential.used"}, maxlen=10)
        assert first != second

    async def test_maxlen_below_one(self, store: Store) -> None:
        """A stream capped at no entries is refused: it would drop every audit record it is given."""
        with pytest.raises(ValueError, match="maxlen must be at least 1"):
            await store.audit_xadd("audit", {"event": "credential.used"}, maxlen=0)

    async def test_maxlen_memory(self) -> None:
        """The memory stream keeps the last maxlen entries."""
        mem = MemoryStore()
        ids = [await mem.audit_xadd("audit", {"n": str(i)}, maxlen=5) for i in range(20)]
        assert [i for i, _ in mem.stream("audit")] == ids[-5:]

    async def test_maxlen_redis(self, replicas: Make, raw: Redis) -> None:
        """XADD with MAXLEN keeps the stream at maxlen entries, the newest ones."""
        store = await replicas()
        ids = [await store.audit_xadd("audit", {"n": str(i)}, maxlen=5) for i in range(20)]
        assert await raw.xlen("secretless:audit:audit") == 5
        entries = await raw.xrange("secretless:audit:audit")
        assert [e[0].decode() for e in entries] == ids[-5:]
        assert entries[-1][1] == {b"n": b"19"}


class TestSharedFetch:
    async def test_one_provider_call(self, backend: Make) -> None:
        """Replicas that miss the same credential at once cause one provider call."""
        stores = [await backend(), await backend()]
        calls = 0

        async def fetch() -> IssuedCredential:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.2)
            return cred()
        results = await asyncio.gather(*(
            shared_fetch(stores[i % 2], "stripe/x", fetch, min_valid=30, lock_ttl=5) for i in range(6)))
        assert calls == 1
        assert {r.secret.reveal() for r in results} == {MARKER}

    async def test_stored_value_served(self, store: Store) -> None:
        """A valid stored credential is returned without calling the provider."""
        await store.put_credential("k", encode_credential(cred("stored")), expires_at=time.time() + 300)

        async def fetch() -> IssuedCredential:
            raise AssertionError("the provider must not be called")
        assert (await shared_fetch(store, "k", fetch, min_valid=30, lock_ttl=5)).secret.reveal() == "stored"

    async def test_nearly_expired_refetched(self, store: Store) -> None:
        """A stored credential within the skew is not served: a fresh one is fetched and stored."""
        await store.put_credential("k", encode_credential(cred("old", ttl=10)), expires_at=time.time() + 10)

        async def fetch() -> IssuedCredential:
            return cred("new")
        assert (await shared_fetch(store, "k", fetch, min_valid=30, lock_ttl=5)).secret.reveal() == "new"
        assert decode_credential(await store.get_credential("k")).secret.reveal() == "new"

    async def test_refresh_ahead(self, backend: Make) -> None:
        """A refresh ignores the stored copy of the credential it replaces, but takes a newer one."""
        a, b = await backend(), await backend()
        held = cred("current", ttl=300)
        await a.put_credential("k", encode_credential(held), expires_at=held.expires_at)
        calls = 0

        async def fetch() -> IssuedCredential:
            nonlocal calls
            calls += 1
            return cred("refreshed", ttl=600)
        first = await shared_fetch(a, "k", fetch, min_valid=30, lock_ttl=5, replacing=held)
        second = await shared_fetch(b, "k", fetch, min_valid=30, lock_ttl=5, replacing=held)
        assert first.secret.reveal() == second.secret.reveal() == "refreshed" and calls == 1

    async def test_failed_holder_hands_over(self, backend: Make) -> None:
        """When the lock holder's fetch fails, a waiter takes the lock and fetches itself."""
        a, b = await backend(), await backend()
        calls = 0

        async def fetch() -> IssuedCredential:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.1)
            if calls == 1:
                raise ProviderError("token endpoint down")
            return cred("second")
        first = asyncio.create_task(shared_fetch(a, "k", fetch, min_valid=30, lock_ttl=5))
        await asyncio.sleep(0.02)
        second = await shared_fetch(b, "k", fetch, min_valid=30, lock_ttl=5)
        with pytest.raises(ProviderError, match="token endpoint down"):
            await first
        assert second.secret.reveal() == "second" and calls == 2

    async def test_store_down_fetches_locally(self, replicas: Make, redis_server: RedisServer) -> None:
        """With Redis down the credential is still brokered, from this replica."""
        store = await replicas()
        redis_server.stop()

        async def fetch() -> IssuedCredential:
            return cred("local")
        assert (await shared_fetch(store, "k", fetch, min_valid=30, lock_ttl=5)).secret.reveal() == "local"


class TestRedisAtRest:
    async def test_only_ciphertext(self, replicas: Make, raw: Redis) -> None:
        """No key, value or DUMP in Redis contains a credential, a grant's reason or its workload."""
        store = await replicas()
        await store.put_credential(credential_key("stripe", "d", W, store.key_digest), encode_credential(cred()), expires_at=time.time() + 60)
        g = grant(reason=f"reason {MARKER}")
        await store.put_grant(g)
        await store.put_grant(grant(rule="other"))
        await store.revoke_grant(g.id, reason="closed")
        await store.acquire_lock("stripe/x", 5)
        needles = [MARKER.encode(), W.encode(), b"incident 42"]
        keys = [k async for k in raw.scan_iter("*")]
        assert {k.split(b":")[1] for k in keys} == {b"cred", b"grant", b"grants", b"revoked", b"lock"}
        for key in keys:
            kind = (await raw.type(key)).decode()
            content = {"string": raw.get, "hash": raw.hgetall, "zset": lambda k: raw.zrange(k, 0, -1)}[kind]
            blob = repr(await content(key)).encode() + (await raw.dump(key))
            for needle in needles:
                assert needle not in key and needle not in blob, (key, kind)

    async def test_ttl_from_expiry(self, replicas: Make, raw: Redis) -> None:
        """Entries expire in Redis when the credential or grant does."""
        store = await replicas()
        await store.put_credential("k", b"v", expires_at=time.time() + 100)
        assert 99_000 < await raw.pttl("secretless:cred:k") <= 100_000
        g = grant(ttl=600)
        await store.put_grant(g)
        assert 599_000 < await raw.pttl(f"secretless:grant:{g.id}") <= 600_000

    async def test_moved_blob_does_not_open(self, replicas: Make, raw: Redis) -> None:
        """A sealed value copied under another key reads as a miss and counts as an integrity error."""
        errors: list[str] = []
        store = await replicas(on_error=errors.append)
        await store.put_credential("a", b"secret", expires_at=time.time() + 60)
        await raw.set("secretless:cred:b", await raw.get("secretless:cred:a"))
        assert await store.get_credential("b") is None
        assert errors == ["integrity"]

    async def test_forged_grant_ignored(self, replicas: Make, raw: Redis) -> None:
        """A grant written to Redis without the key (or moved from another id) is never honoured."""
        store = await replicas()
        real, other = grant(), grant()
        await store.put_grant(real)
        [pair] = [k async for k in raw.scan_iter("secretless:grants:*")]
        await raw.hset(f"secretless:grant:{other.id}", "sealed", await raw.hget(f"secretless:grant:{real.id}", "sealed"))
        await raw.zadd(pair, {other.id: int(other.expires_at * 1000)})
        await raw.hset(f"secretless:grant:{real.id}", "sealed", other.to_json())
        assert await store.find_grant(W, RULE) is None
        assert await store.get_grant(other.id) is None

    async def test_key_rotation(self, replicas: Make) -> None:
        """A replica with the new key opens old entries; one without it treats new entries as misses."""
        k1, k2 = os.urandom(32), os.urandom(32)
        old = await replicas(sealer=Sealer({"k1": k1}, "k1"))
        new = await replicas(sealer=Sealer({"k1": k1, "k2": k2}, "k2"))
        await old.put_credential("a", b"by-k1", expires_at=time.time() + 60)
        assert await new.get_credential("a") == b"by-k1"
        await new.put_credential("b", b"by-k2", expires_at=time.time() + 60)
        assert await old.get_credential("b") is None


class TestRedisReplicas:
    async def test_event_latency(self, replicas: Make) -> None:
        """An event published by replica A reaches replica B's callback within 1 s."""
        a, b = await replicas(), await replicas()
        arrived = asyncio.get_running_loop().create_future()
        b.subscribe(lambda e: arrived.done() or arrived.set_result(time.monotonic()))
        sent = time.monotonic()
        await a.publish({"type": "credential_evicted", "key": "stripe/x"})
        latency = await asyncio.wait_for(arrived, 1.0) - sent
        assert latency < 1.0

    async def test_revocation_reaches_replica(self, replicas: Make) -> None:
        """A revocation on A stops B from honouring the grant and lands in B's revoked set within 1 s."""
        a, b = await replicas(), await replicas()
        g = grant()
        await a.put_grant(g)
        assert await b.find_grant(W, RULE) == g
        started = time.monotonic()
        await a.revoke_grant(g.id, reason="incident closed")
        assert await b.find_grant(W, RULE) is None
        await until(lambda: g.id in b.revoked_grant_ids(), timeout=1.0)
        assert time.monotonic() - started < 1.0

    async def test_restart_keeps_revocation(self, replicas: Make, redis_server: RedisServer, raw: Redis) -> None:
        """A Redis restart that loses every key revives no revoked grant, and the tombstone comes back."""
        a = await replicas()
        g = grant()
        await a.put_grant(g)
        await a.revoke_grant(g.id, reason="done")
        redis_server.stop()
        assert g.id in a.revoked_grant_ids()
        assert await a.put_grant(g) is False  # refused from the local set, without Redis
        with pytest.raises(StoreError, match="unavailable"):
            await a.find_grant(W, RULE)
        redis_server.start()
        await until_async(lambda: raw.zscore("secretless:revoked", g.id), timeout=5)
        assert await a.put_grant(g) is False
        assert await a.find_grant(W, RULE) is None
        restarted = await replicas()  # a replica started after the outage learns it from Redis
        assert g.id in restarted.revoked_grant_ids()
        assert await restarted.put_grant(g) is False

    async def test_lost_tombstone_healed(self, replicas: Make, raw: Redis) -> None:
        """If Redis forgets a revocation (old snapshot, failover), replicas refuse the grant and write it back."""
        a = await replicas()
        g = grant()
        await a.put_grant(g)
        await a.revoke_grant(g.id, reason="done")
        await raw.zrem("secretless:revoked", g.id)
        await raw.hdel(f"secretless:grant:{g.id}", "revoked_at", "revoke_reason")
        assert await a.find_grant(W, RULE) is None  # the local set still knows
        await raw.client_kill_filter(_type="pubsub")  # a's subscription drops and re-syncs
        await until_async(lambda: raw.zscore("secretless:revoked", g.id), timeout=5)
        fresh = await replicas()
        assert await fresh.find_grant(W, RULE) is None


class TestRedisOutage:
    async def test_fails_fast_and_recovers(self, replicas: Make, redis_server: RedisServer) -> None:
        """Server killed: every operation raises StoreError within 2 s; restarted: the client is back by itself."""
        errors: list[str] = []
        a, b = await replicas(on_error=errors.append), await replicas()
        events: list[dict] = []
        b.subscribe(events.append)
        assert a.healthy and b.healthy
        redis_server.stop()
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "get_credential": lambda: a.get_credential("k"),
            "put_credential": lambda: a.put_credential("k", b"v", expires_at=time.time() + 60),
            "acquire_lock": lambda: a.acquire_lock("k", 5),
            "find_grant": lambda: a.find_grant(W, RULE),
            "put_grant": lambda: a.put_grant(grant()),
            "publish": lambda: a.publish({"type": "resync"}),
        }
        for op, call in calls.items():
            started = time.monotonic()
            with pytest.raises(StoreError, match=rf"^the shared store is unavailable \({op}\)") as exc:
                await call()
            assert time.monotonic() - started < 2.0
            assert exc.value.reason == "store_unavailable" and exc.value.op == op
            assert exc.value.__cause__ is None  # the client's text is never chained in
            assert exc.value.__context__ is None or exc.value.__suppress_context__
        assert not a.healthy
        assert set(calls) <= set(errors)
        await until(lambda: not b.healthy)
        redis_server.start()
        await until(lambda: a.healthy and b.healthy, timeout=5)
        assert await b.wait_subscribed(5)
        await until(lambda: {"type": "resync", "origin": b.origin} in events)
        await a.publish({"type": "credential_evicted", "key": "after-restart"})
        await until(lambda: any(e.get("key") == "after-restart" for e in events), timeout=1.0)
        await a.put_credential("k", b"v", expires_at=time.time() + 60)
        assert await b.get_credential("k") == b"v"

    async def test_partition_times_out(self, replicas: Make, redis_server: RedisServer) -> None:
        """A server that accepts but never answers fails operations within 2 s, then recovers."""
        a = await replicas()
        redis_server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match="unavailable"):
                await a.get_credential("k")
            assert time.monotonic() - started < 2.0
            assert not a.healthy
            started = time.monotonic()
            with pytest.raises(StoreError, match="unavailable"):  # fails at once while unhealthy
                await a.find_grant(W, RULE)
            assert time.monotonic() - started < 0.1
        finally:
            redis_server.resume()
        await until_async(lambda: _answers(a), timeout=5)
        assert a.healthy

    async def test_start_while_down(self, redis_server: RedisServer) -> None:
        """A replica started during an outage starts, refuses store operations, and connects later."""
        redis_server.stop()
        store = RedisStore(redis_server.url, sealer=SEALER)
        try:
            started = time.monotonic()
            await store.start()
            assert time.monotonic() - started < 2.0 and not store.healthy
            with pytest.raises(StoreError):
                await store.get_credential("k")
            redis_server.start()
            assert await store.wait_subscribed(5)
            assert store.healthy
            assert await store.get_credential("k") is None
        finally:
            await store.close()

    async def test_closed(self, replicas: Make) -> None:
        """A closed store refuses operations with a StoreError."""
        store = await replicas()
        await store.close()
        with pytest.raises(StoreError, match=r"the shared store is not running \(get_credential\)"):
            await store.get_credential("k")


async def _answers(store: RedisStore) -> bool:
    try:
        await store.get_credential("probe")
    except StoreError:
        return False
    return True


@pytest.mark.e2e  # starts its own redis-server processes
class TestRedisDeployments:
    async def test_password(self, tmp_path: Path) -> None:
        """A password given as a secret works; a wrong one is a StoreError that never shows it."""
        with RedisServer("--requirepass", "s3cret-redis-pw") as server:
            good = RedisStore(server.url, sealer=SEALER, password=Secret("s3cret-redis-pw"))
            bad = RedisStore(server.url, sealer=SEALER, password=Secret("wrong-pw-value"))
            try:
                await good.start()
                await good.put_credential("k", b"v", expires_at=time.time() + 60)
                assert await good.get_credential("k") == b"v"
                await bad.start()
                with pytest.raises(StoreError) as exc:
                    await bad.get_credential("k")
                assert "wrong-pw-value" not in str(exc.value) and "s3cret" not in str(exc.value)
            finally:
                await good.close()
                await bad.close()

    async def test_tls(self, tmp_path: Path) -> None:
        """rediss:// verifies the server against the configured CA; an unknown CA is refused."""
        ca = certs.make_ca(common_name="test redis CA")
        leaf = certs.make_server_cert(ca=ca)
        (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
        (tmp_path / "server.pem").write_bytes(leaf.cert_pem())
        (tmp_path / "server-key.pem").write_bytes(leaf.key_pem())
        other = tmp_path / "other-ca.pem"
        other.write_bytes(certs.make_ca(common_name="other CA").cert_pem())
        with RedisServer("--tls-cert-file", str(tmp_path / "server.pem"), "--tls-key-file",
                         str(tmp_path / "server-key.pem"), "--tls-ca-cert-file", str(tmp_path / "ca.pem"),
                         "--tls-auth-clients", "no", tls=True) as server:
            good = RedisStore(server.url, sealer=SEALER, tls=TlsFiles(ca_bundle=tmp_path / "ca.pem"))
            bad = RedisStore(server.url, sealer=SEALER, tls=TlsFiles(ca_bundle=other))
            try:
                await good.start()
                assert good.healthy
                await good.put_credential("k", b"v", expires_at=time.time() + 60)
                assert await good.get_credential("k") == b"v"
                await bad.start()
                with pytest.raises(StoreError):
                    await bad.get_credential("k")
            finally:
                await good.close()
                await bad.close()

    async def test_sentinel(self) -> None:
        """redis+sentinel:// finds the master through Sentinel and works like a direct URL."""
        with RedisServer() as master, RedisServer(
                f"sentinel monitor mymaster 127.0.0.1 {master.port} 1",
                "sentinel down-after-milliseconds mymaster 60000", sentinel=True) as sentinel:
            a = RedisStore(f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0", sealer=SEALER)
            b = RedisStore(master.url, sealer=SEALER)
            try:
                await a.start()
                await b.start()
                assert a.healthy
                await a.put_credential("k", b"v", expires_at=time.time() + 60)
                assert await b.get_credential("k") == b"v"
                seen: list[dict] = []
                b.subscribe(seen.append)
                await a.publish({"type": "resync"})
                await until(lambda: seen, timeout=1.0)
            finally:
                await a.close()
                await b.close()


class TestLuaScripts:
    LUA = Path(__file__).resolve().parent.parent / "secretless_proxy" / "store" / "lua"

    def test_every_script_file_is_loaded_and_documented(self) -> None:
        """Each lua/*.lua is in SCRIPTS, as read from the package, with a KEYS/ARGV/returns comment block."""
        files = {f.stem: f.read_text() for f in self.LUA.glob("*.lua")}
        assert set(files) == set(SCRIPTS) == {"release_lock", "put_grant", "find_grants", "revoke_grant"}
        for name, text in SCRIPTS.items():
            assert text == files[name]
            head = [line for line in text.splitlines() if line.startswith("--")]
            assert any(line.startswith("-- KEYS[1]") for line in head), name
            assert any(line.startswith("-- ARGV[1]") for line in head), name
            assert any(line.startswith("-- returns") for line in head), name

    def test_the_scripts_are_package_data_of_the_wheel(self) -> None:
        """pyproject's package-data names every script, so an installed wheel can start a Redis store."""
        pyproject = tomllib.loads((self.LUA.parent.parent.parent / "pyproject.toml").read_text())
        globs = pyproject["tool"]["setuptools"]["package-data"]["secretless_proxy.store"]
        covered = {f for g in globs for f in self.LUA.parent.glob(g)}
        assert covered and covered == set(self.LUA.glob("*.lua"))


class TestUrl:
    @pytest.mark.parametrize(("url", "expected"), [
        ("redis://localhost:6379/2", dict(scheme="redis", tls=False, db=2)),
        ("rediss://svc@redis.internal:6380", dict(scheme="rediss", tls=True, db=0, username="svc")),
        ("redis+sentinel://h1:26379,h2,[::1]:26380/mymaster/1",
         dict(tls=False, sentinels=(("h1", 26379), ("h2", 26379), ("::1", 26380)), service="mymaster", db=1)),
        ("rediss+sentinel://h1/mymaster", dict(tls=True, sentinels=(("h1", 26379),), service="mymaster", db=0)),
    ])
    def test_valid(self, url: str, expected: dict) -> None:
        """Direct, TLS and Sentinel URLs parse to their parts."""
        target = parse_url(url)
        assert {k: getattr(target, k) for k in expected} == expected

    @pytest.mark.parametrize(("url", "message"), [
        ("redis://:hunter2@localhost", "must not contain a password"),
        ("http://localhost", "unsupported store URL scheme 'http'"),
        ("redis://localhost/x", "invalid database number 'x'"),
        ("redis://localhost?ssl=true", "takes no query"),
        ("redis+sentinel://h1:26379", "names the master"),
        ("redis+sentinel://h1:99999/m", "invalid sentinel address"),
    ])
    def test_invalid(self, url: str, message: str) -> None:
        """Invalid URLs say what is wrong, never echoing a password."""
        with pytest.raises(ValueError, match=message) as exc:
            parse_url(url)
        assert "hunter2" not in str(exc.value)


class TestConfig:
    KEY = "ab" * 32

    def parse(self, text: str, tmp_path: Path) -> tuple[StoreConfig | None, list[str]]:
        src = yamlsource.load(text, file="t.yaml")
        cfg = parse_store_section(src, src.data["store"], tmp_path)
        return cfg, [str(i) for i in src.issues]

    def test_memory(self, tmp_path: Path) -> None:
        """``store: memory://`` is the embedded store."""
        cfg, issues = self.parse("store: memory://\n", tmp_path)
        assert issues == [] and cfg == StoreConfig() and cfg.kind == "memory"
        assert isinstance(open_store(cfg), MemoryStore)

    async def test_redis(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A full Redis section parses, resolves its keys and opens a RedisStore."""
        monkeypatch.setenv("STORE_K2", self.KEY)
        monkeypatch.setenv("REDIS_PW", "pw")
        (tmp_path / "k1").write_text("cd" * 32 + "\n")
        (tmp_path / "ca.pem").write_text("x")
        cfg, issues = self.parse(
            "store:\n  url: rediss://redis.internal:6380/1\n"
            "  encryption_keys: {k2: env:STORE_K2, k1: file:k1}\n  active_key: k2\n"
            "  password: env:REDIS_PW\n  tls: {ca_bundle: ca.pem}\n  key_prefix: 'prod:'\n  timeout_seconds: 1\n",
            tmp_path)
        assert issues == []
        assert cfg.kind == "redis" and cfg.active_key == "k2" and set(cfg.encryption_keys) == {"k1", "k2"}
        assert cfg.tls == TlsFiles(ca_bundle=tmp_path / "ca.pem") and cfg.key_prefix == "prod:" and cfg.timeout == 1.0
        assert cfg.grant_cache == 0.5  # the default bound (store/grantcache.py)
        store = open_store(cfg)
        assert isinstance(store, RedisStore) and store._sealer.active_key_id == "k2"

    @pytest.mark.parametrize(("text", "message"), [
        ("store: redis://localhost\n", "t.yaml:1 store: missing required key 'encryption_keys'"),
        ("store: {url: 'redis://:pw@localhost', encryption_keys: {k1: env:STORE_K}}\n",
         "store.url: the store URL must not contain a password"),
        ("store: {url: redis://localhost, encryption_keys: {k1: env:STORE_K, k2: env:STORE_K}}\n",
         "store: missing required key 'active_key': say which of k1, k2"),
        ("store: {url: redis://localhost, encryption_keys: {k1: env:STORE_K}, active_key: k9}\n",
         r"store.active_key: unknown key id 'k9' \(known: k1\)"),
        ("store: {url: redis://localhost, encryption_keys: {k1: env:STORE_BAD}}\n",
         r"store.encryption_keys.k1: env:STORE_BAD: an encryption key must be 32 random bytes"),
        ("store: {url: redis://localhost, encryption_keys: {k1: env:STORE_UNSET}}\n",
         "store.encryption_keys.k1: cannot resolve env:STORE_UNSET"),
        ("store: {url: redis://localhost, encryption_keys: {k1: env:STORE_K}, tls: {}}\n",
         "store.tls: TLS settings need a rediss:// URL"),
        ("store: {url: memory://, active_key: k1}\n", "store.active_key: memory:// keeps everything in this process"),
        ("store: {url: redis://localhost, encryption_keys: {k1: env:STORE_K}, key_prefx: x}\n",
         "store.key_prefx: unknown key 'key_prefx' \\(did you mean 'key_prefix'"),
        ("store: {url: redis://localhost, encryption_keys: {k1: env:STORE_K}, timeout_seconds: 60}\n",
         "store.timeout_seconds: must be a number of seconds from 0.05 to 10"),
        ("store: {url: redis://localhost, encryption_keys: {k1: env:STORE_K}, grant_cache_seconds: 61}\n",
         "store.grant_cache_seconds: must be a number of seconds from 0 to 60, got 61"),
        ("store: {url: redis://localhost, encryption_keys: {k1: env:STORE_K}, grant_cache_seconds: -1}\n",
         "store.grant_cache_seconds: must be a number of seconds from 0 to 60, got -1"),
        ("store: {url: memory://, grant_cache_seconds: 1}\n",
         "store.grant_cache_seconds: memory:// keeps everything in this process"),
    ])
    def test_invalid(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str) -> None:
        """Each mistake is an issue naming file, line and key path, never a key's value."""
        monkeypatch.setenv("STORE_K", self.KEY)
        monkeypatch.setenv("STORE_BAD", "hunter2hunter2")
        monkeypatch.delenv("STORE_UNSET", raising=False)
        cfg, issues = self.parse(text, tmp_path)
        assert cfg is None
        assert any(re.search(message, i) for i in issues), issues
        assert not any("hunter2" in i for i in issues)

    @pytest.mark.parametrize(("value", "expected"), [(0, 0.0), (0.25, 0.25), (60, 60.0)])
    def test_grant_cache_seconds(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: float,
                                 expected: float) -> None:
        """grant_cache_seconds takes 0 (the cache off) to 60; the store section keeps it as grant_cache."""
        monkeypatch.setenv("STORE_K", self.KEY)
        cfg, issues = self.parse("store: {url: redis://localhost, encryption_keys: {k1: env:STORE_K}, "
                                 f"grant_cache_seconds: {value}}}\n", tmp_path)
        assert issues == [] and cfg is not None and cfg.grant_cache == expected

    def test_open_unresolvable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Opening a store whose key vanished since the config check says which key."""
        monkeypatch.delenv("STORE_GONE", raising=False)
        cfg = StoreConfig(url="redis://localhost", encryption_keys={"k1": SecretRef.parse("env:STORE_GONE")})
        with pytest.raises(ValueError, match="encryption key 'k1': cannot resolve env:STORE_GONE"):
            open_store(cfg)


class TestGrantValue:
    def test_new(self) -> None:
        """A new grant has a random url-safe id, its creation time and expiry."""
        g = grant(break_glass=True, ttl=600)
        assert g.id != grant().id and len(g.id) == 22
        assert g.expires_at - g.created_at == pytest.approx(600)
        assert g.active_at(time.time()) and not g.revoked

    def test_json_round_trip(self) -> None:
        """to_json/from_json keep every field, revocation included."""
        g = grant().revoked_as(at=time.time(), reason="done")
        assert Grant.from_json(g.to_json()) == g

    @pytest.mark.parametrize(("kw", "message"), [
        ({"ttl": 10}, "a grant must last from 60 to 604800 seconds, got 10"),
        ({"ttl": 8 * 86400}, "a grant must last from 60"),
        ({"ttl": 5 * 3600, "break_glass": True}, "a break-glass grant must last from 60 to 14400 seconds"),
        ({"break_glass": True, "reason": " "}, "a break-glass grant needs a reason"),
        ({"ttl": True}, "ttl must be a number of seconds"),
        ({"workload": "spiffe://example.org/ns/*/sa/x"}, "exact SPIFFE ID"),
        ({"workload": "billing"}, "invalid SPIFFE ID"),
        ({"issued_by": ""}, r"issued_by \(who issued the grant\) is required"),
        ({"reason": "a\nb"}, "reason must not contain line breaks"),
        ({"rule": ""}, "invalid rule name"),
    ])
    def test_invalid(self, kw: dict, message: str) -> None:
        """Each invalid field is refused with a sentence naming it."""
        with pytest.raises(ValueError, match=message):
            grant(**kw)

    @pytest.mark.parametrize(("text", "message"), [
        ("not json", "not valid JSON"),
        ("[]", "not a JSON object"),
        ('{"id": "abcdefgh"}', "wrong fields"),
    ])
    def test_from_json_invalid(self, text: str, message: str) -> None:
        """A malformed stored grant is refused."""
        with pytest.raises(ValueError, match=message):
            Grant.from_json(text)
