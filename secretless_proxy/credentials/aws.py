"""``kind: aws_sigv4``: STS session credentials per workload, for re-signing requests with SigV4.

Two ways to get them, chosen by which key is given:

- ``base_credentials: {access_key_id, secret_access_key}``: STS ``AssumeRole``, signed with
  the base key pair (the one long-lived secret stays inside the proxy);
- ``web_identity: {audience}``: STS ``AssumeRoleWithWebIdentity`` with a short-lived JWT the
  proxy mints for the workload (``sub`` = its SPIFFE ID). The STS call is unsigned and no AWS
  secret exists anywhere: the role's trust policy trusts the proxy's OIDC issuer.

STS is called through its Query API with the shared ``httpx.AsyncClient`` (never botocore's
blocking client in the event loop). Credentials are cached per workload, and the role session
name is derived from the workload, so CloudTrail shows which workload made each call.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode

import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from secretless_proxy.config import fields
from secretless_proxy.config.yamlsource import Path_, Source
from secretless_proxy.credentials.base import (
    CredentialKind,
    IssuedCredential,
    Provider,
    ProviderError,
    RequestContext,
)
from secretless_proxy.errors import SecretUnavailable
from secretless_proxy.secretrefs import Secret, SecretRef

STS_VERSION = "2011-06-15"
DEFAULT_STS_ENDPOINT = "https://sts.amazonaws.com"
DEFAULT_AUDIENCE = "sts.amazonaws.com"
MAX_RESPONSE_BYTES = 256 * 1024  # an STS answer is ~2 KiB; anything far larger is not one
WEB_IDENTITY_TOKEN_TTL = 300.0  # the JWT only has to live through one STS call

_ROLE_ARN = re.compile(r"arn:aws(?:-cn|-us-gov|-iso(?:-[a-z])?)?:iam::\d{12}:role/[\w+=,.@/-]{1,512}\Z",
                       re.ASCII)
_AWS_NAME = re.compile(r"[a-z0-9-]{1,64}\Z")
_SESSION_CHARS = re.compile(r"[^\w+=,.@-]", re.ASCII)  # RoleSessionName: [\w+=,.@-]{2,64}
_ERROR_CODE = re.compile(r"[A-Za-z0-9.:_-]{1,64}\Z")
# STS error codes worth another attempt (the rest are configuration or trust problems).
_RETRYABLE_CODES = frozenset({"Throttling", "ThrottlingException", "RequestLimitExceeded",
                              "IDPCommunicationError", "ServiceUnavailable", "InternalFailure"})


@dataclass(frozen=True, kw_only=True)
class AwsSettings:
    role_arn: str
    mode: Literal["assume_role", "web_identity"]
    access_key_id: SecretRef | None = None  # assume_role only
    secret_access_key: SecretRef | None = None
    audience: str = DEFAULT_AUDIENCE  # web_identity only
    sts_endpoint: str = DEFAULT_STS_ENDPOINT
    sts_region: str = "us-east-1"
    duration_seconds: int = 900
    region: str | None = None  # signing defaults when the rule's inject.sigv4 names none
    service: str | None = None

    def secret_refs(self) -> dict[str, SecretRef]:
        if self.access_key_id is None or self.secret_access_key is None:
            return {}
        return {"base_credentials.access_key_id": self.access_key_id,
                "base_credentials.secret_access_key": self.secret_access_key}


def parse(src: Source, p: Path_, m: dict[str, Any], base: Path) -> AwsSettings | None:
    ok = True
    role_arn = src.string(p + ("role_arn",), m["role_arn"])
    if role_arn is not None and not _ROLE_ARN.match(role_arn):
        src.error(p + ("role_arn",), f"invalid role ARN {role_arn!r}: expected "
                                     "arn:aws:iam::<12-digit account id>:role/<name>")
        ok = False
    kw: dict[str, Any] = {}
    modes = [k for k in ("base_credentials", "web_identity") if k in m]
    if len(modes) != 1:
        src.error(p, "give exactly one of 'base_credentials' (STS AssumeRole with a key pair) or "
                     "'web_identity' (AssumeRoleWithWebIdentity with a JWT the proxy signs)"
                     + (f" (found: {', '.join(modes)})" if modes else ""))
        ok = False
    elif modes[0] == "base_credentials":
        bp = p + ("base_credentials",)
        bc = src.mapping(bp, m["base_credentials"], required=("access_key_id", "secret_access_key"))
        refs = {k: fields.secret_ref(src, bp + (k,), bc[k], base) for k in ("access_key_id", "secret_access_key")
                if bc and k in bc}
        ok = ok and len(refs) == 2 and all(refs.values())
        kw.update(mode="assume_role", **refs)
    else:
        wp = p + ("web_identity",)
        wi = src.mapping(wp, m["web_identity"] if m["web_identity"] is not None else {}, optional=("audience",))
        kw["mode"] = "web_identity"
        if wi and "audience" in wi:
            audience = src.string(wp + ("audience",), wi["audience"])
            ok = ok and audience is not None
            kw["audience"] = audience
        ok = ok and wi is not None
    if "sts_endpoint" in m:
        kw["sts_endpoint"] = fields.url(src, p + ("sts_endpoint",), m["sts_endpoint"])
        ok = ok and kw["sts_endpoint"] is not None
    for key in ("sts_region", "region", "service"):
        if key in m:
            value = src.string(p + (key,), m[key])
            if value is not None and not _AWS_NAME.match(value):
                src.error(p + (key,), f"invalid AWS {key.removeprefix('sts_')} {value!r}: lower-case "
                                      "letters, digits and '-' (e.g. us-east-1, s3)")
                value = None
            ok = ok and value is not None
            kw[key] = value
    if "duration_seconds" in m:
        kw["duration_seconds"] = src.integer(p + ("duration_seconds",), m["duration_seconds"], lo=900, hi=43200)
        ok = ok and kw["duration_seconds"] is not None
    if not ok or role_arn is None:
        return None
    return AwsSettings(role_arn=role_arn, **kw)


def role_session_name(spiffe_id: str) -> str:
    """A RoleSessionName naming the workload: ``secretless-<hash>-<path tail>``, at most 64 chars.

    The hash keeps names of different workloads apart when the tail is cut or sanitised; the
    tail keeps them readable in CloudTrail.
    """
    digest = hashlib.sha256(spiffe_id.encode()).hexdigest()[:10]
    _, _, path = spiffe_id.removeprefix("spiffe://").partition("/")
    tail = _SESSION_CHARS.sub("_", path.strip("/").replace("/", "."))
    head = f"secretless-{digest}"
    room = 64 - len(head) - 1
    return f"{head}-{tail[-room:].lstrip('.')}" if tail else head


class AwsProvider(Provider):
    kind = "aws_sigv4"
    settings: AwsSettings

    def scope(self, ctx: RequestContext) -> str | None:
        return ctx.workload.spiffe_id

    async def fetch(self, ctx: RequestContext) -> IssuedCredential:
        s = self.settings
        http = self.deps.http
        if http is None:
            raise ProviderError("no HTTP client is available to call STS", retryable=False)
        workload = ctx.workload.spiffe_id
        form = {"Version": STS_VERSION, "RoleArn": s.role_arn, "RoleSessionName": role_session_name(workload),
                "DurationSeconds": str(s.duration_seconds)}
        if s.mode == "web_identity":
            action = "AssumeRoleWithWebIdentity"
            if self.deps.signer is None:
                raise ProviderError(f"credential {self.name!r} uses web_identity, which needs the proxy's "
                                    "signing key: add a 'signing:' section to the config", retryable=False)
            form["WebIdentityToken"] = self.deps.signer.mint({"sub": workload, "aud": s.audience},
                                                             ttl=WEB_IDENTITY_TOKEN_TTL)
        else:
            action = "AssumeRole"
        body = urlencode({"Action": action, **form}).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8", "Accept": "application/xml"}
        if s.mode == "assume_role":
            headers = self._signed(headers, body)
        status, data = await self._post(http, body, headers, action)
        meta = {"role_arn": s.role_arn}
        meta.update({k: v for k, v in (("region", s.region), ("service", s.service)) if v})
        if status != 200:
            code = _error_code(data)
            raise ProviderError(f"STS refused {action} for role {s.role_arn}: {code} (HTTP {status})",
                                retryable=status >= 500 or status == 429 or code in _RETRYABLE_CODES)
        try:
            key_id, secret, token, expires_at, assumed = _parse_credentials(data)
        except ValueError:
            raise ProviderError(f"STS answered {action} for role {s.role_arn} with something that is not "
                                "an STS credentials document") from None
        if expires_at <= self.deps.now():
            raise ProviderError(f"STS returned credentials for role {s.role_arn} that have already expired")
        if assumed:
            meta["assumed_role_arn"] = assumed
        return IssuedCredential(name=self.name, kind=self.kind, secret=secret, expires_at=expires_at,
                                scope=workload, issued_at=self.deps.now(),
                                parts={"access_key_id": key_id, "session_token": token}, meta=meta)

    def _signed(self, headers: dict[str, str], body: bytes) -> dict[str, str]:
        """SigV4 headers for the AssumeRole call, signed with the base key pair."""
        s = self.settings
        assert s.access_key_id is not None and s.secret_access_key is not None
        try:
            key_id, secret = s.access_key_id.resolve(), s.secret_access_key.resolve()
        except SecretUnavailable as exc:
            raise ProviderError(str(exc), retryable=False) from None
        req = AWSRequest(method="POST", url=s.sts_endpoint, data=body, headers=headers)
        SigV4Auth(ReadOnlyCredentials(key_id.reveal(), secret.reveal(), None), "sts", s.sts_region).add_auth(req)
        return dict(req.headers.items())

    async def _post(self, http: httpx.AsyncClient, body: bytes, headers: dict[str, str],
                    action: str) -> tuple[int, bytes]:
        endpoint = self.settings.sts_endpoint
        try:
            async with http.stream("POST", endpoint, content=body, headers=headers) as resp:
                data = bytearray()
                async for chunk in resp.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_RESPONSE_BYTES:
                        raise ProviderError(f"STS at {endpoint} answered {action} with more than "
                                            f"{MAX_RESPONSE_BYTES} bytes")
                return resp.status_code, bytes(data)
        except httpx.TimeoutException as exc:
            raise ProviderError(f"STS at {endpoint} did not answer {action} in time") from exc
        except httpx.HTTPError as exc:
            raise ProviderError(f"cannot reach STS at {endpoint} ({type(exc).__name__})") from exc


def _xml(data: bytes) -> ET.Element:
    # STS never sends a DTD; refusing one rules out entity-expansion tricks before parsing.
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise ValueError("DTD in an STS response")
    try:
        return ET.fromstring(data)
    except ET.ParseError:
        raise ValueError("not XML") from None


def _error_code(data: bytes) -> str:
    """The AWS error Code of an ErrorResponse; never its Message (it may quote request values)."""
    try:
        code = _xml(data).findtext(".//{*}Error/{*}Code")
    except ValueError:
        code = None
    code = (code or "").strip()
    return code if _ERROR_CODE.match(code) else "an unrecognised error"


def _parse_credentials(data: bytes) -> tuple[Secret, Secret, Secret, float, str | None]:
    root = _xml(data)
    creds = root.find(".//{*}Credentials")
    if creds is None:
        raise ValueError("no Credentials")
    values = [(creds.findtext(f"{{*}}{k}") or "").strip()
              for k in ("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")]
    if not all(values) or any(c in v for v in values[:3] for c in "\r\n\x00 "):
        raise ValueError("missing or malformed field")
    expiration = datetime.fromisoformat(values[3])
    if expiration.tzinfo is None:
        raise ValueError("Expiration without a time zone")
    assumed = root.findtext(".//{*}AssumedRoleUser/{*}Arn")
    return (Secret(values[0]), Secret(values[1]), Secret(values[2]), expiration.timestamp(),
            assumed.strip() if assumed else None)


KINDS = [CredentialKind(
    name="aws_sigv4",
    required=("role_arn",),
    optional=("base_credentials", "web_identity", "sts_endpoint", "sts_region", "duration_seconds",
              "region", "service"),
    parse=parse,
    provider=AwsProvider,
    injections=frozenset({"sigv4"}),
)]
