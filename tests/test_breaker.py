"""Tests for issue 10 §3: the circuit breaker (breaker.py) and how the broker uses it.

The clock is the broker's fake wall clock; providers are test_broker's counting fakes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from helpers.providers import Clock, FakeProvider, context

from secretless_proxy.breaker import CLOSED, HALF_OPEN, OPEN, Backoff, Breaker, Breakers
from secretless_proxy.broker import Broker, BrokerEvents
from secretless_proxy.config.model import BrokerConfig
from secretless_proxy.config.parse import load_config
from secretless_proxy.credentials.base import ProviderError
from secretless_proxy.dev.certs import make_ca, write_ca
from secretless_proxy.errors import ConfigError
from secretless_proxy.refusal import Refusal, error_response

REPORTS = "spiffe://example.org/ns/prod/sa/reports"


class Events(BrokerEvents):
    def __init__(self) -> None:
        self.breaker_log: list[tuple[str, int]] = []
        self.backoffs = 0

    def breaker(self, *, credential: str, failing: int) -> None:
        self.breaker_log.append((credential, failing))

    def backoff(self, *, credential: str) -> None:
        self.backoffs += 1


def make(p: FakeProvider, clock: Clock, events: BrokerEvents | None = None, **cfg) -> Broker:
    config = BrokerConfig(**{"timeout": 1.0, "retries": 2, **cfg})
    return Broker({p.name: p}, config=config, now=clock, rng=lambda: 1.0, events=events)


async def failed_once(events: BrokerEvents | None = None) -> tuple[Clock, FakeProvider, Broker]:
    """A broker whose provider is down, after the first fill failed (every attempt): the breaker is open."""
    clock = Clock()
    p = FakeProvider(clock=clock)
    p.down = ProviderError("down")
    broker = make(p, clock, events)
    with pytest.raises(ProviderError):
        await broker.get("api", context())
    return clock, p, broker


class TestBreaker:
    def test_schedule_doubles_up_to_the_cap(self) -> None:
        """Open delays follow base * 2**(n-1), capped (rng 1: no jitter)."""
        clock = Clock()
        b = Breaker(base=0.5, cap=4.0, clock=clock, rng=lambda: 1.0)
        assert [b.failed() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]

    def test_jitter_stays_within_half_to_full(self) -> None:
        """Jitter picks a delay in [delay/2, delay]."""
        assert Breaker(base=2.0, clock=Clock(), rng=lambda: 0.0).failed() == 1.0

    def test_open_half_open_closed(self) -> None:
        """Open refuses with the time left; after it one probe is admitted, others wait; success closes."""
        clock = Clock()
        b = Breaker(base=1.0, clock=clock, rng=lambda: 1.0)
        assert b.admit() is None and b.state == CLOSED
        b.failed()
        assert b.state == OPEN and b.admit() == pytest.approx(1.0)
        clock.advance(0.4)
        assert b.admit() == pytest.approx(0.6)
        clock.advance(0.6)
        assert b.admit() is None and b.state == HALF_OPEN and b.is_probe
        assert b.admit() == 1.0  # the probe is out
        b.succeeded()
        assert b.state == CLOSED and b.failures == 0 and b.admit() is None

    def test_failed_probe_reopens_for_longer(self) -> None:
        """A failed probe opens the breaker for the next step of the schedule."""
        clock = Clock()
        b = Breaker(base=1.0, clock=clock, rng=lambda: 1.0)
        b.failed()
        clock.advance(1)
        assert b.admit() is None
        assert b.failed() == 2.0 and b.state == OPEN


class TestBreakers:
    def test_only_failing_keys_are_held(self) -> None:
        """A success removes the key's breaker: the table is as small as what fails now."""
        seen: list[tuple[str, int]] = []
        table = Breakers(base=1, cap=10, clock=Clock(), on_change=lambda n, k: seen.append((n, k)))
        table.failed(("api", "d", "a"))
        table.failed(("api", "d", "b"))
        assert len(table) == 2 and seen == [("api", 1), ("api", 2)]
        table.succeeded(("api", "d", "a"))
        assert len(table) == 1 and seen[-1] == ("api", 1)
        table.retain(lambda k: False)
        assert len(table) == 0 and seen[-1] == ("api", 0)


    def test_idle_breakers_are_pruned(self) -> None:
        """A breaker nobody asked about for a cap past its probe time is forgotten (no unbounded table)."""
        clock = Clock()
        seen: list[tuple[str, int]] = []
        table = Breakers(base=1, cap=10, clock=clock, on_change=lambda n, k: seen.append((n, k)))
        table.failed(("api", "d", "grant-1"))
        clock.advance(5)
        assert table.prune() == 0 and len(table) == 1
        clock.advance(10)
        assert table.prune() == 1 and len(table) == 0 and seen[-1] == ("api", 0)


