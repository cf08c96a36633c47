"""A circuit breaker per credential definition: a failing provider is damped, not hammered (issue 10 §3).

Without one, every request that finds no cached credential starts a provider call (with its
retries): provider calls grow with the request rate exactly when the provider is down. With it:

- **closed**: fills go to the provider as usual.
- **open**: a fill failed; for ``delay`` seconds no request calls the provider, each is refused at
  once with ``Backoff`` saying when to retry (the addon's ``Retry-After``). ``delay`` follows the
  backoff schedule: ``base * 2**(failures-1)``, capped, jittered to [delay/2, delay] so replicas
  and credentials do not probe in lockstep.
- **half-open**: the delay is over; the next request is the *probe*, one single provider attempt.
  Others are refused while it runs. Success closes the breaker (recovery is picked up at the
  first probe after it); failure opens it again for the next step of the schedule.

So provider calls during an outage are bounded by the schedule (one attempt per step, plus the
first fill's retries), whatever the request rate. A cached credential is served whatever the
state: the breaker only gates provider calls.

Time is the broker's clock (the one its expiries use); one event loop, no locking.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from secretless_proxy.credentials.base import ProviderError

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATES = (CLOSED, OPEN, HALF_OPEN)


class Backoff(ProviderError):
    """No credential now; ``retry_after`` seconds is when trying again may help (the 503's Retry-After)."""

    def __init__(self, detail: str, *, retry_after: float) -> None:
        super().__init__(detail, retryable=False)
        self.retry_after = retry_after


class Breaker:
    """The state of one credential's provider; see the module docstring."""

    __slots__ = ("_cap", "_base", "_clock", "_on_change", "_rng", "failures", "probing", "reopen_at", "state")

    def __init__(self, *, base: float = 0.5, cap: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random,
                 on_change: Callable[[str], None] | None = None) -> None:
        self._base, self._cap, self._clock, self._rng, self._on_change = base, cap, clock, rng, on_change
        self.state = CLOSED
        self.failures = 0  # consecutive failed fills
        self.reopen_at = 0.0  # while open: when the next probe may start
        self.probing = False  # half-open: the probe is running

    def __repr__(self) -> str:
        return f"Breaker(state={self.state!r}, failures={self.failures})"

    def admit(self) -> float | None:
        """None: call the provider (the caller becomes the probe when half-open); else seconds to wait."""
        if self.state == CLOSED:
            return None
        now = self._clock()
        if self.state == OPEN:
            if now < self.reopen_at:
                return self.reopen_at - now
            self._set(HALF_OPEN)
        if self.probing:
            return 1.0  # a probe is out: its answer is a moment away
        self.probing = True
        return None

    @property
    def is_probe(self) -> bool:
        """Whether the fill admitted last is the half-open probe (one attempt, no retries)."""
        return self.state == HALF_OPEN

    def succeeded(self) -> None:
        self.failures, self.probing = 0, False
        if self.state != CLOSED:
            self._set(CLOSED)

    def failed(self) -> float:
        """A fill failed: open for the next step of the schedule; returns the delay chosen."""
        self.failures += 1
        self.probing = False
        delay = min(self._cap, self._base * 2 ** (self.failures - 1))
        delay *= 0.5 + 0.5 * self._rng()
        self.reopen_at = self._clock() + delay
        if self.state != OPEN:
            self._set(OPEN)
        return delay

    def retry_after(self) -> float | None:
        """While open: seconds until the next probe may start; None when closed."""
        if self.state == CLOSED:
            return None
        return max(0.0, self.reopen_at - self._clock()) if self.state == OPEN else 1.0

    def _set(self, state: str) -> None:
        self.state = state
        if self._on_change is not None:
            self._on_change(state)


class Breakers:
    """The breakers of one broker, by cache key (``key[0]`` is the credential name).

    Only failing keys hold a breaker: a success removes it (a fresh breaker is closed), so the
    table stays as small as what is failing now, whatever the number of scopes and grants seen.
    One workload's failing scope never refuses another workload's: each scope has its own.
    ``on_change(name, failing)`` reports, after each transition, how many of ``name``'s keys are
    open or half-open (the metric).
    """

    def __init__(self, *, base: float, cap: float, rng: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, int], None] | None = None) -> None:
        self._base, self._cap, self._rng, self._clock = base, cap, rng, clock
        self._on_change = on_change
        self._table: dict[tuple[str, ...], Breaker] = {}

    def __len__(self) -> int:
        return len(self._table)

    def admit(self, key: tuple[str, ...]) -> float | None:
        b = self._table.get(key)
        return None if b is None else b.admit()

    def state(self, key: tuple[str, ...]) -> str:
        b = self._table.get(key)
        return CLOSED if b is None else b.state

    def is_probe(self, key: tuple[str, ...]) -> bool:
        b = self._table.get(key)
        return b is not None and b.is_probe

    def retry_after(self, key: tuple[str, ...]) -> float | None:
        b = self._table.get(key)
        return None if b is None else b.retry_after()

    def failed(self, key: tuple[str, ...]) -> float:
        b = self._table.get(key)
        if b is None:
            b = self._table[key] = Breaker(base=self._base, cap=self._cap, clock=self._clock, rng=self._rng,
                                           on_change=lambda _state, name=key[0]: self._changed(name))
        return b.failed()

    def succeeded(self, key: tuple[str, ...]) -> None:
        b = self._table.pop(key, None)
        if b is not None:
            b.succeeded()

    def cancelled(self, key: tuple[str, ...]) -> None:
        """The fill was cancelled (shutdown, eviction): no outcome, but the probe slot is free again."""
        b = self._table.get(key)
        if b is not None:
            b.probing = False

    def retain(self, keep: Callable[[tuple[str, ...]], bool]) -> None:
        """Forget the breakers of keys ``keep`` rejects (a reload replaced their definition)."""
        gone = [k for k in self._table if not keep(k)]
        for key in gone:
            del self._table[key]
        for name in {k[0] for k in gone}:
            self._changed(name)

    def prune(self) -> int:
        """Forget breakers nobody has asked about for a whole cap past their probe time (a scope of an
        ended grant, a workload gone): a later failure starts the schedule again. Returns how many."""
        now = self._clock()
        idle = [k for k, b in self._table.items() if not b.probing and now > b.reopen_at + self._cap]
        for key in idle:
            del self._table[key]
        for name in {k[0] for k in idle}:
            self._changed(name)
        return len(idle)

    def failing(self, name: str) -> int:
        return sum(1 for k, b in self._table.items() if k[0] == name and b.state != CLOSED)

    def _changed(self, name: str) -> None:
        if self._on_change is not None:
            self._on_change(name, self.failing(name))
