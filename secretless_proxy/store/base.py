"""The store protocol: what replicas share (credential cache, locks, grants, revocations, events).

Two implementations: ``memory.MemoryStore`` (the embedded default: one process, no
dependencies) and ``redis.RedisStore`` (shared by replicas). Both keep these semantics:

- **Credentials** are opaque bytes under a string key (``credential_key(...)``: a family, a
  definition digest and a scope hash, ``<family>/<definition>/<scope>``), kept until
  ``expires_at`` and never after. ``sweep_credentials(prefix, keep)`` deletes a family's entries
  under other definitions (and hands their values back for revocation); ``key_digest`` is the
  store's keyed hash for the parts of a key name (a Redis key never shows what it was made of). Use ``encode_credential``/``decode_credential`` to turn
  an ``IssuedCredential`` into bytes; Redis stores them sealed (``sealing.py``).
- **Locks** (``acquire_lock``/``release_lock``) give distributed single flight: the token holder
  fetches, the others wait for the value; a lock expires by itself after ``ttl`` so a crashed
  holder never blocks the rest. ``shared_fetch`` puts the pieces together.
- **Grants** (``grants.Grant``): ``find_grant`` returns an active grant only. Revocation is
  permanent: a tombstone outlives the grant, ``put_grant`` refuses a revoked id (returns False)
  and every store also keeps the revoked ids it has seen in process (``revoked_grant_ids``), so
  a store that lost its tombstones (a restored snapshot, a failover) cannot revive one.
- **Events** (``publish``/``subscribe``) tell every replica to drop what it holds in process:
  ``credential_evicted{key}``, ``grant_revoked{id}``, ``grant_created{id}``, and ``resync{}``
  after a store reconnects (events may have been missed: drop the in-process cache). Mutations
  publish their own events; every subscriber receives every event, its own included
  (``origin`` names the publishing store). Callbacks may be sync or async and must be idempotent.
- **Errors**: every failure to reach the shared store is ``StoreError`` (reason
  ``store_unavailable``), raised at one boundary with our own sentence; ``healthy`` says
  whether the last contact worked.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from ..credentials.base import IssuedCredential
from ..errors import SecretlessError
from ..grants import Grant
from ..reasons import Reason
from ..secrets import Secret

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


def credential_key(family: str, definition: str, scope: str, digest: Callable[[str], str] | None = None) -> str:
    """The store key of a broker cache entry: ``<family>/<definition hash>/<scope hash>``.

    ``digest`` is the store's ``key_digest`` (keyed); without one, plain SHA-256. Entries of one
    family under another definition share the prefix ``credential_family(family)`` and not
    ``credential_prefix(family, definition, digest)``: that is what ``sweep_credentials`` takes.
    """
    hash_ = digest or _sha256
    return f"{credential_prefix(family, definition, digest)}{hash_('scope:' + scope)[:32]}"


def credential_family(family: str) -> str:
    return f"{family}/"


def credential_prefix(family: str, definition: str, digest: Callable[[str], str] | None = None) -> str:
    return f"{family}/{(digest or _sha256)('definition:' + definition)[:24]}/"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_key(key: object) -> str:
    if not isinstance(key, str) or not key or len(key) > 512 or not key.isprintable():
        raise ValueError(f"invalid store key {key!r}: 1 to 512 printable characters")
    return key


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


# -- credentials as bytes -----------------------------------------------------------------------

def encode_credential(cred: IssuedCredential) -> bytes:
    """The plaintext form of a credential for ``put_credential`` (seal it before it leaves the process)."""
    return json.dumps({
        "v": 1, "name": cred.name, "kind": cred.kind, "scope": cred.scope,
        "secret": cred.secret.reveal(), "expires_at": cred.expires_at, "issued_at": cred.issued_at,
        "parts": {k: v.reveal() for k, v in cred.parts.items()}, "meta": dict(cred.meta),
    }, separators=(",", ":")).encode()


def decode_credential(data: bytes) -> IssuedCredential:
    """The credential ``encode_credential`` wrote; ValueError (without the value) if malformed."""
    try:
        d = json.loads(data)
        if d.get("v") != 1:
            raise ValueError
        return IssuedCredential(
            name=str(d["name"]), kind=str(d["kind"]), scope=str(d["scope"]), secret=Secret(str(d["secret"])),
            expires_at=None if d["expires_at"] is None else float(d["expires_at"]),
            issued_at=float(d["issued_at"]), parts={str(k): Secret(str(v)) for k, v in d["parts"].items()},
            meta={str(k): str(v) for k, v in d["meta"].items()},
        )
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
        raise ValueError("a stored credential is malformed") from None


# -- distributed single flight ------------------------------------------------------------------

async def shared_fetch(store: Store, key: str, fetch: Callable[[], Awaitable[IssuedCredential]], *,
                       min_valid: float, lock_ttl: float, replacing: IssuedCredential | None = None,
                       poll: float = 0.05, now: Callable[[], float] = time.time) -> IssuedCredential:
    """One provider call across replicas for a credential none of them holds.

    A valid value in the store is returned as is. Otherwise the replica that takes the lock
    checks the store once more, calls ``fetch``, stores the result and releases the lock; the
    others poll the store until the value appears, take the lock if it is freed without one
    (the holder's fetch failed), or give up waiting after ``lock_ttl`` and fetch themselves.
    The store failing at any step means: fetch locally. A store outage costs provider calls,
    never a refusal. Errors from ``fetch`` propagate unchanged.

    For a refresh-ahead, pass the credential being refreshed as ``replacing``: a stored value
    that does not outlive it is no answer, one that does was refreshed by another replica.
    """
    accept = _acceptor(min_valid, replacing, now)
    try:
        claim = await _claim(store, key, accept, lock_ttl=lock_ttl, poll=poll)
    except StoreError:
        return await fetch()
    if isinstance(claim, IssuedCredential):
        return claim
    if claim is None:
        log.warning("store key %s: the lock holder stored no credential within %.1f s; fetching "
                    "without the lock", key, lock_ttl)
        return await fetch()
    try:
        try:
            if (cred := await _load(store, key, accept)) is not None:
                return cred  # filled between our first look and taking the lock
        except StoreError:
            pass
        cred = await fetch()
        if cred.expires_at is not None:
            try:
                await store.put_credential(key, encode_credential(cred), expires_at=cred.expires_at)
            except StoreError:
                pass  # served from this process; other replicas fetch their own
        return cred
    finally:
        try:
            await store.release_lock(key, claim)
        except StoreError:
            pass  # it expires after lock_ttl


async def _claim(store: Store, key: str, accept: Callable[[IssuedCredential], bool], *, lock_ttl: float,
                 poll: float) -> IssuedCredential | str | None:
    """A valid stored credential, the lock's token, or None when waiting for the holder timed out."""
    deadline = time.monotonic() + lock_ttl
    while True:
        if (cred := await _load(store, key, accept)) is not None:
            return cred
        if (token := await store.acquire_lock(key, lock_ttl)) is not None:
            return token
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(poll)


def _acceptor(min_valid: float, replacing: IssuedCredential | None,
              now: Callable[[], float]) -> Callable[[IssuedCredential], bool]:
    floor = None if replacing is None else replacing.expires_at

    def accept(cred: IssuedCredential) -> bool:
        if not cred.valid_at(now(), min_valid):
            return False
        return floor is None or cred.expires_at is None or cred.expires_at > floor
    return accept


async def _load(store: Store, key: str, accept: Callable[[IssuedCredential], bool]) -> IssuedCredential | None:
    data = await store.get_credential(key)
    if data is None:
        return None
    try:
        cred = decode_credential(data)
    except ValueError:
        log.warning("store key %s holds a malformed credential; ignoring it", key)
        return None
    return cred if accept(cred) else None
