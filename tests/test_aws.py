"""Tests for credentials/aws.py (STS session credentials) and sigv4.py (re-signing requests).

STS is moto in server mode, in its own process on an ephemeral loopback port; one moto runs
with IAM authentication on, so it checks the signatures of our STS calls and of requests
``sigv4.sign`` produced. A small fake STS records exact requests and answers errors.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from hashlib import sha256
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from helpers.moto_server import ROLE_ARN, MotoServer
from helpers.net import QuietHandler
from helpers.providers import config_head, load_example, load_text, request_context
from mitmproxy import http

from secretless_proxy import sigv4
from secretless_proxy.config.model import Credential
from secretless_proxy.credentials.aws import AwsProvider, AwsSettings, role_session_name
from secretless_proxy.credentials.base import (
    IssuedCredential,
    ProviderDeps,
    ProviderError,
    RequestContext,
)
from secretless_proxy.credentials.registry import KINDS
from secretless_proxy.errors import ConfigError
from secretless_proxy.secretrefs import Secret, SecretRef
from secretless_proxy.signing import JwtSigner

ROLE = ROLE_ARN
BILLING = "spiffe://example.org/ns/prod/sa/billing"
ISSUER = "https://secretless.example.org"
BODY_MARKER = "sts-private-detail-c41d"
# The moto fixtures' view of an authenticating moto: its URL and the IAM user's key.
AuthMoto = MotoServer


def sts_credentials_xml(*, action: str = "AssumeRole", expiration: str = "2031-01-01T00:00:00Z") -> bytes:
    return (f'<{action}Response xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><{action}Result>'
            "<Credentials><AccessKeyId>ASIAFAKEKEY0000001</AccessKeyId>"
            "<SecretAccessKey>fakeSecretKey/+0123456789</SecretAccessKey>"
            "<SessionToken>FwoGZXIvYXdzEFakeSessionToken==</SessionToken>"
            f"<Expiration>{expiration}</Expiration></Credentials>"
            f"<AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/reader/s</Arn></AssumedRoleUser>"
            f"</{action}Result></{action}Response>").encode()


def sts_error_xml(code: str) -> bytes:
    return ('<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
            f"<Code>{code}</Code><Message>{BODY_MARKER}: not authorized</Message></Error></ErrorResponse>"
            ).encode()


class _StsHandler(QuietHandler):
    server: _StsServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        sts = self.server.sts
        sts.requests.append((dict(self.headers.items()), body))
        if sts.hang:
            sts.stop.wait(5)
            self.close_connection = True
            return
        status, payload = sts.answer
        self.send_response(status)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _StsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sts: FakeSts) -> None:
        self.sts = sts
        super().__init__(("127.0.0.1", 0), _StsHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Silenced: clients that time out and disconnect are expected."""


class FakeSts:
    """Records every STS request (headers, raw form body) and answers ``answer``."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answer: tuple[int, bytes] = (200, sts_credentials_xml())
        self.hang = False
        self.stop = threading.Event()
        self._server = _StsServer(self)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def form(self, i: int = -1) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.requests[i][1].decode(), strict_parsing=True).items()}

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with MotoServer(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server.url


@pytest.fixture(scope="module")
def auth_moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with MotoServer(tmp_path_factory.mktemp("moto-auth") / "moto.log", auth=True) as server:
        yield server


@pytest.fixture
def fake_sts() -> Iterator[FakeSts]:
    with FakeSts() as sts:
        yield sts


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as c:
        yield c


@pytest.fixture
def base_keys(monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """moto's dummy key pair in the environment, as env: secret references read it."""
    monkeypatch.setenv("TEST_AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("TEST_AWS_SECRET_ACCESS_KEY", "testing")
    return "testing", "testing"


@pytest.fixture(scope="module")
def signer() -> JwtSigner:
    return JwtSigner.generate(issuer=ISSUER)


def ctx(spiffe_id: str = BILLING) -> RequestContext:
    return request_context(spiffe_id, host="s3.us-east-1.amazonaws.com")


def assume_role(endpoint: str, client: httpx.AsyncClient, **kw: Any) -> AwsProvider:
    settings = AwsSettings(role_arn=kw.pop("role_arn", ROLE), mode="assume_role", sts_endpoint=endpoint,
                           access_key_id=SecretRef.parse(kw.pop("access_key_id", "env:TEST_AWS_ACCESS_KEY_ID")),
                           secret_access_key=SecretRef.parse(kw.pop("secret_access_key",
                                                                    "env:TEST_AWS_SECRET_ACCESS_KEY")), **kw)
    return AwsProvider(Credential(name="aws", kind="aws_sigv4", settings=settings), ProviderDeps(http=client))


def web_identity(endpoint: str, client: httpx.AsyncClient, signer: JwtSigner | None, **kw: Any) -> AwsProvider:
    settings = AwsSettings(role_arn=ROLE, mode="web_identity", sts_endpoint=endpoint, **kw)
    return AwsProvider(Credential(name="aws", kind="aws_sigv4", settings=settings),
                       ProviderDeps(http=client, signer=signer))


def session(key_id: str = "ASIAFAKEKEY0000001", secret: str = "fakeSecretKey/+0123456789",
            token: str | None = "FwoGZXIvYXdzEFakeSessionToken==", **meta: str) -> IssuedCredential:
    parts = {"access_key_id": Secret(key_id)}
    if token is not None:
        parts["session_token"] = Secret(token)
    return IssuedCredential(name="aws", kind="aws_sigv4", secret=Secret(secret), expires_at=time.time() + 900,
                            parts=parts, meta=meta)


_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([a-z0-9-]+)/([a-z0-9-]+)/aws4_request, "
                   r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})\Z")


