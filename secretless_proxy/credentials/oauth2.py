"""``kind: oauth2_client_credentials`` and ``kind: oauth2_token_exchange``: access tokens from a token endpoint.

Client credentials (RFC 6749 §4.4) gets one token for the proxy's client, shared by every
workload a rule lets use it. Token exchange (RFC 8693) trades a short JWT the proxy mints for
the calling workload (``sub`` = its SPIFFE ID) for a token scoped to that workload.

The proxy authenticates to the endpoint with a client secret (RFC 6749 §2.3.1, HTTP Basic by
default, or in the form body) or with ``private_key_jwt`` (RFC 7523 §2.2: an assertion signed
by the proxy's own signing key, so no shared secret exists at all; register the proxy's JWKS,
``<signing.issuer>/.well-known/jwks.json``, with the authorization server). The assertion's
``aud`` is the URL called (token or revocation endpoint) unless ``assertion_audience`` is set.

Token endpoint answers are never quoted in errors: they may echo a secret, and they are not
ours. Only a status code and, for 4xx, an RFC error code from a closed list are reported.
A response without ``expires_in`` is taken to live ``DEFAULT_EXPIRES_IN`` seconds.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote_plus, urlsplit

import httpx

from secretless_proxy.config import fields
from secretless_proxy.config.yamlsource import Path_, Source, type_name
from secretless_proxy.credentials.base import (
    CredentialKind,
    IssuedCredential,
    Provider,
    ProviderDeps,
    ProviderError,
    RequestContext,
)
from secretless_proxy.secretrefs import Secret, SecretRef, SecretUnavailable

if TYPE_CHECKING:
    from secretless_proxy.config.model import Credential

GRANT_CLIENT_CREDENTIALS = "client_credentials"
GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# RFC 6749 §5.1 only RECOMMENDS expires_in. Five minutes: short enough that an unannounced
# shorter lifetime costs little, long enough not to hammer the endpoint.
DEFAULT_EXPIRES_IN = 300.0
ASSERTION_TTL = 60  # RFC 7523 §3: a client assertion only has to survive one round trip
DEFAULT_SUBJECT_TTL = 120.0

# RFC 6749 §3.3 scope-token: printable ASCII except space, '"' and '\'.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+\Z")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S+\Z")
_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
# Error codes we may repeat (RFC 6749 §5.2, RFC 8693 §2.2.2, RFC 7009 §2.2.1): a closed list,
# never the server's free text.
_ERROR_CODES = frozenset({"invalid_request", "invalid_client", "invalid_grant", "unauthorized_client",
                          "unsupported_grant_type", "invalid_scope", "invalid_target",
                          "unsupported_token_type", "server_error", "temporarily_unavailable"})
# Form parameters the proxy sets itself; ``params:`` must not be a way around them.
_RESERVED_PARAMS = frozenset({
    "grant_type", "client_id", "client_secret", "client_assertion", "client_assertion_type", "scope",
    "audience", "resource", "subject_token", "subject_token_type", "actor_token", "actor_token_type",
    "requested_token_type", "token", "token_type_hint",
})

AuthMethod = Literal["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]
_COMMON = ("client_id", "client_secret", "client_auth", "client_secret_method", "assertion_audience",
           "scopes", "audience", "resource", "params", "revocation_url", "timeout_seconds")


@dataclass(frozen=True, kw_only=True)
class TokenEndpointSettings:
    token_url: str
    client_id: str | None
    auth: AuthMethod
    client_secret: SecretRef | None = None
    assertion_audience: str | None = None  # private_key_jwt "aud"; default: the URL called
    scopes: tuple[str, ...] = ()
    audience: tuple[str, ...] = ()
    resource: tuple[str, ...] = ()
    params: tuple[tuple[str, str], ...] = ()
    revocation_url: str | None = None
    timeout: float | None = None  # None: the shared client's timeout

    def secret_refs(self) -> dict[str, SecretRef]:
        return {"client_secret": self.client_secret} if self.client_secret else {}


@dataclass(frozen=True, kw_only=True)
class ClientCredentialsSettings(TokenEndpointSettings):
    pass


@dataclass(frozen=True, kw_only=True)
class TokenExchangeSettings(TokenEndpointSettings):
    requested_token_type: str | None = None
    subject_audience: str | None = None  # the subject JWT's "aud"; default: token_url
    subject_ttl: float = DEFAULT_SUBJECT_TTL


def parse_client_credentials(src: Source, p: Path_, m: dict[str, Any], base: Path) -> ClientCredentialsSettings | None:
    kw = _parse_endpoint(src, p, m, base, exchange=False)
    return None if kw is None else ClientCredentialsSettings(**kw)


def parse_token_exchange(src: Source, p: Path_, m: dict[str, Any], base: Path) -> TokenExchangeSettings | None:
    n = len(src.issues)
    kw = _parse_endpoint(src, p, m, base, exchange=True) or {}
    if "requested_token_type" in m:
        v = kw["requested_token_type"] = src.string(p + ("requested_token_type",), m["requested_token_type"])
        if v is not None and not _URI.match(v):
            src.error(p + ("requested_token_type",), "must be a token type URI such as "
                      f"urn:ietf:params:oauth:token-type:access_token, got {v!r}")
    if "subject_audience" in m:
        kw["subject_audience"] = src.string(p + ("subject_audience",), m["subject_audience"])
    if "subject_ttl_seconds" in m:
        # RFC 8693 leaves it open; the subject only has to survive one exchange: at most 5 minutes.
        kw["subject_ttl"] = fields.seconds(src, p + ("subject_ttl_seconds",), m["subject_ttl_seconds"],
                                           lo=60, hi=300)
    return TokenExchangeSettings(**kw) if len(src.issues) == n else None


def _parse_endpoint(src: Source, p: Path_, m: dict[str, Any], base: Path, *, exchange: bool) -> dict[str, Any] | None:
    n = len(src.issues)
    token_url = fields.url(src, p + ("token_url",), m["token_url"])
    client_id = src.string(p + ("client_id",), m["client_id"]) if "client_id" in m else None
    if client_id is not None and _HEADER_UNSAFE.search(client_id):
        src.error(p + ("client_id",), "must not contain control characters")
    secret = fields.secret_ref(src, p + ("client_secret",), m["client_secret"], base) if "client_secret" in m else None
    auth = _auth_method(src, p, m, exchange=exchange)
    if auth != "none" and "client_id" not in m:
        src.error(p, f"missing required key 'client_id' ({auth} authenticates a client)")
    kw: dict[str, Any] = {"token_url": token_url, "client_id": client_id, "auth": auth, "client_secret": secret}
    if "assertion_audience" in m:
        kw["assertion_audience"] = src.string(p + ("assertion_audience",), m["assertion_audience"])
        if auth != "private_key_jwt":
            src.error(p + ("assertion_audience",), "only applies with client_auth: private_key_jwt")
    if "scopes" in m and (scopes := src.string_list(p + ("scopes",), m["scopes"])) is not None:
        for i, scope in enumerate(scopes):
            if not _SCOPE_TOKEN.match(scope):
                src.error(p + ("scopes", i), f"invalid scope {scope!r}: one scope per item, no spaces, quotes or backslashes")
        kw["scopes"] = tuple(scopes)
    if "audience" in m and (aud := src.string_list(p + ("audience",), m["audience"])) is not None:
        kw["audience"] = tuple(aud)
    if "resource" in m and (res := src.string_list(p + ("resource",), m["resource"])) is not None:
        for i, r in enumerate(res):
            try:
                parts = urlsplit(r)
            except ValueError:  # an unbalanced '[' in the authority
                parts = None
            if parts is None or not parts.scheme or not (parts.netloc or parts.path) or parts.fragment or "#" in r:
                # RFC 8707 §2: an absolute URI without a fragment.
                src.error(p + ("resource", i), f"must be an absolute URI without a fragment, got {r!r}")
        kw["resource"] = tuple(res)
    if "params" in m:
        kw["params"] = _params(src, p + ("params",), m["params"])
    if "revocation_url" in m:
        kw["revocation_url"] = fields.url(src, p + ("revocation_url",), m["revocation_url"])
    if "timeout_seconds" in m:
        kw["timeout"] = fields.seconds(src, p + ("timeout_seconds",), m["timeout_seconds"], lo=0.1, hi=120)
    return kw if len(src.issues) == n else None


def _auth_method(src: Source, p: Path_, m: dict[str, Any], *, exchange: bool) -> AuthMethod:
    """Exactly one way to authenticate the client: a secret, the proxy's key, or (exchange only) none."""
    choices = ("client_secret", "private_key_jwt", "none") if exchange else ("client_secret", "private_key_jwt")
    has_secret = "client_secret" in m
    if "client_auth" in m:
        declared = src.choice(p + ("client_auth",), m["client_auth"], choices)
    else:
        declared = "client_secret" if has_secret else ("none" if exchange else None)
        if declared is None:
            src.error(p, "give client_secret (a secret reference) or client_auth: private_key_jwt "
                         "(an assertion signed by the proxy's key) to authenticate to the token endpoint")
    if declared is None:
        return "none"  # already reported
    if declared == "client_secret" and not has_secret:
        src.error(p + ("client_auth",), "client_auth: client_secret needs a client_secret reference")
    elif declared in ("private_key_jwt", "none") and has_secret:
        src.error(p + ("client_secret",), f"client_auth is {declared}: remove client_secret, or remove "
                  "client_auth to authenticate with the secret")
    if declared == "client_secret":
        how = src.choice(p + ("client_secret_method",), m.get("client_secret_method", "basic"), ("basic", "post"))
        return "client_secret_post" if how == "post" else "client_secret_basic"
    if "client_secret_method" in m:
        src.error(p + ("client_secret_method",), "only applies when authenticating with client_secret")
    return "private_key_jwt" if declared == "private_key_jwt" else "none"


