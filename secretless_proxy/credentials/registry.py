"""Every credential kind, by the ``kind:`` value that names it in config.

Each provider module declares its kinds (``KINDS: list[CredentialKind]``) and this module lists
the modules: the one place a new kind is registered. It lives apart from the package
``__init__`` so that importing one provider module (or ``base``) never runs the others half-way
through their own import, and so that the config model never needs it: the config parser and
the runtime builder import the registry, the model only holds each kind's settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from secretless_proxy.credentials import aws, github, jwt, oauth2, static
from secretless_proxy.credentials.base import CredentialKind

__all__ = ["KINDS", "CredentialKind"]


def _index(*modules: Iterable[CredentialKind]) -> Mapping[str, CredentialKind]:
    kinds: dict[str, CredentialKind] = {}
    for declared in modules:
        for kind in declared:
            if kind.name in kinds:
                raise RuntimeError(f"credential kind {kind.name!r} is declared twice")
            kinds[kind.name] = kind
    return MappingProxyType(kinds)


KINDS: Mapping[str, CredentialKind] = _index(static.KINDS, oauth2.KINDS, jwt.KINDS, github.KINDS, aws.KINDS)
