"""The error contract's vocabulary: every ``reason`` a refusal can carry, spelled once.

A reason is what a refused client reads in ``{"error", "reason", ...}``, what the audit log
records and what ``secretless_denied_total{reason}`` counts, so it is API: renaming one breaks
dashboards, alerts and clients. ``Reason`` is a ``StrEnum``: a member *is* its string, so it
serialises, formats and compares as the plain value (``Reason.NO_RULE == "no_rule"``) and the
JSON bodies, audit records and metric labels are the strings below.

README's error contract gives each reason its status; docs/metrics.md lists the proxy's under
``secretless_denied_total``. ``tests/test_reasons.py`` holds both documents, and the code that
raises refusals, to this class.
"""

from __future__ import annotations

from enum import StrEnum, unique


@unique
class Reason(StrEnum):
    """Why a request was refused."""

    # 407 on the proxy port, 401 on the admin API: no verified workload identity (identity.py, trust/proof.py).
    IDENTITY_MISSING = "identity_missing"
    IDENTITY_UNTRUSTED = "identity_untrusted"
    IDENTITY_EXPIRED = "identity_expired"
    IDENTITY_INVALID = "identity_invalid"
    IDENTITY_TRUST_DOMAIN = "identity_trust_domain"
    IDENTITY_CONFLICT = "identity_conflict"  # two different certificates on one connection

    # 403: policy (policy.py) names how close the nearest rule came.
    NO_RULE = "no_rule"
    METHOD = "method"
    PATH = "path"
    PLAINTEXT_UPSTREAM = "plaintext_upstream"
    HOST_MISMATCH = "host_mismatch"  # request target, Host, SNI and CONNECT target disagree
    GRANT_REQUIRED = "grant_required"
    DESTINATION_PRIVATE = "destination_private"  # an address the rule may not reach (destinations/pinning.py)

    # The edge (issue 8): what is not an HTTP request that policy can judge, or is too large to judge.
    PROTOCOL_REFUSED = "protocol_refused"  # 400: raw TCP/UDP, non-HTTP bytes in a tunnel, h2 CONNECT, other modes
    UPGRADE_REFUSED = "upgrade_refused"  # 400: Upgrade: h2c or anything but websocket
    HEADER_INVALID = "header_invalid"  # 400: CR/LF/NUL or another control character in the request line or a header
    METHOD_NOT_CANONICAL = "method_not_canonical"  # 400: `get`, `Get`: methods are case-sensitive (RFC 9110 §9.1)
    HEAD_TOO_LARGE = "head_too_large"  # 431: request line + headers over limits.max_request_head_bytes
    BODY_TOO_LARGE = "body_too_large"  # 413: request body over limits.max_request_body_bytes
    BODY_MALFORMED = "body_malformed"  # 400: HTTP/1.1 body framing broken (chunk size/CRLF) or cut short by EOF
    BODY_TIMEOUT = "body_timeout"  # 408: no request body bytes for limits.request_body_timeout

    # 5xx: the proxy could not do its part (metrics: decision="error").
    CREDENTIAL_UNAVAILABLE = "credential_unavailable"  # 503: the provider failed, nothing valid cached
    AUDIT_UNAVAILABLE = "audit_unavailable"  # 503: the audit log cannot be written (fail closed)
    STORE_UNAVAILABLE = "store_unavailable"  # 503: the shared store does not answer (store/base.py)
    NOT_CONFIGURED = "not_configured"  # 503: no configuration (or no trust) loaded yet
    INTERNAL_ERROR = "internal_error"  # 502 (500 on the admin API): a bug; the request is refused, not forwarded
    DNS_FAILED = "dns_failed"  # 502: the decided host does not resolve
    DNS_TIMEOUT = "dns_timeout"  # 504: the resolver did not answer in time
    # A failed upstream connection (destination.upstream_refusal): never names the resolved address.
    UPSTREAM_UNREACHABLE = "upstream_unreachable"  # 502: connection refused, reset, no route
    UPSTREAM_TLS_FAILED = "upstream_tls_failed"  # 502: no TLS, a failed handshake or an unverified certificate
    UPSTREAM_TIMEOUT = "upstream_timeout"  # 504: the upstream did not answer the connection in time
    RESPONSE_TOO_LARGE = "response_too_large"  # 502: inject-rule response over limits.max_response_scan_bytes
    RESPONSE_HEAD_TOO_LARGE = "response_head_too_large"  # 502: upstream head over limits.max_response_head_bytes
    TRANSFER_ENCODING_REFUSED = "transfer_encoding_refused"  # 502: upstream Transfer-Encoding other than chunked
    UPSTREAM_PROTOCOL_ERROR = "upstream_protocol_error"  # 502: the upstream's response could not be read (malformed, cut)
    RESPONSE_UNDECODABLE = "response_undecodable"  # 502: inject-rule body whose Content-Encoding the echo check cannot decode

    # The admin API only (admin/api.py): an origin server's refusals of an admin's request.
    NOT_ADMIN = "not_admin"  # 403: a verified workload not under admin.workloads
    NOT_FOUND = "not_found"  # 404: no such endpoint
    METHOD_NOT_ALLOWED = "method_not_allowed"  # 405
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # 415: a POST body that is not application/json
    INVALID_REQUEST = "invalid_request"  # 400/411/413/431: a malformed request, field or parameter
    INVALID_JSON = "invalid_json"  # 400
    INVALID_GRANT = "invalid_grant"  # 400: the grant's values are refused (grants.py)
    UNKNOWN_RULE = "unknown_rule"  # 400
    RULE_NOT_GRANTABLE = "rule_not_grantable"  # 400: the rule does not say requires_grant
    WORKLOAD_NOT_COVERED = "workload_not_covered"  # 400: the rule does not cover the workload
    BREAK_GLASS_NOT_PERMITTED = "break_glass_not_permitted"  # 400
    REASON_REQUIRED = "reason_required"  # 400: a break-glass grant without a reason
    GRANT_CONFLICT = "grant_conflict"  # 409: the store refused the new grant
    GRANT_NOT_FOUND = "grant_not_found"  # 404: unknown, expired or not a grant id