def _params(src: Source, p: Path_, value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        src.error(p, f"must be a mapping of parameter names to strings, got {type_name(value)}")
        return ()
    out = []
    for key, v in value.items():
        if key in _RESERVED_PARAMS:
            src.error(p + (key,), f"parameter {key!r} is set by the proxy (use scopes:, audience:, "
                      "resource: or the client auth keys); it cannot be a free parameter")
        elif (s := src.string(p + (key,), v, empty_ok=True)) is not None:
            out.append((key, s))
    return tuple(out)


class _TokenEndpointProvider(Provider):
    """Shared by both grants: client authentication, the POST, and reading the token response."""

    settings: TokenEndpointSettings
    token_types: frozenset[str] = frozenset({"bearer"})

    def __init__(self, credential: Credential, deps: ProviderDeps) -> None:
        super().__init__(credential, deps)
        # Revocable only where an RFC 7009 endpoint is configured (base declares it per class).
        self.revocable = self.settings.revocation_url is not None  # type: ignore[misc]

    @property
    def revocation_target(self) -> str | None:
        return self.settings.revocation_url

    def _form(self) -> dict[str, str | list[str]]:
        s = self.settings
        form: dict[str, str | list[str]] = {}
        if s.scopes:
            form["scope"] = " ".join(s.scopes)
        if s.audience:
            form["audience"] = list(s.audience)
        if s.resource:
            form["resource"] = list(s.resource)
        form.update(s.params)
        return form

    def _authenticate(self, form: dict[str, str | list[str]], url: str) -> dict[str, str]:
        """Add client authentication for a request to ``url``; returns the extra headers."""
        s = self.settings
        if s.auth == "none":
            if s.client_id:
                form["client_id"] = s.client_id  # RFC 6749 §2.3: a public client names itself
            return {}
        assert s.client_id is not None  # parse requires it
        if s.auth == "private_key_jwt":
            signer = self.deps.signer
            if signer is None:
                raise ProviderError(f"credential {self.name!r} uses private_key_jwt but the proxy has no "
                                    "signing key", retryable=False)
            # RFC 7523 §3: iss = sub = client_id, aud = the authorization server (the URL called).
            form["client_assertion_type"] = ASSERTION_TYPE
            form["client_assertion"] = signer.mint(
                {"iss": s.client_id, "sub": s.client_id, "aud": s.assertion_audience or url}, ttl=ASSERTION_TTL)
            form["client_id"] = s.client_id
            return {}
        assert s.client_secret is not None
        try:
            secret = s.client_secret.resolve()
        except SecretUnavailable as exc:
            raise ProviderError(f"credential {self.name!r}: {exc}", retryable=False) from None
        if s.auth == "client_secret_post":
            form["client_id"] = s.client_id
            form["client_secret"] = secret.reveal()
            return {}
        # RFC 6749 §2.3.1: both parts are form-urlencoded before Base64 (':' in an ID is legal).
        pair = f"{quote_plus(s.client_id)}:{quote_plus(secret.reveal())}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}

    async def _post(self, url: str, form: dict[str, str | list[str]], what: str) -> httpx.Response:
        http = self.deps.http
        if http is None:
            raise ProviderError(f"credential {self.name!r}: the proxy has no HTTP client", retryable=False)
        headers = {"Accept": "application/json", **self._authenticate(form, url)}
        timeout = self.settings.timeout
        try:
            # Redirects are not followed (httpx's default): a credential is never re-sent elsewhere.
            return await http.post(url, data=form, headers=headers,
                                   timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout)
        except httpx.TimeoutException as exc:
            raise ProviderError(f"{what} {url} timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            # Transport errors describe the connection (refused, TLS verification), never a body.
            raise ProviderError(f"cannot reach {what} {url}: {type(exc).__name__}: {str(exc)[:200]}") from exc

    @staticmethod
    def _check_status(resp: httpx.Response, url: str, what: str) -> None:
        status = resp.status_code
        if 200 <= status < 300:
            return
        code = _error_code(resp)
        msg = f"{what} {url} answered HTTP {status}" + (f" with error {code}" if code else "")
        if code == "invalid_client" or status == 401:
            msg += ": check client_id and the client secret, or the key registered for the client"
        raise ProviderError(msg, retryable=status >= 500 or status in (408, 429))

    async def _token(self, ctx: RequestContext, form: dict[str, str | list[str]], *, scope: str) -> IssuedCredential:
        url = self.settings.token_url
        started = self.deps.now()
        resp = await self._post(url, form, "token endpoint")
        self._check_status(resp, url, "token endpoint")
        prefix = f"token endpoint {url} answered HTTP {resp.status_code}"
        try:
            body = resp.json()
        except (ValueError, UnicodeDecodeError):
            # Often a gateway's error page: worth a retry.
            raise ProviderError(f"{prefix} with a body that is not JSON") from None
        if not isinstance(body, dict):
            raise ProviderError(f"{prefix} with JSON that is not an object")
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise ProviderError(f"{prefix} without an access_token", retryable=False)
        if _HEADER_UNSAFE.search(token):
            raise ProviderError(f"{prefix} with an access_token that cannot go in an HTTP header", retryable=False)
        token_type = body.get("token_type")
        if token_type is not None and (not isinstance(token_type, str) or token_type.lower() not in self.token_types):
            shown = token_type if isinstance(token_type, str) and token_type.isalnum() and len(token_type) < 20 else "?"
            raise ProviderError(f"{prefix} with token_type {shown!r}; only {'/'.join(sorted(self.token_types))} "
                                "tokens can be injected", retryable=False)
        lifetime = _expires_in(body.get("expires_in"))
        if lifetime is None:
            raise ProviderError(f"{prefix} with an invalid expires_in (a positive number of seconds)",
                                retryable=False)
        meta = {"token_type": token_type or "Bearer"}
        for key in ("scope", "issued_token_type"):
            if isinstance(v := body.get(key), str) and len(v) <= 1024 and not _HEADER_UNSAFE.search(v):
                meta[key] = v
        self._check_response(body, prefix)
        return IssuedCredential(name=self.name, kind=self.kind, secret=Secret(token),
                                expires_at=started + lifetime, issued_at=started, scope=scope, meta=meta)

    def _check_response(self, body: dict[str, Any], prefix: str) -> None:
        """Grant-specific checks of a successful token response."""

    async def revoke(self, cred: IssuedCredential) -> None:
        """RFC 7009: tell the server the token is no longer needed."""
        url = self.settings.revocation_url
        if url is None:
            return
        form: dict[str, str | list[str]] = {"token": cred.secret.reveal(), "token_type_hint": "access_token"}
        resp = await self._post(url, form, "revocation endpoint")
        # RFC 7009 §2.2: 200 even for an unknown or expired token; 503 means try again later.
        self._check_status(resp, url, "revocation endpoint")


class ClientCredentialsProvider(_TokenEndpointProvider):
    kind = "oauth2_client_credentials"

    def scope(self, ctx: RequestContext) -> str | None:
        return ""  # one token for the proxy's client, whichever workload asked

    async def fetch(self, ctx: RequestContext) -> IssuedCredential:
        form = {"grant_type": GRANT_CLIENT_CREDENTIALS, **self._form()}
        return await self._token(ctx, form, scope="")


class TokenExchangeProvider(_TokenEndpointProvider):
    kind = "oauth2_token_exchange"
    settings: TokenExchangeSettings
    # RFC 8693 §2.2.1: "N_A" when the issued token is not an access token (e.g. an ID token).
    token_types = frozenset({"bearer", "n_a"})

    def scope(self, ctx: RequestContext) -> str | None:
        return ctx.workload.spiffe_id  # the token speaks for this workload only

    async def fetch(self, ctx: RequestContext) -> IssuedCredential:
        s = self.settings
        signer = self.deps.signer
        if signer is None:
            raise ProviderError(f"credential {self.name!r} needs the proxy's signing key for the subject token",
                                retryable=False)
        subject = signer.mint({"sub": ctx.workload.spiffe_id, "aud": s.subject_audience or s.token_url},
                              ttl=s.subject_ttl)
        form: dict[str, str | list[str]] = {"grant_type": GRANT_TOKEN_EXCHANGE, "subject_token": subject,
                                            "subject_token_type": TOKEN_TYPE_JWT}
        if s.requested_token_type:
            form["requested_token_type"] = s.requested_token_type
        form.update(self._form())
        return await self._token(ctx, form, scope=ctx.workload.spiffe_id)

    def _check_response(self, body: dict[str, Any], prefix: str) -> None:
        wanted = self.settings.requested_token_type
        if wanted and body.get("issued_token_type") not in (None, wanted):
            raise ProviderError(f"{prefix} with an issued_token_type other than the requested {wanted}",
                                retryable=False)


def _expires_in(value: Any) -> float | None:
    if value is None:
        return DEFAULT_EXPIRES_IN
    if isinstance(value, str) and value.isdigit():
        value = int(value)  # some servers send a string
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 10**9:
        return None
    return float(value)


def _error_code(resp: httpx.Response) -> str | None:
    try:
        body = resp.json()
    except (ValueError, UnicodeDecodeError):
        return None
    code = body.get("error") if isinstance(body, dict) else None
    return code if code in _ERROR_CODES else None


KINDS = [
    CredentialKind(name=ClientCredentialsProvider.kind, required=("token_url", "client_id"),
                   optional=tuple(k for k in _COMMON if k != "client_id"),
                   parse=parse_client_credentials, provider=ClientCredentialsProvider),
    CredentialKind(name=TokenExchangeProvider.kind, required=("token_url",),
                   optional=(*_COMMON, "requested_token_type", "subject_audience", "subject_ttl_seconds"),
                   parse=parse_token_exchange, provider=TokenExchangeProvider),
]
