"""Tests for credentials/oauth2.py: client credentials and token exchange against a real, strict
HTTPS authorization server on loopback (tests/helpers/idp.py), and their config parsing."""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import httpx
import jwt
import pytest
from helpers.idp import ACCESS_TOKEN_TYPE, BODY_MARKER, IdP
from helpers.providers import BILLING, CREDS_FILE, NOW, REPORTS, config_head, ctx, load_credential, load_example
from helpers.proxy import Pki

from secretless_proxy.config.model import Credential
from secretless_proxy.credentials.base import ProviderDeps, ProviderError
from secretless_proxy.credentials.oauth2 import (
    ASSERTION_TYPE,
    DEFAULT_EXPIRES_IN,
    GRANT_TOKEN_EXCHANGE,
    TOKEN_TYPE_JWT,
    ClientCredentialsProvider,
    ClientCredentialsSettings,
    TokenExchangeProvider,
    TokenExchangeSettings,
)
from secretless_proxy.dev import certs
from secretless_proxy.errors import ConfigError
from secretless_proxy.secretrefs import SecretRef
from secretless_proxy.signing import JwtSigner

# ':' '/' '+' '&' '=' '%' and a space: RFC 6749 §2.3.1 form-urlencoding must survive them all.
SECRET = "s3cr:t/+&=% shh"
@pytest.fixture(scope="module")
def idp_cert(pki: Pki) -> certs.Issued:
    return certs.make_server_cert(ca=pki.upstream_ca)


@pytest.fixture(scope="module")
def signer() -> JwtSigner:
    return JwtSigner.generate(issuer="https://secretless.test")


@pytest.fixture
def idp(idp_cert: certs.Issued, signer: JwtSigner) -> Iterator[IdP]:
    with IdP(server_cert=idp_cert, clients={"billing": SECRET, "keyed": None}, jwks=signer.jwks()) as server:
        yield server
    assert not server.errors, server.errors[0]


@pytest.fixture
async def http(pki: Pki) -> AsyncIterator[httpx.AsyncClient]:
    tls = ssl.create_default_context(cafile=str(pki.upstream_ca_file))
    async with httpx.AsyncClient(verify=tls, trust_env=False, timeout=5) as client:
        yield client


@pytest.fixture
def deps(http: httpx.AsyncClient, signer: JwtSigner) -> ProviderDeps:
    return ProviderDeps(http=http, signer=signer, now=lambda: NOW)


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TEST_OAUTH_SECRET", SECRET)
    return "env:TEST_OAUTH_SECRET"


def client_credentials(idp: IdP, deps: ProviderDeps, **kw: Any) -> ClientCredentialsProvider:
    """A client-credentials provider for the 'billing' client (basic auth unless ``kw`` says otherwise)."""
    kw.setdefault("client_id", "billing")
    if kw.setdefault("auth", "client_secret_basic").startswith("client_secret"):
        kw.setdefault("client_secret", SecretRef.parse("env:TEST_OAUTH_SECRET"))
    settings = ClientCredentialsSettings(token_url=idp.token_url, **kw)
    return ClientCredentialsProvider(Credential(name="payments", kind="oauth2_client_credentials",
                                                settings=settings), deps)


def token_exchange(idp: IdP, deps: ProviderDeps, **kw: Any) -> TokenExchangeProvider:
    """A token-exchange provider authenticating as the key-based client 'keyed' unless ``kw`` says otherwise."""
    kw.setdefault("auth", "private_key_jwt")
    kw.setdefault("client_id", "keyed")
    settings = TokenExchangeSettings(token_url=idp.token_url, **kw)
    return TokenExchangeProvider(Credential(name="orders", kind="oauth2_token_exchange", settings=settings), deps)


def assert_clean(exc: ProviderError) -> None:
    """Neither the server's body nor the client secret made it into the error."""
    for text in (str(exc), repr(exc), *map(str, exc.args)):
        assert BODY_MARKER not in text
        assert SECRET not in text and quote_plus(SECRET) not in text


