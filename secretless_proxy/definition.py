"""The digest of a credential definition: what the broker's cache keys carry (issue 10 §2).

A cached credential must match the definition it is served under. The broker's cache key and
the shared store's key both carry ``definition_digest(kind, settings)``, a SHA-256 over a
canonical form of *everything* that shapes an issued credential: the kind and every field of
its settings (endpoint, client identity, scopes, audience, resource, params, repositories,
permissions, role ARN, lifetimes, ...). Narrowing a scope, changing a client or a role gives a
new digest, so a token minted under the old definition is never found again, in process or in
Redis, after a reload or a restart.

Secret *references* (``env:NAME``, ``file:/path``) take part by their text: pointing a credential
at another secret is a new definition. Secret *values* never do (settings hold none; a ``Secret``
found in them is a bug and refused). The digest is a plain hash of config text; the store hashes
it once more with a key of its own before it becomes part of a Redis key name (``Store.key_digest``).

Over-invalidation is the safe direction: a field that does not change the token (a timeout)
costs one provider call after it changes, never a stale credential.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from secretless_proxy.secretrefs import Secret, SecretRef

VERSION = 1  # bump when the canonical form changes: every cached entry is then refetched once


def definition_digest(kind: str, settings: Any) -> str:
    """64 hex digits identifying (kind, settings); equal definitions give equal digests in any process."""
    text = json.dumps({"v": VERSION, "kind": kind, "settings": _canon(settings)}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _canon(value: Any) -> Any:
    if isinstance(value, Secret):
        raise TypeError("a credential definition holds secret references, never secret values")
    if isinstance(value, SecretRef):
        return {"$ref": str(value), "$type": type(value).__name__}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return repr(value)  # exact, and JSON has no inf/nan
    if isinstance(value, enum.Enum):
        return {"$enum": type(value).__name__, "value": _canon(value.value)}
    if isinstance(value, PurePath):
        return {"$path": str(value)}
    if isinstance(value, bytes):
        return {"$bytes": value.hex()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _canon(getattr(value, f.name)) for f in dataclasses.fields(value) if f.compare}
        return {"$dataclass": type(value).__qualname__, "fields": fields}
    if isinstance(value, Mapping):
        items = [[json.dumps(_canon(k), sort_keys=True), _canon(v)] for k, v in value.items()]
        return {"$map": sorted(items, key=lambda kv: kv[0])}
    if isinstance(value, list | tuple):
        return [_canon(v) for v in value]
    if isinstance(value, set | frozenset):
        return {"$set": sorted(json.dumps(_canon(v), sort_keys=True) for v in value)}
    # Unknown types: their repr (a Secret's is masked). A repr that differs between processes only
    # costs a refetch after a restart, never a stale credential.
    return {"$repr": f"{type(value).__qualname__}:{value!r}"}
