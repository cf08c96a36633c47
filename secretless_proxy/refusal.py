"""The error contract: what a refused request looks like to the client.

A JSON body ``{"error", "reason", "rule", "request_id"}`` with an honest status; never a
traceback, a secret or a provider's raw error text.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from mitmproxy import http

from secretless_proxy.errors import SecretlessError
from secretless_proxy.reasons import Reason

REQUEST_ID_HEADER = "X-Secretless-Request-Id"

DENY_MESSAGES = {
    Reason.NO_RULE: "no rule allows this workload to reach this destination",
    Reason.METHOD: "the rule for this destination does not allow this method",
    Reason.PATH: "the rule for this destination does not allow this path",
    Reason.PLAINTEXT_UPSTREAM: "the rule does not allow plaintext HTTP to its upstream (see allow_plaintext)",
}


@dataclass
class Refusal(SecretlessError):
    """A request answered with the error contract instead of being forwarded.

    ``reason`` is a ``Reason``; a plain string is accepted and looked up (ValueError if it is not
    a member), so every refusal carries a reason of the one vocabulary.
    """

    status: int
    reason: str
    message: str
    rule: str | None = None
    retry_after: float | None = None  # seconds: sent as Retry-After (RFC 9110 §10.2.3) on a 503
    allow: tuple[str, ...] = ()  # the methods sent as Allow (RFC 9110 §10.2.1) on a 405

    def __post_init__(self) -> None:
        self.reason = Reason(self.reason)


def error_response(request_id: str, refusal: Refusal) -> http.Response:
    body = json.dumps({"error": refusal.message, "reason": refusal.reason,
                       "rule": refusal.rule, "request_id": request_id}).encode()
    headers = {"Content-Type": "application/json", REQUEST_ID_HEADER: request_id, "Cache-Control": "no-store"}
    if refusal.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(refusal.retry_after)))  # delay-seconds: a whole number
    return http.Response.make(refusal.status, body, headers)


def decoded_too_large(limit: int, rule: str | None) -> Refusal:
    """The refusal of an inject-rule response whose decoded body is over the scan window."""
    return Refusal(502, Reason.RESPONSE_TOO_LARGE,
                   f"the response body decodes to more than limits.max_response_scan_bytes ({limit} bytes), the most "
                   "this rule checks for an echoed credential; it was withheld (see inject.echo_check)", rule)