@pytest.mark.usefixtures("secret_env")
class TestClientCredentials:
    async def test_basic_auth_accepted(self, idp: IdP, deps: ProviderDeps) -> None:
        """client_secret_basic: the IdP accepts the Basic header, the token comes back with its lifetime."""
        cred = await client_credentials(idp, deps).fetch(ctx())
        (req,) = idp.requests
        assert cred.secret.reveal() in idp.issued
        assert (cred.name, cred.kind, cred.scope) == ("payments", "oauth2_client_credentials", "")
        assert (cred.issued_at, cred.expires_at) == (NOW, NOW + 3600)
        assert cred.meta["token_type"] == "Bearer"
        assert req.one("grant_type") == "client_credentials"
        assert "client_secret" not in req.form and "client_id" not in req.form
        assert req.headers["accept"] == "application/json"

    async def test_basic_auth_form_urlencodes_both_parts(self, idp: IdP, deps: ProviderDeps) -> None:
        """RFC 6749 §2.3.1: client ID and secret are form-urlencoded before Base64."""
        await client_credentials(idp, deps).fetch(ctx())
        raw = base64.b64decode(idp.requests[0].headers["authorization"].removeprefix("Basic ")).decode()
        assert raw == f"billing:{quote_plus(SECRET)}"

    async def test_post_auth_accepted(self, idp: IdP, deps: ProviderDeps) -> None:
        """client_secret_post: ID and secret go in the form body, no Authorization header."""
        cred = await client_credentials(idp, deps, auth="client_secret_post").fetch(ctx())
        (req,) = idp.requests
        assert cred.secret.reveal() in idp.issued
        assert (req.one("client_id"), req.one("client_secret")) == ("billing", SECRET)
        assert "authorization" not in req.headers

    async def test_private_key_jwt_accepted(self, idp: IdP, deps: ProviderDeps, signer: JwtSigner) -> None:
        """private_key_jwt: an RFC 7523 assertion (iss = sub = client_id, aud = token URL) the IdP verifies."""
        cred = await client_credentials(idp, deps, client_id="keyed", auth="private_key_jwt").fetch(ctx())
        (req,) = idp.requests
        assert idp.issued[cred.secret.reveal()]["client_id"] == "keyed"
        assert req.one("client_assertion_type") == ASSERTION_TYPE
        assert "client_secret" not in req.form and "authorization" not in req.headers
        claims = jwt.decode(req.one("client_assertion") or "", options={"verify_signature": False})
        assert (claims["iss"], claims["sub"], claims["aud"]) == ("keyed", "keyed", idp.token_url)
        assert 0 < claims["exp"] - claims["iat"] <= 60
        assert jwt.get_unverified_header(req.one("client_assertion") or "")["kid"] == signer.kid

    async def test_private_key_jwt_fresh_assertion_each_time(self, idp: IdP, deps: ProviderDeps) -> None:
        """Each fetch signs a new assertion, so the IdP's replay check (jti) never trips."""
        provider = client_credentials(idp, deps, client_id="keyed", auth="private_key_jwt")
        first, second = await provider.fetch(ctx()), await provider.fetch(ctx())
        assert first.secret != second.secret
        assert idp.calls["client_credentials"] == 2 and not idp.rejections

    async def test_assertion_audience_override(self, idp: IdP, deps: ProviderDeps) -> None:
        """assertion_audience replaces the token URL as the assertion's aud (servers that want their issuer)."""
        idp.assertion_audience = "https://idp.example/issuer"
        provider = client_credentials(idp, deps, client_id="keyed", auth="private_key_jwt",
                                      assertion_audience="https://idp.example/issuer")
        assert (await provider.fetch(ctx())).secret.reveal() in idp.issued

    async def test_foreign_key_rejected(self, idp: IdP, http: httpx.AsyncClient, signer: JwtSigner) -> None:
        """An assertion signed by another key (even under the registered kid) is invalid_client, not retryable."""
        impostor = JwtSigner.generate(issuer="https://other", key_id=signer.kid)
        stranger = ProviderDeps(http=http, signer=impostor, now=lambda: NOW)
        with pytest.raises(ProviderError, match=r"answered HTTP 401 with error invalid_client: check client_id") as info:
            await client_credentials(idp, stranger, client_id="keyed", auth="private_key_jwt").fetch(ctx())
        assert info.value.retryable is False
        assert "client assertion rejected: InvalidSignatureError" in idp.rejections[0]

    async def test_wrong_secret_rejected(self, idp: IdP, deps: ProviderDeps, monkeypatch: pytest.MonkeyPatch) -> None:
        """A wrong secret is a non-retryable ProviderError that names the status, not the secret or body."""
        monkeypatch.setenv("TEST_OAUTH_SECRET", "wrong-" + SECRET)
        with pytest.raises(ProviderError, match=r"token endpoint https://localhost:\d+/token answered HTTP 401 "
                                                r"with error invalid_client") as info:
            await client_credentials(idp, deps).fetch(ctx())
        assert info.value.retryable is False
        assert_clean(info.value)
        assert "wrong-" not in str(info.value)

    async def test_unset_secret(self, idp: IdP, deps: ProviderDeps, monkeypatch: pytest.MonkeyPatch) -> None:
        """A secret reference that does not resolve fails before any request, naming the reference."""
        monkeypatch.delenv("TEST_OAUTH_SECRET")
        with pytest.raises(ProviderError, match="environment variable TEST_OAUTH_SECRET is not set") as info:
            await client_credentials(idp, deps).fetch(ctx())
        assert info.value.retryable is False and not idp.requests

    async def test_scopes_audience_resource_params_forwarded(self, idp: IdP, deps: ProviderDeps) -> None:
        """Scopes go space-separated in one scope; audience and resource repeat; free params pass through."""
        provider = client_credentials(idp, deps, scopes=("payments:read", "payments:write"),
                                      audience=("https://pay.example", "https://ledger.example"),
                                      resource=("https://pay.example/v1",), params=(("tenant", "acme"),))
        cred = await provider.fetch(ctx())
        req = idp.requests[0]
        assert req.form["scope"] == ["payments:read payments:write"]
        assert req.form["audience"] == ["https://pay.example", "https://ledger.example"]
        assert req.form["resource"] == ["https://pay.example/v1"]
        assert req.form["tenant"] == ["acme"]
        assert cred.meta["scope"] == "payments:read payments:write"

    @pytest.mark.parametrize(("sent", "lifetime"), [(120, 120.0), ("90", 90.0), (1.5, 1.5)])
    async def test_expires_in_honoured(self, idp: IdP, deps: ProviderDeps, sent: Any, lifetime: float) -> None:
        """expires_at is the request's start plus expires_in (a number, or digits in a string)."""
        idp.expires_in = sent
        cred = await client_credentials(idp, deps).fetch(ctx())
        assert cred.expires_at == NOW + lifetime and cred.lifetime == lifetime

    async def test_expires_at_measured_from_request_start(self, idp: IdP, http: httpx.AsyncClient,
                                                          signer: JwtSigner) -> None:
        """With the real clock, expires_at ≈ now + expires_in and never later."""
        import time

        idp.expires_in = 600
        before = time.time()
        cred = await client_credentials(idp, ProviderDeps(http=http, signer=signer)).fetch(ctx())
        assert before + 600 <= (cred.expires_at or 0) <= time.time() + 600

    async def test_missing_expires_in_uses_default(self, idp: IdP, deps: ProviderDeps) -> None:
        """Without expires_in the token is taken to live DEFAULT_EXPIRES_IN (300 s)."""
        idp.mode = "no_expires_in"
        cred = await client_credentials(idp, deps).fetch(ctx())
        assert DEFAULT_EXPIRES_IN == 300 and cred.expires_at == NOW + 300

    async def test_token_type_case_insensitive(self, idp: IdP, deps: ProviderDeps) -> None:
        """token_type 'bearer' is Bearer (RFC 6749 §5.1: case-insensitive)."""
        idp.token_type = "bearer"
        assert (await client_credentials(idp, deps).fetch(ctx())).meta["token_type"] == "bearer"

    async def test_non_bearer_token_refused(self, idp: IdP, deps: ProviderDeps) -> None:
        """A DPoP (or any non-Bearer) token cannot be injected as is: non-retryable error."""
        idp.token_type = "DPoP"
        with pytest.raises(ProviderError, match="with token_type 'DPoP'; only bearer tokens can be injected") as info:
            await client_credentials(idp, deps).fetch(ctx())
        assert info.value.retryable is False

    async def test_shared_scope(self, idp: IdP, deps: ProviderDeps) -> None:
        """One token for the client: the cache scope is '' whichever workload asks."""
        provider = client_credentials(idp, deps)
        assert provider.scope(ctx(BILLING)) == provider.scope(ctx(REPORTS)) == ""

    async def test_no_http_client(self, idp: IdP, signer: JwtSigner) -> None:
        """Without the shared HTTP client (a wiring bug) the provider fails closed."""
        with pytest.raises(ProviderError, match="the proxy has no HTTP client"):
            await client_credentials(idp, ProviderDeps(signer=signer)).fetch(ctx())


