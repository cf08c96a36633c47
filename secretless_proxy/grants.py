"""Grants: time-boxed permission for one workload to use one rule that says ``requires_grant: true``.

A grant names exactly one workload (a SPIFFE ID, never a pattern) and one rule, expires on its
own, says why it exists (``reason``, required for ``break_glass``) and who issued it. Revoking it
is permanent: the store keeps a tombstone that outlives the grant, so a revoked id never becomes
active again, even if the same record is written back (``store/base.py``).

This module is the value type and its validation only; storing, finding and revoking grants is
the store's job, deciding when a rule needs one is the policy's.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from secretless_proxy.trust.spiffe import parse_spiffe_id

MIN_TTL = 60.0  # a shorter grant expires before anyone can use it
MAX_TTL = 7 * 86400.0  # standing access belongs in a rule, not a grant
BREAK_GLASS_MAX_TTL = 4 * 3600.0  # emergency access is short by design
MAX_TEXT = 500  # reason / issued_by / revoke reason: audit text, not documents

_ID = re.compile(r"[A-Za-z0-9_-]{8,64}\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def valid_grant_id(value: object) -> bool:
    """Whether ``value`` has the shape of a grant id (url-safe, 8 to 64 characters)."""
    return isinstance(value, str) and _ID.match(value) is not None


@dataclass(frozen=True, kw_only=True, slots=True)
class Grant:
    """One grant. ``revoked_at``/``revoke_reason`` are set by the store, never by the issuer."""

    id: str
    workload: str  # an exact SPIFFE ID
    rule: str  # a rule name
    expires_at: float  # epoch seconds
    reason: str
    issued_by: str
    break_glass: bool = False
    created_at: float
    revoked_at: float | None = None
    revoke_reason: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def active_at(self, now: float) -> bool:
        """Whether the grant may be honoured at ``now``: not revoked, not expired."""
        return self.revoked_at is None and now < self.expires_at

    def revoked_as(self, *, at: float, reason: str) -> Grant:
        """This grant marked revoked (the first revocation wins: an earlier one is kept)."""
        if self.revoked_at is not None:
            return self
        return replace(self, revoked_at=at, revoke_reason=reason)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Grant:
        """Parse and check a stored grant; raises ValueError for anything malformed."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError("a stored grant is not valid JSON") from exc
        if not isinstance(data, dict):
            raise ValueError("a stored grant is not a JSON object")
        expected = {f for f in cls.__dataclass_fields__}
        if set(data) != expected:
            raise ValueError(f"a stored grant has the wrong fields ({', '.join(sorted(set(data) ^ expected))})")
        grant = cls(**data)
        _check(grant)
        return grant


def new_grant(*, workload: str, rule: str, ttl: float, reason: str, issued_by: str,
              break_glass: bool = False, now: Callable[[], float] = time.time,
              min_ttl: float = MIN_TTL, max_ttl: float = MAX_TTL,
              break_glass_max_ttl: float = BREAK_GLASS_MAX_TTL) -> Grant:
    """A new grant with a random url-safe id; raises ValueError naming what is wrong."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl):
        raise ValueError(f"ttl must be a number of seconds, got {ttl!r}")
    cap = min(max_ttl, break_glass_max_ttl) if break_glass else max_ttl
    if not min_ttl <= ttl <= cap:
        kind = "a break-glass grant" if break_glass else "a grant"
        raise ValueError(f"{kind} must last from {min_ttl:g} to {cap:g} seconds, got {ttl:g}")
    if break_glass and not (isinstance(reason, str) and reason.strip()):
        raise ValueError("a break-glass grant needs a reason: say why the emergency access is needed")
    created = now()
    grant = Grant(id=secrets.token_urlsafe(16), workload=workload, rule=rule, expires_at=created + ttl,
                  reason=reason.strip() if isinstance(reason, str) else reason,
                  issued_by=issued_by.strip() if isinstance(issued_by, str) else issued_by,
                  break_glass=break_glass, created_at=created)
    _check(grant)
    return grant


def check_text(what: str, value: Any, *, required: bool) -> None:
    """Audit text: a string, at most ``MAX_TEXT`` characters, no control characters."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"{what} is required")
    if len(value) > MAX_TEXT:
        raise ValueError(f"{what} is longer than {MAX_TEXT} characters")
    if _CONTROL.search(value):
        raise ValueError(f"{what} must not contain line breaks or control characters")


def _check(g: Grant) -> None:
    if not valid_grant_id(g.id):
        raise ValueError(f"invalid grant id {g.id!r}: 8 to 64 letters, digits, '-' or '_'")
    if not isinstance(g.workload, str) or "*" in g.workload:
        raise ValueError(f"a grant names one workload by its exact SPIFFE ID, got {g.workload!r}")
    parse_spiffe_id(g.workload)
    if not isinstance(g.rule, str) or not g.rule or len(g.rule) > 200 or _CONTROL.search(g.rule):
        raise ValueError(f"invalid rule name {g.rule!r}")
    check_text("reason", g.reason, required=False)
    check_text("issued_by (who issued the grant)", g.issued_by, required=True)
    if not isinstance(g.break_glass, bool):
        raise ValueError("break_glass must be true or false")
    for name in ("expires_at", "created_at", "revoked_at"):
        value = getattr(g, name)
        if value is None and name == "revoked_at":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name} must be a timestamp, got {value!r}")
    if g.expires_at <= g.created_at:
        raise ValueError("a grant must expire after it was created")
    if (g.revoked_at is None) != (g.revoke_reason is None):
        raise ValueError("revoked_at and revoke_reason go together")
    if g.revoke_reason is not None:
        check_text("revoke reason", g.revoke_reason, required=True)
