"""The store protocol: what replicas share (credential cache, locks, grants, revocations, events).

Two implementations: ``memory.MemoryStore`` (the embedded default: one process, no
dependencies) and ``redis.RedisStore`` (shared by replicas). Both keep these semantics:

- **Credentials** are opaque records: bytes under a string key, kept until ``expires_at`` and
  never after; Redis stores them sealed (``sealing.py``). The store knows no credential kind:
  the broker names the keys (``<family>/<definition>/<scope>``) and encodes the values
  (``sharedcache.py``). ``sweep_credentials(prefix, keep)`` deletes the entries under ``prefix``
  but not ``keep`` (and hands their values back for revocation); ``key_digest`` is the store's
  keyed hash for the parts of a key name (a Redis key never shows what it was made of).
- **Locks** (``acquire_lock``/``release_lock``) give distributed single flight: the token holder
  fetches, the others wait for the value; a lock expires by itself after ``ttl`` so a crashed
  holder never blocks the rest. ``sharedcache.shared_fetch`` puts the pieces together.
- **Grants** (``grants.Grant``): ``find_grant`` returns an active grant only. Revocation is
  permanent: a tombstone outlives the grant, ``put_grant`` refuses a revoked id (returns False)
  and every store also keeps the revoked ids it has seen in process (``revoked_grant_ids``), so
  a store that lost its tombstones (a restored snapshot, a failover) cannot revive one.
- **Events** (``publish``/``subscribe``) tell every replica to drop what it holds in process:
  ``credential_evicted{key}``, ``grant_revoked{id}``, ``grant_created{id}``, and ``resync{}``
  after a store reconnects (events may have been missed: drop the in-process cache); ``event_epoch``
  says whether events are arriving now and changes with every reconnect (``grantcache.py``). Mutations
  publish their own events; every subscriber receives every event, its own included
  (``origin`` names the publishing store). Callbacks may be sync or async and must be idempotent.
- **Errors**: every failure to reach the shared store is ``StoreError`` (reason
  ``store_unavailable``), raised at one boundary with our own sentence; ``healthy`` says
  whether the last contact worked.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from secretless_proxy.errors import SecretlessError
from secretless_proxy.grants import Grant
from secretless_proxy.reasons import Reason

log = logging.getLogger(__name__)

# Event types and the one field each carries (``resync`` carries none).
EVENTS: Mapping[str, str | None] = {
    "credential_evicted": "key", "grant_revoked": "id", "grant_created": "id", "resync": None,
}
MAX_EVENT_BYTES = 4096

Event = dict[str, str]
Callback = Callable[[Event], Awaitable[None] | None]


class StoreError(SecretlessError):
    """The shared store could not be used for ``op``. Never carries the store client's own error text."""

    def __init__(self, op: str, detail: str | None = None) -> None:
        self.reason = Reason.STORE_UNAVAILABLE
        self.op = op
        super().__init__(detail or f"the shared store is unavailable ({op}); requests that need it are "
                                   "refused until it answers again")


