"""The shared store on Redis, through redis-py's asyncio client: what replicas of the proxy share.

URLs: ``redisurl.py`` (a password never goes in the URL: pass it as ``password``). The atomic
steps are Lua scripts, package resources under ``lua/`` (``SCRIPTS``).

Keys (``prefix`` is ``secretless:`` by default)::

    <p>cred:<key>           string   sealed credential (sealing.py, aad = this key), PX = expires_at - now
    <p>lock:<key>           string   single-flight lock token, PX = lock ttl
    <p>grant:<id>           hash     sealed (the grant's JSON, aad = this key), revoked_at, revoke_reason;
                                     PEXPIREAT = the grant's expires_at
    <p>grants               zset     every grant id, score = expires_at (ms)
    <p>grants:<pair>        zset     grant ids of one (workload, rule) pair; PEXPIREAT = the last expiry
    <p>revoked              zset     tombstones: revoked grant id, score = revoked_at (ms); pruned after
                                     ``tombstone_ttl`` (30 days), which must outlive every grant
    <p>events               channel  invalidation events (JSON, see base.py), signed (events.py)
    <p>audit:<stream>       stream   audit records, XADD MAXLEN

Grants are sealed too: whoever can write to Redis cannot forge or extend one (it would not
open), only delete or revoke, which fails closed.

Failure model: socket timeouts are short (``timeout``, 0.5 s) and redis-py retries a dropped
connection once, so an outage fails fast; every failure becomes ``StoreError`` at one boundary
(``_run``), counted through ``on_error(op)``, logged by exception type only. While unhealthy,
operations fail at once except one probe every ``probe_interval`` (no request waits on a dead
server). A background task holds the event subscription; after any disconnect it reconnects
with capped backoff, then re-syncs the revoked set both ways (local tombstones are written back
to a Redis that lost them) and delivers a ``resync`` event, so nothing missed is honoured.
Not for Redis Cluster: the grant scripts read keys derived from their arguments.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from secretless_proxy.config.model import TlsFiles
from secretless_proxy.grants import Grant, check_text, valid_grant_id
from secretless_proxy.secretrefs import Secret
from secretless_proxy.store import base
from secretless_proxy.store.base import Callback, Event, StoreError, check_grant, check_key, check_maxlen
from secretless_proxy.store.events import EventSigner
from secretless_proxy.store.redisurl import parse_url
from secretless_proxy.store.sealing import Sealer, SealingError

log = logging.getLogger(__name__)
T = TypeVar("T")

TOMBSTONE_TTL = 30 * 86400.0
_UNHEALTHY = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError, TimeoutError)


def _lua(name: str) -> str:
    """The text of ``lua/<name>.lua``: package data, so an installed wheel carries it (pyproject.toml)."""
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


# The atomic steps, each a Lua script whose comment block lists its KEYS, ARGV and return value.
# Read once at import: a missing file fails the import, not the first grant at run time.
SCRIPTS: Mapping[str, str] = {name: _lua(name) for name in ("release_lock", "put_grant", "find_grants", "revoke_grant")}


class RedisStore:
    """The store protocol on Redis; see the module docstring."""

    probe_interval = 0.5  # while unhealthy, at most one operation per interval tries the server
    reconnect_base, reconnect_cap = 0.05, 1.0  # subscriber reconnect backoff (s)
    ping_interval = 1.0  # the subscriber pings this often; silence for 3 intervals means a dead link

    def __init__(self, url: str, *, sealer: Sealer, password: Secret | None = None,
                 tls: TlsFiles | None = None, prefix: str = "secretless:", timeout: float = 0.5,
                 tombstone_ttl: float = TOMBSTONE_TTL, on_error: Callable[[str], None] | None = None,
                 on_event_rejected: Callable[[str], None] | None = None,
                 now: Callable[[], float] = time.time) -> None:
        self.target = parse_url(url)
        self._url = url
        self._sealer = sealer
        self._password = password
        self._tls = tls
        self._prefix = prefix
        self._timeout = timeout
        self._deadline = 2 * timeout + 0.25  # whole operation, retries included
        self._tombstone_ttl = tombstone_ttl
        self._on_error = on_error
        self._now = now
        self.origin = secrets.token_hex(8)
        self._channel = prefix + "events"
        # Key names carry keyed hashes (definitions, scopes): whoever reads Redis cannot confirm a guess.
        self._name_key = sealer.derive("key names")
        # Events are signed: whoever can PUBLISH on the channel cannot evict or revoke (events.py).
        self._signer = EventSigner(sealer, self._channel, now=now, on_reject=on_event_rejected)
        self._client: Redis | None = None
        self._events_client: Redis | None = None  # the subscription's own, never retrying, connection
        self._sentinel: Sentinel | None = None
        self._scripts: dict[str, Any] = {}
        self._revoked: dict[str, float] = {}  # id -> revoked_at: survives Redis losing its tombstones
        self._subscribers = base.Subscribers()
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._epoch = 0  # counts subscriptions: events published between two of them were missed
        self._pubsub: Any = None  # the live subscription (redis-py PubSub), while there is one
        self._healthy = False
        self._probe_at = 0.0
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisStore({self._url!r}, healthy={self._healthy})"

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def event_epoch(self) -> int | None:
        # The subscription's socket is checked too: the loop reads a server's EOF or reset some turns
        # before the listener task runs; a request in between must already see the link as down.
        return self._epoch if self._subscribed.is_set() and _link_open(self._pubsub) else None

    async def start(self) -> None:
        if self._client is not None or self._closed:
            return
        self._client = self._connect()
        # redis-py would reconnect a subscription silently (and resubscribe): the listener must
        # see every disconnect to re-sync what it missed, so its client never retries.
        self._events_client = self._connect(retries=0)
        for name, lua in SCRIPTS.items():
            self._scripts[name] = self._client.register_script(lua)
        self._listener = asyncio.get_running_loop().create_task(self._listen())
        try:  # a first sync when the server answers; otherwise the listener keeps trying
            await asyncio.wait_for(self._subscribed.wait(), self._deadline)
        except TimeoutError:
            log.warning("the shared store at %s is not reachable yet; retrying in the background", self._where())

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        await self._subscribers.aclose()
        for client in (self._client, self._events_client, self._sentinel):
            if client is not None:
                await client.aclose()
        self._client = self._events_client = self._sentinel = None
        self._healthy = False

    async def __aenter__(self) -> RedisStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_subscribed(self, timeout: float) -> bool:
        """Wait until the event subscription is live (after start or a reconnect); False on timeout."""
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- credentials ----------------------------------------------------------------------

    async def get_credential(self, key: str) -> bytes | None:
        rkey = self._prefix + "cred:" + check_key(key)
        blob = await self._run("get_credential", lambda c: c.get(rkey))
        if blob is None:
            return None
        try:
            return self._sealer.open(blob, aad=rkey)
        except SealingError as exc:  # another key generation, or tampering: a miss, never a value
            self._count("integrity")
            log.warning("store key %s does not open (%s); treating it as a miss", rkey, exc)
            return None

    async def put_credential(self, key: str, plaintext: bytes, *, expires_at: float) -> None:
        rkey = self._prefix + "cred:" + check_key(key)
        ms = base.ttl_ms(expires_at, self._now())
        if ms <= 0:
            return
        blob = self._sealer.seal(plaintext, aad=rkey)
        await self._run("put_credential", lambda c: c.set(rkey, blob, px=ms))

    async def delete_credential(self, key: str) -> bool:
        rkey = self._prefix + "cred:" + check_key(key)
        event = self._event({"type": "credential_evicted", "key": key})

        async def call(c: Any) -> list[Any]:
            async with c.pipeline(transaction=True) as pipe:
                return await pipe.delete(rkey).publish(self._channel, event).execute()
        return bool((await self._run("delete_credential", call))[0])

    async def sweep_credentials(self, prefix: str, keep: str | None) -> list[tuple[str, bytes]]:
        base_key = self._prefix + "cred:"
        pattern = _glob_escape(base_key + check_key(prefix)) + "*"
        keys = await self._run("sweep_credentials", lambda c: _scan(c, pattern))
        out = []
        for rkey in keys:
            key = rkey.decode(errors="replace")[len(base_key):]
            if keep and key.startswith(keep):
                continue
            event = self._event({"type": "credential_evicted", "key": key})

            async def call(c: Any, rkey: bytes = rkey, event: str = event) -> list[Any]:
                async with c.pipeline(transaction=True) as pipe:
                    return await pipe.getdel(rkey).publish(self._channel, event).execute()
            blob = (await self._run("sweep_credentials", call))[0]
            if blob is None:
                continue
            try:
                out.append((key, self._sealer.open(blob, aad=rkey.decode())))
            except (SealingError, UnicodeDecodeError):
                self._count("integrity")  # deleted all the same; nothing to revoke with
        return out

    def key_digest(self, text: str) -> str:
        return hmac.new(self._name_key, text.encode(), hashlib.sha256).hexdigest()

    # -- locks ----------------------------------------------------------------------------

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        rkey = self._prefix + "lock:" + check_key(key)
        token = secrets.token_urlsafe(16)
        ms = max(1, math.ceil(ttl * 1000))
        ok = await self._run("acquire_lock", lambda c: c.set(rkey, token, nx=True, px=ms))
        return token if ok else None

    async def release_lock(self, key: str, token: str) -> bool:
        rkey = self._prefix + "lock:" + check_key(key)
        return bool(await self._script("release_lock", keys=[rkey], args=[token]))

    # -- grants ---------------------------------------------------------------------------

    async def put_grant(self, grant: Grant) -> bool:
        now = self._now()
        check_grant(grant, now, self._tombstone_ttl)
        if grant.revoked or grant.id in self.revoked_grant_ids() or not now < grant.expires_at:
            return False
        gkey = self._grant_key(grant.id)
        sealed = self._sealer.seal(grant.to_json().encode(), aad=gkey)
        event = self._event({"type": "grant_created", "id": grant.id})
        keys = [gkey, self._pair_key(grant.workload, grant.rule), self._prefix + "grants", self._prefix + "revoked"]
        args = [grant.id, sealed, _ms(grant.expires_at), _ms(now), self._channel, event]
        return bool(await self._script("put_grant", keys=keys, args=args))

    async def get_grant(self, grant_id: str) -> Grant | None:
        if not valid_grant_id(grant_id):
            return None
        gkey = self._grant_key(grant_id)

        async def call(c: Any) -> list[Any]:
            async with c.pipeline(transaction=False) as pipe:
                return await pipe.hgetall(gkey).zscore(self._prefix + "revoked", grant_id).execute()
        record, tomb = await self._run("get_grant", call)
        if tomb is not None:
            self._remember(grant_id, tomb / 1000)
        return self._grant_from(grant_id, record)

    async def list_grants(self) -> list[Grant]:
        now = self._now()
        ids = await self._run("list_grants", lambda c: c.zrangebyscore(self._prefix + "grants", f"({_ms(now)}", "+inf"))
        if not ids:
            return []

        async def call(c: Any) -> list[Any]:
            async with c.pipeline(transaction=False) as pipe:
                for gid in ids:
                    pipe.hgetall(self._grant_key(gid.decode()))
                return await pipe.execute()
        records = await self._run("list_grants", call)
        grants = [g for gid, rec in zip(ids, records, strict=True) if (g := self._grant_from(gid.decode(), rec)) is not None]
        return sorted(grants, key=lambda g: (g.created_at, g.id))

    async def find_grant(self, workload: str, rule: str) -> Grant | None:
        now = self._now()
        flat = await self._script("find_grants", op="find_grant",
                                  keys=[self._pair_key(workload, rule), self._prefix + "revoked"],
                                  args=[_ms(now), self._prefix + "grant:"])
        best = None
        for gid, sealed in zip(flat[::2], flat[1::2], strict=True):
            grant = self._grant_from(gid.decode(), {b"sealed": sealed})
            if (grant is not None and grant.workload == workload and grant.rule == rule
                    and grant.id not in self._revoked and grant.active_at(now)
                    and (best is None or grant.expires_at > best.expires_at)):
                best = grant
        return best

    async def revoke_grant(self, grant_id: str, *, reason: str) -> Grant | None:
        if not valid_grant_id(grant_id):
            raise ValueError(f"invalid grant id {grant_id!r}")
        check_text("revoke reason", reason, required=True)
        now = self._now()
        self._remember(grant_id, now)  # before Redis: even if it is down, this process never honours it again
        event = self._event({"type": "grant_revoked", "id": grant_id})
        sealed, at, why = await self._script(
            "revoke_grant", keys=[self._grant_key(grant_id), self._prefix + "revoked"],
            args=[grant_id, _ms(now), reason, _ms(now - self._tombstone_ttl), self._channel, event])
        self._remember(grant_id, int(at) / 1000)
        if sealed is None:
            return None
        return self._grant_from(grant_id, {b"sealed": sealed, b"revoked_at": at, b"revoke_reason": why})

    def revoked_grant_ids(self) -> frozenset[str]:
        cutoff = self._now() - self._tombstone_ttl
        for gid in [g for g, at in self._revoked.items() if at < cutoff]:
            del self._revoked[gid]
        return frozenset(self._revoked)

    # -- events and audit -----------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        payload = self._event(event)
        await self._run("publish", lambda c: c.publish(self._channel, payload))

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        return self._subscribers.add(callback)

    async def audit_xadd(self, stream: str, fields: Mapping[str, str], *, maxlen: int,
                         approximate: bool = False) -> str:
        check_maxlen(maxlen)
        skey = self._prefix + "audit:" + check_key(stream)
        entry = await self._run("audit_xadd", lambda c: c.xadd(skey, dict(fields), maxlen=maxlen,
                                                                 approximate=approximate))
        return entry.decode()

    # -- internals: the one boundary ------------------------------------------------------

    async def _run(self, op: str, call: Callable[[Any], Awaitable[T]]) -> T:
        client: Any = self._client  # redis-py's types mix its sync and async returns
        if client is None:
            self._count(op)
            raise StoreError(op, f"the shared store is not running ({op})")
        if not self._healthy and time.monotonic() < self._probe_at:
            self._count(op)
            raise StoreError(op)
        try:
            async with asyncio.timeout(self._deadline):
                result = await call(client)
        except (RedisError, OSError, TimeoutError) as exc:
            # The client's text may quote a value: only the type goes anywhere.
            self._failed(op, exc)
            raise StoreError(op) from None
        self._set_healthy(True)
        return result

    async def _script(self, name: str, *, keys: list[str], args: list[Any], op: str | None = None) -> Any:
        script = self._scripts.get(name)
        if script is None:
            self._count(op or name)
            raise StoreError(op or name, f"the shared store is not running ({op or name})")
        return await self._run(op or name, lambda c: script(keys=keys, args=args, client=c))

    def _failed(self, op: str, exc: BaseException) -> None:
        self._count(op)
        if isinstance(exc, _UNHEALTHY):
            if self._healthy:
                log.warning("the shared store at %s became unreachable during %s (%s)", self._where(), op,
                            type(exc).__name__)
            self._healthy = False
            self._probe_at = time.monotonic() + self.probe_interval
        else:
            log.warning("the shared store refused %s (%s)", op, type(exc).__name__)

    def _set_healthy(self, up: bool) -> None:
        if up and not self._healthy:
            log.info("the shared store at %s is reachable", self._where())
        self._healthy = up

    def _count(self, op: str) -> None:
        if self._on_error is not None:
            try:
                self._on_error(op)
            except Exception as exc:  # noqa: BLE001 - a metrics hook must not break the store
                log.warning("store on_error hook raised %s", type(exc).__name__)

    # -- internals: the subscriber --------------------------------------------------------

    async def _listen(self) -> None:
        """Hold the subscription; after any failure reconnect with backoff and re-sync."""
        delay = self.reconnect_base
        ever = False
        while not self._closed:
            assert self._events_client is not None
            pubsub = self._events_client.pubsub()
            try:
                async with asyncio.timeout(self._deadline):
                    await pubsub.subscribe(self._channel)
                    while (msg := await pubsub.get_message(timeout=self._deadline)) is None or msg["type"] != "subscribe":
                        pass
                    await self._resync()
                self._set_healthy(True)
                self._epoch += 1
                self._pubsub = pubsub
                self._subscribed.set()
                if ever:
                    self._subscribers.deliver({"type": "resync", "origin": self.origin})
                ever, delay = True, self.reconnect_base
                await self._pump(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed("subscribe", exc)
            except Exception as exc:  # noqa: BLE001 - the listener must outlive any surprise
                self._count("subscribe")
                log.error("store event listener failed (%s); reconnecting", type(exc).__name__)
            finally:
                self._subscribed.clear()
                self._pubsub = None
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001, S110 - the connection is already gone
                    pass
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(self.reconnect_cap, delay * 2)

    async def _pump(self, pubsub: Any) -> None:
        last_seen = last_ping = time.monotonic()
        while True:
            msg = await pubsub.get_message(timeout=self.ping_interval)
            now = time.monotonic()
            if msg is not None:
                last_seen = now
                if msg["type"] == "message":
                    self._dispatch(msg["data"])
            if now - last_ping >= self.ping_interval:
                last_ping = now
                await pubsub.ping()
            if now - last_seen > 3 * self.ping_interval:
                raise RedisTimeoutError("no answer on the event subscription")

    def _dispatch(self, data: bytes) -> None:
        event = self._signer.verify(data)  # None: malformed, unsigned, forged, stale or replayed (counted)
        if event is None:
            return
        if event["type"] == "grant_revoked":
            self._remember(event["id"], self._now())
        self._subscribers.deliver(event)

    async def _resync(self) -> None:
        """Union the revoked sets: write local tombstones Redis lost back, then read all of Redis's."""
        assert self._client is not None
        rkey = self._prefix + "revoked"
        local = {gid: _ms(at) for gid, at in self._revoked.items()}
        async with self._client.pipeline(transaction=False) as pipe:
            if local:
                pipe.zadd(rkey, local, nx=True)
            pipe.zremrangebyscore(rkey, "-inf", f"({_ms(self._now() - self._tombstone_ttl)}")
            pipe.zrange(rkey, 0, -1, withscores=True)
            *_, members = await pipe.execute()
        for gid, score in members:
            self._remember(gid.decode(), score / 1000)

    # -- internals: helpers ---------------------------------------------------------------

    def _connect(self, *, retries: int = 1) -> Redis:
        t = self.target
        kw: dict[str, Any] = {
            "socket_timeout": self._timeout, "socket_connect_timeout": self._timeout,
            "retry": Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=retries),
            "client_name": "secretless-proxy", "username": t.username,
            "password": None if self._password is None else self._password.reveal(),
        }
        if t.tls and self._tls is not None:
            kw.update(ssl_ca_certs=_str(self._tls.ca_bundle), ssl_certfile=_str(self._tls.cert),
                      ssl_keyfile=_str(self._tls.key))
        if t.service is None:
            return Redis.from_url(self._url, **kw)
        tls_kw = {k: v for k, v in kw.items() if k.startswith("ssl_")} | ({"ssl": True} if t.tls else {})
        if self._sentinel is None:
            self._sentinel = Sentinel(
                list(t.sentinels),
                sentinel_kwargs={"socket_timeout": self._timeout, "socket_connect_timeout": self._timeout,
                                 "retry": kw["retry"], **tls_kw},
                **kw, **({"ssl": True} if t.tls else {}))
        return self._sentinel.master_for(t.service, db=t.db, retry=kw["retry"])

    def _where(self) -> str:
        t = self.target
        if t.service is not None:
            return f"sentinel service {t.service}"
        parts = urlsplit(self._url)
        return f"{parts.hostname}:{parts.port or 6379}"

    def _event(self, event: Mapping[str, Any]) -> str:
        return self._signer.sign({**event, "origin": self.origin})

    def _grant_key(self, grant_id: str) -> str:
        return self._prefix + "grant:" + grant_id

    def _pair_key(self, workload: str, rule: str) -> str:
        digest = hashlib.sha256(f"{workload}\x00{rule}".encode()).hexdigest()[:32]
        return self._prefix + "grants:" + digest

    def _remember(self, grant_id: str, revoked_at: float) -> None:
        if valid_grant_id(grant_id):
            self._revoked[grant_id] = min(revoked_at, self._revoked.get(grant_id, math.inf))

    def _grant_from(self, grant_id: str, record: Mapping[bytes, bytes] | None) -> Grant | None:
        """Open a stored grant and apply what is known about its revocation; None if absent or bad."""
        if not record or b"sealed" not in record:
            return None
        gkey = self._grant_key(grant_id)
        try:
            grant = Grant.from_json(self._sealer.open(record[b"sealed"], aad=gkey))
            if grant.id != grant_id:
                raise ValueError("stored under another id")
            at, why = record.get(b"revoked_at"), record.get(b"revoke_reason")
            if at is not None:
                grant = grant.revoked_as(at=int(at) / 1000, reason=(why or b"revoked").decode())
        except (SealingError, ValueError, TypeError) as exc:
            self._count("integrity")
            log.warning("grant %s in the shared store does not open or is malformed (%s); ignoring it",
                        grant_id, type(exc).__name__)
            return None
        if not self._now() < grant.expires_at:
            return None
        if grant_id in self._revoked:
            grant = grant.revoked_as(at=self._revoked[grant_id], reason="revoked")
        return grant


def _link_open(pubsub: Any) -> bool:
    """Whether the subscription's connection is open as far as the event loop has read.

    redis-py has no public call for it: this reads its connection's ``_reader`` (an
    ``asyncio.StreamReader``). A redis-py without one answers False: the grant cache then stays
    off (fails closed) and tests/test_e2e_grantcache.py says so."""
    reader = getattr(getattr(pubsub, "connection", None), "_reader", None)
    if not isinstance(reader, asyncio.StreamReader):
        return False
    return not reader.at_eof() and reader.exception() is None


async def _scan(client: Any, pattern: str) -> list[bytes]:
    return [key async for key in client.scan_iter(match=pattern, count=500)]


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis glob (MATCH): escape * ? [ ] and backslash."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def _ms(seconds: float) -> int:
    return math.floor(seconds * 1000)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
