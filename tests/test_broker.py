"""Tests for secretless_proxy.broker: cache, single flight, refresh-ahead, failures, expiry, revocation.

The providers here are small test implementations of the provider protocol that count calls and
whose delay, failures and lifetimes the tests control; time is a controllable clock where the
behaviour depends on it, and concurrency is real asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest
from helpers.providers import BILLING, LIFETIME, Clock, FakeProvider, Recorder, RevocableProvider, context

from secretless_proxy.broker import Broker, BrokerEvents, CachedInfo
from secretless_proxy.config.model import BrokerConfig
from secretless_proxy.credentials.base import (
    IssuedCredential,
    Provider,
    ProviderError,
    RequestContext,
)
from secretless_proxy.errors import CredentialError
from secretless_proxy.reasons import Reason
from secretless_proxy.secretrefs import Secret

REPORTS = "spiffe://example.org/ns/prod/sa/reports"
LEAK = "sk_live_LEAKEDtoken0123456789"


class Exploding(BrokerEvents):
    """An event sink whose every method raises."""

    def fetched(self, **kw) -> None:
        raise RuntimeError(LEAK)

    def cache(self, **kw) -> None:
        raise RuntimeError(LEAK)

    def issued(self, cred: IssuedCredential) -> None:
        raise RuntimeError(LEAK)

    def revoked(self, cred: IssuedCredential, **kw) -> None:
        raise RuntimeError(LEAK)


async def until(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    """Let background tasks run until ``cond()`` holds."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.001)


async def fetch_in_flight(make: Callable[..., Broker]) -> tuple[Broker, FakeProvider, asyncio.Task]:
    """A broker whose provider holds its first fetch until ``gate`` is set, and the get waiting on it."""
    p = FakeProvider(clock=time.time)
    p.gate = asyncio.Event()
    broker = make(p)
    waiter = asyncio.create_task(broker.get("api", context()))
    await until(lambda: p.calls == 1)
    return broker, p, waiter


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make():
    """Build brokers (zero retry backoff unless ``rng`` is given); every one is closed at teardown."""
    made: list[Broker] = []

    def build(*providers: Provider, now: Callable[[], float] = time.time, events: BrokerEvents | None = None,
              rng: Callable[[], float] = lambda: 0.0, **cfg) -> Broker:
        config = BrokerConfig(**{"skew": 30.0, "refresh_at": 0.75, "timeout": 1.0, "retries": 2, **cfg})
        broker = Broker({p.name: p for p in providers}, config=config, events=events, now=now, rng=rng)
        made.append(broker)
        return broker

    yield build
    for broker in made:
        await broker.aclose()


class TestSteadyState:
    async def test_zero_provider_calls_after_warm_up(self, make, clock) -> None:
        """After the first fetch, gets within the refresh window never call the provider."""
        p = FakeProvider(clock=clock)
        broker = make(p, now=clock)
        first = await broker.get("api", context())
        for _ in range(200):
            clock.advance(3)  # up to +600, before refresh_at
            assert await broker.get("api", context()) is first
        assert p.calls == 1

    async def test_never_expiring_credential_is_cached_and_never_refreshed(self, make, clock) -> None:
        """A credential without expiry (static key) is fetched once and served indefinitely."""
        p = FakeProvider(clock=clock, lifetime=None)
        broker = make(p, now=clock)
        await broker.get("api", context())
        clock.advance(10**9)
        assert (await broker.get("api", context())).secret.reveal() == "tok-1"
        assert p.calls == 1

    async def test_unknown_credential_is_refused(self, make) -> None:
        """A name without a provider raises credential_unavailable naming the credential."""
        broker = make()
        with pytest.raises(CredentialError, match="unknown credential 'nope'") as info:
            await broker.get("nope", context())
        assert info.value.reason == Reason.CREDENTIAL_UNAVAILABLE