@runtime_checkable
class Store(Protocol):
    """What replicas share. Every method may raise ``StoreError`` except where said otherwise."""

    @property
    def healthy(self) -> bool:
        """Whether the last contact with the store worked (always True in memory)."""
        ...

    @property
    def event_epoch(self) -> int | None:
        """None while the event subscription is down; else a number that changes with every
        (re)subscription, so a holder of in-process state can tell that events may have been missed
        in between (always 0 in memory). No I/O; never raises."""
        ...

    async def start(self) -> None:
        """Connect and start listening for events. Never raises: an unreachable store is retried."""

    async def close(self) -> None:
        """Stop listening and close every connection; idempotent."""

    async def get_credential(self, key: str) -> bytes | None: ...

    async def put_credential(self, key: str, plaintext: bytes, *, expires_at: float) -> None:
        """Keep ``plaintext`` until ``expires_at``; an already expired value is not stored."""

    async def delete_credential(self, key: str) -> bool:
        """Delete and publish ``credential_evicted``; True if a value was there."""

    async def sweep_credentials(self, prefix: str, keep: str | None) -> list[tuple[str, bytes]]:
        """Delete every credential whose key starts with ``prefix`` but not with ``keep`` (None: keep
        none), publishing ``credential_evicted`` for each; returns the (key, value) pairs deleted."""
        ...

    def key_digest(self, text: str) -> str:
        """A keyed hash of ``text`` (hex) for building key names; the same in every replica. No I/O."""
        ...

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        """A token if the lock was free (it expires after ``ttl`` seconds), else None."""

    async def release_lock(self, key: str, token: str) -> bool:
        """Release only if ``token`` still owns the lock; False if it expired or changed hands."""

    async def put_grant(self, grant: Grant) -> bool:
        """Store (or replace) a grant and publish ``grant_created``; False if its id is revoked or it expired."""

    async def get_grant(self, grant_id: str) -> Grant | None:
        """The grant, revoked ones included (``revoked_at`` set); None if unknown or expired."""

    async def list_grants(self) -> list[Grant]:
        """Every grant not yet expired, revoked ones included, oldest first."""

    async def find_grant(self, workload: str, rule: str) -> Grant | None:
        """The active grant for exactly this workload and rule (the one expiring last), or None."""

    async def revoke_grant(self, grant_id: str, *, reason: str) -> Grant | None:
        """Revoke for good and publish ``grant_revoked``; the grant as revoked, None if unknown."""

    def revoked_grant_ids(self) -> frozenset[str]:
        """The revoked ids this process knows of (its own, events, resyncs). No I/O; never raises."""
        ...

    async def publish(self, event: Event) -> None: ...

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Call ``callback(event)`` for every event; returns a function that unsubscribes."""
        ...

    async def audit_xadd(self, stream: str, fields: Mapping[str, str], *, maxlen: int,
                         approximate: bool = False) -> str:
        """Append an audit record to a capped stream; returns its id."""
        ...


def check_key(key: object) -> str:
    if not isinstance(key, str) or not key or len(key) > 512 or not key.isprintable():
        raise ValueError(f"invalid store key {key!r}: 1 to 512 printable characters")
    return key


def check_maxlen(maxlen: int) -> int:
    """An audit stream's cap: at least one entry (a cap of 0 would drop every record it is given)."""
    if maxlen < 1:
        raise ValueError("maxlen must be at least 1")
    return maxlen


def check_event(event: Mapping[str, Any]) -> Event:
    """A well-formed event (known type, its one field a string) or ValueError."""
    kind = event.get("type") if isinstance(event, Mapping) else None
    if not isinstance(kind, str) or kind not in EVENTS:
        raise ValueError(f"unknown event type {kind!r} (known: {', '.join(EVENTS)})")
    field = EVENTS[kind]
    out: Event = {"type": kind}
    if field is not None:
        value = event.get(field)
        if not isinstance(value, str) or not value or len(value) > 512:
            raise ValueError(f"a {kind} event needs a non-empty string '{field}'")
        out[field] = value
    origin = event.get("origin")
    if isinstance(origin, str) and len(origin) <= 64:
        out["origin"] = origin
    return out


def check_grant(grant: Grant, now: float, tombstone_ttl: float) -> None:
    """A Grant that does not outlive its revocation tombstone, or TypeError/ValueError."""
    if not isinstance(grant, Grant):
        raise TypeError(f"put_grant takes a Grant, got {type(grant).__name__}")
    if grant.expires_at - now > tombstone_ttl:
        raise ValueError(f"a grant may not outlive its revocation tombstone ({tombstone_ttl:g} s)")


def ttl_ms(expires_at: float, now: float) -> int:
    """Milliseconds left until ``expires_at``; 0 or less means expired."""
    left = expires_at - now
    return math.floor(left * 1000) if math.isfinite(left) else 0


class Subscribers:
    """The callbacks of one store; delivers events without letting one callback break the others."""

    def __init__(self) -> None:
        self._callbacks: list[Callback] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def add(self, callback: Callback) -> Callable[[], None]:
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)
        return unsubscribe

    def deliver(self, event: Event) -> None:
        for callback in list(self._callbacks):
            try:
                result = callback(dict(event))
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
            except Exception as exc:  # noqa: BLE001 - one bad subscriber must not silence the rest
                log.warning("store event callback raised %s (event %s)", type(exc).__name__, event["type"])

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("store event callback raised %s", type(task.exception()).__name__)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._callbacks.clear()