@pytest.mark.usefixtures("secret_env")
class TestFailures:
    @pytest.mark.parametrize(
        ("mode", "expires_in", "message", "retryable"),
        [
            ("invalid_client", 3600, r"answered HTTP 401 with error invalid_client: check client_id", False),
            ("server_error", 3600, r"answered HTTP 500$", True),
            ("malformed", 3600, r"answered HTTP 200 with a body that is not JSON", True),
            ("empty", 3600, r"answered HTTP 200 with a body that is not JSON", True),
            ("no_access_token", 3600, r"answered HTTP 200 without an access_token", False),
            (None, 0, r"answered HTTP 200 with an invalid expires_in \(a positive number of seconds\)", False),
            (None, -5, r"answered HTTP 200 with an invalid expires_in", False),
            (None, "soon", r"answered HTTP 200 with an invalid expires_in", False),
            (None, True, r"answered HTTP 200 with an invalid expires_in", False),
        ],
        ids=["401-invalid-client", "500", "malformed-json", "empty-body", "no-access-token",
             "expires-in-zero", "expires-in-negative", "expires-in-text", "expires-in-bool"],
    )
    async def test_bad_answer(self, idp: IdP, deps: ProviderDeps, mode: str | None, expires_in: Any,
                              message: str, retryable: bool) -> None:
        """Each bad answer is a ProviderError with our own message, never the body, and the right retryability."""
        idp.mode, idp.expires_in = mode, expires_in
        with pytest.raises(ProviderError, match=r"^token endpoint https://localhost:\d+/token " + message) as info:
            await client_credentials(idp, deps, auth="client_secret_post").fetch(ctx())
        assert info.value.retryable is retryable
        assert info.value.reason == "credential_unavailable"
        assert_clean(info.value)

    async def test_hang_times_out(self, idp: IdP, deps: ProviderDeps) -> None:
        """A token endpoint that does not answer within timeout_seconds is a retryable timeout."""
        idp.mode, idp.hang_seconds = "hang", 10
        with pytest.raises(ProviderError, match=r"token endpoint https://localhost:\d+/token timed out \(ReadTimeout\)") as info:
            await client_credentials(idp, deps, timeout=0.3).fetch(ctx())
        assert info.value.retryable is True
        assert_clean(info.value)

    async def test_connection_refused(self, idp: IdP, deps: ProviderDeps, idp_cert: certs.Issued) -> None:
        """Nothing listening is a retryable 'cannot reach' error."""
        with IdP(server_cert=idp_cert) as gone:
            url = gone.token_url
        provider = client_credentials(idp, deps)
        provider.settings = replace(provider.settings, token_url=url)
        with pytest.raises(ProviderError, match=r"cannot reach token endpoint https://localhost:\d+/token: ConnectError") as info:
            await provider.fetch(ctx())
        assert info.value.retryable is True

    async def test_untrusted_certificate(self, idp: IdP, signer: JwtSigner) -> None:
        """A token endpoint whose certificate the proxy does not trust gets no secret: verification error."""
        async with httpx.AsyncClient(trust_env=False) as untrusting:
            provider = client_credentials(idp, ProviderDeps(http=untrusting, signer=signer),
                                          auth="client_secret_post")
            with pytest.raises(ProviderError, match="cannot reach token endpoint .*CERTIFICATE_VERIFY_FAILED"):
                await provider.fetch(ctx())
        assert not idp.requests

    async def test_unknown_error_code_not_repeated(self, idp: IdP, deps: ProviderDeps) -> None:
        """Only RFC error codes from a closed list are repeated; the description never is."""
        idp.clients["billing"] = "other"
        with pytest.raises(ProviderError) as info:
            await client_credentials(idp, deps).fetch(ctx())
        assert "error_description" not in str(info.value) and "wrong secret" not in str(info.value)


