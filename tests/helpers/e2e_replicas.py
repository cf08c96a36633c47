"""Helpers for the replica tests: a fleet of proxy processes on one redis-server, admin clients, Redis scans.

Everything here is a real part: ``secretless-proxy run`` subprocesses (through conftest's
``proxy_factory``), the real redis-server of ``redis_server.py``, the admin API over mTLS with
httpx, the proxy's own store code to write a grant the admin API could not (one that expires in
seconds), and redis-py to read back every byte Redis holds.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis
import requests

from helpers.proxy import BIN, ProxyProcess
from secretless_proxy.grants import Grant
from secretless_proxy.store.redis import RedisStore
from secretless_proxy.store.sealing import Sealer

BILLING = "spiffe://example.org/ns/prod/sa/billing"
ADMIN = "spiffe://example.org/ns/ops/sa/admin"
PREFIX = "secretless:"  # the store's default key prefix
ADMIN_LISTENER = re.compile(r"admin listener on 127\.0\.0\.1:(\d+)")
ADMIN_API = re.compile(r"admin API on (https://127\.0\.0\.1:\d+)")

Cert = tuple[str, str]


@dataclass
class Replica:
    """One proxy process of the fleet, with its admin listener (metrics) and admin API."""

    name: str
    proxy: ProxyProcess
    metrics_port: int
    api_url: str
    _sessions: list[requests.Session] = field(default_factory=list)

    def session(self, cert: Cert, cacert: str) -> requests.Session:
        """A requests session through this replica presenting ``cert`` (closed by ``close()``)."""
        s = requests.Session()
        s.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override s.verify
        s.proxies = {"https": self.proxy.url}
        s.verify = cacert
        s.cert = cert
        self._sessions.append(s)
        return s

    def close(self) -> None:
        for s in self._sessions:
            s.close()
        self._sessions.clear()


def started_replica(name: str, proxy: ProxyProcess) -> Replica:
    """Read the admin listener's port and the admin API's URL from the replica's log."""
    out = proxy.output()
    listener, api = ADMIN_LISTENER.search(out), ADMIN_API.search(out)
    assert listener and api, out
    return Replica(name=name, proxy=proxy, metrics_port=int(listener.group(1)), api_url=api.group(1))


class Admin:
    """The admin API of one replica over mTLS (sync httpx), as the admin workload or anyone else."""

    def __init__(self, url: str, *, cacert: str, cert: Cert | None) -> None:
        ctx = ssl.create_default_context(cafile=cacert)
        if cert is not None:
            ctx.load_cert_chain(*cert)
        self.client = httpx.Client(base_url=url, verify=ctx, trust_env=False, timeout=10)

    def grant(self, rule: str, *, workload: str = BILLING, ttl: int = 900, reason: str = "INC-1 test",
              **extra: Any) -> httpx.Response:
        return self.client.post("/v1/grants", json={"workload": workload, "rule": rule, "ttl_seconds": ttl,
                                                    "reason": reason, **extra})

    def revoke(self, grant_id: str, reason: str = "done") -> httpx.Response:
        return self.client.delete(f"/v1/grants/{grant_id}", params={"reason": reason})

    def close(self) -> None:
        self.client.close()


def cli(*args: str, api: str, cert: Cert, cacert: str) -> subprocess.CompletedProcess[str]:
    """The real ``secretless-proxy`` admin CLI, connection given by flags (not the environment)."""
    return subprocess.run([str(BIN / "secretless-proxy"), *args, "--api", api, "--cert", cert[0], "--key", cert[1],
                           "--cacert", cacert], capture_output=True, text=True, timeout=60)


# -- polling and numbers -------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def audit_events(text: str, event: str | None = None) -> list[dict[str, Any]]:
    """The audit JSON lines in a proxy's output or an audit file (other log lines are skipped)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record and (event is None or record["event"] == event):
            out.append(record)
    return out


# -- Redis, read and written from the outside ----------------------------------------------------


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def dump_redis(url: str) -> dict[bytes, tuple[str, list[bytes]]]:
    """Every key with its type and every byte string it holds (members, fields, values, scores)."""
    r = redis_client(url)
    out: dict[bytes, tuple[str, list[bytes]]] = {}
    try:
        for key in r.scan_iter(count=500):
            kind = r.type(key).decode()
            values: list[bytes]
            if kind == "string":
                values = [r.get(key) or b""]
            elif kind == "hash":
                values = [b for kv in r.hgetall(key).items() for b in kv]
            elif kind == "zset":
                values = [b for m, s in r.zrange(key, 0, -1, withscores=True) for b in (m, repr(s).encode())]
            elif kind == "set":
                values = list(r.smembers(key))
            elif kind == "list":
                values = r.lrange(key, 0, -1)
            elif kind == "stream":
                values = [b for entry_id, fields in r.xrange(key) for b in
                          (entry_id, *(x for kv in fields.items() for x in kv))]
            else:
                raise AssertionError(f"unexpected Redis type {kind} for {key!r}")
            out[key] = (kind, values)
    finally:
        r.close()
    return out


def snapshot_keys(url: str, keys: list[str]) -> dict[str, tuple[bytes, int]]:
    """DUMP and PTTL of ``keys``: a backup to RESTORE into a Redis that lost them."""
    r = redis_client(url)
    try:
        out = {}
        for key in keys:
            data = r.dump(key)
            assert data is not None, f"{key} is not in Redis"
            out[key] = (data, max(0, r.pttl(key)))
        return out
    finally:
        r.close()


def restore_keys(url: str, snapshot: dict[str, tuple[bytes, int]]) -> None:
    r = redis_client(url)
    try:
        for key, (data, pttl) in snapshot.items():
            r.restore(key, pttl, data, replace=True)
    finally:
        r.close()


def put_grant_directly(url: str, *, key_hex: str, rule: str, expires_in: float, workload: str = BILLING) -> Grant:
    """Write a grant into the shared store with the proxy's own store code and sealing key.

    The admin API refuses a TTL under 60 s; this grant expires ``expires_in`` seconds from now.
    """
    now = time.time()
    grant = Grant(id=secrets.token_urlsafe(16), workload=workload, rule=rule, expires_at=now + expires_in,
                  reason="test: expires in seconds", issued_by=ADMIN, created_at=now)

    async def put() -> bool:
        async with RedisStore(url, sealer=Sealer({"k1": bytes.fromhex(key_hex)}, "k1")) as store:
            return await store.put_grant(grant)

    assert asyncio.run(put()), "the store refused the grant"
    return grant


def find_grant_directly(url: str, *, key_hex: str, rule: str, workload: str = BILLING) -> Grant | None:
    """What a fresh process (no revocations in memory) finds in the shared store for (workload, rule)."""

    async def find() -> Grant | None:
        async with RedisStore(url, sealer=Sealer({"k1": bytes.fromhex(key_hex)}, "k1")) as store:
            return await store.find_grant(workload, rule)

    return asyncio.run(find())


def iter_needles(values: dict[str, str]) -> Iterator[tuple[str, bytes]]:
    """(label, bytes) of each secret, also in the encodings a careless writer might use."""
    import base64

    for label, value in values.items():
        raw = value.encode()
        yield label, raw
        yield f"{label} (base64)", base64.b64encode(raw)
        yield f"{label} (hex)", raw.hex().encode()
