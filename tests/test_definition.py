"""Tests for issue 10 §2: a cached credential matches its current definition.

The definition digest (``definition.py``) and what the broker does with it: a changed
definition never finds a token minted under the old one (in process or in the shared store),
and ``retire_stale`` evicts and revokes what was minted under older definitions.
"""

from __future__ import annotations

import time

import pytest
from helpers.providers import Clock, FakeProvider, Recorder, RevocableProvider, context

from secretless_proxy.broker import Broker
from secretless_proxy.config.model import BrokerConfig
from secretless_proxy.credentials.oauth2 import ClientCredentialsSettings
from secretless_proxy.definition import definition_digest
from secretless_proxy.secretrefs import Secret, SecretRef
from secretless_proxy.sharedcache import credential_family, encode_credential
from secretless_proxy.store import MemoryStore


def oauth(**kw) -> ClientCredentialsSettings:
    base = {"token_url": "https://idp.example/token", "client_id": "billing", "auth": "client_secret_basic",
            "client_secret": SecretRef.parse("env:CS"), "scopes": ("payments:admin",)}
    return ClientCredentialsSettings(**{**base, **kw})


def define(provider: FakeProvider, **settings) -> FakeProvider:
    """Give a fake provider the digest of a real OAuth2 definition."""
    provider.digest = definition_digest("oauth2_client_credentials", oauth(**settings))
    return provider


class TestDigest:
    def test_equal_definitions_equal_digests(self) -> None:
        """Two parses of the same definition digest alike (the digest is stable across processes)."""
        assert definition_digest("k", oauth()) == definition_digest("k", oauth())
        assert len(definition_digest("k", oauth())) == 64

    @pytest.mark.parametrize("change", [
        {"scopes": ("payments:read",)}, {"client_id": "reports"}, {"token_url": "https://other.example/token"},
        {"audience": ("api",)}, {"resource": ("https://api.example",)}, {"params": (("tenant", "t2"),)},
        {"client_secret": SecretRef.parse("env:OTHER")}, {"auth": "client_secret_post"},
    ])
    def test_every_field_that_shapes_the_token_changes_it(self, change: dict) -> None:
        """Scopes, client, endpoint, audience, resource, params, secret reference, auth: each is a new digest."""
        assert definition_digest("k", oauth(**change)) != definition_digest("k", oauth())

    def test_kind_is_part_of_it(self) -> None:
        """The same settings under another kind are another definition."""
        assert definition_digest("a", oauth()) != definition_digest("b", oauth())

    def test_mappings_digest_independently_of_order(self) -> None:
        """A mapping (GitHub permissions) digests the same whatever its key order."""
        assert definition_digest("k", {"contents": "read", "issues": "write"}) == \
            definition_digest("k", {"issues": "write", "contents": "read"})

    def test_a_secret_value_is_refused(self) -> None:
        """A definition holding a secret value is a bug: refused, never hashed into a key."""
        with pytest.raises(TypeError, match="never secret values"):
            definition_digest("k", {"secret": Secret("v")})


def broker(providers, clock, store=None, events=None) -> Broker:
    b = Broker({p.name: p for p in providers}, config=BrokerConfig(retries=0), now=clock, events=events)
    b.attach_store(store)
    return b


async def restarted(store: MemoryStore, clock: Clock, before: FakeProvider, after: FakeProvider) -> Broker:
    """A broker that fetched with ``before`` and closed (a process that stopped), then a new one on
    the same store with ``after`` (the restart)."""
    b1 = broker([before], clock, store)
    await b1.get("api", context())
    await b1.aclose()
    return broker([after], clock, store)


class TestBrokerKeys:
    async def test_changed_definition_is_not_served_the_old_token(self) -> None:
        """After a reload that swaps the provider (without evicting), the next get mints under the new definition."""
        clock = Clock()
        old = define(FakeProvider(clock=clock))
        b = broker([old], clock)
        assert (await b.get("api", context())).secret.reveal() == "tok-1"
        new = define(FakeProvider(clock=clock), scopes=("payments:read",))
        b.replace_providers({"api": new})
        assert (await b.get("api", context())).secret.reveal() == "tok-1"  # new provider's first token
        assert (old.calls, new.calls) == (1, 1)
        await b.aclose()

    async def test_same_definition_keeps_the_cache(self) -> None:
        """A reload that leaves a definition alone keeps its cached token (no needless provider call)."""
        clock = Clock()
        b = broker([define(FakeProvider(clock=clock))], clock)
        await b.get("api", context())
        again = define(FakeProvider(clock=clock))
        b.replace_providers({"api": again})
        assert (await b.get("api", context())).secret.reveal() == "tok-1" and again.calls == 0
        assert await b.retire_stale() == 0
        await b.aclose()

    async def test_retire_stale_revokes_old_entries(self) -> None:
        """retire_stale drops and revokes (through the provider that issued it) a token of the old definition."""
        clock, events = Clock(), Recorder()
        old = define(RevocableProvider(clock=clock))
        b = broker([old], clock, events=events)
        await b.get("api", context())
        b.replace_providers({"api": define(RevocableProvider(clock=clock), scopes=("payments:read",))})
        assert await b.retire_stale(["api"]) == 1
        await b.aclose()  # lets the revocation finish
        assert [c.secret.reveal() for c in old.revoked] == ["tok-1"]
        assert ("revoked", "tok-1", "config_changed") in events.log
        assert b.snapshot() == []

    async def test_sweep_drops_a_fill_that_finished_after_the_reload(self) -> None:
        """A fetch in flight across a reload lands under the old digest; the next sweep drops and revokes it."""
        clock = Clock()
        old = define(RevocableProvider(clock=clock))
        b = broker([old], clock)
        await b.get("api", context())
        b._providers = {"api": define(RevocableProvider(clock=clock), scopes=("x",))}  # swapped, entry left behind
        assert b.sweep() == 1 and b.snapshot() == []
        await b.aclose()
        assert len(old.revoked) == 1


