"""Tests for credentials/github.py: GitHub App installation tokens against a real HTTPS fake API,
and the ``github_app`` config kind."""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from helpers.github_api import BODY_MARKER, GitHubApi
from helpers.providers import config_head, load_example, load_text, request_context

from secretless_proxy.config.model import Credential
from secretless_proxy.credentials.base import ProviderDeps, ProviderError, RequestContext
from secretless_proxy.credentials.github import GitHubAppProvider, GitHubAppSettings, PemSecretRef
from secretless_proxy.credentials.registry import KINDS
from secretless_proxy.dev import certs
from secretless_proxy.errors import ConfigError

APP_ID = 424242
INSTALLATION_ID = 9876543


def rsa_pem(key: rsa.RSAPrivateKey) -> bytes:
    """PKCS#1 (the traditional RSA PEM), the format GitHub hands out app keys in."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def app_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def api(pki, app_key: rsa.RSAPrivateKey) -> Iterator[GitHubApi]:
    with GitHubApi(server_cert=certs.make_server_cert(ca=pki.upstream_ca), app_id=APP_ID,
                   public_key=app_key.public_key(), installation_id=INSTALLATION_ID) as server:
        yield server


@pytest.fixture(autouse=True)
def _reset_api(request: pytest.FixtureRequest) -> None:
    if "api" in request.fixturenames:
        request.getfixturevalue("api").reset()


@pytest.fixture
def key_file(tmp_path: Path, app_key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "app.pem"
    path.write_bytes(rsa_pem(app_key))
    return path


@pytest.fixture
async def client(pki) -> AsyncIterator[httpx.AsyncClient]:
    tls = ssl.create_default_context(cafile=str(pki.upstream_ca_file))
    async with httpx.AsyncClient(verify=tls, trust_env=False, timeout=5) as c:
        yield c


def ctx() -> RequestContext:
    return request_context("spiffe://example.org/ns/ci/sa/release", host="api.github.com", path="/repos/acme/api",
                           rule="ci-to-github")


def provider(api: GitHubApi, key_file: Path, client: httpx.AsyncClient, **kw) -> GitHubAppProvider:
    settings = GitHubAppSettings(app_id=kw.pop("app_id", APP_ID),
                                 installation_id=kw.pop("installation_id", INSTALLATION_ID),
                                 private_key=PemSecretRef.parse(f"file:{key_file}"),
                                 base_url=kw.pop("base_url", api.url), **kw)
    deps = ProviderDeps(http=client)
    return GitHubAppProvider(Credential(name="github", kind="github_app", settings=settings), deps)


class TestFetch:
    async def test_token_is_fetched_with_a_verified_app_jwt(self, api, key_file, client) -> None:
        """The app JWT verifies with the app's public key (RS256, iss = app id) and the token comes back."""
        cred = await provider(api, key_file, client).fetch(ctx())
        [req] = api.token_requests
        assert cred.secret.reveal() == req.token
        assert (cred.name, cred.kind, cred.scope) == ("github", "github_app", "")
        assert req.claims["iss"] == str(APP_ID)
        assert api.calls == {f"POST /app/installations/{INSTALLATION_ID}/access_tokens": 1}

    async def test_app_jwt_is_backdated_and_lives_nine_minutes(self, api, key_file, client) -> None:
        """iat is now - 60 s (clock drift) and exp is now + 9 min, from the provider's clock."""
        now = time.time() - 100  # a clock a little behind the API's: the JWT must still verify
        p = provider(api, key_file, client)
        p.deps.now = lambda: now
        await p.fetch(ctx())
        claims = api.token_requests[0].claims
        assert (claims["iat"], claims["exp"]) == (int(now) - 60, int(now) + 540)

    async def test_api_version_and_accept_headers(self, api, key_file, client) -> None:
        """The request names API version 2022-11-28 and the GitHub JSON media type."""
        await provider(api, key_file, client).fetch(ctx())
        headers = {k.lower(): v for k, v in api.token_requests[0].headers.items()}
        assert headers["x-github-api-version"] == "2022-11-28"
        assert headers["accept"] == "application/vnd.github+json"

    async def test_no_body_without_repositories_or_permissions(self, api, key_file, client) -> None:
        """Without narrowing, no JSON body is sent: the token gets everything the installation has."""
        cred = await provider(api, key_file, client).fetch(ctx())
        assert api.token_requests[0].body is None
        assert cred.meta["repository_selection"] == "all"

    async def test_repositories_and_permissions_are_forwarded(self, api, key_file, client) -> None:
        """Configured repositories and permissions go into the JSON body and come back in meta."""
        cred = await provider(api, key_file, client, repositories=("api", "web"),
                              permissions={"contents": "read", "pull_requests": "write"}).fetch(ctx())
        assert api.token_requests[0].body == {"repositories": ["api", "web"],
                                              "permissions": {"contents": "read", "pull_requests": "write"}}
        assert cred.meta["permissions"] == "contents:read,pull_requests:write"
        assert cred.meta["repository_selection"] == "selected"

    async def test_expires_at_is_honoured(self, api, key_file, client) -> None:
        """The credential expires exactly when GitHub's ISO 8601 expires_at says."""
        api.expires_at = "2031-02-03T04:05:06Z"
        cred = await provider(api, key_file, client).fetch(ctx())
        assert cred.expires_at == datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC).timestamp()

    async def test_default_expiry_is_about_an_hour(self, api, key_file, client) -> None:
        """GitHub's one-hour tokens give a one-hour credential lifetime."""
        cred = await provider(api, key_file, client).fetch(ctx())
        assert cred.lifetime is not None and 3590 <= cred.lifetime <= 3601

    async def test_each_fetch_gets_a_fresh_token(self, api, key_file, client) -> None:
        """Two fetches make two calls and two distinct tokens (caching is the broker's job)."""
        p = provider(api, key_file, client)
        a, b = await p.fetch(ctx()), await p.fetch(ctx())
        assert a.secret != b.secret
        assert len(api.token_requests) == 2

    async def test_enterprise_server_base_url_with_path(self, api, key_file, client) -> None:
        """A GitHub Enterprise Server root with a path (/api/v3) is kept in front of every route."""
        api.prefix = "/api/v3"
        p = provider(api, key_file, client, base_url=api.url + "/api/v3")
        cred = await p.fetch(ctx())
        await p.revoke(cred)
        assert api.calls == {f"POST /api/v3/app/installations/{INSTALLATION_ID}/access_tokens": 1,
                             "DELETE /api/v3/installation/token": 1}

    async def test_cache_scope_is_shared(self, api, key_file, client) -> None:
        """An installation token does not depend on the workload: one cache entry for all."""
        assert provider(api, key_file, client).scope(ctx()) == ""

    async def test_repr_hides_the_token(self, api, key_file, client) -> None:
        """Neither the credential's repr nor its settings' repr shows the token or key."""
        cred = await provider(api, key_file, client).fetch(ctx())
        assert cred.secret.reveal() not in repr(cred)
        assert "PRIVATE KEY" not in repr(provider(api, key_file, client).settings)


