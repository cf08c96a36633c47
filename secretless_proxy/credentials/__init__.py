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


def _collect() -> dict[str, CredentialKind]:
    """Every kind: ``static`` here, the others from modules that each export ``KINDS: list[CredentialKind]``."""
    import importlib

    kinds = {"static": CredentialKind(name="static", required=("secret",), optional=(), parse=static.parse,
                                      provider=static.StaticProvider)}
    for module in ("oauth2", "jwt", "github", "aws"):
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:  # TODO(broker issue): drop once all provider modules exist
            if exc.name != f"{__name__}.{module}":
                raise
            continue
        for kind in mod.KINDS:
            kinds[kind.name] = kind
    return kinds


KINDS: dict[str, CredentialKind] = _collect()
