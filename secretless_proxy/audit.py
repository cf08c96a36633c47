"""Audit events as JSON lines: credential issued, used, revoked; request denied.

Each event is one JSON object on one line with ``ts`` (RFC 3339, UTC) and ``event``:

- ``credential.issued``  credential, kind, scope, expires_at, fingerprint
- ``credential.used``    request_id, workload, rule, credential, fingerprint, method, host, path,
                         status (upstream; null when no response came), duration_seconds
- ``credential.revoked`` credential, kind, scope, fingerprint, reason (expired | config_changed |
                         grant_revoked | grant_expired | manual | shutdown)
- ``request.denied``     request_id, workload (null, with ``workload_unknown`` saying why), rule,
                         reason, host, path

Never a credential value. A credential is named by its **fingerprint**: HMAC-SHA256 over the
value with a per-deployment key (``audit.fingerprint_key``), first 16 hex digits (64 bits). Two
events about one value correlate; without the key the value cannot be confirmed or recovered,
not even by brute force over a low-entropy key. Without a configured key a random one is made
once per process, so fingerprints correlate within that process only. Paths are logged without
their query string (a credential may be injected there) and cut at 2,048 characters.

**Sink failures.** A sink is ``stdout`` or ``file:/abs/path`` (opened for append; ``reopen()``
after logrotate moved the file — the proxy calls it on SIGHUP). A write that fails is counted
in ``secretless_audit_write_errors_total{sink}`` and logged by exception type; the file sink
retries opening on the next event. ``emit()`` returns whether *every* configured sink took
the event: a sink the operator configured is a promise, and an audit trail that silently lost
one copy is not complete. ``emit()`` never raises. With ``fail_closed`` (the default,
``on_sink_failure: fail_closed``) the addon refuses to inject (503 ``audit_unavailable``)
while ``healthy`` is False, i.e. after a write failed and until one succeeds again. A failed
``credential.used`` write itself cannot undo the request it describes (the upstream already
acted on it; turning its answer into a 503 could make a client retry a POST that took
effect), so it is counted and stops the *next* credential use. ``healthy`` also serves as a
readiness check. With
``on_sink_failure: log_and_continue`` requests proceed and only the counter moves.

Writes are synchronous, one ``write(2)`` per event on an ``O_APPEND`` descriptor: a local append
is a page-cache copy (microseconds), it keeps events in order, and the addon needs the result
before it lets a credential be used. No ``fsync`` per event (milliseconds on real disks).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TextIO

if TYPE_CHECKING:
    from secretless_proxy.config.model import AuditConfig
    from secretless_proxy.credentials.base import IssuedCredential
    from secretless_proxy.metrics import Metrics
    from secretless_proxy.secretrefs import Secret

log = logging.getLogger("secretless.audit")

FINGERPRINT_HEX = 16
MAX_PATH = 2048
_FP_CONTEXT = b"secretless-proxy credential fingerprint v1\x00"


class Sink(Protocol):
    name: str  # the ``secretless_audit_write_errors_total{sink}`` label

    def write(self, line: bytes) -> None: ...  # raises OSError/ValueError on failure
    def reopen(self) -> None: ...
    def close(self) -> None: ...


class StdoutSink:
    """Standard output (container logs). Looks up ``sys.stdout`` per write unless given a stream."""

    name = "stdout"

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def write(self, line: bytes) -> None:
        stream = self._stream or sys.stdout
        stream.write(line.decode("ascii"))  # json.dumps(ensure_ascii=True): always ASCII
        stream.flush()

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


class FileSink:
    """A file opened for append (created 0640). ``reopen()`` follows logrotate's rename."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = f"file:{path}"
        self._fd: int | None = None
        try:
            self._open()
        except OSError as exc:
            # Not fatal here: the first event's write retries, fails, and is counted.
            log.error("audit sink %s cannot be opened (%s)", self.name, type(exc).__name__)

    def _open(self) -> int:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return self._fd

    def write(self, line: bytes) -> None:
        fd = self._fd if self._fd is not None else self._open()
        view = memoryview(line)
        while view:
            n = os.write(fd, view)
            if n <= 0:
                raise OSError("short write")
            view = view[n:]

    def reopen(self) -> None:
        self.close()
        try:
            self._open()
        except OSError as exc:
            log.error("audit sink %s cannot be reopened (%s)", self.name, type(exc).__name__)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def open_sink(spec: str) -> Sink:
    """A sink from its config form: ``stdout`` or ``file:/abs/path``."""
    if spec == "stdout":
        return StdoutSink()
    if spec.startswith("file:") and os.path.isabs(spec[5:]):
        return FileSink(spec[5:])
    raise ValueError(f"unknown audit sink {spec!r} (use stdout or file:/absolute/path)")


@functools.cache
def _process_key() -> bytes:
    """The random fingerprint key used when none is configured: one per process, made on first use."""
    return os.urandom(32)


