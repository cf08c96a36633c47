"""The broker's entries in the shared store: their key names, their bytes, single flight across replicas.

The store keeps opaque records and knows no credential kind; what a record means is the
broker's business, so it lives here, beside the broker:

- **Key names**: ``credential_key(family, definition, scope, digest)`` is
  ``<family>/<definition hash>/<scope hash>``; entries of one family under another definition
  share ``credential_family(family)`` but not ``credential_prefix(family, definition, digest)``,
  which is what ``Store.sweep_credentials`` takes.
- **Bytes**: ``encode_credential``/``decode_credential`` turn an ``IssuedCredential`` into the
  plaintext the store seals before it leaves the process, and back.
- **Single flight across replicas**: ``shared_fetch`` (one provider call for a credential no
  replica holds), on the store's locks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable

from secretless_proxy.credentials.base import IssuedCredential
from secretless_proxy.secretrefs import Secret
from secretless_proxy.store.base import Store, StoreError

log = logging.getLogger(__name__)


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
