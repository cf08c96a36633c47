"""Tests for issue 10 §4: store events are authenticated (store/events.py, RedisStore).

Replicas are ``RedisStore`` clients of a real redis-server; the attacker is redis-py, a plain
client that can PUBLISH on the channel and read everything published there. Forged, unsigned,
stale, tampered and replayed events must have no effect and be counted; genuine ones work.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from helpers.redis_server import RedisServer
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from secretless_proxy.store.events import EventSigner
from secretless_proxy.store.redis import RedisStore
from secretless_proxy.store.sealing import Sealer

# every test runs a real redis-server
pytestmark = pytest.mark.e2e

KEY = secrets.token_bytes(32)
CHANNEL = "secretless:events"
GID = "g" * 22


def sealer(key: bytes = KEY, kid: str = "k1") -> Sealer:
    return Sealer({kid: key}, kid)


class Reasons(Counter):
    """How many events a replica refused, by reason (its ``on_event_rejected`` hook)."""

    def update_one(self, reason: str) -> None:
        self[reason] += 1


class Fleet:
    """Two started replicas, each counting the events it refused, and a raw attacker client."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.rejected: dict[str, Reasons] = {"a": Reasons(), "b": Reasons()}
        self.seen: dict[str, list[dict[str, str]]] = {"a": [], "b": []}
        self.stores: dict[str, RedisStore] = {}

    async def start(self) -> None:
        for name in ("a", "b"):
            store = RedisStore(self.url, sealer=sealer(), on_event_rejected=self.rejected[name].update_one)
            store.subscribe(self.seen[name].append)
            await store.start()
            self.stores[name] = store

    async def close(self) -> None:
        for store in self.stores.values():
            await store.close()


@pytest.fixture
async def fleet() -> AsyncIterator[tuple[Fleet, Redis]]:
    with RedisServer() as server:
        f = Fleet(server.url)
        await f.start()
        raw = Redis.from_url(server.url)
        try:
            yield f, raw
        finally:
            await raw.aclose()
            await f.close()


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def settle() -> None:
    await asyncio.sleep(0.3)  # long enough for a published event to be delivered, were it accepted


async def genuine_event(f: Fleet, raw: Redis) -> tuple[dict, PubSub]:
    """Make replica a publish a real event (a credential deleted); returns it as read off the channel,
    and the subscription (the test closes it)."""
    pubsub = raw.pubsub()
    await pubsub.subscribe(CHANNEL)
    await f.stores["a"].delete_credential("api/x/y")
    msg = None
    while msg is None or msg["type"] != "message":
        msg = await pubsub.get_message(timeout=2)
    return msg, pubsub


class TestGenuine:
    async def test_revocation_reaches_the_other_replica(self, fleet) -> None:
        """A revocation published by A is verified and honoured by B; nothing is refused."""
        f, _ = fleet
        await f.stores["a"].revoke_grant(GID, reason="done")
        await until(lambda: GID in f.stores["b"].revoked_grant_ids())
        assert [e["type"] for e in f.seen["b"]] == ["grant_revoked"]
        assert sum(f.rejected["a"].values()) == sum(f.rejected["b"].values()) == 0

    async def test_what_goes_on_the_wire_is_signed(self, fleet) -> None:
        """An eavesdropper sees ts, nonce, kid and an HMAC on every event, and no key material."""
        f, raw = fleet
        msg, pubsub = await genuine_event(f, raw)
        event = json.loads(msg["data"])
        assert set(event) == {"type", "key", "origin", "ts", "nonce", "kid", "sig"}
        assert event["kid"] == "k1" and len(event["sig"]) == 64
        assert KEY.hex() not in msg["data"].decode()
        await pubsub.aclose()