class TestBrokerDamping:
    async def test_calls_bounded_by_schedule_not_request_rate(self) -> None:
        """500 requests while the provider is down cost the first fill's attempts, then one per probe."""
        clock = Clock()
        p = FakeProvider(clock=clock)
        p.down = ProviderError("token endpoint answered 500")
        events = Events()
        broker = make(p, clock, events)
        for _ in range(100):
            for _ in range(5):
                with pytest.raises(ProviderError):
                    await broker.get("api", context())
            clock.advance(0.1)  # 10 s in all
        # 3 attempts, then probes after 0.5, 1, 2, 4 s (cumulative 7.5 s) and at most one more.
        assert 3 + 4 <= p.calls <= 3 + 5, p.calls
        assert events.backoffs >= 500 - p.calls
        await broker.aclose()

    async def test_refusal_says_when_to_retry(self) -> None:
        """The failed fill and the refusals after it carry retry_after: the time until the next probe."""
        clock = Clock()
        p = FakeProvider(clock=clock)
        p.down = ProviderError("down")
        broker = make(p, clock)
        with pytest.raises(Backoff) as first:
            await broker.get("api", context())
        assert first.value.retry_after == pytest.approx(0.5)
        clock.advance(0.2)
        with pytest.raises(Backoff, match="circuit breaker") as second:
            await broker.get("api", context())
        assert second.value.retry_after == pytest.approx(0.3)
        await broker.aclose()

    async def test_probe_is_one_attempt_and_recovery_closes(self) -> None:
        """The half-open probe makes a single provider attempt; once the provider is back it closes the breaker."""
        events = Events()
        clock, p, broker = await failed_once(events)
        assert p.calls == 3
        clock.advance(0.5)
        with pytest.raises(ProviderError):
            await broker.get("api", context())
        assert p.calls == 4  # the probe: one attempt, no retries
        p.down = None
        clock.advance(1.0)
        assert (await broker.get("api", context())).secret.reveal() == "tok-5"
        assert events.breaker_log[-1] == ("api", 0)
        assert (await broker.get("api", context())).secret.reveal() == "tok-5"  # cached, closed
        await broker.aclose()

    async def test_others_do_not_queue_behind_the_probe(self) -> None:
        """While the probe is out, another request for the key is refused at once instead of waiting."""
        clock, p, broker = await failed_once()
        p.down, p.gate = None, asyncio.Event()
        clock.advance(0.5)
        probe = asyncio.ensure_future(broker.get("api", context()))
        await asyncio.sleep(0.01)
        with pytest.raises(Backoff, match="circuit breaker"):
            await broker.get("api", context())
        p.gate.set()
        assert (await probe).secret.reveal() == "tok-4"
        await broker.aclose()

    async def test_one_workloads_failure_does_not_refuse_another(self) -> None:
        """Breakers are per scope: a workload whose fill fails does not stop another workload's fill."""
        clock = Clock()
        p = FakeProvider(clock=clock, scope_by="workload")
        p.fail = [ProviderError("invalid_grant", retryable=False)]
        broker = make(p, clock)
        with pytest.raises(ProviderError, match="invalid_grant"):
            await broker.get("api", context())
        assert (await broker.get("api", context(REPORTS))).secret.reveal() == "tok-2"
        with pytest.raises(Backoff):
            await broker.get("api", context())  # the failing workload itself is damped
        await broker.aclose()

    async def test_cached_credential_is_served_while_open(self) -> None:
        """An open breaker gates provider calls only: a valid cached value is still served."""
        clock = Clock()
        p = FakeProvider(clock=clock)
        broker = make(p, clock, retries=0)
        await broker.get("api", context())
        p.down = ProviderError("down")
        clock.advance(800)  # refresh-ahead fails and opens the breaker
        assert (await broker.get("api", context())).secret.reveal() == "tok-1"
        await asyncio.sleep(0.01)
        assert (await broker.get("api", context())).secret.reveal() == "tok-1"
        await broker.aclose()

    async def test_reload_with_a_new_definition_starts_closed(self) -> None:
        """A fixed definition (new digest) is tried at once, not after the old one's backoff."""
        clock, p, broker = await failed_once()
        fixed = FakeProvider(clock=clock)
        fixed.digest = "fixed"
        broker.replace_providers({"api": fixed})
        assert (await broker.get("api", context())).secret.reveal() == "tok-1"
        await broker.aclose()


