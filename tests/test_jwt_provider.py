"""Tests for credentials/jwt.py: audience-bound JWTs minted by the proxy, and their config parsing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt
import pytest
from helpers.providers import BILLING, CREDS_FILE, NOW, REPORTS, config_head, ctx, load_credential, load_example

from secretless_proxy.config.model import Credential
from secretless_proxy.credentials.base import ProviderDeps, ProviderError
from secretless_proxy.credentials.jwt import JwtProvider, JwtSettings
from secretless_proxy.credentials.registry import KINDS
from secretless_proxy.errors import ConfigError
from secretless_proxy.signing import JwtSigner

ISSUER = "https://secretless.example.org"
@pytest.fixture(scope="module")
def signer() -> JwtSigner:
    return JwtSigner.generate(issuer=ISSUER)


def provider(signer: JwtSigner | None, **kw: Any) -> JwtProvider:
    return JwtProvider(Credential(name="workload-jwt", kind="jwt", settings=JwtSettings(**kw)),
                       ProviderDeps(signer=signer))


def verify(signer: JwtSigner, token: str, audience: str) -> dict[str, Any]:
    """What a receiving service does: pick the key from the JWKS by kid and check signature, iss, aud, exp."""
    key = jwt.PyJWKSet.from_dict(signer.jwks())[jwt.get_unverified_header(token)["kid"]]
    return jwt.decode(token, key, algorithms=["ES256", "RS256"], issuer=ISSUER, audience=audience,
                      options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]})


class TestJwtProvider:
    async def test_verifies_with_jwks(self, signer: JwtSigner) -> None:
        """The token verifies against the JWKS; sub is the workload, aud the request's host by default."""
        cred = await provider(signer).fetch(ctx())
        claims = verify(signer, cred.secret.reveal(), audience="api.example.com")
        assert (claims["sub"], claims["aud"], claims["iss"]) == (BILLING, "api.example.com", ISSUER)
        assert (cred.name, cred.kind, cred.expires_at, cred.issued_at) == (
            "workload-jwt", "jwt", float(claims["exp"]), float(claims["iat"]))
        assert cred.meta == {"aud": "api.example.com", "jti": claims["jti"], "kid": signer.kid}

    async def test_configured_audience(self, signer: JwtSigner) -> None:
        """A configured audience replaces the host."""
        cred = await provider(signer, audience="https://inventory.example").fetch(ctx(host="10.0.0.7"))
        assert verify(signer, cred.secret.reveal(), audience="https://inventory.example")["aud"] == \
            "https://inventory.example"

    async def test_wrong_audience_rejected_by_receiver(self, signer: JwtSigner) -> None:
        """A token minted for one host does not verify at another (audience binding)."""
        cred = await provider(signer).fetch(ctx(host="api.example.com"))
        with pytest.raises(jwt.InvalidAudienceError):
            verify(signer, cred.secret.reveal(), audience="evil.example.com")

    async def test_lifetime(self) -> None:
        """exp = iat + ttl_seconds from the signer's clock, never later; expires_at is exp."""
        clock = JwtSigner.generate(issuer=ISSUER, now=lambda: NOW + 0.5)
        cred = await provider(clock, ttl=120.0).fetch(ctx())
        claims = jwt.decode(cred.secret.reveal(), options={"verify_signature": False})
        assert (claims["iat"], claims["exp"]) == (int(NOW), int(NOW) + 120)
        assert cred.expires_at == int(NOW) + 120 and cred.lifetime == 120

    async def test_default_ttl_is_60s(self, signer: JwtSigner) -> None:
        """Without ttl_seconds a token lives 60 seconds."""
        claims = jwt.decode((await provider(signer).fetch(ctx())).secret.reveal(), options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == 60

    async def test_per_request_fresh_jti(self, signer: JwtSigner) -> None:
        """per_request: never cached (scope None) and every fetch has its own jti."""
        p = provider(signer, per_request=True)
        assert p.scope(ctx()) is None
        tokens = [(await p.fetch(ctx())).secret.reveal() for _ in range(5)]
        jtis = {verify(signer, t, audience="api.example.com")["jti"] for t in tokens}
        assert len(jtis) == 5

    async def test_cache_scope_per_workload_and_audience(self, signer: JwtSigner) -> None:
        """Cached per workload and audience: another workload or host never shares a token."""
        p = provider(signer)
        assert p.scope(ctx()) == f"{BILLING}|api.example.com"
        assert p.scope(ctx(REPORTS)) == f"{REPORTS}|api.example.com"
        assert p.scope(ctx(host="other.example")) == f"{BILLING}|other.example"
        assert provider(signer, audience="x").scope(ctx(host="other.example")) == f"{BILLING}|x"
        assert (await p.fetch(ctx())).scope == p.scope(ctx())

    async def test_extra_claims(self, signer: JwtSigner) -> None:
        """Static claims are added next to the proxy's own."""
        cred = await provider(signer, claims=(("env", "prod"), ("team", "fulfilment"))).fetch(ctx())
        claims = verify(signer, cred.secret.reveal(), audience="api.example.com")
        assert (claims["env"], claims["team"], claims["sub"]) == ("prod", "fulfilment", BILLING)

    async def test_no_signer(self) -> None:
        """Without the proxy's signing key (a wiring bug) the provider fails closed, not retryable."""
        with pytest.raises(ProviderError, match="credential 'workload-jwt' needs the proxy's signing key") as info:
            await provider(None).fetch(ctx())
        assert info.value.retryable is False

    def test_registered(self) -> None:
        """The kind is in the registry with its provider and value injections."""
        assert KINDS["jwt"].provider is JwtProvider
        assert KINDS["jwt"].injections == frozenset({"header", "basic", "query"})


FILE = CREDS_FILE
HEAD = config_head() + "rules: []\ncredentials:\n  tok:\n    kind: jwt\n"  # further keys of the credential start on line 9


def load(tmp_path: Path, body: str) -> Any:
    return load_credential(tmp_path, HEAD, body)


MALFORMED = [
    ("ttl-too-long", "ttl_seconds: 7200", 9, "tok.ttl_seconds", "must be a number of seconds from 1 to 3600, got 7200"),
    ("ttl-zero", "ttl_seconds: 0", 9, "tok.ttl_seconds", "from 1 to 3600, got 0"),
    ("ttl-text", "ttl_seconds: 1m", 9, "tok.ttl_seconds", "got '1m'"),
    ("per-request-text", 'per_request: "yes"', 9, "tok.per_request", "must be true or false, got a string"),
    ("audience-empty", 'audience: ""', 9, "tok.audience", "must be a non-empty string"),
    ("claim-overrides-sub", "claims:\n  env: prod\n  sub: admin", 11, "tok.claims.sub",
     "claim 'sub' is set by the proxy and cannot be overridden"),
    ("claim-overrides-exp", "claims: {exp: '9999999999'}", 9, "tok.claims.exp", "claim 'exp' is set by the proxy"),
    ("claim-not-string", "claims:\n  roles: [a, b]", 10, "tok.claims.roles", "must be a non-empty string, got a list"),
    ("claims-not-mapping", "claims: [env]", 9, "tok.claims", "must be a mapping of claim names to strings, got a list"),
    ("unknown-key", "ttl_second: 60", 9, "tok.ttl_second", "unknown key 'ttl_second' (did you mean 'ttl_seconds'?"),
]


class TestJwtConfig:
    @pytest.mark.parametrize(("body", "line", "path", "fragment"), [c[1:] for c in MALFORMED],
                             ids=[c[0] for c in MALFORMED])
    def test_issue_located(self, tmp_path: Path, body: str, line: int, path: str, fragment: str) -> None:
        """Each problem is reported at its line and exact key path."""
        with pytest.raises(ConfigError) as info:
            load(tmp_path, body)
        located = [i for i in info.value.issues if (i.line, i.path) == (line, f"credentials.{path}")]
        assert any(fragment in i.message for i in located), info.value.issues

    def test_defaults(self, tmp_path: Path) -> None:
        """A bare `kind: jwt` means: host audience, 60 s, cached, no extra claims, no secret to resolve."""
        cred = load(tmp_path, "").credentials["tok"]
        assert cred.settings == JwtSettings(audience=None, ttl=60.0, per_request=False, claims=())
        assert cred.secret_refs() == {}

    def test_all_keys(self, tmp_path: Path) -> None:
        """Every key lands in its typed setting."""
        cfg = load(tmp_path, "audience: https://inv.example\nttl_seconds: 300\nper_request: true\n"
                             "claims: {env: prod, team: ''}")
        assert cfg.credentials["tok"].settings == JwtSettings(
            audience="https://inv.example", ttl=300.0, per_request=True, claims=(("env", "prod"), ("team", "")))

    def test_example_file_loads(self, tmp_path: Path) -> None:
        """config/jwt.yaml is valid."""
        cfg = load_example(tmp_path, "jwt.yaml")
        assert {c.kind for c in cfg.credentials.values()} == {"jwt"}
        assert cfg.credentials["audit-jwt"].settings.per_request is True
        assert cfg.signing is not None and cfg.signing.issuer == "https://secretless.example.org"
