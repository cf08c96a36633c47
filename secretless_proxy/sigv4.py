"""AWS Signature Version 4 for outbound requests: drop what the client signed, sign with STS keys.

botocore's signer does the cryptography (never a hand-written one). This module only maps a
mitmproxy request onto a botocore ``AWSRequest`` and back, and works out the signing region
and service from the host when neither the rule nor the credential names them.

What is stripped: ``Authorization`` and the ``X-Amz-*`` headers and query parameters that carry
or scope a signature (date, security token, credential, signature, payload hash, presigned-URL
fields). Other ``X-Amz-*`` headers select the operation (``X-Amz-Target`` for DynamoDB, SQS
JSON, KMS...; ``X-Amz-Meta-*``, ``X-Amz-Copy-Source`` for S3; ``X-Amz-Trailer`` and
``X-Amz-Decoded-Content-Length`` for S3 checksummed uploads): they are kept and signed, so
the call the client asked for is the call that is signed. What a signed call may do is bounded
by the role's IAM policy, not by this module.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from mitmproxy import http

from secretless_proxy.credentials.base import IssuedCredential
from secretless_proxy.redaction import Needles, needles_for

__all__ = ["region_and_service", "sign"]

# Names (lower case) that carry or scope a signature, in headers and in presigned-URL queries.
_AUTH_NAMES = frozenset({
    "authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256",
    "x-amz-algorithm", "x-amz-credential", "x-amz-signedheaders", "x-amz-signature",
    "x-amz-expires",
})
# Hop-by-hop headers meant for the proxy: never forwarded, so never signed (an HTTP/2 upstream
# drops Proxy-Connection, which would void a signature that covered it).
_PROXY_HEADERS = ("Proxy-Authorization", "Proxy-Connection")
# S3 payload modes the client may choose without holding a key; kept so an aws-chunked body
# with a trailing checksum (botocore's default for uploads) still matches its declared mode.
_UNSIGNED_PAYLOADS = frozenset({"UNSIGNED-PAYLOAD", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"})
# Headers botocore sets while signing, copied back onto the outgoing request.
_SIGNING_HEADERS = ("Authorization", "X-Amz-Date", "Date", "X-Amz-Security-Token", "X-Amz-Content-SHA256")

_SUFFIXES = (".amazonaws.com.cn", ".amazonaws.com", ".api.aws")
_REGION = re.compile(r"(?:us|eu|ap|sa|ca|me|af|il|mx|cn)(?:-gov|-iso[a-z]?)?-[a-z]+-\d{1,2}\Z")
# Host labels whose SigV4 signing name differs from the label.
_SIGNING_NAMES = {
    "email": "ses",
    "queue": "sqs",
    "bedrock-runtime": "bedrock",
    "bedrock-agent": "bedrock",
    "bedrock-agent-runtime": "bedrock",
}


def sign(request: http.Request, cred: IssuedCredential, *, region: str | None = None,
         service: str | None = None) -> Needles:
    """Re-sign ``request`` with ``cred`` (an aws_sigv4 credential); returns the needles to redact.

    ``region``/``service``: the rule's ``inject.sigv4`` values; when None, the credential's
    configured defaults (``cred.meta``), then what the host says. ValueError when the scope
    cannot be known or the request cannot be re-signed; the request is left unsigned then.
    """
    access_key = cred.parts.get("access_key_id")
    if access_key is None:
        raise ValueError(f"credential {cred.name!r} is not an AWS credential (it has no access key id)")
    token = cred.parts.get("session_token")
    region = region or cred.meta.get("region")
    service = service or cred.meta.get("service")
    if region is None or service is None:
        host_region, host_service = region_and_service(request.host)
        region, service = region or host_region, service or host_service

    client_payload = request.headers.get("x-amz-content-sha256", "")
    if client_payload.startswith("STREAMING-") and client_payload not in _UNSIGNED_PAYLOADS:
        # Each chunk's signature chains from the client's own (fake) request signature.
        raise ValueError("chunk-signed (STREAMING-AWS4-*) uploads cannot be re-signed: configure the "
                         "client to send an unsigned or whole-body payload")
    _strip(request)

    aws = AWSRequest(method=request.method, url=request.url, data=request.raw_content or b"")
    for name, value in request.headers.items(multi=True):
        aws.headers[name] = value  # HTTPHeaders appends: repeated headers stay repeated
    if "host" not in aws.headers and request.host_header:
        aws.headers["Host"] = request.host_header  # HTTP/2: the :authority goes out as the host
    creds = ReadOnlyCredentials(access_key.reveal(), cred.secret.reveal(), token.reveal() if token else None)
    signer: SigV4Auth
    if service != "s3":
        signer = SigV4Auth(creds, service, region)
    elif client_payload in _UNSIGNED_PAYLOADS:
        signer = _S3KeepPayload(creds, service, region, payload=client_payload)
    else:
        signer = S3SigV4Auth(creds, service, region)
    signer.add_auth(aws)

    for name in _SIGNING_HEADERS:
        if name in aws.headers:
            request.headers[name] = aws.headers[name]
    # The Authorization value changes every request: its forms are derived but not cached.
    return needles_for(cred.secret.reveal(), token.reveal() if token else "",
                       per_request=(aws.headers["Authorization"],))


def region_and_service(host: str) -> tuple[str, str]:
    """The SigV4 (region, service) an AWS endpoint host implies; ValueError when it cannot tell.

    ``s3.us-west-2.amazonaws.com`` → (us-west-2, s3); ``bucket.s3.amazonaws.com`` and
    ``sts.amazonaws.com`` → us-east-1; ``search-x.eu-west-1.es.amazonaws.com`` → (eu-west-1, es).
    """
    h = host.lower().rstrip(".")
    suffix = next((s for s in _SUFFIXES if h.endswith(s)), None)
    found = _from_labels(h[: -len(suffix)].split("."), suffix) if suffix else None
    if found is None:
        raise ValueError(f"cannot tell the AWS region and service from the host {host!r}: set "
                         "'region' and 'service' under the rule's inject.sigv4 (or on the credential)")
    return found


def _from_labels(labels: list[str], suffix: str) -> tuple[str, str] | None:
    if len(labels) > 1 and labels[-1] == "vpce":  # interface endpoints: vpce-x.sqs.eu-west-1.vpce
        labels = labels[:-1]
    last = labels[-1]
    if not last:
        return None
    if last.startswith("s3-accelerate"):
        return None  # the signing region is the bucket's, which the host does not say
    if last in ("s3", "s3-external-1"):  # s3.amazonaws.com, bucket.s3.amazonaws.com
        return ("us-east-1", "s3")
    if last.startswith("s3-") and _REGION.match(last[3:]):  # legacy bucket.s3-us-west-2
        return (last[3:], "s3")
    if _REGION.match(last):
        if len(labels) < 2:
            return None
        name = labels[-2]
        if name == "dualstack" and len(labels) >= 3:  # s3.dualstack.us-east-1
            name = labels[-3]
        return (last, _signing_name(name))
    if len(labels) >= 2 and _REGION.match(labels[-2]):  # search-x.eu-west-1.es, x.us-east-1.aoss
        return (labels[-2], _signing_name(last))
    if len(labels) == 1:  # global endpoints: sts, iam, route53, cloudfront
        return ("cn-north-1" if suffix == ".amazonaws.com.cn" else "us-east-1", _signing_name(last))
    return None


def _signing_name(label: str) -> str:
    label = label.removesuffix("-fips")
    return _SIGNING_NAMES.get(label, label)


def _strip(request: http.Request) -> None:
    """Remove the client's signature and credentials (headers and presigned-URL query fields)."""
    for name in _PROXY_HEADERS:
        request.headers.pop(name, None)
    for name in {n.lower() for n in request.headers if n.lower() in _AUTH_NAMES}:
        request.headers.pop(name, None)  # removes every value, in any letter case
    path, sep, query = request.path.partition("?")
    if sep:
        # Rebuilt from the raw pairs: re-encoding the rest (as request.query would) could
        # change the bytes the signature covers from those the client's SDK chose.
        kept = [pair for pair in query.split("&") if _query_name(pair) not in _AUTH_NAMES]
        if len(kept) != len(query.split("&")):
            request.path = path + ("?" + "&".join(kept) if kept else "")


def _query_name(pair: str) -> str:
    return unquote_plus(pair.partition("=")[0]).lower()


class _S3KeepPayload(S3SigV4Auth):
    """S3 signing that keeps the unsigned-payload mode the client declared for its body."""

    def __init__(self, credentials: ReadOnlyCredentials, service_name: str, region_name: str, *,
                 payload: str) -> None:
        super().__init__(credentials, service_name, region_name)
        self._payload = payload

    def payload(self, request: AWSRequest) -> str:
        return self._payload
