"""The one small protocol every credential provider implements: ``fetch`` and, optionally, ``revoke``.

A provider turns a credential definition (from config) into short-lived credential values for
a request context. It never sees HTTP flows; the broker decides when to call it (cache,
single flight, refresh-ahead, retries) and the injector decides where the value goes.

A kind is described by one ``CredentialKind`` (its config keys, its settings parser, its
provider class, where its values may be injected); ``registry.py`` lists every kind.

Provider errors are ``ProviderError``: the message is ours and safe to log; a provider's raw
response text never goes into it (it may echo a secret or be attacker-controlled).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from secretless_proxy.config.model import Credential, CredentialSettings
from secretless_proxy.config.yamlsource import Path_, Source
from secretless_proxy.definition import definition_digest
from secretless_proxy.errors import CredentialError
from secretless_proxy.identity import Workload
from secretless_proxy.reasons import Reason
from secretless_proxy.secretrefs import Secret

if TYPE_CHECKING:
    import httpx

    from secretless_proxy.signing import JwtSigner

# Where a credential of a kind can go: "value" kinds fit header/basic/query; "sigv4" re-signs.
VALUE_INJECTIONS = frozenset({"header", "basic", "query"})


class ProviderError(CredentialError):
    """The provider could not produce a credential. ``retryable`` says whether trying again may help."""

    def __init__(self, detail: str, *, retryable: bool = True) -> None:
        super().__init__(Reason.CREDENTIAL_UNAVAILABLE, detail)
        self.retryable = retryable


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestContext:
    """What a provider may know about the request it brokers for."""

    workload: Workload
    host: str  # normalised host the proxy connects to
    port: int
    method: str
    path: str
    rule: str
    grant_id: str | None = None  # the grant this request runs under (rules with requires_grant)


@dataclass(frozen=True, kw_only=True)
class IssuedCredential:
    """One credential value with its lifetime. ``repr`` never shows a value."""

    name: str  # the credential definition's name
    kind: str
    secret: Secret  # the token, key or secret access key
    expires_at: float | None  # epoch seconds; None: does not expire (static keys)
    scope: str = ""  # what it was minted for: "" (shared), a workload ID or an audience
    issued_at: float = field(default_factory=time.time)
    parts: Mapping[str, Secret] = field(default_factory=dict)  # e.g. AWS access key id, session token
    meta: Mapping[str, str] = field(default_factory=dict)  # non-secret facts (token_type, scope granted)

    def __repr__(self) -> str:
        return (f"IssuedCredential(name={self.name!r}, kind={self.kind!r}, scope={self.scope!r}, "
                f"expires_at={self.expires_at!r})")

    def valid_at(self, now: float, skew: float = 0.0) -> bool:
        return self.expires_at is None or now < self.expires_at - skew

    @property
    def lifetime(self) -> float | None:
        return None if self.expires_at is None else self.expires_at - self.issued_at


@dataclass(kw_only=True)
class ProviderDeps:
    """Shared resources a provider may use; created in ``running()``, closed in ``done()``."""

    http: httpx.AsyncClient | None = None
    signer: JwtSigner | None = None
    now: Callable[[], float] = time.time


class Provider:
    """Base class of credential providers. Subclasses set ``kind`` and implement ``fetch``."""

    kind: ClassVar[str]
    revocable: ClassVar[bool] = False

    def __init__(self, credential: Credential, deps: ProviderDeps) -> None:
        self.credential = credential
        self.settings: Any = credential.settings
        self.deps = deps
        # What the broker's cache keys carry: a changed definition never finds an old token.
        self.digest = definition_digest(credential.kind, credential.settings)

    @property
    def name(self) -> str:
        return self.credential.name

    def scope(self, ctx: RequestContext) -> str | None:
        """The cache key part for ``ctx``: "" shared by all, a workload ID, an audience; None: never cache."""
        return ""

    async def fetch(self, ctx: RequestContext) -> IssuedCredential:
        raise NotImplementedError

    def fetch_now(self, ctx: RequestContext) -> IssuedCredential | None:
        """A synchronous fast path for values that need no brokering (static keys), else None.

        Such values are read at every use (a stat for file secrets), so a rotated or removed
        secret takes effect on the next request instead of living on in a cache.
        """
        return None

    @property
    def revocation_target(self) -> str | None:
        """Where ``revoke`` sends a credential (an endpoint URL). The broker records it with each
        credential it issues, and revokes one swept from the store after a restart only through a
        provider with the same target: a token never travels to a server that did not issue it."""
        return None

    async def revoke(self, cred: IssuedCredential) -> None:
        """Revoke at the provider. Only called when ``revocable`` is true."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class CredentialKind:
    """One ``kind:`` of credential: how its config is read, which provider serves it, where it goes.

    ``parse(src, path, mapping, base_dir)`` reads the keys named in ``required``/``optional`` into the
    kind's settings (plain data with ``secret_refs()``), recording problems on ``src``; None if invalid.
    """

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    parse: Callable[[Source, Path_, dict[str, Any], Path], CredentialSettings | None]
    provider: type[Provider]
    injections: frozenset[str] = VALUE_INJECTIONS