@pytest.mark.usefixtures("secret_env")
class TestRevocation:
    async def test_revocable_only_with_endpoint(self, idp: IdP, deps: ProviderDeps) -> None:
        """A provider is revocable exactly when revocation_url is configured."""
        assert client_credentials(idp, deps).revocable is False
        assert client_credentials(idp, deps, revocation_url=idp.revoke_url).revocable is True
        assert ClientCredentialsProvider.revocable is False

    async def test_revoke_sends_token(self, idp: IdP, deps: ProviderDeps) -> None:
        """RFC 7009: the token and token_type_hint=access_token go to the revocation endpoint, authenticated."""
        provider = client_credentials(idp, deps, revocation_url=idp.revoke_url)
        cred = await provider.fetch(ctx())
        await provider.revoke(cred)
        assert idp.revoked == [(cred.secret.reveal(), "access_token")]
        assert idp.requests[-1].headers["authorization"].startswith("Basic ")

    async def test_revoke_with_private_key_jwt(self, idp: IdP, deps: ProviderDeps) -> None:
        """With private_key_jwt the revocation request carries a fresh assertion for the revocation URL."""
        provider = client_credentials(idp, deps, client_id="keyed", auth="private_key_jwt",
                                      revocation_url=idp.revoke_url)
        cred = await provider.fetch(ctx())
        await provider.revoke(cred)
        assert idp.revoked == [(cred.secret.reveal(), "access_token")] and not idp.rejections

    async def test_revoke_unavailable_is_retryable(self, idp: IdP, deps: ProviderDeps) -> None:
        """503 from the revocation endpoint is a retryable error without the body."""
        provider = client_credentials(idp, deps, revocation_url=idp.revoke_url)
        cred = await provider.fetch(ctx())
        idp.revoke_mode = "server_error"
        with pytest.raises(ProviderError, match=r"revocation endpoint https://localhost:\d+/revoke answered HTTP 503") as info:
            await provider.revoke(cred)
        assert info.value.retryable is True
        assert_clean(info.value)