IDENTITY = frozenset(r for r in Reason if r.startswith("identity_"))
# Reasons no proxy-port refusal gives: they are not series of secretless_denied_total.
ADMIN_API = frozenset({
    Reason.NOT_ADMIN, Reason.NOT_FOUND, Reason.METHOD_NOT_ALLOWED, Reason.UNSUPPORTED_MEDIA_TYPE,
    Reason.INVALID_REQUEST, Reason.INVALID_JSON, Reason.INVALID_GRANT, Reason.UNKNOWN_RULE,
    Reason.RULE_NOT_GRANTABLE, Reason.WORKLOAD_NOT_COVERED, Reason.BREAK_GLASS_NOT_PERMITTED,
    Reason.REASON_REQUIRED, Reason.GRANT_CONFLICT, Reason.GRANT_NOT_FOUND,
})
PROXY = frozenset(Reason) - ADMIN_API  # what the proxy port's refusals carry
# Refusals that are the proxy's failure (5xx), not the client's.
PROXY_FAILURES = frozenset({
    Reason.CREDENTIAL_UNAVAILABLE, Reason.AUDIT_UNAVAILABLE, Reason.STORE_UNAVAILABLE, Reason.NOT_CONFIGURED,
    Reason.INTERNAL_ERROR, Reason.DNS_FAILED, Reason.DNS_TIMEOUT, Reason.UPSTREAM_UNREACHABLE,
    Reason.UPSTREAM_TLS_FAILED, Reason.UPSTREAM_TIMEOUT, Reason.RESPONSE_TOO_LARGE,
    Reason.RESPONSE_HEAD_TOO_LARGE, Reason.TRANSFER_ENCODING_REFUSED, Reason.UPSTREAM_PROTOCOL_ERROR,
    Reason.RESPONSE_UNDECODABLE,
})

# Not a refusal: why a cached credential was dropped (broker.Broker.revoke), which is also the label
# of secretless_revocations_total{reason}; spelled once here for both.
REVOCATION_REASONS = frozenset({"expired", "config_changed", "grant_revoked", "grant_expired", "manual", "shutdown"})