class TestRefreshAhead:
    async def test_refresh_starts_before_expiry_and_replaces_the_entry(self, make, clock) -> None:
        """Past refresh_at a hit returns the cached value and one background fetch replaces it."""
        p = FakeProvider(clock=clock)
        broker = make(p, now=clock)
        await broker.get("api", context())
        clock.advance(740)
        assert (await broker.get("api", context())).secret.reveal() == "tok-1"
        assert p.calls == 1
        clock.advance(20)  # +760: past 0.75 of the lifetime, well before expiry
        assert (await broker.get("api", context())).secret.reveal() == "tok-1"
        await until(lambda: p.calls == 2 and broker.snapshot()[0].issued_at == clock())
        assert (await broker.get("api", context())).secret.reveal() == "tok-2"

    async def test_gets_during_a_slow_refresh_return_immediately(self, make, clock) -> None:
        """While a 0.5 s refresh runs, gets take far less than 0.5 s and start no second refresh."""
        p = FakeProvider(clock=clock)
        broker = make(p, now=clock)
        await broker.get("api", context())
        p.delay = 0.5
        clock.advance(800)
        began = time.perf_counter()
        results = [await broker.get("api", context()) for _ in range(20)]
        results += await asyncio.gather(*(broker.get("api", context()) for _ in range(30)))
        assert time.perf_counter() - began < 0.05
        assert {c.secret.reveal() for c in results} == {"tok-1"}
        assert p.calls == 2

    async def test_jitter_delays_the_refresh_by_up_to_five_percent(self, make, clock) -> None:
        """With rng at its maximum the refresh starts at 0.80 of the lifetime, not 0.75."""
        p = FakeProvider(clock=clock)
        broker = make(p, now=clock, rng=lambda: 1.0)
        await broker.get("api", context())
        clock.advance(790)
        await broker.get("api", context())
        assert p.calls == 1
        clock.advance(20)
        await broker.get("api", context())
        await until(lambda: p.calls == 2)

    async def test_short_lifetime_refreshes_within_the_servable_window(self, make, clock) -> None:
        """A lifetime barely above the skew still gets refreshed before it stops being served."""
        p = FakeProvider(clock=clock, lifetime=60.0)  # servable for 30 s; 0.75 * 60 = 45 is too late
        broker = make(p, now=clock)
        await broker.get("api", context())
        clock.advance(25)
        await broker.get("api", context())
        await until(lambda: p.calls == 2)

    async def test_failed_refresh_keeps_serving_and_retries_after_backoff(self, make, clock) -> None:
        """A failed refresh leaves the old value in place; the next attempt waits for the backoff."""
        p = FakeProvider(clock=clock)
        broker = make(p, now=clock, retries=0)
        await broker.get("api", context())
        p.down = ProviderError("token endpoint answered 500")
        clock.advance(800)
        assert (await broker.get("api", context())).secret.reveal() == "tok-1"
        await until(lambda: p.calls == 2)
        await asyncio.sleep(0.01)
        assert (await broker.get("api", context())).secret.reveal() == "tok-1"
        assert p.calls == 2  # still inside the backoff (0.5 s of the fake clock with rng 0)
        p.down = None
        clock.advance(1)
        await broker.get("api", context())
        await until(lambda: p.calls == 3)
        await until(lambda: broker.snapshot()[0].issued_at == clock())