class TestTokenExchange:
    async def test_subject_verified_by_idp(self, idp: IdP, deps: ProviderDeps, signer: JwtSigner) -> None:
        """The subject JWT verifies against the proxy's JWKS, with sub = the workload and aud = the token URL."""
        cred = await token_exchange(idp, deps).fetch(ctx())
        (subject,) = idp.subjects
        assert subject["sub"] == BILLING and subject["aud"] == idp.token_url
        assert subject["iss"] == signer.issuer
        assert 60 <= subject["exp"] - subject["iat"] <= 300
        assert idp.issued[cred.secret.reveal()]["sub"] == BILLING
        req = idp.requests[0]
        assert (req.one("grant_type"), req.one("subject_token_type")) == (GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_JWT)
        assert (cred.scope, cred.expires_at, cred.kind) == (BILLING, NOW + 3600, "oauth2_token_exchange")

    async def test_scope_per_workload(self, idp: IdP, deps: ProviderDeps) -> None:
        """Each workload gets its own token, scoped to its SPIFFE ID."""
        provider = token_exchange(idp, deps)
        a, b = await provider.fetch(ctx(BILLING)), await provider.fetch(ctx(REPORTS))
        assert (provider.scope(ctx(BILLING)), provider.scope(ctx(REPORTS))) == (BILLING, REPORTS)
        assert (a.scope, b.scope) == (BILLING, REPORTS)
        assert [s["sub"] for s in idp.subjects] == [BILLING, REPORTS]

    async def test_subject_audience_and_ttl(self, idp: IdP, deps: ProviderDeps) -> None:
        """subject_audience and subject_ttl set the subject JWT's aud and lifetime."""
        idp.subject_audience = "https://sts.example"
        await token_exchange(idp, deps, subject_audience="https://sts.example", subject_ttl=60).fetch(ctx())
        (subject,) = idp.subjects
        assert subject["aud"] == "https://sts.example" and subject["exp"] - subject["iat"] == 60

    async def test_target_forwarded(self, idp: IdP, deps: ProviderDeps) -> None:
        """audience, resource, scope and requested_token_type reach the STS; issued_token_type comes back."""
        await token_exchange(idp, deps, audience=("https://orders.example",),
                             resource=("https://orders.example/v2",), scopes=("orders:read",),
                             requested_token_type=ACCESS_TOKEN_TYPE).fetch(ctx())
        req = idp.requests[0]
        assert (req.form["audience"], req.form["resource"]) == (["https://orders.example"], ["https://orders.example/v2"])
        assert (req.one("scope"), req.one("requested_token_type")) == ("orders:read", ACCESS_TOKEN_TYPE)

    async def test_issued_token_type_in_meta(self, idp: IdP, deps: ProviderDeps) -> None:
        """The issued_token_type the STS reports is kept as a non-secret fact."""
        cred = await token_exchange(idp, deps, requested_token_type=TOKEN_TYPE_JWT).fetch(ctx())
        assert cred.meta["issued_token_type"] == TOKEN_TYPE_JWT

    async def test_jwks_fetched_by_url(self, idp: IdP, deps: ProviderDeps, signer: JwtSigner, pki: Pki) -> None:
        """An STS that fetches the proxy's JWKS from a URL verifies the subject the same way."""
        idp.published_jwks, idp.jwks, idp.jwks_ca = signer.jwks(), idp.jwks_url, str(pki.upstream_ca_file)
        await token_exchange(idp, deps).fetch(ctx())
        assert idp.subjects[0]["sub"] == BILLING

    async def test_public_client(self, idp: IdP, deps: ProviderDeps) -> None:
        """client_auth none: no client authentication, the client_id (if any) named in the form."""
        idp.allow_public = True
        await token_exchange(idp, deps, auth="none", client_id="public-app").fetch(ctx())
        req = idp.requests[0]
        assert req.one("client_id") == "public-app"
        assert "client_assertion" not in req.form and "authorization" not in req.headers

    async def test_client_secret(self, idp: IdP, deps: ProviderDeps, secret_env: str) -> None:
        """Token exchange can authenticate the proxy's client with a secret too."""
        await token_exchange(idp, deps, auth="client_secret_basic", client_id="billing",
                             client_secret=SecretRef.parse(secret_env)).fetch(ctx())
        assert idp.subjects[0]["sub"] == BILLING

    async def test_foreign_subject_rejected(self, idp: IdP, http: httpx.AsyncClient) -> None:
        """A subject signed by a key the STS does not trust is refused: invalid_grant, not retryable."""
        idp.allow_public = True
        stranger = ProviderDeps(http=http, signer=JwtSigner.generate(issuer="https://other"), now=lambda: NOW)
        with pytest.raises(ProviderError, match="answered HTTP 400 with error invalid_grant") as info:
            await token_exchange(idp, stranger, auth="none", client_id=None).fetch(ctx())
        assert info.value.retryable is False
        assert_clean(info.value)

    async def test_na_token_type_accepted(self, idp: IdP, deps: ProviderDeps) -> None:
        """RFC 8693 §2.2.1: token_type N_A (issued token is not an access token) is accepted."""
        idp.token_type = "N_A"
        assert (await token_exchange(idp, deps).fetch(ctx())).meta["token_type"] == "N_A"

    async def test_no_signer(self, idp: IdP, http: httpx.AsyncClient) -> None:
        """Without the proxy's signing key no subject token can be made: non-retryable error."""
        with pytest.raises(ProviderError, match="needs the proxy's signing key for the subject token") as info:
            await token_exchange(idp, ProviderDeps(http=http), auth="none").fetch(ctx())
        assert info.value.retryable is False and not idp.requests


