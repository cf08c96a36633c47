"""Credential kinds: each module parses its config fields and provides a ``Provider``.

``KINDS`` maps the ``kind:`` value in config to how it is parsed, built and injected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..yamlsource import Path_, Source
from . import static
from .base import IssuedCredential, Provider, ProviderDeps, ProviderError, RequestContext

__all__ = ["KINDS", "CredentialKind", "IssuedCredential", "Provider", "ProviderDeps", "ProviderError",
           "RequestContext"]

# Where a credential of a kind can go: "value" kinds fit header/basic/query; "sigv4" re-signs.
VALUE_INJECTIONS = frozenset({"header", "basic", "query"})


@dataclass(frozen=True, kw_only=True)
class CredentialKind:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    parse: Callable[[Source, Path_, dict[str, Any], Path], Any]
    provider: type[Provider]
    injections: frozenset[str] = VALUE_INJECTIONS


KINDS: dict[str, CredentialKind] = {
    "static": CredentialKind(name="static", required=("secret",), optional=(), parse=static.parse,
                             provider=static.StaticProvider),
}