class TestRefused:
    async def test_unsigned_revocation_has_no_effect(self, fleet) -> None:
        """A plain PUBLISH of a grant revocation (what main honoured) revokes nothing and is counted."""
        f, raw = fleet
        await raw.publish(CHANNEL, json.dumps({"type": "grant_revoked", "id": GID, "origin": "attacker"}))
        await settle()
        for name in ("a", "b"):
            assert GID not in f.stores[name].revoked_grant_ids()
            assert f.seen[name] == [] and f.rejected[name] == {"unsigned": 1}

    async def test_forged_with_another_key(self, fleet) -> None:
        """An event signed with a key the proxies do not hold is refused as forged."""
        f, raw = fleet
        forger = EventSigner(sealer(secrets.token_bytes(32)), CHANNEL)
        await raw.publish(CHANNEL, forger.sign({"type": "grant_revoked", "id": GID, "origin": "x"}))
        await settle()
        assert GID not in f.stores["b"].revoked_grant_ids() and f.rejected["b"] == {"forged": 1}

    async def test_forged_with_an_unknown_key_id(self, fleet) -> None:
        """An event naming a key id the proxies do not have is refused as forged."""
        f, raw = fleet
        forger = EventSigner(sealer(kid="k9"), CHANNEL)
        await raw.publish(CHANNEL, forger.sign({"type": "credential_evicted", "key": "api/x/y", "origin": "x"}))
        await settle()
        assert f.seen["b"] == [] and f.rejected["b"] == {"forged": 1}

    async def test_tampered_genuine_event(self, fleet) -> None:
        """A genuine event with its id changed no longer verifies: forged."""
        f, raw = fleet
        genuine = json.loads(EventSigner(sealer(), CHANNEL).sign({"type": "grant_revoked", "id": GID, "origin": "x"}))
        other = "h" * 22
        await raw.publish(CHANNEL, json.dumps({**genuine, "id": other}))
        await settle()
        assert other not in f.stores["b"].revoked_grant_ids() and f.rejected["b"] == {"forged": 1}

    async def test_signed_for_another_channel(self, fleet) -> None:
        """An event signed for another deployment's channel (key_prefix) does not verify on this one."""
        f, raw = fleet
        elsewhere = EventSigner(sealer(), "other:events").sign({"type": "grant_revoked", "id": GID, "origin": "x"})
        await raw.publish(CHANNEL, elsewhere)
        await settle()
        assert f.rejected["b"] == {"forged": 1}

    async def test_stale_event(self, fleet) -> None:
        """A correctly signed event from 5 minutes ago is refused as stale."""
        f, raw = fleet
        old = EventSigner(sealer(), CHANNEL, now=lambda: time.time() - 300)
        await raw.publish(CHANNEL, old.sign({"type": "grant_revoked", "id": GID, "origin": "x"}))
        await settle()
        assert GID not in f.stores["b"].revoked_grant_ids() and f.rejected["b"] == {"stale": 1}

    async def test_replayed_event(self, fleet) -> None:
        """A genuine event captured off the channel and published again is delivered once, then refused."""
        f, raw = fleet
        msg, pubsub = await genuine_event(f, raw)
        await until(lambda: len(f.seen["b"]) == 1)
        await raw.publish(CHANNEL, msg["data"])
        await settle()
        assert len(f.seen["b"]) == 1 and f.rejected["b"] == {"replayed": 1}
        assert f.rejected["a"] == {"replayed": 1}  # the publisher itself is not fooled either
        await pubsub.aclose()

    @pytest.mark.parametrize("payload", [b"not json", b"[]", b'{"type": "nope"}', b"x" * 5000,
                                         b'{"type": "resync", "ts": "1", "nonce": "n", "kid": "k1", "sig": "s"}'])
    async def test_malformed(self, fleet, payload: bytes) -> None:
        """Garbage on the channel is refused as malformed and never reaches a subscriber."""
        f, raw = fleet
        await raw.publish(CHANNEL, payload)
        await settle()
        assert f.seen["b"] == [] and f.rejected["b"] == {"malformed": 1}