def recomputed_signature(req: http.Request, *, secret_key: str) -> str:
    """What the signature must be, recomputed with botocore from the signed headers alone."""
    m = _AUTH.match(req.headers["Authorization"])
    assert m, req.headers["Authorization"]
    key_id, _, region, service, signed, _ = m.groups()
    aws = AWSRequest(method=req.method, url=req.url, data=req.raw_content or b"")
    for name, value in req.headers.items(multi=True):
        if name.lower() in signed.split(";"):
            aws.headers[name] = value
    aws.context["timestamp"] = req.headers["X-Amz-Date"]
    auth = (S3SigV4Auth if service == "s3" else SigV4Auth)(ReadOnlyCredentials(key_id, secret_key, None),
                                                           service, region)
    return auth.signature(auth.string_to_sign(aws, auth.canonical_request(aws)), aws)


def signature(req: http.Request) -> str:
    return req.headers["Authorization"].rsplit("Signature=", 1)[1]


def scope(req: http.Request) -> tuple[str, str]:
    m = _AUTH.match(req.headers["Authorization"])
    assert m
    return m.group(3), m.group(4)


def client_request(method: str, url: str, body: bytes = b"", **headers: str) -> http.Request:
    """A request as a workload's SDK sends it: signed with a dummy key, token and date of its own."""
    host = urlsplit(url).netloc
    hdrs = {"Host": host, "Authorization": "AWS4-HMAC-SHA256 Credential=AKIDCLIENT/20200101/us-east-1/x/"
            "aws4_request, SignedHeaders=host, Signature=" + "0" * 64,
            "X-Amz-Date": "20200101T000000Z", "X-Amz-Security-Token": "client-token",
            "Proxy-Authorization": "Basic cHJveHk6cHc=", **{k.replace("_", "-"): v for k, v in headers.items()}}
    return http.Request.make(method, url, body, hdrs)


async def send(client: httpx.AsyncClient, req: http.Request) -> httpx.Response:
    """Send exactly what the proxy would: the request's method, URL, headers and body."""
    return await client.request(req.method, req.url, content=req.raw_content, headers=req.headers.fields)


# -- provider ----------------------------------------------------------------------------------


class TestAssumeRole:
    async def test_session_credentials_from_sts(self, moto, client, base_keys) -> None:
        """AssumeRole through moto gives an access key id, secret key and session token, with Expiration."""
        cred = await assume_role(moto, client).fetch(ctx())
        assert cred.parts["access_key_id"].reveal().startswith("ASIA")
        assert cred.parts["session_token"].reveal()
        assert cred.secret.reveal() and cred.secret.reveal() not in repr(cred)
        assert cred.expires_at is not None and abs(cred.expires_at - (time.time() + 900)) < 60
        assert (cred.kind, cred.scope) == ("aws_sigv4", BILLING)

    async def test_session_is_named_after_the_workload(self, moto, client, base_keys) -> None:
        """The assumed-role ARN STS reports carries the RoleSessionName derived from the workload."""
        cred = await assume_role(moto, client).fetch(ctx())
        assert cred.meta["assumed_role_arn"] == (
            f"arn:aws:sts::123456789012:assumed-role/reader/{role_session_name(BILLING)}")

    async def test_duration_seconds(self, moto, client, base_keys) -> None:
        """duration_seconds sets the session lifetime STS grants."""
        cred = await assume_role(moto, client, duration_seconds=3600).fetch(ctx())
        assert cred.expires_at is not None and abs(cred.expires_at - (time.time() + 3600)) < 60

    async def test_request_is_a_signed_query_api_call(self, fake_sts, client, base_keys) -> None:
        """The STS call is a form POST (Action, Version, RoleArn, RoleSessionName, DurationSeconds), SigV4-signed."""
        await assume_role(fake_sts.url, client, duration_seconds=1800).fetch(ctx())
        assert fake_sts.form() == {"Action": "AssumeRole", "Version": "2011-06-15", "RoleArn": ROLE,
                                   "RoleSessionName": role_session_name(BILLING), "DurationSeconds": "1800"}
        headers, body = fake_sts.requests[0]
        auth = headers["Authorization"]
        assert auth.startswith("AWS4-HMAC-SHA256 Credential=testing/")
        assert "/us-east-1/sts/aws4_request" in auth
        req = http.Request.make("POST", fake_sts.url + "/", body, headers)
        assert signature(req) == recomputed_signature(req, secret_key="testing")

    async def test_sts_region_scopes_the_signature(self, fake_sts, client, base_keys) -> None:
        """sts_region is the region in the STS call's credential scope (regional endpoints)."""
        await assume_role(fake_sts.url, client, sts_region="eu-west-1").fetch(ctx())
        assert "/eu-west-1/sts/aws4_request" in fake_sts.requests[0][0]["Authorization"]

    async def test_region_and_service_defaults_go_into_meta(self, fake_sts, client, base_keys) -> None:
        """The credential's signing defaults travel in meta, where sigv4.sign finds them."""
        cred = await assume_role(fake_sts.url, client, region="eu-west-1", service="dynamodb").fetch(ctx())
        assert (cred.meta["region"], cred.meta["service"]) == ("eu-west-1", "dynamodb")

    async def test_missing_base_key_is_final(self, fake_sts, client, monkeypatch) -> None:
        """An unset base key is a non-retryable ProviderError naming the variable; STS is not called."""
        monkeypatch.delenv("TEST_AWS_ACCESS_KEY_ID", raising=False)
        with pytest.raises(ProviderError, match="environment variable TEST_AWS_ACCESS_KEY_ID is not set") as info:
            await assume_role(fake_sts.url, client).fetch(ctx())
        assert info.value.retryable is False
        assert fake_sts.requests == []


