"""The embedded store (``memory://``, the default): the store protocol for one process, no dependencies.

Everything lives in dictionaries on the event loop; events go to local callbacks on the next
loop iteration (as they would arrive from Redis). It never fails, so ``healthy`` is always True.
Values are held in plaintext: they never leave the process, exactly like the broker's own cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from secretless_proxy.grants import Grant, check_text, valid_grant_id
from secretless_proxy.store import base
from secretless_proxy.store.base import Callback, Event, check_event, check_grant, check_key, check_maxlen

TOMBSTONE_TTL = 30 * 86400.0


@dataclass(slots=True)
class _Held:
    value: str | bytes
    expires_at: float


class MemoryStore:
    """One process's shared state; see the module docstring."""

    def __init__(self, *, now: Callable[[], float] = time.time,
                 tombstone_ttl: float = TOMBSTONE_TTL) -> None:
        self._now = now
        self._tombstone_ttl = tombstone_ttl
        self._creds: dict[str, _Held] = {}
        self._locks: dict[str, _Held] = {}
        self._grants: dict[str, Grant] = {}
        self._revoked: dict[str, float] = {}  # id -> revoked_at
        self._streams: dict[str, deque[tuple[str, dict[str, str]]]] = {}
        self._seq = 0
        self._subscribers = base.Subscribers()
        self.origin = secrets.token_hex(8)
        self._name_key = secrets.token_bytes(32)  # key names never leave the process

    def __repr__(self) -> str:
        return f"MemoryStore(credentials={len(self._creds)}, grants={len(self._grants)})"

    @property
    def healthy(self) -> bool:
        return True

    @property
    def event_epoch(self) -> int:
        return 0  # events never leave the process: none can be missed

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        await self._subscribers.aclose()

    async def __aenter__(self) -> MemoryStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- credentials ----------------------------------------------------------------------

    async def get_credential(self, key: str) -> bytes | None:
        held = self._live(self._creds, check_key(key))
        return None if held is None else bytes(held.value)  # type: ignore[arg-type]

    async def put_credential(self, key: str, plaintext: bytes, *, expires_at: float) -> None:
        check_key(key)
        if base.ttl_ms(expires_at, self._now()) > 0:
            self._creds[key] = _Held(bytes(plaintext), expires_at)

    async def delete_credential(self, key: str) -> bool:
        found = self._live(self._creds, check_key(key)) is not None
        self._creds.pop(key, None)
        await self.publish({"type": "credential_evicted", "key": key})
        return found

    async def sweep_credentials(self, prefix: str, keep: str | None) -> list[tuple[str, bytes]]:
        out = []
        for key in [k for k in self._creds if k.startswith(prefix) and not (keep and k.startswith(keep))]:
            held = self._live(self._creds, key)
            self._creds.pop(key, None)
            if held is not None:
                out.append((key, bytes(held.value)))  # type: ignore[arg-type]
                await self.publish({"type": "credential_evicted", "key": key})
        return out

    def key_digest(self, text: str) -> str:
        return hmac.new(self._name_key, text.encode(), hashlib.sha256).hexdigest()

    # -- locks ----------------------------------------------------------------------------

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        if self._live(self._locks, check_key(key)) is not None:
            return None
        token = secrets.token_urlsafe(16)
        self._locks[key] = _Held(token, self._now() + ttl)
        return token

    async def release_lock(self, key: str, token: str) -> bool:
        held = self._live(self._locks, check_key(key))
        if held is None or held.value != token:
            return False
        del self._locks[key]
        return True

    # -- grants ---------------------------------------------------------------------------

    async def put_grant(self, grant: Grant) -> bool:
        now = self._now()
        check_grant(grant, now, self._tombstone_ttl)
        if grant.revoked or grant.id in self.revoked_grant_ids() or not now < grant.expires_at:
            return False
        self._grants[grant.id] = grant
        await self.publish({"type": "grant_created", "id": grant.id})
        return True

    async def get_grant(self, grant_id: str) -> Grant | None:
        if not valid_grant_id(grant_id):
            return None
        grant = self._grants.get(grant_id)
        if grant is None or not self._now() < grant.expires_at:
            return None
        return self._with_revocation(grant)

    async def list_grants(self) -> list[Grant]:
        now = self._now()
        live = [self._with_revocation(g) for g in self._grants.values() if now < g.expires_at]
        return sorted(live, key=lambda g: (g.created_at, g.id))

    async def find_grant(self, workload: str, rule: str) -> Grant | None:
        now = self._now()
        found = [g for g in self._grants.values()
                 if g.workload == workload and g.rule == rule and g.id not in self._revoked
                 and g.active_at(now)]
        return max(found, key=lambda g: g.expires_at, default=None)

    async def revoke_grant(self, grant_id: str, *, reason: str) -> Grant | None:
        if not valid_grant_id(grant_id):
            raise ValueError(f"invalid grant id {grant_id!r}")
        check_text("revoke reason", reason, required=True)
        now = self._now()
        self._prune(now)
        self._revoked.setdefault(grant_id, now)
        grant = self._grants.get(grant_id)
        if grant is not None:
            grant = self._grants[grant_id] = grant.revoked_as(at=self._revoked[grant_id], reason=reason)
        await self.publish({"type": "grant_revoked", "id": grant_id})
        return grant if grant is not None and now < grant.expires_at else None

    def revoked_grant_ids(self) -> frozenset[str]:
        self._prune(self._now())
        return frozenset(self._revoked)

    # -- events and audit -----------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        event = check_event({**event, "origin": self.origin})
        asyncio.get_running_loop().call_soon(self._subscribers.deliver, event)

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        return self._subscribers.add(callback)

    async def audit_xadd(self, stream: str, fields: Mapping[str, str], *, maxlen: int,
                         approximate: bool = False) -> str:
        check_maxlen(maxlen)
        self._seq += 1
        entry_id = f"{int(self._now() * 1000)}-{self._seq}"
        q = self._streams.get(stream)
        if q is None or q.maxlen != maxlen:
            q = self._streams[stream] = deque(q or (), maxlen=maxlen)
        q.append((entry_id, {str(k): str(v) for k, v in fields.items()}))
        return entry_id

    def stream(self, name: str) -> list[tuple[str, dict[str, str]]]:
        """The entries of one audit stream, oldest first (for tests and the admin listener)."""
        return list(self._streams.get(name, ()))

    # -- internals ------------------------------------------------------------------------

    def _live(self, table: dict[str, _Held], key: str) -> _Held | None:
        held = table.get(key)
        if held is not None and not self._now() < held.expires_at:
            del table[key]
            return None
        return held

    def _with_revocation(self, grant: Grant) -> Grant:
        at = self._revoked.get(grant.id)
        return grant if at is None else grant.revoked_as(at=at, reason="revoked")

    def _prune(self, now: float) -> None:
        cutoff = now - self._tombstone_ttl
        for gid in [g for g, at in self._revoked.items() if at < cutoff]:
            del self._revoked[gid]
        for gid in [g for g, grant in self._grants.items() if not now < grant.expires_at]:
            del self._grants[gid]