def rfc3339(ts: float) -> str:
    """``2025-01-31T12:00:00.123Z``: RFC 3339, UTC, milliseconds."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def clean_path(path: str) -> str:
    """The path without its query string or fragment, at most MAX_PATH characters."""
    for sep in ("?", "#"):
        path = path.split(sep, 1)[0]
    return path[:MAX_PATH]


class AuditLog:
    """Writes audit events to its sinks; never raises, reports success as a bool."""

    def __init__(self, sinks: Sequence[Sink], *, key: bytes | None = None, fail_closed: bool = True,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time) -> None:
        self.sinks = tuple(sinks)
        self.fail_closed = fail_closed
        self._key = key or _process_key()
        self._metrics = metrics
        self._clock = clock
        self._last_failed: set[str] = set()

    @classmethod
    def from_config(cls, config: AuditConfig, *, metrics: Metrics | None = None) -> AuditLog:
        """Opens the configured sinks and resolves the key. Raises SecretUnavailable for the key."""
        key = config.fingerprint_key.resolve().reveal().encode() if config.fingerprint_key else None
        return cls([open_sink(s) for s in config.sinks], key=key, fail_closed=config.fail_closed,
                   metrics=metrics)

    # -- events --------------------------------------------------------------------------------

    def issued(self, cred: IssuedCredential) -> bool:
        return self.emit("credential.issued", credential=cred.name, kind=cred.kind, scope=cred.scope,
                         expires_at=None if cred.expires_at is None else rfc3339(cred.expires_at),
                         fingerprint=self.fingerprint(cred.secret))

    def used(self, *, request_id: str, workload: str, rule: str, cred: IssuedCredential, method: str,
             host: str, path: str, status: int | None, duration: float) -> bool:
        return self.emit("credential.used", request_id=request_id, workload=workload, rule=rule,
                         credential=cred.name, fingerprint=self.fingerprint(cred.secret), method=method,
                         host=host, path=clean_path(path), status=status,
                         duration_seconds=round(max(duration, 0.0), 6))

    def revoked(self, cred: IssuedCredential, *, reason: str) -> bool:
        return self.emit("credential.revoked", credential=cred.name, kind=cred.kind, scope=cred.scope,
                         fingerprint=self.fingerprint(cred.secret), reason=reason)

    def denied(self, *, request_id: str, workload: str | None, reason: str, host: str, path: str,
               rule: str | None = None, workload_unknown: str | None = None) -> bool:
        fields: dict[str, Any] = {"request_id": request_id, "workload": workload}
        if workload is None:
            # Why there is no workload: the identity refusal itself, or it was never checked.
            fields["workload_unknown"] = workload_unknown or (
                reason if reason.startswith("identity_") else "not_checked")
        return self.emit("request.denied", **fields, rule=rule, reason=reason, host=host,
                         path=clean_path(path))

    def fingerprint(self, secret: Secret | str) -> str:
        """Keyed, truncated hash of a credential value: correlates events, reveals nothing."""
        value = secret if isinstance(secret, str) else secret.reveal()
        return hmac.new(self._key, _FP_CONTEXT + value.encode(), hashlib.sha256).hexdigest()[:FINGERPRINT_HEX]

    # -- writing -------------------------------------------------------------------------------

    def emit(self, event: str, **fields: Any) -> bool:
        """Write one event to every sink; True only if every sink took it."""
        try:
            line = (json.dumps({"ts": rfc3339(self._clock()), "event": event, **fields},
                               separators=(",", ":"), default=str) + "\n").encode("ascii")
        except (TypeError, ValueError) as exc:
            log.error("audit event %s could not be encoded (%s)", event, type(exc).__name__)
            return False
        ok = True
        for sink in self.sinks:
            try:
                sink.write(line)
            except Exception as exc:  # noqa: BLE001 - any sink failure is counted, never raised
                ok = False
                self._failed(sink, exc)
            else:
                if self._last_failed:
                    self._last_failed.discard(sink.name)
        return ok and bool(self.sinks)

    def _failed(self, sink: Sink, exc: Exception) -> None:
        if sink.name not in self._last_failed:  # log the transition, count every event
            log.error("audit sink %s failed to write (%s)", sink.name, type(exc).__name__)
        self._last_failed.add(sink.name)
        if self._metrics is not None:
            try:
                self._metrics.audit_write_failed(sink.name)
            except Exception as mexc:  # noqa: BLE001 - counting must not turn a failure into a crash
                log.error("counting an audit write error failed (%s)", type(mexc).__name__)

    @property
    def healthy(self) -> bool:
        """False while a sink's last write failed."""
        return not self._last_failed

    def check(self) -> str | None:
        """Readiness check: None when healthy, else which sinks fail (fail_closed only)."""
        if self._last_failed and self.fail_closed:
            return "audit sink failing: " + ", ".join(sorted(self._last_failed))
        return None

    def reopen(self) -> None:
        self._each("reopen")

    def close(self) -> None:
        self._each("close")

    def _each(self, action: str) -> None:
        """``sink.<action>()`` on every sink; one that fails is logged by type and does not stop the others."""
        for sink in self.sinks:
            try:
                getattr(sink, action)()
            except Exception as exc:  # noqa: BLE001
                log.error("audit sink %s %s failed (%s)", sink.name, action, type(exc).__name__)
