"""``kind: jwt``: a short JWT the proxy mints for the calling workload, bound to one audience.

``sub`` is the workload's SPIFFE ID, ``aud`` the configured ``audience`` or else the host the
request goes to, ``iss`` the proxy's ``signing.issuer``. The receiving service verifies it
against ``<issuer>/.well-known/jwks.json``. Nothing leaves the proxy to make one.

A token is cached per workload and audience until it expires; ``per_request: true`` mints a
fresh one (fresh ``jti``) for every request, for receivers that reject a replayed ``jti``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secretless_proxy.config import fields
from secretless_proxy.config.yamlsource import Path_, Source, type_name
from secretless_proxy.credentials.base import (
    CredentialKind,
    IssuedCredential,
    Provider,
    ProviderError,
    RequestContext,
)
from secretless_proxy.secretrefs import Secret, SecretRef

DEFAULT_TTL = 60.0
MAX_TTL = 3600.0
# Claims that say who, for whom and how long: only the proxy decides them.
_RESERVED_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "iat", "nbf", "jti"})


@dataclass(frozen=True, kw_only=True)
class JwtSettings:
    audience: str | None = None  # None: the request's host
    ttl: float = DEFAULT_TTL
    per_request: bool = False
    claims: tuple[tuple[str, str], ...] = ()

    def secret_refs(self) -> dict[str, SecretRef]:
        return {}  # signed with the proxy's own key (signing.key), not a per-credential secret


def parse(src: Source, p: Path_, m: dict[str, Any], base: Path) -> JwtSettings | None:
    n = len(src.issues)
    kw: dict[str, Any] = {}
    if "audience" in m:
        kw["audience"] = src.string(p + ("audience",), m["audience"])
    if "ttl_seconds" in m:
        kw["ttl"] = fields.seconds(src, p + ("ttl_seconds",), m["ttl_seconds"], lo=1, hi=MAX_TTL)
    if "per_request" in m:
        kw["per_request"] = src.boolean(p + ("per_request",), m["per_request"])
    if "claims" in m and (claims := _free_mapping(src, p + ("claims",), m["claims"])) is not None:
        out = []
        for name, value in claims.items():
            if name in _RESERVED_CLAIMS:
                src.error(p + ("claims", name), f"claim {name!r} is set by the proxy and cannot be "
                          f"overridden (reserved: {', '.join(sorted(_RESERVED_CLAIMS))})")
            elif (v := src.string(p + ("claims", name), value, empty_ok=True)) is not None:
                out.append((name, v))
        kw["claims"] = tuple(out)
    return JwtSettings(**kw) if len(src.issues) == n else None


def _free_mapping(src: Source, p: Path_, value: Any) -> dict[str, Any] | None:
    """A mapping whose keys are the user's (``Source.mapping`` checks against known keys)."""
    if not isinstance(value, dict):
        src.error(p, f"must be a mapping of claim names to strings, got {type_name(value)}")
        return None
    return value


class JwtProvider(Provider):
    kind = "jwt"
    settings: JwtSettings

    def _audience(self, ctx: RequestContext) -> str:
        return self.settings.audience or ctx.host

    def scope(self, ctx: RequestContext) -> str | None:
        if self.settings.per_request:
            return None  # never cached: every request gets its own jti
        return f"{ctx.workload.spiffe_id}|{self._audience(ctx)}"

    async def fetch(self, ctx: RequestContext) -> IssuedCredential:
        signer = self.deps.signer
        if signer is None:
            raise ProviderError(f"credential {self.name!r} needs the proxy's signing key", retryable=False)
        aud = self._audience(ctx)
        token, claims = signer.mint_with_claims(
            {**dict(self.settings.claims), "sub": ctx.workload.spiffe_id, "aud": aud}, ttl=self.settings.ttl)
        return IssuedCredential(
            name=self.name, kind=self.kind, secret=Secret(token), expires_at=float(claims["exp"]),
            issued_at=float(claims["iat"]), scope=f"{ctx.workload.spiffe_id}|{aud}",
            meta={"aud": aud, "jti": claims["jti"], "kid": signer.kid},
        )


KINDS = [CredentialKind(name="jwt", required=(), optional=("audience", "ttl_seconds", "per_request", "claims"),
                        parse=parse, provider=JwtProvider)]