class TestWaitBudget:
    async def test_request_stops_waiting_after_the_budget(self) -> None:
        """A hanging provider: the request is refused after max_wait with retry_after; the fill goes on."""
        clock = Clock()
        p = FakeProvider(clock=clock)
        p.gate = asyncio.Event()
        broker = make(p, clock, max_wait=0.05, timeout=5.0)
        with pytest.raises(Backoff, match="wait budget") as info:
            await broker.get("api", context())
        assert info.value.retry_after == 1.0
        p.gate.set()
        await asyncio.sleep(0.01)
        assert (await broker.get("api", context())).secret.reveal() == "tok-1" and p.calls == 1
        await broker.aclose()

    async def test_per_request_credentials_are_bounded_too(self) -> None:
        """A credential minted per request (never cached) is also refused after the budget, and damped."""
        clock = Clock()
        p = FakeProvider(clock=clock, scope_by=None)
        p.gate = asyncio.Event()
        broker = make(p, clock, max_wait=0.05, timeout=5.0)
        with pytest.raises(Backoff, match="wait budget"):
            await broker.get("api", context())
        with pytest.raises(Backoff, match="circuit breaker"):
            await broker.get("api", context())
        assert p.calls == 1
        await broker.aclose()


class TestRetryAfterHeader:
    @pytest.mark.parametrize(("seconds", "header"), [(0.2, "1"), (1.0, "1"), (2.3, "3"), (30.0, "30")])
    def test_rounded_up_to_whole_seconds(self, seconds: float, header: str) -> None:
        """Retry-After is delay-seconds (RFC 9110 §10.2.3): a whole number, at least 1."""
        r = error_response("id", Refusal(503, "credential_unavailable", "no", "r", retry_after=seconds))
        assert r.headers["Retry-After"] == header

    def test_absent_without_a_delay(self) -> None:
        """A refusal without a known delay sends no Retry-After."""
        assert "Retry-After" not in error_response("id", Refusal(403, "no_rule", "no")).headers


class TestConfig:
    def test_max_wait_is_read_and_validated(self, tmp_path: Path) -> None:
        """broker.max_wait_seconds sets the budget; out of range is an error naming the key."""

        ok = _broker_config(tmp_path, "max_wait_seconds: 2.5")
        assert load_config(ok, resolve_secrets=False).broker.max_wait == 2.5
        with pytest.raises(ConfigError, match=r"broker\.max_wait_seconds: must be a number of seconds from 0\.1 to 300"):
            load_config(_broker_config(tmp_path, "max_wait_seconds: 0"), resolve_secrets=False)
        assert BrokerConfig().max_wait == 10.0


def _broker_config(tmp_path: Path, line: str) -> Path:
    write_ca(make_ca(), tmp_path / "ca")  # config loading reads the trust bundle: it must be a real one
    bundle = tmp_path / "ca" / "ca.pem"
    path = tmp_path / f"c{abs(hash(line))}.yaml"
    path.write_text(f"version: 1\nidentity: {{trust_bundle: {bundle}, trust_domains: [example.org]}}\n"
                    f"credentials: {{}}\nrules: []\nbroker:\n  {line}\n")
    return path

