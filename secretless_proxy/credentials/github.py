"""``kind: github_app``: GitHub App installation access tokens, minted on demand and revocable.

The app's RSA private key stays with the proxy. For each token the proxy signs a short app JWT
(RS256) and exchanges it at ``POST /app/installations/{id}/access_tokens``, optionally narrowed
to some repositories and permissions; the token lives one hour at most and is revoked with
``DELETE /installation/token`` when the broker is done with it.
GitHub docs: "Generating a JSON Web Token (JWT) for a GitHub App" and the REST reference for
"Create an installation access token for an app" / "Revoke an installation access token".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from secretless_proxy.config import fields
from secretless_proxy.config.yamlsource import Path_, Source, type_name
from secretless_proxy.credentials.base import (
    CredentialKind,
    IssuedCredential,
    Provider,
    ProviderError,
    RequestContext,
)
from secretless_proxy.errors import SecretUnavailable
from secretless_proxy.secretrefs import Secret, SecretRef

DEFAULT_BASE_URL = "https://api.github.com"
API_VERSION = "2022-11-28"
# GitHub refuses app JWTs that expire more than 10 minutes ahead; iat is back-dated 60 s for
# clock drift between us and GitHub, as GitHub's docs recommend.
JWT_BACKDATE = 60
JWT_LIFETIME = 9 * 60
MAX_RESPONSE_BYTES = 1024 * 1024  # a token answer listing up to 500 repositories fits easily
PERMISSION_LEVELS = ("read", "write", "admin")
# GitHub keeps 401/403/404/422 answers until the app, installation or request changes.
_FINAL_STATUSES = frozenset({400, 401, 403, 404, 422})
_HINTS = {401: ": check app_id and private_key", 404: ": check installation_id (is the app installed?)",
          422: ": check the repositories and permissions requested"}
_REPO_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}\Z")
_PERMISSION_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
_TOKEN = re.compile(r"[\x21-\x7e]{1,1024}\Z")  # printable ASCII: it goes into a header


class PemSecretRef(SecretRef):
    """A secret reference to multi-line key material: ``resolve()`` reads it as PEM.

    ``config`` checks every reference a credential lists with ``resolve()``, which refuses
    line breaks; a PEM file is all line breaks.
    """

    def resolve(self) -> Secret:
        return self.resolve_pem()


@dataclass(frozen=True, kw_only=True)
class GitHubAppSettings:
    app_id: int
    installation_id: int
    private_key: PemSecretRef
    base_url: str = DEFAULT_BASE_URL  # no trailing slash
    repositories: tuple[str, ...] | None = None
    permissions: dict[str, str] = field(default_factory=dict)

    def secret_refs(self) -> dict[str, SecretRef]:
        return {"private_key": self.private_key}


def parse(src: Source, p: Path_, m: dict[str, Any], base: Path) -> GitHubAppSettings | None:
    app_id = src.integer(p + ("app_id",), m["app_id"], lo=1, hi=2**53)
    installation_id = src.integer(p + ("installation_id",), m["installation_id"], lo=1, hi=2**53)
    key = _pem_ref(src, p + ("private_key",), m["private_key"], base)
    ok = None not in (app_id, installation_id, key)
    kw: dict[str, Any] = {}
    if "base_url" in m:
        url = fields.url(src, p + ("base_url",), m["base_url"])
        if url is not None and (urlsplit(url).query or urlsplit(url).fragment):
            src.error(p + ("base_url",), f"{url!r} must not have a query or fragment: give the API root, "
                                         "e.g. https://ghe.example.com/api/v3")
            url = None
        ok = ok and url is not None
        kw["base_url"] = (url or "").rstrip("/")
    if "repositories" in m:
        kw["repositories"] = _repositories(src, p + ("repositories",), m["repositories"])
        ok = ok and kw["repositories"] is not None
    if "permissions" in m:
        kw["permissions"] = _permissions(src, p + ("permissions",), m["permissions"])
        ok = ok and kw["permissions"] is not None
    if not ok:
        return None
    assert app_id is not None and installation_id is not None and key is not None
    return GitHubAppSettings(app_id=app_id, installation_id=installation_id, private_key=key, **kw)


def _pem_ref(src: Source, p: Path_, value: Any, base: Path) -> PemSecretRef | None:
    ref = fields.secret_ref(src, p, value, base)  # the same env:/file: grammar as every secret
    return None if ref is None else PemSecretRef(scheme=ref.scheme, target=ref.target)


def _repositories(src: Source, p: Path_, value: Any) -> tuple[str, ...] | None:
    names = src.string_list(p, value)
    if names is None:
        return None
    ok = True
    for i, name in enumerate(names):
        if "/" in name:
            src.error(p + (i,), f"give the repository name without its owner ({name.rsplit('/', 1)[-1]!r}): "
                                "a token covers repositories of the installation's own account only")
            ok = False
        elif not _REPO_NAME.match(name):
            src.error(p + (i,), f"invalid repository name {name!r}")
            ok = False
    if len(names) > 500:
        src.error(p, f"GitHub accepts at most 500 repositories per token, got {len(names)}")
        ok = False
    return tuple(names) if ok else None


def _permissions(src: Source, p: Path_, value: Any) -> dict[str, str] | None:
    # Not src.mapping: GitHub keeps adding permissions, so names are checked by shape only.
    if not isinstance(value, dict):
        src.error(p, f"must be a mapping of permission names to {', '.join(PERMISSION_LEVELS)}, "
                     f"got {type_name(value)}")
        return None
    m: dict[str, Any] = value
    if not m:
        src.error(p, "must name at least one permission (or leave 'permissions' out for all the app has)")
        return None
    out: dict[str, str] = {}
    for name, level in m.items():
        if not _PERMISSION_NAME.match(name):
            src.error(p + (name,), f"invalid permission name {name!r}: e.g. contents, issues, pull_requests")
        elif src.choice(p + (name,), level, PERMISSION_LEVELS) is not None:
            out[name] = level
    return out if len(out) == len(m) else None


class GitHubAppProvider(Provider):
    kind = "github_app"
    revocable = True
    settings: GitHubAppSettings

    @property
    def revocation_target(self) -> str | None:
        return self.settings.base_url  # DELETE /installation/token goes to the GitHub that issued it

    async def fetch(self, ctx: RequestContext) -> IssuedCredential:
        s = self.settings
        body: dict[str, Any] = {}
        if s.repositories:
            body["repositories"] = list(s.repositories)
        if s.permissions:
            body["permissions"] = dict(s.permissions)
        what = f"the installation token request for app {s.app_id} installation {s.installation_id}"
        status, data = await self._call("POST", f"/app/installations/{s.installation_id}/access_tokens",
                                        self._app_jwt(), body or None, what)
        if status != 201:
            raise ProviderError(f"GitHub answered {status} to {what}{_HINTS.get(status, '')}",
                                retryable=status not in _FINAL_STATUSES)
        try:
            token, expires_at, meta = _parse_token(data)
        except ValueError:
            raise ProviderError(f"GitHub answered {what} with something that is not a token document") from None
        if expires_at <= self.deps.now():
            raise ProviderError(f"GitHub answered {what} with a token that has already expired")
        return IssuedCredential(name=self.name, kind=self.kind, secret=token, expires_at=expires_at,
                                issued_at=self.deps.now(), meta=meta)

    async def revoke(self, cred: IssuedCredential) -> None:
        """Revoke the installation token. Already expired or revoked (401) counts as done."""
        status, _ = await self._call("DELETE", "/installation/token", cred.secret.reveal(), None,
                                     "the token revocation")
        if status not in (204, 401):
            raise ProviderError(f"GitHub answered {status} to the token revocation",
                                retryable=status not in _FINAL_STATUSES)

    def _app_jwt(self) -> str:
        """The app's own short JWT (RS256, iss = app id), signed with its private key."""
        ref = self.settings.private_key
        try:
            pem = ref.resolve_pem()
        except SecretUnavailable as exc:
            raise ProviderError(str(exc), retryable=False) from None
        try:
            key = serialization.load_pem_private_key(pem.reveal().encode(), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            # Chain dropped on purpose: parser errors must not drag key bytes into tracebacks.
            raise ProviderError(f"the GitHub App private key {ref} is not an unencrypted PEM private key",
                                retryable=False) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ProviderError(f"the GitHub App private key {ref} must be an RSA key (GitHub signs with RS256)",
                                retryable=False)
        now = int(self.deps.now())
        claims = {"iat": now - JWT_BACKDATE, "exp": now + JWT_LIFETIME, "iss": str(self.settings.app_id)}
        return jwt.encode(claims, key, algorithm="RS256")

    async def _call(self, method: str, path: str, bearer: str, body: dict[str, Any] | None,
                    what: str) -> tuple[int, bytes]:
        http = self.deps.http
        if http is None:
            raise ProviderError("no HTTP client is available to call GitHub", retryable=False)
        url = self.settings.base_url + path
        headers = {"Authorization": f"Bearer {bearer}", "Accept": "application/vnd.github+json",
                   "X-GitHub-Api-Version": API_VERSION}
        try:
            async with http.stream(method, url, headers=headers, json=body) as resp:
                data = bytearray()
                async for chunk in resp.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_RESPONSE_BYTES:
                        raise ProviderError(f"GitHub answered {what} with more than {MAX_RESPONSE_BYTES} bytes")
                return resp.status_code, bytes(data)
        except httpx.TimeoutException as exc:
            raise ProviderError(f"GitHub at {self.settings.base_url} did not answer {what} in time") from exc
        except httpx.HTTPError as exc:
            raise ProviderError(f"cannot reach GitHub at {self.settings.base_url} ({type(exc).__name__})") from exc


def _parse_token(data: bytes) -> tuple[Secret, float, dict[str, str]]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("not an object")  # noqa: TRY004 - a bad answer, turned into a ProviderError
    token, expires = doc.get("token"), doc.get("expires_at")
    if not isinstance(token, str) or not _TOKEN.match(token) or not isinstance(expires, str):
        raise ValueError("no usable token or expires_at")
    when = datetime.fromisoformat(expires)  # ISO 8601 with "Z": Python >= 3.11
    if when.tzinfo is None:
        raise ValueError("expires_at without a time zone")
    meta = {"token_type": "installation"}
    if isinstance(doc.get("repository_selection"), str):
        meta["repository_selection"] = doc["repository_selection"][:32]
    perms = doc.get("permissions")
    if isinstance(perms, dict):
        meta["permissions"] = ",".join(f"{k}:{v}" for k, v in sorted(perms.items())
                                       if isinstance(k, str) and isinstance(v, str))[:1024]
    return Secret(token), when.timestamp(), meta


KINDS = [CredentialKind(
    name="github_app",
    required=("app_id", "installation_id", "private_key"),
    optional=("base_url", "repositories", "permissions"),
    parse=parse,
    provider=GitHubAppProvider,
)]