class TestWebIdentity:
    async def test_session_credentials_from_sts(self, moto, client, signer) -> None:
        """AssumeRoleWithWebIdentity through moto gives session credentials, with no AWS secret configured."""
        cred = await web_identity(moto, client, signer).fetch(ctx())
        assert cred.parts["access_key_id"].reveal().startswith("ASIA")
        assert cred.parts["session_token"].reveal()
        assert cred.meta["assumed_role_arn"].endswith(f"assumed-role/reader/{role_session_name(BILLING)}")
        assert cred.scope == BILLING

    async def test_token_is_a_workload_jwt_the_proxy_signed(self, fake_sts, client, signer) -> None:
        """The unsigned call carries a JWT (sub = SPIFFE ID, aud = sts.amazonaws.com, 5 min) verifying with the JWKS."""
        await web_identity(fake_sts.url, client, signer).fetch(ctx())
        headers, _ = fake_sts.requests[0]
        assert "Authorization" not in headers
        form = fake_sts.form()
        assert form["Action"] == "AssumeRoleWithWebIdentity"
        assert form["RoleSessionName"] == role_session_name(BILLING)
        key = jwt.PyJWKSet.from_dict(signer.jwks())[signer.kid]
        claims = jwt.decode(form["WebIdentityToken"], key, algorithms=["ES256"], audience="sts.amazonaws.com",
                            issuer=ISSUER)
        assert claims["sub"] == BILLING
        assert claims["exp"] - claims["iat"] == 300

    async def test_configured_audience(self, fake_sts, client, signer) -> None:
        """web_identity.audience becomes the JWT's aud."""
        await web_identity(fake_sts.url, client, signer, audience="https://aws.example.org").fetch(ctx())
        claims = jwt.decode(fake_sts.form()["WebIdentityToken"], options={"verify_signature": False})
        assert claims["aud"] == "https://aws.example.org"

    async def test_without_a_signer_is_final(self, fake_sts, client) -> None:
        """Without the proxy's signing key there is no token to present: a final ProviderError."""
        with pytest.raises(ProviderError, match=r"uses web_identity, which needs the proxy's signing key: "
                                                r"add a 'signing:' section") as info:
            await web_identity(fake_sts.url, client, None).fetch(ctx())
        assert info.value.retryable is False
        assert fake_sts.requests == []


class TestStsFailures:
    @pytest.mark.parametrize(("status", "body", "match", "retryable"), [
        (403, sts_error_xml("AccessDenied"), (r"^STS refused AssumeRole for role "
         r"arn:aws:iam::123456789012:role/reader: AccessDenied \(HTTP 403\)$"), False),
        (400, sts_error_xml("ExpiredToken"), r": ExpiredToken \(HTTP 400\)$", False),
        (400, sts_error_xml("Throttling"), r": Throttling \(HTTP 400\)$", True),
        (503, b"<html>" + BODY_MARKER.encode() + b"</html>", r": an unrecognised error \(HTTP 503\)$", True),
        (403, sts_error_xml("Access Denied <script>"), r": an unrecognised error \(HTTP 403\)$", False),
        (200, b"<nope/>", r"answered AssumeRole for role .* with something that is not an STS credentials document",
         True),
        (200, b"{\"json\": \"" + BODY_MARKER.encode() + b"\"}", r"not an STS credentials document", True),
        (200, b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "' + BODY_MARKER.encode() + b'">]>'
         + sts_credentials_xml().replace(b"ASIAFAKEKEY0000001", b"&a;"), r"not an STS credentials document", True),
        (200, sts_credentials_xml(expiration="2001-01-01T00:00:00Z"), r"credentials .* that have already expired",
         True),
        (200, sts_credentials_xml(expiration="tomorrow"), r"not an STS credentials document", True),
    ])
    async def test_errors_carry_the_code_only(self, fake_sts, client, base_keys, status, body, match,
                                              retryable) -> None:
        """STS failures become ProviderErrors with the AWS error Code at most, never the message body."""
        fake_sts.answer = (status, body)
        with pytest.raises(ProviderError, match=match) as info:
            await assume_role(fake_sts.url, client).fetch(ctx())
        assert info.value.retryable is retryable
        assert BODY_MARKER not in str(info.value)

    async def test_web_identity_errors_name_the_action(self, fake_sts, client, signer) -> None:
        """A rejected web identity token names AssumeRoleWithWebIdentity and the code."""
        fake_sts.answer = (400, sts_error_xml("InvalidIdentityToken"))
        with pytest.raises(ProviderError, match=r"refused AssumeRoleWithWebIdentity .*: InvalidIdentityToken"):
            await web_identity(fake_sts.url, client, signer).fetch(ctx())

    async def test_hanging_sts_times_out(self, fake_sts, client, base_keys) -> None:
        """An STS that never answers is a retryable ProviderError once the client times out."""
        fake_sts.hang = True
        async with httpx.AsyncClient(trust_env=False, timeout=0.3) as impatient:
            with pytest.raises(ProviderError, match=r"STS at http://127\.0\.0\.1:\d+ did not answer AssumeRole "
                                                    r"in time") as info:
                await assume_role(fake_sts.url, impatient).fetch(ctx())
        assert info.value.retryable is True

    async def test_unreachable_sts(self, client, base_keys) -> None:
        """A refused connection is a retryable ProviderError naming the endpoint."""
        with pytest.raises(ProviderError, match=r"cannot reach STS at http://127\.0\.0\.1:9 \(ConnectError\)"):
            await assume_role("http://127.0.0.1:9", client).fetch(ctx())


