"""Shared state behind one protocol (``base.Store``): ``memory://`` (default) or Redis for several replicas.

The store keeps opaque records (bytes under a key, sealed before they leave the process) and
knows no credential kind: the broker encodes what it caches (``sharedcache.py``). The ``store:``
section of the YAML is read by ``storeconfig.py`` into a ``config.StoreConfig``;
``open_store(config)`` builds the store, then ``await store.start()`` in ``running()`` and
``await store.close()`` in ``done()``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from secretless_proxy.config.model import MEMORY, StoreConfig
from secretless_proxy.errors import SecretUnavailable
from secretless_proxy.store.base import EVENTS, Store, StoreError
from secretless_proxy.store.memory import MemoryStore
from secretless_proxy.store.sealing import Sealer, SealingError

__all__ = [
    "EVENTS", "MemoryStore", "Sealer", "SealingError", "Store", "StoreConfig",
    "StoreError", "open_store",
]


def open_store(config: StoreConfig | str = MEMORY, *, on_error: Callable[[str], None] | None = None,
               on_event_rejected: Callable[[str], None] | None = None,
               now: Callable[[], float] = time.time) -> Store:
    """The store ``config`` describes, not started yet. ValueError if a key or password does not resolve."""
    if isinstance(config, str):
        config = StoreConfig(url=config)
    if config.kind == "memory":
        return MemoryStore(now=now)
    from secretless_proxy.store.redis import RedisStore  # redis-py is only imported by deployments that use it

    if not config.encryption_keys:
        raise ValueError("a Redis store needs encryption_keys: credentials are never stored in plaintext")
    active = config.active_key or (next(iter(config.encryption_keys)) if len(config.encryption_keys) == 1 else "")
    sealer = Sealer.from_refs(config.encryption_keys, active)
    password = None
    if config.password is not None:
        try:
            password = config.password.resolve()
        except SecretUnavailable as exc:
            raise ValueError(f"store password: cannot resolve {config.password}: {exc}") from None
    return RedisStore(config.url, sealer=sealer, password=password, tls=config.tls, prefix=config.key_prefix,
                      timeout=config.timeout, on_error=on_error, on_event_rejected=on_event_rejected, now=now)
