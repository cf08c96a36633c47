"""One object the addon and the broker report to: it updates the metrics and writes the audit log.

``Observer`` is duck-type compatible with the broker's ``BrokerEvents`` (``fetched``, ``cache``,
``issued``, ``revoked``) and adds what the addon reports per request. Observing must never
break the request path, so no method raises: an unexpected error is logged by type (never by
message: it might quote a value) and dropped. ``audit_ready()`` is what the addon checks before
it injects: False while an audit sink fails and ``fail_closed`` is set (then it refuses with
503 ``audit_unavailable``). ``used()`` reports whether the record was written; the request it
describes has already been answered by the upstream, so a failure there is counted and stops
the next use, not this one.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from secretless_proxy.audit import AuditLog
from secretless_proxy.metrics import Metrics

if TYPE_CHECKING:
    from secretless_proxy.credentials.base import IssuedCredential

log = logging.getLogger("secretless.observe")

F = TypeVar("F", bound=Callable[..., Any])


def _never_raises(default: Any = None) -> Callable[[F], F]:
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - observing must not break the request path
                log.error("%s failed (%s)", fn.__name__, type(exc).__name__)
                return default
        return inner  # type: ignore[return-value]
    return wrap


class Observer:
    """Metrics + audit log behind the calls the addon and the broker make."""

    def __init__(self, *, metrics: Metrics, audit: AuditLog | None = None) -> None:
        self.metrics = metrics
        self.audit = audit or AuditLog([], metrics=metrics)

    def set_audit(self, audit: AuditLog) -> None:
        """Swap in the audit log of a reloaded config; closes the previous one."""
        old, self.audit = self.audit, audit
        if old is not audit:
            old.close()

    # -- broker events (BrokerEvents) ----------------------------------------------------------

    @_never_raises()
    def fetched(self, *, credential: str, kind: str, outcome: str, seconds: float) -> None:
        self.metrics.credential_fetched(credential=credential, kind=kind, outcome=outcome, seconds=seconds)

    @_never_raises()
    def cache(self, *, credential: str, result: str) -> None:
        self.metrics.cache_lookup(credential=credential, result=result)

    @_never_raises()
    def issued(self, cred: IssuedCredential, *, cached: bool = True) -> None:
        """``credential.issued``; ``cached=False`` (minted per request) keeps it off the expiry gauge."""
        if cached:
            self.metrics.credential_cached(credential=cred.name, scope=cred.scope, expires_at=cred.expires_at)
        self.audit.issued(cred)

    @_never_raises()
    def revoked(self, cred: IssuedCredential, *, reason: str) -> None:
        self.metrics.credential_revoked(credential=cred.name, scope=cred.scope, reason=reason)
        self.audit.revoked(cred, reason=reason)

    @_never_raises()
    def breaker(self, *, credential: str, failing: int) -> None:
        self.metrics.breaker_changed(credential=credential, failing=failing)

    @_never_raises()
    def backoff(self, *, credential: str) -> None:
        self.metrics.backed_off(credential=credential)

    # -- addon events --------------------------------------------------------------------------

    @_never_raises()
    def request_done(self, *, rule: str | None, decision: str, overhead_seconds: float) -> None:
        """Once per request: ``decision`` is allowed | injected | denied | error."""
        self.metrics.request_done(rule=rule, decision=decision, overhead_seconds=overhead_seconds)

    @_never_raises()
    def denied(self, *, request_id: str, workload: str | None, reason: str, host: str, path: str,
               rule: str | None = None) -> None:
        """A refusal (any status): ``request.denied`` audit event and ``secretless_denied_total``."""
        self.metrics.request_denied(reason)
        self.audit.denied(request_id=request_id, workload=workload, reason=reason, host=host, path=path,
                          rule=rule)

    @_never_raises(default=False)
    def used(self, *, request_id: str, workload: str, rule: str, cred: IssuedCredential, method: str,
             host: str, path: str, status: int | None, duration: float) -> bool:
        """Write ``credential.used``. False: not written and fail_closed (the next use will be refused)."""
        ok = self.audit.used(request_id=request_id, workload=workload, rule=rule, cred=cred, method=method,
                             host=host, path=path, status=status, duration=duration)
        return ok or not self.audit.fail_closed

    def audit_ready(self) -> bool:
        """Whether a credential may be used now: False while an audit sink fails and fail_closed."""
        return self.audit.healthy or not self.audit.fail_closed

    @_never_raises()
    def cert_rejected(self, reason: str) -> None:
        self.metrics.cert_rejected(reason)

    @_never_raises()
    def config_loaded(self, digest: str) -> None:
        self.metrics.config_loaded(digest)

    @_never_raises()
    def config_reload_failed(self) -> None:
        self.metrics.config_reload_failed()

    @_never_raises()
    def reopen(self) -> None:
        """SIGHUP: reopen file sinks after logrotate."""
        self.audit.reopen()

    @_never_raises()
    def close(self) -> None:
        self.audit.close()