class TestAgainstAuthenticatingSts:
    async def test_assume_role_signature_is_accepted(self, auth_moto, client, monkeypatch) -> None:
        """With IAM auth on, moto accepts the AssumeRole call signed with the base key pair."""
        monkeypatch.setenv("TEST_AWS_ACCESS_KEY_ID", auth_moto.key_id)
        monkeypatch.setenv("TEST_AWS_SECRET_ACCESS_KEY", auth_moto.secret)
        cred = await assume_role(auth_moto.url, client).fetch(ctx())
        assert cred.parts["access_key_id"].reveal().startswith("ASIA")

    async def test_wrong_base_secret_is_signature_does_not_match(self, auth_moto, client, monkeypatch) -> None:
        """A wrong base secret key gets SignatureDoesNotMatch from STS: final, code only."""
        monkeypatch.setenv("TEST_AWS_ACCESS_KEY_ID", auth_moto.key_id)
        monkeypatch.setenv("TEST_AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with pytest.raises(ProviderError, match=r": SignatureDoesNotMatch \(HTTP 403\)$") as info:
            await assume_role(auth_moto.url, client).fetch(ctx())
        assert info.value.retryable is False


# -- role session names ------------------------------------------------------------------------


class TestRoleSessionName:
    def test_shape(self) -> None:
        """secretless-<10 hex>-<path with dots>: readable in CloudTrail, valid for STS."""
        assert re.fullmatch(r"secretless-[0-9a-f]{10}-ns\.prod\.sa\.billing", role_session_name(BILLING))

    def test_deterministic(self) -> None:
        """The same workload always gets the same session name."""
        assert role_session_name(BILLING) == role_session_name(BILLING)

    def test_same_path_other_trust_domain_differs(self) -> None:
        """The hash covers the whole SPIFFE ID, so equal paths in two trust domains do not collide."""
        assert role_session_name(BILLING) != role_session_name(BILLING.replace("example.org", "partner.example"))

    def test_long_path_keeps_its_tail_within_64(self) -> None:
        """A long path is cut from the left to 64 characters, keeping its most specific end."""
        spiffe_id = "spiffe://example.org/" + "/".join(f"segment{i:02d}" for i in range(30)) + "/worker"
        name = role_session_name(spiffe_id)
        assert len(name) <= 64
        assert name.endswith(".segment29.worker")
        assert re.fullmatch(r"[\w+=,.@-]{2,64}", name, re.ASCII)

    def test_no_path(self) -> None:
        """A SPIFFE ID without a path still gets a valid name."""
        assert re.fullmatch(r"secretless-[0-9a-f]{10}", role_session_name("spiffe://example.org"))

    @pytest.mark.parametrize("spiffe_id", [BILLING, "spiffe://example.org/a_b/c-d/e.f",
                                           "spiffe://example.org/" + "x" * 200])
    def test_charset(self, spiffe_id: str) -> None:
        """Every name matches STS's RoleSessionName pattern [\\w+=,.@-]{2,64}."""
        assert re.fullmatch(r"[\w+=,.@-]{2,64}", role_session_name(spiffe_id), re.ASCII)

    async def test_cache_scope_is_the_workload(self, client) -> None:
        """Session credentials are cached per workload SPIFFE ID."""
        p = web_identity("https://sts.amazonaws.com", client, None)
        assert p.scope(ctx()) == BILLING
        assert p.scope(ctx("spiffe://example.org/other")) == "spiffe://example.org/other"


# -- sigv4.sign ----------------------------------------------------------------------------------


class TestSign:
    def test_client_signature_and_token_are_replaced(self) -> None:
        """The client's Authorization, X-Amz-Date, security token and Proxy-Authorization are gone or replaced."""
        req = client_request("GET", "https://sqs.eu-west-1.amazonaws.com/?Action=ListQueues")
        sigv4.sign(req, session())
        assert "AKIDCLIENT" not in req.headers["Authorization"]
        assert req.headers.get_all("X-Amz-Security-Token") == ["FwoGZXIvYXdzEFakeSessionToken=="]
        assert req.headers.get_all("X-Amz-Date") != ["20200101T000000Z"]
        assert len(req.headers.get_all("Authorization")) == 1
        assert "Proxy-Authorization" not in req.headers

    def test_signature_recomputes_with_botocore(self) -> None:
        """Recomputing from the signed headers with the session secret gives the same signature."""
        req = client_request("POST", "https://dynamodb.us-east-1.amazonaws.com/", b'{"Limit": 1}',
                             X_Amz_Target="DynamoDB_20120810.ListTables",
                             Content_Type="application/x-amz-json-1.0")
        sigv4.sign(req, session())
        assert signature(req) == recomputed_signature(req, secret_key="fakeSecretKey/+0123456789")
        assert scope(req) == ("us-east-1", "dynamodb")

    def test_operation_headers_are_kept_and_signed(self) -> None:
        """X-Amz-Target (which selects the operation) stays, and is covered by the signature."""
        req = client_request("POST", "https://dynamodb.us-east-1.amazonaws.com/", b"{}",
                             X_Amz_Target="DynamoDB_20120810.ListTables")
        sigv4.sign(req, session())
        assert req.headers["X-Amz-Target"] == "DynamoDB_20120810.ListTables"
        assert "x-amz-target" in _AUTH.match(req.headers["Authorization"]).group(5).split(";")

    def test_client_content_sha256_is_recomputed_for_s3(self) -> None:
        """S3 gets X-Amz-Content-SHA256 of the actual body, whatever the client claimed."""
        body = b"report contents"
        req = client_request("PUT", "https://reports.s3.us-west-2.amazonaws.com/2024/q1.csv", body,
                             X_Amz_Content_SHA256="0" * 64)
        sigv4.sign(req, session())
        assert req.headers.get_all("X-Amz-Content-SHA256") == [sha256(body).hexdigest()]
        assert scope(req) == ("us-west-2", "s3")
        assert signature(req) == recomputed_signature(req, secret_key="fakeSecretKey/+0123456789")

    @pytest.mark.parametrize("mode", ["UNSIGNED-PAYLOAD", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"])
    def test_unsigned_s3_payload_mode_is_kept(self, mode: str) -> None:
        """An unsigned payload mode the client chose (aws-chunked uploads with a trailer) is kept and signed."""
        req = client_request("PUT", "https://b.s3.amazonaws.com/k", b"5\r\nhello\r\n0\r\n\r\n",
                             X_Amz_Content_SHA256=mode, Content_Encoding="aws-chunked",
                             X_Amz_Decoded_Content_Length="5", X_Amz_Trailer="x-amz-checksum-crc32")
        sigv4.sign(req, session())
        assert req.headers["X-Amz-Content-SHA256"] == mode
        assert req.headers["X-Amz-Trailer"] == "x-amz-checksum-crc32"
        assert signature(req) == recomputed_signature(req, secret_key="fakeSecretKey/+0123456789")

    def test_chunk_signed_upload_is_refused(self) -> None:
        """A STREAMING-AWS4-HMAC-SHA256-PAYLOAD upload cannot be re-signed: ValueError, request untouched."""
        req = client_request("PUT", "https://b.s3.amazonaws.com/k", b"...",
                             X_Amz_Content_SHA256="STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
        with pytest.raises(ValueError, match=r"chunk-signed \(STREAMING-AWS4-\*\) uploads cannot be re-signed"):
            sigv4.sign(req, session())
        assert "AKIDCLIENT" in req.headers["Authorization"]

    def test_presigned_query_fields_are_removed(self) -> None:
        """X-Amz-* signing fields in the query go; other parameters keep their exact encoding."""
        req = client_request(
            "GET", "https://b.s3.amazonaws.com/k?response-content-type=text%2Fplain&X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AKIDCLIENT%2F20200101%2Fus-east-1%2Fs3%2Faws4_request&x-amz-security-token=t"
            "&X-Amz-Date=20200101T000000Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=abc&a=b%20c")
        sigv4.sign(req, session())
        assert req.path == "/k?response-content-type=text%2Fplain&a=b%20c"
        assert signature(req) == recomputed_signature(req, secret_key="fakeSecretKey/+0123456789")

    def test_query_without_signing_fields_is_untouched(self) -> None:
        """A query with nothing to strip is left byte for byte."""
        req = client_request("GET", "https://sqs.eu-west-1.amazonaws.com/?Action=ListQueues&QueueNamePrefix=a+b")
        sigv4.sign(req, session())
        assert req.path == "/?Action=ListQueues&QueueNamePrefix=a+b"

    def test_without_session_token(self) -> None:
        """Long-lived keys (no session token) sign without an X-Amz-Security-Token header."""
        req = client_request("GET", "https://sts.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15")
        sigv4.sign(req, session(token=None))
        assert "X-Amz-Security-Token" not in req.headers
        assert scope(req) == ("us-east-1", "sts")

    def test_returns_the_strings_to_redact(self) -> None:
        """The secret key, the session token and the new Authorization value are all redacted."""
        req = client_request("GET", "https://sqs.eu-west-1.amazonaws.com/")
        needles = sigv4.sign(req, session())
        for value in ("fakeSecretKey/+0123456789", "FwoGZXIvYXdzEFakeSessionToken==", req.headers["Authorization"]):
            assert needles.redact_bytes(f"echo {value}!".encode()) == b"echo [REDACTED]!"

    def test_explicit_region_and_service_win(self) -> None:
        """The rule's region/service override both the credential's defaults and the host."""
        req = client_request("GET", "https://sqs.eu-west-1.amazonaws.com/")
        sigv4.sign(req, session(region="us-west-1", service="dynamodb"), region="ap-south-1", service="execute-api")
        assert scope(req) == ("ap-south-1", "execute-api")

    def test_credential_defaults_come_before_the_host(self) -> None:
        """Without rule values, the credential's configured region/service are used."""
        req = client_request("GET", "https://sqs.internal.example/")
        sigv4.sign(req, session(region="eu-west-1", service="sqs"))
        assert scope(req) == ("eu-west-1", "sqs")

    def test_only_region_given_derives_service(self) -> None:
        """With only a region configured, the service still comes from the host."""
        req = client_request("GET", "https://sqs.eu-west-1.amazonaws.com/")
        sigv4.sign(req, session(), region="eu-central-1")
        assert scope(req) == ("eu-central-1", "sqs")

    def test_unknown_host_without_config(self) -> None:
        """A host that names no AWS endpoint, with nothing configured, is a ValueError saying what to set."""
        req = client_request("GET", "https://api.example.com/")
        with pytest.raises(ValueError, match=r"cannot tell the AWS region and service from the host "
                                             r"'api\.example\.com': set 'region' and 'service' under the rule's "
                                             r"inject\.sigv4"):
            sigv4.sign(req, session())

    def test_not_an_aws_credential(self) -> None:
        """A credential without an access key id (say, a static token) cannot sign."""
        cred = IssuedCredential(name="stripe", kind="static", secret=Secret("sk"), expires_at=None)
        with pytest.raises(ValueError, match="credential 'stripe' is not an AWS credential"):
            sigv4.sign(client_request("GET", "https://sqs.eu-west-1.amazonaws.com/"), cred)

    def test_http2_authority_is_signed_as_host(self) -> None:
        """An HTTP/2 request's :authority is what the signature covers as host."""
        req = http.Request.make("GET", "https://sqs.eu-west-1.amazonaws.com/", b"", {})
        req.http_version = "HTTP/2.0"
        req.authority = "sqs.eu-west-1.amazonaws.com"
        sigv4.sign(req, session())
        assert "host" in _AUTH.match(req.headers["Authorization"]).group(5).split(";")

    async def test_sts_issued_credentials_verify(self, moto, client, base_keys) -> None:
        """Signed with credentials STS issued, the signature recomputes from those same credentials."""
        cred = await assume_role(moto, client).fetch(ctx())
        req = client_request("GET", "https://s3.eu-west-3.amazonaws.com/bucket/key?list-type=2")
        sigv4.sign(req, cred)
        assert req.headers["X-Amz-Security-Token"] == cred.parts["session_token"].reveal()
        assert req.headers["Authorization"].startswith(
            f"AWS4-HMAC-SHA256 Credential={cred.parts['access_key_id'].reveal()}/")
        assert signature(req) == recomputed_signature(req, secret_key=cred.secret.reveal())


class TestSignedRequestsAcceptedByAws:
    """moto with IAM auth checks every signature sign() makes, with the session keys it issued."""

    @pytest.fixture
    async def cred(self, auth_moto, client, monkeypatch) -> IssuedCredential:
        monkeypatch.setenv("TEST_AWS_ACCESS_KEY_ID", auth_moto.key_id)
        monkeypatch.setenv("TEST_AWS_SECRET_ACCESS_KEY", auth_moto.secret)
        return await assume_role(auth_moto.url, client).fetch(ctx())

    async def test_get_caller_identity(self, auth_moto, client, cred) -> None:
        """A re-signed GetCallerIdentity is answered as the assumed role, session named after the workload."""
        req = client_request("POST", auth_moto.url + "/", b"Action=GetCallerIdentity&Version=2011-06-15",
                             Content_Type="application/x-www-form-urlencoded")
        sigv4.sign(req, cred, region="us-east-1", service="sts")
        resp = await send(client, req)
        assert resp.status_code == 200, resp.text
        assert f"assumed-role/reader/{role_session_name(BILLING)}</Arn>" in resp.text

    async def test_tampered_signature_is_rejected(self, auth_moto, client, cred) -> None:
        """The same request with one signature digit changed is refused: the server really checks."""
        req = client_request("POST", auth_moto.url + "/", b"Action=GetCallerIdentity&Version=2011-06-15",
                             Content_Type="application/x-www-form-urlencoded")
        sigv4.sign(req, cred, region="us-east-1", service="sts")
        sig = signature(req)
        req.headers["Authorization"] = req.headers["Authorization"].replace(sig, sig[:-1] + ("0" if sig[-1] != "0"
                                                                                            else "1"))
        resp = await send(client, req)
        assert resp.status_code == 403
        assert "SignatureDoesNotMatch" in resp.text

    async def test_dynamodb_json_call_with_target(self, auth_moto, client, cred) -> None:
        """A DynamoDB call keeps its X-Amz-Target and is accepted."""
        req = client_request("POST", auth_moto.url + "/", b"{}", X_Amz_Target="DynamoDB_20120810.ListTables",
                             Content_Type="application/x-amz-json-1.0")
        sigv4.sign(req, cred, region="us-east-1", service="dynamodb")
        resp = await send(client, req)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"TableNames": []}

    async def test_s3_put_then_get(self, auth_moto, client, cred) -> None:
        """S3 (its own signing rules: payload hash header, no path normalisation) accepts PUT and GET."""
        for method, path, body in (("PUT", "/reports", b""), ("PUT", "/reports/2024/q1 summary.csv", b"a,b\n1,2\n")):
            req = client_request(method, auth_moto.url + path.replace(" ", "%20"), body)
            sigv4.sign(req, cred, region="us-east-1", service="s3")
            resp = await send(client, req)
            assert resp.status_code == 200, resp.text
        req = client_request("GET", auth_moto.url + "/reports/2024/q1%20summary.csv")
        sigv4.sign(req, cred, region="us-east-1", service="s3")
        resp = await send(client, req)
        assert (resp.status_code, resp.content) == (200, b"a,b\n1,2\n")


class TestRegionAndService:
    @pytest.mark.parametrize(("host", "expected"), [
        ("s3.us-west-2.amazonaws.com", ("us-west-2", "s3")),
        ("s3.amazonaws.com", ("us-east-1", "s3")),
        ("bucket.s3.amazonaws.com", ("us-east-1", "s3")),
        ("my.dotted.bucket.s3.eu-central-1.amazonaws.com", ("eu-central-1", "s3")),
        ("bucket.s3-us-west-2.amazonaws.com", ("us-west-2", "s3")),
        ("s3-external-1.amazonaws.com", ("us-east-1", "s3")),
        ("bucket.s3.dualstack.ap-southeast-2.amazonaws.com", ("ap-southeast-2", "s3")),
        ("s3-fips.us-gov-west-1.amazonaws.com", ("us-gov-west-1", "s3")),
        ("s3.cn-north-1.amazonaws.com.cn", ("cn-north-1", "s3")),
        ("sqs.eu-west-1.amazonaws.com", ("eu-west-1", "sqs")),
        ("queue.amazonaws.com", ("us-east-1", "sqs")),
        ("dynamodb.us-east-1.amazonaws.com", ("us-east-1", "dynamodb")),
        ("streams.dynamodb.us-east-1.amazonaws.com", ("us-east-1", "dynamodb")),
        ("dynamodb.us-east-1.api.aws", ("us-east-1", "dynamodb")),
        ("sts.amazonaws.com", ("us-east-1", "sts")),
        ("sts.eu-north-1.amazonaws.com", ("eu-north-1", "sts")),
        ("sts-fips.us-east-2.amazonaws.com", ("us-east-2", "sts")),
        ("iam.amazonaws.com", ("us-east-1", "iam")),
        ("iam.amazonaws.com.cn", ("cn-north-1", "iam")),
        ("abc123.execute-api.eu-west-2.amazonaws.com", ("eu-west-2", "execute-api")),
        ("vpce-0a1b-c2d3.sqs.eu-west-1.vpce.amazonaws.com", ("eu-west-1", "sqs")),
        ("bucket.vpce-0a1b-c2d3.s3.us-east-1.vpce.amazonaws.com", ("us-east-1", "s3")),
        ("search-logs-x1y2.eu-west-1.es.amazonaws.com", ("eu-west-1", "es")),
        ("bedrock-runtime.us-west-2.amazonaws.com", ("us-west-2", "bedrock")),
        ("email.eu-west-1.amazonaws.com", ("eu-west-1", "ses")),
        ("S3.US-WEST-2.AMAZONAWS.COM.", ("us-west-2", "s3")),
    ])
    def test_derived(self, host: str, expected: tuple[str, str]) -> None:
        """Known endpoint shapes give the SigV4 region and signing name."""
        assert sigv4.region_and_service(host) == expected

    @pytest.mark.parametrize("host", ["api.example.com", "amazonaws.com", "evil-amazonaws.com",
                                      "bucket.s3-accelerate.amazonaws.com", "foo.bar.amazonaws.com",
                                      "us-east-1.amazonaws.com", "127.0.0.1"])
    def test_unknown(self, host: str) -> None:
        """Hosts that do not say their region and service are a ValueError, never a guess."""
        with pytest.raises(ValueError, match=f"cannot tell the AWS region and service from the host '{re.escape(host)}'"):
            sigv4.region_and_service(host)


# -- config ------------------------------------------------------------------------------------


def config_text(pki: Any, credential: str, inject: str = "sigv4: {}") -> str:
    """A config whose credential block starts on line 6, its keys from line 8."""
    return (
        config_head(pki.trust_bundle) +
        "credentials:\n"
        "  aws:\n"
        "    kind: aws_sigv4\n"
        + credential +
        "rules:\n"
        f'  - name: r\n    workloads: ["{BILLING}"]\n'
        "    to: {host: reports.s3.eu-west-1.amazonaws.com}\n"
        f"    inject: {{credential: aws, {inject}}}\n"
    )


WEB = f"    role_arn: {ROLE}\n    web_identity: {{}}\n"
BASE = (f"    role_arn: {ROLE}\n    base_credentials:\n      access_key_id: env:TEST_AWS_ACCESS_KEY_ID\n"
        "      secret_access_key: env:TEST_AWS_SECRET_ACCESS_KEY\n")


def load(tmp_path: Path, text: str, *, resolve: bool = False):
    return load_text(tmp_path, text, name="aws.yaml", resolve=resolve)


class TestConfig:
    def test_kind_injects_by_signing_only(self) -> None:
        """aws_sigv4 credentials can only be injected as a SigV4 signature."""
        assert KINDS["aws_sigv4"].injections == frozenset({"sigv4"})

    def test_base_credentials_mode_and_defaults(self, pki, tmp_path) -> None:
        """base_credentials selects AssumeRole; the STS endpoint, region and duration have defaults."""
        s = load(tmp_path, config_text(pki, BASE)).credentials["aws"].settings
        assert (s.mode, s.role_arn, str(s.access_key_id), str(s.secret_access_key)) == (
            "assume_role", ROLE, "env:TEST_AWS_ACCESS_KEY_ID", "env:TEST_AWS_SECRET_ACCESS_KEY")
        assert (s.sts_endpoint, s.sts_region, s.duration_seconds, s.region, s.service) == (
            "https://sts.amazonaws.com", "us-east-1", 900, None, None)

    def test_web_identity_mode(self, pki, tmp_path) -> None:
        """web_identity (empty, or even null) selects AssumeRoleWithWebIdentity with the default audience."""
        for block in ("    web_identity: {}\n", "    web_identity:\n"):
            s = load(tmp_path, config_text(pki, f"    role_arn: {ROLE}\n" + block)).credentials["aws"].settings
            assert (s.mode, s.audience, s.access_key_id) == ("web_identity", "sts.amazonaws.com", None)
            assert s.secret_refs() == {}

    def test_all_optional_keys(self, pki, tmp_path) -> None:
        """Every optional key lands typed."""
        s = load(tmp_path, config_text(pki, (
            "    role_arn: arn:aws-cn:iam::123456789012:role/path/to/role\n"
            "    web_identity: {audience: https://aws.example.org}\n"
            "    sts_endpoint: https://sts.cn-north-1.amazonaws.com.cn\n"
            "    sts_region: cn-north-1\n    duration_seconds: 43200\n    region: cn-north-1\n    service: s3\n"
        ))).credentials["aws"].settings
        assert (s.audience, s.sts_endpoint, s.sts_region, s.duration_seconds, s.region, s.service) == (
            "https://aws.example.org", "https://sts.cn-north-1.amazonaws.com.cn", "cn-north-1", 43200,
            "cn-north-1", "s3")

    def test_check_resolves_the_base_key_pair(self, pki, tmp_path, monkeypatch) -> None:
        """With secrets resolved, both base keys must be readable; an unset one is reported."""
        monkeypatch.setenv("TEST_AWS_ACCESS_KEY_ID", "AKIA")
        monkeypatch.delenv("TEST_AWS_SECRET_ACCESS_KEY", raising=False)
        with pytest.raises(ConfigError, match=re.escape(
                "credentials.aws.base_credentials.secret_access_key: cannot resolve env:TEST_AWS_SECRET_ACCESS_KEY")):
            load(tmp_path, config_text(pki, BASE), resolve=True)
        monkeypatch.setenv("TEST_AWS_SECRET_ACCESS_KEY", "secret")
        assert "aws" in load(tmp_path, config_text(pki, BASE), resolve=True).credentials

    @pytest.mark.parametrize(("credential", "where", "message"), [
        (WEB.replace(ROLE, "arn:aws:iam::123:role/x"), "aws.yaml:8 credentials.aws.role_arn",
         "invalid role ARN 'arn:aws:iam::123:role/x': expected arn:aws:iam::<12-digit account id>:role/<name>"),
        (WEB.replace(ROLE, "arn:aws:iam::123456789012:user/bob"), "aws.yaml:8 credentials.aws.role_arn",
         "invalid role ARN"),
        (f"    role_arn: {ROLE}\n", "aws.yaml:6 credentials.aws",
         ("give exactly one of 'base_credentials' (STS AssumeRole with a key pair) or 'web_identity' "
         "(AssumeRoleWithWebIdentity with a JWT the proxy signs)")),
        (BASE + "    web_identity: {}\n", "aws.yaml:6 credentials.aws",
         "give exactly one of 'base_credentials'"),
        (BASE.replace("      secret_access_key: env:TEST_AWS_SECRET_ACCESS_KEY\n", ""),
         "aws.yaml:9 credentials.aws.base_credentials", "missing required key 'secret_access_key'"),
        (BASE.replace("env:TEST_AWS_ACCESS_KEY_ID", "AKIAINLINE"),
         "aws.yaml:10 credentials.aws.base_credentials.access_key_id",
         "invalid secret reference, not a reference (the value is not shown"),
        (f"    role_arn: {ROLE}\n    web_identity: {{audiense: x}}\n", "aws.yaml:9 credentials.aws.web_identity.audiense",
         "unknown key 'audiense' (did you mean 'audience'?"),
        (f"    role_arn: {ROLE}\n    web_identity: {{audience: ''}}\n",
         "aws.yaml:9 credentials.aws.web_identity.audience", "must be a non-empty string"),
        (WEB + "    duration_seconds: 600\n", "aws.yaml:10 credentials.aws.duration_seconds",
         "must be an integer from 900 to 43200, got 600"),
        (WEB + "    sts_endpoint: http://sts.example.com\n", "aws.yaml:10 credentials.aws.sts_endpoint",
         "'http://sts.example.com' would send credentials in plaintext"),
        (WEB + "    sts_region: US-EAST-1\n", "aws.yaml:10 credentials.aws.sts_region",
         "invalid AWS region 'US-EAST-1': lower-case letters, digits and '-'"),
        (WEB + "    service: S3\n", "aws.yaml:10 credentials.aws.service", "invalid AWS service 'S3'"),
        (WEB + "    role: x\n", "aws.yaml:10 credentials.aws.role", "unknown key 'role'"),
    ])
    def test_errors_name_the_key_path(self, pki, tmp_path, credential, where, message) -> None:
        """Each mistake is reported with file, line and the exact key path."""
        with pytest.raises(ConfigError, match=re.escape(f"{where}: {message}")):
            load(tmp_path, config_text(pki, credential))

    def test_loopback_http_sts_endpoint_is_allowed(self, pki, tmp_path) -> None:
        """Plain http is accepted for a loopback STS (moto in tests)."""
        s = load(tmp_path, config_text(pki, WEB + "    sts_endpoint: http://127.0.0.1:5000\n")).credentials["aws"]
        assert s.settings.sts_endpoint == "http://127.0.0.1:5000"

    def test_header_injection_is_refused(self, pki, tmp_path) -> None:
        """An aws_sigv4 credential cannot be pasted into a header: the rule must sign."""
        with pytest.raises(ConfigError, match=re.escape(
                "rules[0].inject.header: a aws_sigv4 credential cannot be injected as 'header' (use: sigv4)")):
            load(tmp_path, config_text(pki, WEB, inject="header: Authorization"))


class TestExampleConfig:
    def test_config_aws_yaml_is_valid(self, pki, tmp_path) -> None:
        """config/aws.yaml loads (secrets unresolved) next to a dev CA, as `make dev-certs` makes it."""
        cfg = load_example(tmp_path, "aws.yaml")
        assert {c.kind for c in cfg.credentials.values()} == {"aws_sigv4"}
        assert {c.settings.mode for c in cfg.credentials.values()} == {"assume_role", "web_identity"}
        assert all(r.inject is not None and r.inject.sigv4 for r in cfg.rules if r.action == "inject")