# -- configuration ------------------------------------------------------------------------------

FILE = CREDS_FILE
HEAD = config_head() + "rules: []\ncredentials:\n  pay:\n"  # the credential's keys start on line 8


def load(tmp_path: Path, body: str, **kw: Any):
    return load_credential(tmp_path, HEAD, body, **kw)


CC = "kind: oauth2_client_credentials\ntoken_url: https://idp.example/token\nclient_id: billing\n"  # lines 8-10
TX = "kind: oauth2_token_exchange\ntoken_url: https://sts.example/token\n"  # lines 8-9

MALFORMED = [
    ("no-client-auth", CC, 7, "pay", "give client_secret (a secret reference) or client_auth: private_key_jwt"),
    ("both-client-auths", CC + "client_secret: env:X\nclient_auth: private_key_jwt\n", 11, "pay.client_secret",
     "client_auth is private_key_jwt: remove client_secret, or remove client_auth"),
    ("auth-secret-without-secret", CC + "client_auth: client_secret\n", 11, "pay.client_auth",
     "client_auth: client_secret needs a client_secret reference"),
    ("unknown-client-auth", CC + "client_auth: mtls\n", 11, "pay.client_auth",
     "must be one of client_secret, private_key_jwt, got 'mtls'"),
    ("plaintext-token-url", CC.replace("https://idp.example", "http://idp.example") + "client_secret: env:X\n", 9,
     "pay.token_url", "'http://idp.example/token' would send credentials in plaintext"),
    ("token-url-not-url", CC.replace("https://idp.example/token", "idp.example/token") + "client_secret: env:X\n", 9,
     "pay.token_url", "must be an absolute https:// URL, got 'idp.example/token'"),
    ("misspelled-scopes", CC + "client_secret: env:X\nscope: [a]\n", 12, "pay.scope",
     "unknown key 'scope' (did you mean 'scopes'?"),
    ("bad-secret-method", CC + "client_secret: env:X\nclient_secret_method: digest\n", 12, "pay.client_secret_method",
     "must be one of basic, post, got 'digest'"),
    ("secret-method-with-jwt", CC + "client_auth: private_key_jwt\nclient_secret_method: post\n", 12,
     "pay.client_secret_method", "only applies when authenticating with client_secret"),
    ("scope-with-space", CC + "client_secret: env:X\nscopes: [ok, a b]\n", 12, "pay.scopes[1]",
     "invalid scope 'a b': one scope per item"),
    ("reserved-param", CC + "client_secret: env:X\nparams:\n  grant_type: password\n", 13, "pay.params.grant_type",
     "parameter 'grant_type' is set by the proxy"),
    ("param-not-string", CC + "client_secret: env:X\nparams:\n  tenant: [a]\n", 13, "pay.params.tenant",
     "must be a non-empty string, got a list"),
    ("params-not-mapping", CC + "client_secret: env:X\nparams: [a]\n", 12, "pay.params",
     "must be a mapping of parameter names to strings, got a list"),
    ("resource-with-fragment", CC + "client_secret: env:X\nresource: 'https://api.example/#x'\n", 12,
     "pay.resource[0]", "must be an absolute URI without a fragment"),
    ("timeout-zero", CC + "client_secret: env:X\ntimeout_seconds: 0\n", 12, "pay.timeout_seconds",
     "must be a number of seconds from 0.1 to 120, got 0"),
    ("plaintext-revocation", CC + "client_secret: env:X\nrevocation_url: http://idp.example/revoke\n", 12,
     "pay.revocation_url", "would send credentials in plaintext"),
    ("bad-secret-ref", CC + "client_secret: vault:x\n", 11, "pay.client_secret",
     "invalid secret reference, scheme 'vault' is not env or file"),
    ("assertion-audience-with-secret", CC + "client_secret: env:X\nassertion_audience: x\n", 12,
     "pay.assertion_audience", "only applies with client_auth: private_key_jwt"),
    ("cc-without-client-id", ("kind: oauth2_client_credentials\ntoken_url: https://idp.example/token\n"
                              "client_auth: private_key_jwt\n"), 7, "pay", "missing required key 'client_id'"),
    ("tx-jwt-without-client-id", TX + "client_auth: private_key_jwt\n", 7, "pay",
     "missing required key 'client_id' (private_key_jwt authenticates a client)"),
    ("tx-unknown-client-auth", TX + "client_auth: token\n", 10, "pay.client_auth",
     "must be one of client_secret, private_key_jwt, none, got 'token'"),
    ("tx-none-with-secret", TX + "client_id: a\nclient_auth: none\nclient_secret: env:X\n", 12, "pay.client_secret",
     "client_auth is none: remove client_secret"),
    ("tx-subject-ttl-too-long", TX + "subject_ttl_seconds: 600\n", 10, "pay.subject_ttl_seconds",
     "must be a number of seconds from 60 to 300, got 600"),
    ("tx-requested-type-not-uri", TX + "requested_token_type: access_token\n", 10, "pay.requested_token_type",
     "must be a token type URI such as urn:ietf:params:oauth:token-type:access_token"),
    ("tx-unknown-key", TX + "subject_token: x\n", 10, "pay.subject_token", "unknown key 'subject_token'"),
]