class TestSingleFlight:
    async def test_fifty_concurrent_first_gets_make_one_fetch(self, make) -> None:
        """50 concurrent gets for a cold key share one provider call and one result."""
        p = FakeProvider(clock=time.time, delay=0.05)
        broker = make(p)
        results = await asyncio.gather(*(broker.get("api", context()) for _ in range(50)))
        assert p.calls == 1
        assert len({id(c) for c in results}) == 1

    async def test_fifty_concurrent_gets_share_one_failure(self, make) -> None:
        """When the shared fetch fails, every waiter gets the error and the provider was called once."""
        p = FakeProvider(clock=time.time, delay=0.05)
        p.down = ProviderError("the client secret was rejected", retryable=False)
        broker = make(p)
        results = await asyncio.gather(*(broker.get("api", context()) for _ in range(50)),
                                       return_exceptions=True)
        assert p.calls == 1
        assert all(isinstance(r, ProviderError) for r in results)
        assert all("client secret was rejected" in str(r) for r in results)

    async def test_cancelled_waiter_does_not_cancel_the_shared_fetch(self, make) -> None:
        """Cancelling one waiter leaves the fetch running for the others."""
        p = FakeProvider(clock=time.time)
        p.gate = asyncio.Event()
        broker = make(p)
        first = asyncio.create_task(broker.get("api", context()))
        second = asyncio.create_task(broker.get("api", context()))
        await until(lambda: p.calls == 1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        p.gate.set()
        assert (await second).secret.reveal() == "tok-1"
        assert p.calls == 1

    async def test_failures_are_not_cached(self, make, clock) -> None:
        """After a failed fetch the provider is asked again once the breaker's delay is over (issue 10 §3)."""
        p = FakeProvider(clock=clock)
        p.fail = [ProviderError("down", retryable=False)]
        broker = make(p, now=clock)
        with pytest.raises(ProviderError, match="down"):
            await broker.get("api", context())
        with pytest.raises(ProviderError, match="circuit breaker"):
            await broker.get("api", context())  # within the delay: refused without a call
        assert p.calls == 1
        clock.advance(1)
        assert (await broker.get("api", context())).secret.reveal() == "tok-2"


class TestProviderFailures:
    async def test_cached_credential_serves_until_expiry_minus_skew_then_refuses(self, make, clock) -> None:
        """With the provider down the cached value is served until expires_at - skew, never after."""
        p = FakeProvider(clock=clock)
        broker = make(p, now=clock, retries=0)
        await broker.get("api", context())
        p.down = ProviderError("token endpoint unreachable")
        issued = clock()
        clock.t = issued + 969.999
        assert (await broker.get("api", context())).secret.reveal() == "tok-1"
        clock.t = issued + LIFETIME - 30  # exactly expires_at - skew
        with pytest.raises(ProviderError, match="credential 'api' is unavailable after 1 attempt.*unreachable") as info:
            await broker.get("api", context())
        assert info.value.reason == Reason.CREDENTIAL_UNAVAILABLE == "credential_unavailable"

    async def test_hanging_provider_fails_within_timeout_times_attempts(self, make) -> None:
        """A provider that never answers fails after ~timeout x attempts, each attempt a timeout."""
        p = FakeProvider(clock=time.time, delay=30)
        events = Recorder()
        broker = make(p, events=events, timeout=0.05, retries=2)
        began = time.perf_counter()
        with pytest.raises(ProviderError, match=r"after 3 attempt\(s\): .*did not answer within 0.05 s"):
            await broker.get("api", context())
        assert 0.15 <= time.perf_counter() - began < 0.5
        assert p.calls == 3
        assert events.of("fetched") == [("fetched", "api", "timeout")] * 3

    @pytest.mark.parametrize(("result", "match"), [
        ("not a credential", "returned a str instead of a credential"),
        (IssuedCredential(name="api", kind="fake", secret=Secret(""), expires_at=None), "empty secret"),
        (IssuedCredential(name="api", kind="fake", secret=Secret("tok"), expires_at=1.0), "expires within"),
        (IssuedCredential(name="api", kind="fake", secret=Secret("tok"), expires_at=time.time() + 10),
         "expires within the 30 s skew"),
    ], ids=["wrong-type", "empty-secret", "already-expired", "shorter-than-skew"])
    async def test_malformed_result_is_a_failure_not_retried(self, make, result, match) -> None:
        """A result that is not a usable credential fails the get instead of being served."""
        p = FakeProvider(clock=time.time)
        p.result = result
        broker = make(p)
        with pytest.raises(ProviderError, match=match):
            await broker.get("api", context())
        assert p.calls == 1
        assert broker.snapshot() == []

    async def test_none_result_is_a_failure(self, make) -> None:
        """A provider that returns None fails the get."""
        p = FakeProvider(clock=time.time)

        async def none(ctx: RequestContext) -> None:
            p.calls += 1

        p.fetch = none  # type: ignore[method-assign]
        broker = make(p)
        with pytest.raises(ProviderError, match="returned a NoneType instead of a credential"):
            await broker.get("api", context())

    @pytest.mark.parametrize(("error", "retries", "match", "calls"), [
        (ProviderError("invalid_client", retryable=False), 5, r"after 1 attempt\(s\): invalid_client", 1),
        (ProviderError("503 from the token endpoint"), 3, r"after 4 attempt\(s\): 503", 4),
    ], ids=["non-retryable-is-not-retried", "retryable-is-retried-until-attempts-run-out"])
    async def test_attempts_of_a_failing_provider(self, make, error, retries, match, calls) -> None:
        """ProviderError(retryable=False) ends the get after one attempt; a retryable error is tried
        1 + retries times."""
        p = FakeProvider(clock=time.time)
        p.down = error
        broker = make(p, retries=retries)
        with pytest.raises(ProviderError, match=match):
            await broker.get("api", context())
        assert p.calls == calls

    async def test_retry_succeeds_after_transient_failures(self, make) -> None:
        """Two transient failures followed by a success return the credential."""
        p = FakeProvider(clock=time.time)
        p.fail = [ProviderError("blip"), OSError("connection reset")]
        broker = make(p, retries=2)
        assert (await broker.get("api", context())).secret.reveal() == "tok-3"

    async def test_retry_backoff_is_capped(self, make) -> None:
        """Backoff grows exponentially but each sleep is capped, keeping the total bounded."""
        p = FakeProvider(clock=time.time)
        p.down = ProviderError("down")
        broker = make(p, retries=4, rng=lambda: 1.0)
        broker.retry_base, broker.retry_cap = 0.01, 0.02  # sleeps 0.01, 0.02, 0.02, 0.02
        began = time.perf_counter()
        with pytest.raises(ProviderError, match="after 5 attempt"):
            await broker.get("api", context())
        assert 0.07 <= time.perf_counter() - began < 0.3

    async def test_unexpected_exception_text_never_leaks(self, make, caplog) -> None:
        """A provider exception's message (maybe a secret) is in neither the error nor the log."""
        caplog.set_level(logging.DEBUG)
        p = FakeProvider(clock=time.time)
        p.down = ValueError(f"bad response: access_token={LEAK}")
        broker = make(p, retries=1)
        with pytest.raises(ProviderError, match=r"failed unexpectedly \(ValueError\)") as info:
            await broker.get("api", context())
        err = info.value
        assert LEAK not in str(err) and LEAK not in repr(err)
        assert err.__cause__ is None and err.__context__ is None
        assert LEAK not in caplog.text
        assert "ValueError" in caplog.text
        assert p.calls == 2  # an unknown exception counts as a retryable failure

    async def test_scope_exception_is_a_provider_error(self, make, caplog) -> None:
        """A provider whose scope() raises fails closed without leaking the message."""
        p = FakeProvider(clock=time.time)

        def bad_scope(ctx: RequestContext) -> str:
            raise KeyError(LEAK)

        p.scope = bad_scope  # type: ignore[method-assign]
        broker = make(p)
        with pytest.raises(ProviderError, match=r"failed unexpectedly \(KeyError\)"):
            await broker.get("api", context())
        assert LEAK not in caplog.text and p.calls == 0


class TestScopes:
    async def test_each_workload_gets_its_own_credential(self, make) -> None:
        """Per-workload scope: two workloads cause two fetches, a repeat of one causes none."""
        p = FakeProvider(clock=time.time, scope_by="workload")
        broker = make(p)
        a1 = await broker.get("api", context(BILLING))
        b = await broker.get("api", context(REPORTS))
        a2 = await broker.get("api", context(BILLING))
        assert p.calls == 2
        assert a1 is a2 and a1 is not b
        assert [i.scope for i in broker.snapshot()] == [BILLING, REPORTS]

    async def test_scope_none_fetches_every_time(self, make) -> None:
        """A per-request credential is fetched on every get and never cached."""
        p = FakeProvider(clock=time.time, scope_by=None)
        broker = make(p)
        tokens = [(await broker.get("api", context())).secret.reveal() for _ in range(3)]
        assert tokens == ["tok-1", "tok-2", "tok-3"]
        assert broker.snapshot() == []

    async def test_scope_none_still_has_timeout_and_retries(self, make) -> None:
        """A per-request fetch is retried after a transient failure and bounded by the timeout."""
        p = FakeProvider(clock=time.time, scope_by=None)
        p.fail = [ProviderError("blip")]
        broker = make(p, timeout=0.05)
        assert (await broker.get("api", context())).secret.reveal() == "tok-2"
        p.delay = 30
        with pytest.raises(ProviderError, match="did not answer within 0.05 s"):
            await broker.get("api", context())


class TestExpirySweep:
    async def test_sweep_drops_expired_entries_with_reason_expired(self, make, clock) -> None:
        """sweep() removes entries no longer servable and reports them as revoked: expired."""
        events = Recorder()
        short, long = FakeProvider("short", clock=clock, lifetime=100), FakeProvider("long", clock=clock)
        broker = make(short, long, now=clock, events=events)
        await broker.get("short", context())
        await broker.get("long", context())
        clock.advance(70)  # short: expires_at - skew reached
        assert broker.sweep() == 1
        assert [i.name for i in broker.snapshot()] == ["long"]
        assert events.of("revoked") == [("revoked", "tok-1", "expired")]

    async def test_background_sweeper_drops_expired_entries(self, make, clock) -> None:
        """The sweeper started by the first get drops expired entries on its own."""
        events = Recorder()
        p = FakeProvider(clock=clock, lifetime=100)
        broker = make(p, now=clock, events=events)
        broker.sweep_interval = 0.01
        await broker.get("api", context())
        clock.advance(100)
        await until(lambda: broker.snapshot() == [])
        assert events.of("revoked") == [("revoked", "tok-1", "expired")]

    async def test_expired_entry_is_dropped_on_access_and_refetched(self, make, clock) -> None:
        """A get that finds an expired entry reports it expired and fetches a fresh credential."""
        events = Recorder()
        p = FakeProvider(clock=clock, lifetime=100)
        broker = make(p, now=clock, events=events, refresh_at=0.95)
        await broker.get("api", context())
        clock.advance(71)
        assert (await broker.get("api", context())).secret.reveal() == "tok-2"
        assert events.of("revoked") == [("revoked", "tok-1", "expired")]
        assert [i.issued_at for i in broker.snapshot()] == [clock()]


class TestEvict:
    async def test_evict_revokes_revocable_credentials_at_the_provider(self, make) -> None:
        """evict() drops the entry, revokes it in the background and emits revoked(reason)."""
        events = Recorder()
        p = RevocableProvider(clock=time.time)
        broker = make(p, events=events)
        cred = await broker.get("api", context())
        assert await broker.evict(["api"], reason="grant_revoked") == 1
        assert broker.snapshot() == []
        await until(lambda: p.revoked == [cred])
        assert events.of("revoked") == [("revoked", "tok-1", "grant_revoked")]
        assert (await broker.get("api", context())).secret.reveal() == "tok-2"

    async def test_evict_all_skips_revocation_for_non_revocable_providers(self, make) -> None:
        """evict(None) drops everything; a provider without revoke is not asked to revoke."""
        events = Recorder()
        plain, rev = FakeProvider("plain", clock=time.time), RevocableProvider("rev", clock=time.time)
        broker = make(plain, rev, events=events)
        await broker.get("plain", context())
        await broker.get("rev", context())
        assert await broker.evict(reason="manual") == 2
        await until(lambda: len(rev.revoked) == 1)
        assert sorted(e[2] for e in events.of("revoked")) == ["manual", "manual"]

    async def test_a_fetch_landing_after_stop_issuing_is_revoked_and_never_handed_out(self, make) -> None:
        """Shutdown revocation (hostile review 4.13): a fetch under way when the broker stops issuing
        brings a fresh token; it is revoked at the provider, the waiting request is refused, and
        fetches_settled() then revocations_settled() wait for both, so the process never exits with a
        live token it issued. After stop_issuing, get() refuses without calling the provider."""
        p = RevocableProvider(clock=time.time)
        broker = make(p)
        p.gate = asyncio.Event()
        waiting = asyncio.create_task(broker.get("api", context()))
        await until(lambda: p.calls == 1)  # the fetch is under way
        broker.stop_issuing()
        assert await broker.evict(reason="shutdown") == 0
        p.gate.set()
        await broker.fetches_settled()
        await broker.revocations_settled()
        assert [c.secret.reveal() for c in p.revoked] == ["tok-1"]
        with pytest.raises(ProviderError, match="stopped issuing"):
            await waiting
        with pytest.raises(CredentialError, match="shut down"):
            await broker.get("api", context())
        assert p.calls == 1

    async def test_revoke_failure_is_logged_by_type_and_not_raised(self, make, caplog) -> None:
        """A provider failing to revoke is logged by exception type only; evict() still succeeds."""
        p = RevocableProvider(clock=time.time, revoke_error=RuntimeError(LEAK))
        broker = make(p)
        await broker.get("api", context())
        assert await broker.evict(["api"], reason="manual") == 1
        await until(lambda: "revoking at the fake_revocable provider failed (RuntimeError)" in caplog.text)
        assert LEAK not in caplog.text

    async def test_unknown_reason_is_rejected(self, make) -> None:
        """evict() only accepts the documented reasons (they become metric labels)."""
        broker = make()
        with pytest.raises(ValueError, match="unknown revocation reason 'oops'"):
            await broker.evict(reason="oops")

    async def test_fetch_in_flight_during_evict_is_not_cached(self, make) -> None:
        """A fetch started before evict() answers its waiter but does not repopulate the cache."""
        broker, p, waiter = await fetch_in_flight(make)
        await broker.evict(["api"], reason="config_changed")
        p.gate.set()
        assert (await waiter).secret.reveal() == "tok-1"
        assert broker.snapshot() == []

    async def test_replace_providers_drops_removed_names_and_uses_new_providers(self, make) -> None:
        """Removed credentials are dropped as config_changed; a replaced name uses the new provider."""
        events = Recorder()
        old_a, gone = FakeProvider("a", clock=time.time), RevocableProvider("gone", clock=time.time)
        broker = make(old_a, gone, events=events)
        await broker.get("a", context())
        gone_cred = await broker.get("gone", context())
        await broker.evict(["a"], reason="config_changed")
        new_a = FakeProvider("a", clock=time.time)
        broker.replace_providers({"a": new_a})
        await until(lambda: gone.revoked == [gone_cred])
        assert sorted(e[2] for e in events.of("revoked")) == ["config_changed", "config_changed"]
        await broker.get("a", context())
        assert (old_a.calls, new_a.calls) == (1, 1)
        with pytest.raises(CredentialError, match="unknown credential 'gone'"):
            await broker.get("gone", context())


class TestSnapshot:
    async def test_snapshot_describes_entries_without_values(self, make, clock) -> None:
        """snapshot() lists name, kind, scope and times; no secret in it or the broker's repr."""
        p = FakeProvider(clock=clock, scope_by="workload")
        broker = make(p, now=clock)
        await broker.get("api", context())
        clock.advance(5)
        await broker.get("api", context())
        assert broker.snapshot() == [CachedInfo(name="api", kind="fake", scope=BILLING,
                                                expires_at=clock() - 5 + LIFETIME, issued_at=clock() - 5,
                                                last_used=clock())]
        assert "tok-1" not in repr(broker.snapshot()) + repr(broker)


class TestEvents:
    async def test_cache_fetch_and_issue_events(self, make, clock) -> None:
        """miss, hit and refresh are reported, with fetched(success) and issued for each new credential."""
        events = Recorder()
        p = FakeProvider(clock=clock)
        broker = make(p, now=clock, events=events)
        await broker.get("api", context())
        await broker.get("api", context())
        clock.advance(800)
        await broker.get("api", context())
        await until(lambda: len(events.of("issued")) == 2)
        assert events.log == [
            ("cache", "api", "miss"), ("fetched", "api", "success"), ("issued", "api", "tok-1"),
            ("cache", "api", "hit"), ("cache", "api", "refresh"),
            ("fetched", "api", "success"), ("issued", "api", "tok-2"),
        ]

    async def test_exploding_event_sink_does_not_break_get(self, make, clock, caplog) -> None:
        """An exception in any events method is logged by type and the get still succeeds."""
        p = RevocableProvider(clock=clock)
        broker = make(p, now=clock, events=Exploding())
        assert (await broker.get("api", context())).secret.reveal() == "tok-1"
        assert (await broker.get("api", context())).secret.reveal() == "tok-1"
        assert await broker.evict(reason="manual") == 1
        assert "event sink Exploding.issued raised RuntimeError" in caplog.text
        assert "Exploding.revoked raised RuntimeError" in caplog.text
        assert LEAK not in caplog.text


class TestClose:
    async def test_aclose_leaves_no_pending_tasks(self, make, clock) -> None:
        """aclose() cancels and awaits the sweeper, a refresh, a fetch and a revocation."""
        slow = FakeProvider("slow", clock=clock)
        rev = RevocableProvider("rev", clock=clock, scope_by="workload", revoke_delay=30)
        broker = make(slow, rev, now=clock, timeout=0.1, retries=5)
        await broker.get("slow", context())
        await broker.get("rev", context(BILLING))
        slow.delay = 30
        clock.advance(800)
        await broker.get("slow", context())  # starts a 30 s background refresh
        rev.gate = asyncio.Event()
        waiter = asyncio.create_task(broker.get("rev", context(REPORTS)))  # a miss: fetch in flight
        await until(lambda: rev.calls == 2 and slow.calls == 2)
        await broker.evict(["rev"], reason="manual")  # a revocation that outlasts the grace period
        await broker.aclose()
        with pytest.raises(ProviderError, match="shut down"):
            await waiter
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    async def test_waiters_of_a_fetch_cancelled_by_aclose_get_a_provider_error(self, make) -> None:
        """A get waiting on a fetch when the broker closes is refused, not silently cancelled."""
        broker, _, waiter = await fetch_in_flight(make)
        await broker.aclose()
        with pytest.raises(ProviderError, match="broker shut down during the fetch"):
            await waiter

    async def test_get_after_aclose_is_refused(self, make) -> None:
        """A closed broker issues nothing."""
        broker = make(FakeProvider(clock=time.time))
        await broker.aclose()
        with pytest.raises(CredentialError, match="broker is shut down"):
            await broker.get("api", context())

    async def test_aclose_lets_pending_revocations_finish(self, make) -> None:
        """Revocations started by evict() complete during aclose() (bounded by the timeout)."""
        p = RevocableProvider(clock=time.time, revoke_delay=0.05)
        broker = make(p)
        cred = await broker.get("api", context())
        await broker.evict(reason="manual")
        await broker.aclose()
        assert p.revoked == [cred]