class TestRevoke:
    async def test_revoke_sends_delete_with_the_token(self, api, key_file, client) -> None:
        """revoke() sends DELETE /installation/token with the installation token as bearer."""
        p = provider(api, key_file, client)
        assert p.revocable is True
        cred = await p.fetch(ctx())
        await p.revoke(cred)
        assert api.revoked == [cred.secret.reveal()]

    async def test_revoking_twice_is_not_an_error(self, api, key_file, client) -> None:
        """A token GitHub no longer knows (401: expired or revoked) counts as revoked."""
        p = provider(api, key_file, client)
        cred = await p.fetch(ctx())
        await p.revoke(cred)
        await p.revoke(cred)
        assert api.revoked == [cred.secret.reveal()]
        assert api.calls["DELETE /installation/token"] == 2

    async def test_revoke_failure_is_a_retryable_provider_error(self, api, key_file, client) -> None:
        """A 500 on revocation raises a retryable ProviderError without the body."""
        p = provider(api, key_file, client)
        cred = await p.fetch(ctx())
        api.mode = "server_error"
        with pytest.raises(ProviderError, match=r"^GitHub answered 500 to the token revocation$") as info:
            await p.revoke(cred)
        assert info.value.retryable is True


class TestFailures:
    @pytest.mark.parametrize(("mode", "match", "retryable"), [
        ("unauthorized", (r"GitHub answered 401 to the installation token request for app 424242 installation "
                         r"9876543: check app_id and private_key$"), False),
        ("server_error", r"GitHub answered 500 to the installation token request", True),
        ("malformed", r"answered the installation token request .* with something that is not a token document",
         True),
        ("no_token", r"with something that is not a token document", True),
    ])
    async def test_failure_modes(self, api, key_file, client, mode, match, retryable) -> None:
        """Each failure is a ProviderError with our message (status only, never the body)."""
        api.mode = mode
        with pytest.raises(ProviderError, match=match) as info:
            await provider(api, key_file, client).fetch(ctx())
        assert info.value.retryable is retryable
        assert BODY_MARKER not in str(info.value)

    async def test_hanging_api_times_out(self, api, key_file, client, pki) -> None:
        """An API that never answers gives a retryable ProviderError when the client times out."""
        api.mode, api.hang_seconds = "hang", 3
        tls = ssl.create_default_context(cafile=str(pki.upstream_ca_file))
        async with httpx.AsyncClient(verify=tls, trust_env=False, timeout=0.3) as impatient:
            with pytest.raises(ProviderError, match=r"did not answer the installation token request .* in time"
                               ) as info:
                await provider(api, key_file, impatient).fetch(ctx())
        assert info.value.retryable is True

    async def test_unknown_installation_is_final(self, api, key_file, client) -> None:
        """A 404 (app not installed there) is not retryable and says what to check."""
        with pytest.raises(ProviderError, match=r"answered 404 .*: check installation_id \(is the app installed\?\)"
                           ) as info:
            await provider(api, key_file, client, installation_id=1).fetch(ctx())
        assert info.value.retryable is False

    async def test_wrong_private_key_is_rejected_by_the_api(self, api, tmp_path, client) -> None:
        """An app JWT signed with another RSA key fails the signature check: 401, not retryable."""
        other = tmp_path / "other.pem"
        other.write_bytes(rsa_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
        with pytest.raises(ProviderError, match="answered 401") as info:
            await provider(api, other, client).fetch(ctx())
        assert info.value.retryable is False
        assert api.rejections == ["app JWT rejected: InvalidSignatureError"]

    async def test_wrong_app_id_is_rejected_by_the_api(self, api, key_file, client) -> None:
        """A JWT whose iss is not the app id gets 401."""
        with pytest.raises(ProviderError, match="answered 401"):
            await provider(api, key_file, client, app_id=7).fetch(ctx())
        assert api.rejections == ["iss '7' is not the app id"]

    async def test_already_expired_token_is_refused(self, api, key_file, client) -> None:
        """A token whose expires_at is already past is not handed out."""
        api.expires_at = "2001-01-01T00:00:00Z"
        with pytest.raises(ProviderError, match="a token that has already expired"):
            await provider(api, key_file, client).fetch(ctx())

    async def test_unreachable_api(self, key_file, client, api) -> None:
        """A refused connection is a retryable ProviderError naming the API root."""
        with pytest.raises(ProviderError, match=r"cannot reach GitHub at https://127\.0\.0\.1:9 \(ConnectError\)"
                           ) as info:
            await provider(api, key_file, client, base_url="https://127.0.0.1:9").fetch(ctx())
        assert info.value.retryable is True
        assert api.calls == {}

    async def test_missing_key_file(self, api, tmp_path, client) -> None:
        """A missing key file is a final ProviderError naming the file, and nothing is sent."""
        with pytest.raises(ProviderError, match=r"secret file .*/absent\.pem does not exist") as info:
            await provider(api, tmp_path / "absent.pem", client).fetch(ctx())
        assert info.value.retryable is False
        assert api.calls == {}

    async def test_key_that_is_not_pem(self, api, tmp_path, client) -> None:
        """A file that is not a PEM private key is refused without quoting it."""
        bad = tmp_path / "bad.pem"
        bad.write_text(_pem_armour("RSA PRIVATE KEY", "not-base64-secretbits"))
        with pytest.raises(ProviderError, match=r"private key file:.*bad\.pem is not an unencrypted PEM private key"
                           ) as info:
            await provider(api, bad, client).fetch(ctx())
        assert "secretbits" not in str(info.value)
        assert info.value.retryable is False

    async def test_ec_key_is_refused(self, api, tmp_path, client) -> None:
        """GitHub App keys are RSA; an EC key is refused before any call."""
        ec_file = tmp_path / "ec.pem"
        ec_file.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        with pytest.raises(ProviderError, match=r"must be an RSA key \(GitHub signs with RS256\)"):
            await provider(api, ec_file, client).fetch(ctx())
        assert api.calls == {}


# -- config ------------------------------------------------------------------------------------

def config_text(pki, credential: str) -> str:
    """A config whose credential block starts on line 6 (its keys from line 7)."""
    return (
        config_head(pki.trust_bundle) +
        "credentials:\n"
        "  gh:\n"
        "    kind: github_app\n"
        + credential +
        "rules:\n"
        '  - name: r\n    workloads: ["spiffe://example.org/ns/ci/sa/release"]\n'
        "    to: {host: api.github.com}\n"
        '    inject: {credential: gh, header: Authorization, format: "Bearer {secret}"}\n'
    )


VALID = "    app_id: 1\n    installation_id: 2\n    private_key: file:app.pem\n"


def load(tmp_path: Path, text: str, *, resolve: bool = False):
    return load_text(tmp_path, text, name="github.yaml", resolve=resolve)


class TestConfig:
    def test_kind_is_registered(self) -> None:
        """github_app is a config kind whose credentials go into headers, basic auth or queries."""
        assert KINDS["github_app"].injections == frozenset({"header", "basic", "query"})

    def test_full_definition(self, pki, tmp_path) -> None:
        """Every field lands typed; base_url loses its trailing slash; the key path is relative to the file."""
        cfg = load(tmp_path, config_text(pki, VALID + (
            "    base_url: https://ghe.example.com/api/v3/\n"
            "    repositories: [api, web.site]\n"
            "    permissions: {contents: read, pull_requests: write, administration: admin}\n")))
        s = cfg.credentials["gh"].settings
        assert (s.app_id, s.installation_id, s.base_url) == (1, 2, "https://ghe.example.com/api/v3")
        assert s.repositories == ("api", "web.site")
        assert s.permissions == {"contents": "read", "pull_requests": "write", "administration": "admin"}
        assert s.private_key.target == str(tmp_path / "app.pem")

    def test_defaults(self, pki, tmp_path) -> None:
        """Without optional keys: api.github.com, all repositories, all permissions."""
        s = load(tmp_path, config_text(pki, VALID)).credentials["gh"].settings
        assert (s.base_url, s.repositories, s.permissions) == ("https://api.github.com", None, {})

    def test_check_reads_a_pem_key_file(self, pki, tmp_path, app_key) -> None:
        """With secrets resolved (``check``), a multi-line PEM key file is accepted, not refused for line breaks."""
        (tmp_path / "app.pem").write_bytes(rsa_pem(app_key))
        assert "gh" in load(tmp_path, config_text(pki, VALID), resolve=True).credentials

    def test_check_reports_a_missing_key_file(self, pki, tmp_path) -> None:
        """With secrets resolved, a missing key file is reported at the credential's private_key."""
        with pytest.raises(ConfigError, match=re.escape(
                "github.yaml:10 credentials.gh.private_key: cannot resolve file:") + ".*app.pem does not exist"):
            load(tmp_path, config_text(pki, VALID), resolve=True)

    @pytest.mark.parametrize(("credential", "where", "message"), [
        (VALID.replace("app_id: 1", "app_id: one"), "github.yaml:8 credentials.gh.app_id",
         "must be an integer from 1 to"),
        (VALID.replace("installation_id: 2", "installation_id: 0"), "github.yaml:9 credentials.gh.installation_id",
         "must be an integer from 1 to"),
        (VALID.replace("file:app.pem", "vault:gh"), "github.yaml:10 credentials.gh.private_key",
         "invalid secret reference, scheme 'vault' is not env or file: use env:NAME or file:/path"),
        (VALID.replace("private_key", "privat_key"), "github.yaml:10 credentials.gh.privat_key",
         "unknown key 'privat_key' (did you mean 'private_key'?"),
        (VALID + "    base_url: http://ghe.example.com/api/v3\n", "github.yaml:11 credentials.gh.base_url",
         "'http://ghe.example.com/api/v3' would send credentials in plaintext"),
        (VALID + "    base_url: https://ghe.example.com/api/v3?x=1\n", "github.yaml:11 credentials.gh.base_url",
         "'https://ghe.example.com/api/v3?x=1' must not have a query or fragment: give the API root"),
        (VALID + "    repositories: [api, acme/web]\n", "github.yaml:11 credentials.gh.repositories[1]",
         "give the repository name without its owner ('web')"),
        (VALID + "    repositories: ['bad name']\n", "github.yaml:11 credentials.gh.repositories[0]",
         "invalid repository name 'bad name'"),
        (VALID + "    permissions:\n      contents: readwrite\n", "github.yaml:12 credentials.gh.permissions.contents",
         "must be one of read, write, admin, got 'readwrite'"),
        (VALID + "    permissions: [contents]\n", "github.yaml:11 credentials.gh.permissions",
         "must be a mapping of permission names to read, write, admin, got a list"),
        (VALID + "    permissions: {}\n", "github.yaml:11 credentials.gh.permissions",
         "must name at least one permission"),
        (VALID + "    permissions: {Contents: read}\n", "github.yaml:11 credentials.gh.permissions.Contents",
         "invalid permission name 'Contents'"),
        ("    app_id: 1\n    private_key: file:app.pem\n", "github.yaml:6 credentials.gh",
         "missing required key 'installation_id'"),
    ])
    def test_errors_name_the_key_path(self, pki, tmp_path, credential, where, message) -> None:
        """Each mistake is reported with file, line and the exact key path."""
        with pytest.raises(ConfigError, match=re.escape(f"{where}: {message}")):
            load(tmp_path, config_text(pki, credential))

    def test_plain_http_base_url_is_allowed_on_loopback(self, pki, tmp_path) -> None:
        """http:// is accepted for a loopback API root (a local test server)."""
        cfg = load(tmp_path, config_text(pki, VALID + "    base_url: http://127.0.0.1:8000\n"))
        assert cfg.credentials["gh"].settings.base_url == "http://127.0.0.1:8000"


class TestExampleConfig:
    def test_config_github_yaml_is_valid(self, pki, tmp_path) -> None:
        """config/github.yaml loads (secrets unresolved) next to a dev CA, as `make dev-certs` makes it."""
        cfg = load_example(tmp_path, "github.yaml")
        kinds = {c.kind for c in cfg.credentials.values()}
        assert kinds == {"github_app"}
        assert all(r.inject is not None for r in cfg.rules)


def _pem_armour(label: str, body: str) -> str:
    """PEM armour around a body that is not a key (built, so no key marker sits in the repo)."""
    dashes = "-" * 5
    return f"{dashes}BEGIN {label}{dashes}\n{body}\n{dashes}END {label}{dashes}\n"
