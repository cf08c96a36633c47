"""The error contract: what a refused request looks like to the client.

A JSON body ``{"error", "reason", "rule", "request_id"}`` with an honest status; never a
traceback, a secret or a provider's raw error text.
"""

from __future__ import annotations

import json
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

DENY_MESSAGES = {
    "no_rule": "no rule allows this workload to reach this destination",
    "method": "the rule for this destination does not allow this method",
    "path": "the rule for this destination does not allow this path",
    "plaintext_upstream": "the rule does not allow sending its credential over plaintext HTTP",
}


@dataclass
class Refusal(Exception):
    status: int
    reason: str
    message: str
    rule: str | None = None


def error_response(request_id: str, refusal: Refusal) -> http.Response:
    body = json.dumps({"error": refusal.message, "reason": refusal.reason,
                       "rule": refusal.rule, "request_id": request_id}).encode()
    return http.Response.make(refusal.status, body, {
        "Content-Type": "application/json", REQUEST_ID_HEADER: request_id, "Cache-Control": "no-store",
    })
