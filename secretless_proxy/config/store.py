"""The ``store:`` section of the proxy's YAML → ``config.StoreConfig``.

Configuration::

    store: memory://                        # the default: one process, nothing shared

    store:
      url: redis://redis.internal:6379/0    # rediss://... for TLS; redis+sentinel://h1:26379,h2:26379/mymaster/0
      encryption_keys:                      # AES-256 keys (64 hex digits or base64), by key id
        k2: env:SECRETLESS_STORE_KEY_K2
        k1: file:/run/secrets/store-k1      # an older key: still opens what it sealed
      active_key: k2                        # seals new entries; optional with a single key
      password: env:REDIS_PASSWORD          # optional; never in the URL
      tls: {ca_bundle: /etc/secretless/redis-ca.pem, cert: /run/tls/client.pem, key: /run/tls/client-key.pem}
      key_prefix: "secretless:"             # optional: several deployments on one Redis
      timeout_seconds: 0.5                  # optional: socket timeouts; an outage fails this fast
      grant_cache_seconds: 0.5              # optional: how long a found grant is served from memory
                                            # (store/grantcache.py); 0 turns the cache off

``parse_store_section(src, value, base_dir)`` records issues on the ``Source`` like every other
section reader. It checks the URL and the key format with the store's own rules
(``store/redisurl.py``, ``store/sealing.py``), so ``check`` refuses what the store would refuse.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from secretless_proxy.config import fields
from secretless_proxy.config.model import MEMORY, StoreConfig, TlsFiles
from secretless_proxy.config.yamlsource import Path_, Source
from secretless_proxy.errors import SecretUnavailable
from secretless_proxy.secretrefs import SecretRef, expand_user
from secretless_proxy.store.redisurl import parse_url
from secretless_proxy.store.sealing import parse_key

_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_PREFIX = re.compile(r"[A-Za-z0-9_.:{}-]{1,64}\Z")


def parse_store_section(src: Source, value: Any, base_dir: Path, *, resolve_secrets: bool = True) -> StoreConfig | None:
    """Read the ``store:`` section (a URL string or a mapping); issues go to ``src``, None if invalid."""
    p: Path_ = ("store",)
    issues_before = len(src.issues)
    if isinstance(value, str):
        value = {"url": value}
        src.lines.setdefault(p + ("url",), src.line(p) or 0)
    m = src.mapping(p, value, required=("url",), optional=(
        "encryption_keys", "active_key", "password", "tls", "key_prefix", "timeout_seconds",
        "grant_cache_seconds"))
    if m is None or "url" not in m or len(src.issues) > issues_before:
        return None
    url = src.string(p + ("url",), m["url"])
    if url is None:
        return None
    ok = True
    if url == MEMORY:
        extra = sorted(set(m) - {"url"})
        if extra:
            src.error(p + (extra[0],), "memory:// keeps everything in this process: it takes no other settings")
            return None
        return StoreConfig()
    try:
        target = parse_url(url)
    except ValueError as exc:
        src.error(p + ("url",), str(exc))
        return None
    keys = _keys(src, p, m, base_dir, resolve_secrets)
    if keys is None:
        ok = False
    active = None
    if "active_key" in m:
        active = src.string(p + ("active_key",), m["active_key"])
        if active is not None and keys is not None and active not in keys:
            src.error(p + ("active_key",), f"unknown key id {active!r} (known: {', '.join(sorted(keys))})")
            ok = False
    elif keys is not None and len(keys) > 1:
        src.error(p, f"missing required key 'active_key': say which of {', '.join(sorted(keys))} seals new entries")
        ok = False
    password = None
    if "password" in m:
        password = _secret(src, p + ("password",), m["password"], base_dir, resolve_secrets, is_key=False)
        ok = ok and password is not None
    tls = None
    if "tls" in m:
        tls = _tls(src, p + ("tls",), m["tls"], base_dir)
        if tls is not None and not target.tls:
            src.error(p + ("tls",), f"TLS settings need a rediss:// URL, got {target.scheme}://")
            tls = None
        ok = ok and tls is not None
    prefix = "secretless:"
    if "key_prefix" in m:
        prefix = src.string(p + ("key_prefix",), m["key_prefix"]) or ""
        if not _PREFIX.match(prefix):
            src.error(p + ("key_prefix",), f"must be 1 to 64 letters, digits or '_.:{{}}-', got {m['key_prefix']!r}")
            ok = False
    timeout = 0.5
    if "timeout_seconds" in m:
        t = fields.seconds(src, p + ("timeout_seconds",), m["timeout_seconds"], lo=0.05, hi=10)
        ok = ok and t is not None
        timeout = t or timeout
    grant_cache = StoreConfig.grant_cache
    if "grant_cache_seconds" in m:
        # Above 1 s a revocation whose event is lost outlives the fleet's "under a second" promise:
        # allowed (up to a minute), and said so in the docs, not refused.
        g = fields.seconds(src, p + ("grant_cache_seconds",), m["grant_cache_seconds"], lo=0, hi=60)
        ok = ok and g is not None
        grant_cache = grant_cache if g is None else g
    if not ok or keys is None or len(src.issues) > issues_before:
        return None
    return StoreConfig(url=url, encryption_keys=keys, active_key=active, password=password, tls=tls,
                       key_prefix=prefix, timeout=timeout, grant_cache=grant_cache)


def _keys(src: Source, p: Path_, m: dict[str, Any], base_dir: Path, resolve: bool) -> dict[str, SecretRef] | None:
    if "encryption_keys" not in m:
        src.error(p, "missing required key 'encryption_keys': a shared store holds credentials only "
                     "encrypted (e.g. encryption_keys: {k1: env:SECRETLESS_STORE_KEY})")
        return None
    kp = p + ("encryption_keys",)
    raw = m["encryption_keys"]
    if not isinstance(raw, dict) or not raw:
        src.error(kp, "must be a mapping of key ids to secret references, e.g. {k1: env:SECRETLESS_STORE_KEY}")
        return None
    out = {}
    for kid, ref_text in raw.items():
        if not _KEY_ID.match(str(kid)):
            src.error(kp + (kid,), f"invalid key id {kid!r}: 1 to 64 letters, digits, '_', '.' or '-'")
            continue
        ref = _secret(src, kp + (kid,), ref_text, base_dir, resolve, is_key=True)
        if ref is not None:
            out[str(kid)] = ref
    return out if len(out) == len(raw) else None


def _secret(src: Source, p: Path_, value: Any, base_dir: Path, resolve: bool, *, is_key: bool) -> SecretRef | None:
    text = src.string(p, value)
    if text is None:
        return None
    try:
        ref = SecretRef.parse(text, base_dir=base_dir)
    except ValueError as exc:
        src.error(p, str(exc))
        return None
    if resolve:
        try:
            secret = ref.resolve()
            if is_key:  # an encryption key: check its form now, not at the first request
                parse_key(secret.reveal())
        except SecretUnavailable as exc:
            src.error(p, f"cannot resolve {ref}: {exc}")
            return None
        except ValueError as exc:
            src.error(p, f"{ref}: {exc}")
            return None
    return ref


def _tls(src: Source, p: Path_, value: Any, base_dir: Path) -> TlsFiles | None:
    m = src.mapping(p, value, optional=("ca_bundle", "cert", "key"))
    if m is None:
        return None
    paths: dict[str, Path | None] = {}
    for name in ("ca_bundle", "cert", "key"):
        if name not in m:
            continue
        s = src.string(p + (name,), m[name])
        if s is None:
            return None
        try:
            path = expand_user(s)
        except ValueError as exc:
            src.error(p + (name,), str(exc))
            return None
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            src.error(p + (name,), f"file {path} does not exist")
            return None
        paths[name] = path
    if ("cert" in paths) != ("key" in paths):
        src.error(p, "a client certificate needs both 'cert' and 'key'")
        return None
    return TlsFiles(**paths)
