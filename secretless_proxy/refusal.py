"""The error contract: what a refused request looks like to the client.

A JSON body ``{"error", "reason", "rule", "request_id"}`` with an honest status; never a
traceback, a secret or a provider's raw error text.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from mitmproxy import http

REQUEST_ID_HEADER = "X-Secretless-Request-Id"

HOST_MISMATCH = "host_mismatch"
CREDENTIAL_UNAVAILABLE = "credential_unavailable"
AUDIT_UNAVAILABLE = "audit_unavailable"
INTERNAL = "internal_error"
NOT_CONFIGURED = "not_configured"
STORE_UNAVAILABLE = "store_unavailable"
GRANT_REQUIRED = "grant_required"
DESTINATION_PRIVATE = "destination_private"  # 403: an address the rule may not reach (destination.py)
DNS_FAILED = "dns_failed"  # 502: the decided host does not resolve
DNS_TIMEOUT = "dns_timeout"  # 504: the resolver did not answer in time
# A failed upstream connection (destination.upstream_refusal): never names the resolved address.
UPSTREAM_UNREACHABLE = "upstream_unreachable"  # 502: connection refused, reset, no route
UPSTREAM_TLS_FAILED = "upstream_tls_failed"  # 502: no TLS, a failed handshake or an unverified certificate
UPSTREAM_TIMEOUT = "upstream_timeout"  # 504: the upstream did not answer the connection in time
# The edge (issue 8): what is not an HTTP request that policy can judge, or is too large to judge.
PROTOCOL_REFUSED = "protocol_refused"  # raw TCP/UDP, non-HTTP bytes in a tunnel, h2 CONNECT, other modes
UPGRADE_REFUSED = "upgrade_refused"  # Upgrade: h2c or anything but websocket
HEADER_INVALID = "header_invalid"  # CR/LF/NUL or another control character in the request line or a header
METHOD_NOT_CANONICAL = "method_not_canonical"  # `get`, `Get`: methods are case-sensitive (RFC 9110 §9.1)
HEAD_TOO_LARGE = "head_too_large"  # 431: request line + headers over limits.max_request_head_bytes
BODY_TOO_LARGE = "body_too_large"  # 413: request body over limits.max_request_body_bytes
RESPONSE_TOO_LARGE = "response_too_large"  # inject-rule response over limits.max_response_scan_bytes (raw or decoded)
RESPONSE_HEAD_TOO_LARGE = "response_head_too_large"  # 502: upstream status line + headers over limits.max_response_head_bytes
TRANSFER_ENCODING_REFUSED = "transfer_encoding_refused"  # 502: upstream Transfer-Encoding other than plain chunked

DENY_MESSAGES = {
    "no_rule": "no rule allows this workload to reach this destination",
    "method": "the rule for this destination does not allow this method",
    "path": "the rule for this destination does not allow this path",
    "plaintext_upstream": "the rule does not allow plaintext HTTP to its upstream (see allow_plaintext)",
}


@dataclass
class Refusal(Exception):
    status: int
    reason: str
    message: str
    rule: str | None = None
    retry_after: float | None = None  # seconds: sent as Retry-After (RFC 9110 §10.2.3) on a 503
    allow: tuple[str, ...] = ()  # the methods sent as Allow (RFC 9110 §10.2.1) on a 405


def error_response(request_id: str, refusal: Refusal) -> http.Response:
    body = json.dumps({"error": refusal.message, "reason": refusal.reason,
                       "rule": refusal.rule, "request_id": request_id}).encode()
    headers = {"Content-Type": "application/json", REQUEST_ID_HEADER: request_id, "Cache-Control": "no-store"}
    if refusal.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(refusal.retry_after)))  # delay-seconds: a whole number
    return http.Response.make(refusal.status, body, headers)


def decoded_too_large(limit: int, rule: str | None) -> Refusal:
    """The refusal of an inject-rule response whose decoded body is over the scan window."""
    return Refusal(502, RESPONSE_TOO_LARGE,
                   f"the response body decodes to more than limits.max_response_scan_bytes ({limit} bytes), the most "
                   "this rule checks for an echoed credential; it was withheld (see inject.echo_check)", rule)