class TestConfig:
    @pytest.mark.parametrize(("body", "line", "path", "fragment"), [c[1:] for c in MALFORMED],
                             ids=[c[0] for c in MALFORMED])
    def test_issue_located(self, tmp_path: Path, body: str, line: int, path: str, fragment: str) -> None:
        """Each problem is reported at its line and exact key path with a message saying what to do."""
        with pytest.raises(ConfigError) as info:
            load(tmp_path, body, resolve_secrets=False)
        located = [i for i in info.value.issues if (i.line, i.path) == (line, f"credentials.{path}")]
        assert any(fragment in i.message for i in located), info.value.issues

    def test_client_credentials_settings(self, tmp_path: Path) -> None:
        """A full client-credentials definition loads into its typed settings."""
        cfg = load(tmp_path, CC + "client_secret: file:secret.txt\nclient_secret_method: post\n"
                   "scopes: [a, b]\naudience: https://api.example\nresource: [https://api.example/v1]\n"
                   "params: {tenant: acme}\nrevocation_url: https://idp.example/revoke\ntimeout_seconds: 2.5\n",
                   resolve_secrets=False)
        s = cfg.credentials["pay"].settings
        assert isinstance(s, ClientCredentialsSettings)
        assert (s.token_url, s.client_id, s.auth) == ("https://idp.example/token", "billing", "client_secret_post")
        assert (s.scopes, s.audience, s.resource) == (("a", "b"), ("https://api.example",), ("https://api.example/v1",))
        assert (s.params, s.revocation_url, s.timeout) == ((("tenant", "acme"),), "https://idp.example/revoke", 2.5)
        assert cfg.credentials["pay"].secret_refs() == {"client_secret": SecretRef.parse(f"file:{tmp_path}/secret.txt")}

    def test_loopback_http_allowed(self, tmp_path: Path) -> None:
        """Plain http:// is accepted for a loopback token endpoint (local development IdPs)."""
        cfg = load(tmp_path, CC.replace("https://idp.example", "http://127.0.0.1:8081") + "client_secret: env:X\n",
                   resolve_secrets=False)
        assert cfg.credentials["pay"].settings.token_url == "http://127.0.0.1:8081/token"

    def test_private_key_jwt_has_no_secret(self, tmp_path: Path) -> None:
        """private_key_jwt needs no secret reference: nothing to resolve at load time."""
        cfg = load(tmp_path, CC + "client_auth: private_key_jwt\n")
        assert cfg.credentials["pay"].settings.auth == "private_key_jwt"
        assert cfg.credentials["pay"].secret_refs() == {}

    def test_unresolvable_secret(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """With secret resolution on, an unset client secret is reported at its key."""
        monkeypatch.delenv("NOPE_UNSET_SECRET", raising=False)
        with pytest.raises(ConfigError, match=r"creds\.yaml:11 credentials\.pay\.client_secret: cannot resolve "
                                              r"env:NOPE_UNSET_SECRET"):
            load(tmp_path, CC + "client_secret: env:NOPE_UNSET_SECRET\n")

    def test_token_exchange_settings(self, tmp_path: Path) -> None:
        """A token-exchange definition without client auth is a public client; its extra keys load."""
        cfg = load(tmp_path, TX + "requested_token_type: urn:ietf:params:oauth:token-type:access_token\n"
                   "subject_audience: https://sts.example\nsubject_ttl_seconds: 90\naudience: [a, b]\n")
        s = cfg.credentials["pay"].settings
        assert isinstance(s, TokenExchangeSettings)
        assert (s.auth, s.client_id, s.subject_audience, s.subject_ttl) == ("none", None, "https://sts.example", 90)
        assert s.requested_token_type == ACCESS_TOKEN_TYPE and s.audience == ("a", "b")

    def test_example_file_loads(self, tmp_path: Path) -> None:
        """config/oauth2.yaml is valid (secrets not resolved: they live on the deployment's disk)."""
        cfg = load_example(tmp_path, "oauth2.yaml")
        assert {c.kind for c in cfg.credentials.values()} == {"oauth2_client_credentials", "oauth2_token_exchange"}
        assert cfg.rules
