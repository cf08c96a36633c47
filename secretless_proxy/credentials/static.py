"""``kind: static``: a vaulted key for a third party that only takes API keys.

The value comes from a secret reference (``env:`` or ``file:``) read by the proxy; file secrets
are re-read when they change, so rotation needs no restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secretless_proxy.config.fields import secret_ref
from secretless_proxy.config.yamlsource import Path_, Source
from secretless_proxy.credentials.base import (
    CredentialKind,
    IssuedCredential,
    Provider,
    ProviderError,
    RequestContext,
)
from secretless_proxy.secretrefs import SecretRef, SecretUnavailable


@dataclass(frozen=True, kw_only=True)
class StaticSettings:
    secret: SecretRef

    def secret_refs(self) -> dict[str, SecretRef]:
        return {"secret": self.secret}


def parse(src: Source, p: Path_, m: dict[str, Any], base: Path) -> StaticSettings | None:
    ref = secret_ref(src, p + ("secret",), m["secret"], base) if "secret" in m else None
    return StaticSettings(secret=ref) if ref else None


class StaticProvider(Provider):
    kind = "static"

    async def fetch(self, ctx: RequestContext) -> IssuedCredential:
        return self.fetch_now(ctx)

    def fetch_now(self, ctx: RequestContext) -> IssuedCredential:
        try:
            value = self.settings.secret.resolve()
        except SecretUnavailable as exc:
            raise ProviderError(str(exc), retryable=False) from None
        return IssuedCredential(name=self.name, kind=self.kind, secret=value, expires_at=None)


KINDS = [CredentialKind(name="static", required=("secret",), optional=(), parse=parse, provider=StaticProvider)]