class Targeted(RevocableProvider):
    """A revocable fake that revokes at ``target`` (an endpoint URL, as oauth2 and github_app do)."""

    def __init__(self, *args, target: str = "https://idp.example/revoke", **kw) -> None:
        super().__init__(*args, **kw)
        self.target = target

    @property
    def revocation_target(self) -> str | None:
        return self.target


class TestSharedStore:
    async def test_restart_with_a_changed_definition(self) -> None:
        """A new broker (a restart) on the same store never reads the old definition's token, and
        retire_stale removes it from the store and revokes it through the current provider."""
        clock = Clock(time.time())
        async with MemoryStore() as store:
            first = define(Targeted(clock=clock))
            b1 = broker([first], clock, store)
            assert (await b1.get("api", context())).secret.reveal() == "tok-1"
            await b1.aclose()
            narrowed = define(Targeted(clock=clock), scopes=("payments:read",))
            b2 = broker([narrowed], clock, store)
            assert (await b2.get("api", context())).secret.reveal() == "tok-1" and narrowed.calls == 1
            assert await b2.retire_stale() == 1
            assert await store.sweep_credentials(credential_family("api"), None) != []  # the new one stayed
            await b2.aclose()
            assert [c.secret.reveal() for c in narrowed.revoked] == ["tok-1"]  # the old token, revoked
            assert narrowed.revoked[0].expires_at == pytest.approx(clock() + 1000)

    @pytest.mark.parametrize(("before", "after"), [
        (lambda clock: define(Targeted(clock=clock)),
         lambda clock: define(Targeted(clock=clock, target="https://other.example/revoke"),
                              token_url="https://other.example/t")),
        (lambda clock: define(RevocableProvider(clock=clock)),
         lambda clock: define(RevocableProvider(clock=clock), scopes=("x",))),
    ], ids=["revocation-endpoint-moved", "provider-without-a-revocation-target"])
    async def test_swept_token_is_deleted_but_not_revoked(self, before, after) -> None:
        """After a restart that moved the revocation endpoint, the swept token is deleted but not sent
        there; a revocable kind that does not say where it revokes gets no swept token to revoke."""
        clock = Clock(time.time())
        async with MemoryStore() as store:
            current = after(clock)
            b2 = await restarted(store, clock, before(clock), current)
            assert await b2.retire_stale() == 1
            await b2.aclose()
            assert current.revoked == []

    async def test_unchanged_definition_is_shared_after_a_restart(self) -> None:
        """Same definition, new process: the stored token is reused, nothing swept, no provider call."""
        clock = Clock(time.time())
        async with MemoryStore() as store:
            again = define(FakeProvider(clock=clock))
            b2 = await restarted(store, clock, define(FakeProvider(clock=clock)), again)
            assert await b2.retire_stale() == 0
            assert (await b2.get("api", context())).secret.reveal() == "tok-1" and again.calls == 0
            await b2.aclose()

    async def test_removed_credential_is_swept(self) -> None:
        """A name no longer configured loses every stored entry when retired by name."""
        clock = Clock(time.time())
        async with MemoryStore() as store:
            b = broker([define(FakeProvider(clock=clock))], clock, store)
            await b.get("api", context())
            b.replace_providers({})
            assert await b.retire_stale(["api"]) == 1
            assert await store.sweep_credentials(credential_family("api"), None) == []
            await b.aclose()

    async def test_a_kind_mismatch_is_not_revoked(self) -> None:
        """A swept value of another kind is deleted but never sent to the current provider to revoke."""
        clock = Clock(time.time())
        async with MemoryStore() as store:
            p = define(Targeted(clock=clock))
            from secretless_proxy.credentials.base import IssuedCredential
            alien = IssuedCredential(name="api", kind="static", secret=Secret("x"), expires_at=clock() + 60)
            await store.put_credential("api/zz/yy", encode_credential(alien), expires_at=clock() + 60)
            b = broker([p], clock, store)
            assert await b.retire_stale() == 1
            await b.aclose()
            assert p.revoked == []
