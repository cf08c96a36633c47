"""Audit log: JSON-lines events, keyed fingerprints, file sinks with logrotate, failing sinks."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from secretless_proxy.audit import AuditLog, FileSink, StdoutSink, clean_path, open_sink, rfc3339
from secretless_proxy.config.model import AuditConfig
from secretless_proxy.credentials.base import IssuedCredential
from secretless_proxy.metrics import Metrics
from secretless_proxy.observe import Observer
from secretless_proxy.secretrefs import Secret, SecretRef

VALUE = "ghs_SECRETtokenVALUE0123456789abcdef"
OTHER_VALUE = "ghs_OTHERtokenVALUE9876543210fedcba"
KEY = b"k" * 32
WORKLOAD = "spiffe://example.org/ns/prod/sa/billing"


def cred(value: str = VALUE, *, scope: str = "", expires_at: float | None = 1_700_000_600.0) -> IssuedCredential:
    return IssuedCredential(name="github", kind="github_app", secret=Secret(value), expires_at=expires_at,
                            scope=scope)


def lines(path: Path) -> list[dict]:
    """Every line of an audit file, each parsed as one JSON object."""
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    return tmp_path / "audit.log"


@pytest.fixture
def audit(log_file: Path, metrics: Metrics) -> AuditLog:
    a = AuditLog([FileSink(str(log_file))], key=KEY, metrics=metrics, clock=lambda: 1_700_000_000.25)
    yield a
    a.close()


def used(a: AuditLog | Observer, c: IssuedCredential, *, path: str = "/repos/x/issues?page=2",
         status: int | None = 201) -> bool:
    return a.used(request_id="f-1", workload=WORKLOAD, rule="billing-to-github", cred=c, method="POST",
                  host="api.github.com", path=path, status=status, duration=0.1234567)


class TestEvents:
    def test_issued(self, audit: AuditLog, log_file: Path) -> None:
        """credential.issued names kind, credential, scope, expiry and fingerprint."""
        assert audit.issued(cred(scope="spiffe://example.org/x"))
        (ev,) = lines(log_file)
        assert ev == {"ts": "2023-11-14T22:13:20.250Z", "event": "credential.issued", "credential": "github",
                      "kind": "github_app", "scope": "spiffe://example.org/x",
                      "expires_at": "2023-11-14T22:23:20.000Z", "fingerprint": audit.fingerprint(VALUE)}

    def test_issued_without_expiry(self, audit: AuditLog, log_file: Path) -> None:
        """A non-expiring credential has expires_at null."""
        audit.issued(cred(expires_at=None))
        assert lines(log_file)[0]["expires_at"] is None

    def test_used(self, audit: AuditLog, log_file: Path) -> None:
        """credential.used carries request, workload, rule, credential, method, host, path, status, duration."""
        assert used(audit, cred())
        (ev,) = lines(log_file)
        assert ev == {"ts": "2023-11-14T22:13:20.250Z", "event": "credential.used", "request_id": "f-1",
                      "workload": WORKLOAD, "rule": "billing-to-github", "credential": "github",
                      "fingerprint": audit.fingerprint(VALUE), "method": "POST", "host": "api.github.com",
                      "path": "/repos/x/issues", "status": 201, "duration_seconds": 0.123457}

    @pytest.mark.parametrize(("path", "logged"), [
        ("/v1/charges?api_key=" + VALUE, "/v1/charges"),
        ("/a#frag?x", "/a"),
        ("/" + "x" * 5000, "/" + "x" * 2047),
    ])
    def test_used_path_has_no_query(self, audit: AuditLog, log_file: Path, path: str, logged: str) -> None:
        """The path is logged without query string or fragment, and bounded in length."""
        used(audit, cred(), path=path)
        assert lines(log_file)[0]["path"] == logged
        assert VALUE not in log_file.read_text()

    def test_used_without_response(self, audit: AuditLog, log_file: Path) -> None:
        """A request that got no upstream response is logged with status null."""
        used(audit, cred(), status=None)
        assert lines(log_file)[0]["status"] is None

    def test_revoked(self, audit: AuditLog, log_file: Path) -> None:
        """credential.revoked names the credential, its fingerprint and the reason."""
        audit.revoked(cred(), reason="grant_revoked")
        (ev,) = lines(log_file)
        assert ev["event"] == "credential.revoked"
        assert (ev["credential"], ev["reason"], ev["fingerprint"]) == ("github", "grant_revoked",
                                                                       audit.fingerprint(VALUE))

    def test_denied_with_workload(self, audit: AuditLog, log_file: Path) -> None:
        """request.denied names the workload, rule, reason, host and query-less path."""
        audit.denied(request_id="f-2", workload=WORKLOAD, reason="path", host="api.github.com",
                     path="/admin?token=x", rule="billing-to-github")
        (ev,) = lines(log_file)
        assert ev == {"ts": "2023-11-14T22:13:20.250Z", "event": "request.denied", "request_id": "f-2",
                      "workload": WORKLOAD, "rule": "billing-to-github", "reason": "path",
                      "host": "api.github.com", "path": "/admin"}

    @pytest.mark.parametrize(("reason", "why"), [
        ("identity_untrusted", "identity_untrusted"), ("identity_missing", "identity_missing"),
        ("not_configured", "not_checked"),
    ])
    def test_denied_without_workload_says_why(self, audit: AuditLog, log_file: Path, reason: str, why: str) -> None:
        """Without a verified workload the event says why it is unknown."""
        audit.denied(request_id="f-3", workload=None, reason=reason, host="h.example", path="/")
        ev = lines(log_file)[0]
        assert ev["workload"] is None
        assert ev["workload_unknown"] == why

    def test_every_line_is_json_with_ts_and_event(self, audit: AuditLog, log_file: Path) -> None:
        """Each event is one line of JSON with an RFC 3339 UTC ts and an event name."""
        c = cred()
        audit.issued(c)
        used(audit, c)
        audit.revoked(c, reason="expired")
        audit.denied(request_id="r", workload=None, reason="no_rule", host="h", path="/\n\"x\u2028")
        events = lines(log_file)
        assert [e["event"] for e in events] == ["credential.issued", "credential.used", "credential.revoked",
                                               "request.denied"]
        for e in events:
            assert dt.datetime.fromisoformat(e["ts"]).utcoffset() == dt.timedelta(0)
            assert e["ts"].endswith("Z")
        assert events[3]["path"] == "/\n\"x\u2028"

    def test_rfc3339(self) -> None:
        """Timestamps are UTC with milliseconds and a Z suffix."""
        assert rfc3339(0) == "1970-01-01T00:00:00.000Z"


class TestFingerprint:
    def test_one_credential_correlates(self, audit: AuditLog, log_file: Path) -> None:
        """issued, used and revoked of one value carry the same fingerprint."""
        c = cred()
        audit.issued(c)
        used(audit, c)
        audit.revoked(c, reason="manual")
        fps = {e["fingerprint"] for e in lines(log_file)}
        assert len(fps) == 1
        assert len(fps.pop()) == 16

    def test_values_differ(self, audit: AuditLog) -> None:
        """Different values get different fingerprints."""
        assert audit.fingerprint(VALUE) != audit.fingerprint(OTHER_VALUE)

    def test_keyed(self) -> None:
        """The same value under another key gives another fingerprint: it is an HMAC, not a hash."""
        a, b = AuditLog([], key=b"a" * 32), AuditLog([], key=b"b" * 32)
        assert a.fingerprint(VALUE) != b.fingerprint(VALUE)
        assert AuditLog([], key=b"a" * 32).fingerprint(VALUE) == a.fingerprint(VALUE)

    def test_process_key_when_none_configured(self) -> None:
        """Without a configured key, logs of one process still correlate."""
        assert AuditLog([]).fingerprint(VALUE) == AuditLog([]).fingerprint(VALUE)

    def test_value_never_written(self, audit: AuditLog, log_file: Path) -> None:
        """No event contains the secret, whole or in part, in text or bytes."""
        c = cred()
        audit.issued(c)
        used(audit, c)
        audit.revoked(c, reason="expired")
        raw = log_file.read_bytes()
        assert VALUE.encode() not in raw
        assert VALUE[4:20].encode() not in raw
        assert VALUE.encode().hex().encode() not in raw

    def test_key_from_config(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """from_config resolves fingerprint_key, opens the sinks and keeps fail_closed."""
        monkeypatch.setenv("AUDIT_FP_KEY", "per-deployment-key")
        out = tmp_path / "a.log"
        cfg = AuditConfig(sinks=(f"file:{out}",), fingerprint_key=SecretRef.parse("env:AUDIT_FP_KEY"),
                          fail_closed=False)
        a = AuditLog.from_config(cfg)
        try:
            assert a.fail_closed is False
            assert a.fingerprint(VALUE) == AuditLog([], key=b"per-deployment-key").fingerprint(VALUE)
            assert a.issued(cred())
            assert lines(out)[0]["event"] == "credential.issued"
        finally:
            a.close()


class TestSinks:
    def test_stdout(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The stdout sink writes one JSON line per event."""
        a = AuditLog([StdoutSink()], key=KEY)
        assert a.issued(cred())
        out = capsys.readouterr().out
        assert json.loads(out)["event"] == "credential.issued"
        assert VALUE not in out

    def test_open_sink(self, tmp_path: Path) -> None:
        """open_sink understands the config forms and rejects anything else."""
        assert isinstance(open_sink("stdout"), StdoutSink)
        f = open_sink(f"file:{tmp_path / 'x.log'}")
        assert f.name == f"file:{tmp_path / 'x.log'}"
        f.close()
        with pytest.raises(ValueError, match="unknown audit sink 'file:rel.log'"):
            open_sink("file:rel.log")

    def test_appends(self, log_file: Path) -> None:
        """The file sink appends to what is already there."""
        log_file.write_text('{"old":1}\n')
        a = AuditLog([FileSink(str(log_file))], key=KEY)
        a.issued(cred())
        a.close()
        assert [next(iter(e)) for e in lines(log_file)] == ["old", "ts"]

    def test_created_private(self, log_file: Path) -> None:
        """A new audit file is not world-readable."""
        FileSink(str(log_file)).close()
        assert log_file.stat().st_mode & 0o007 == 0

    def test_reopen_after_logrotate_rename(self, audit: AuditLog, log_file: Path) -> None:
        """After logrotate renames the file, reopen() starts a new one; nothing is lost."""
        audit.issued(cred())
        rotated = log_file.with_suffix(".log.1")
        os.rename(log_file, rotated)
        audit.revoked(cred(), reason="expired")  # still goes to the renamed file (same inode)
        audit.reopen()
        audit.denied(request_id="r", workload=None, reason="no_rule", host="h", path="/")
        assert [e["event"] for e in lines(rotated)] == ["credential.issued", "credential.revoked"]
        assert [e["event"] for e in lines(log_file)] == ["request.denied"]


class TestFailingSink:
    def test_disk_full(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """A write that fails (ENOSPC on /dev/full) returns False and counts the error."""
        a = AuditLog([FileSink("/dev/full")], key=KEY, metrics=metrics)
        assert a.issued(cred()) is False
        assert a.denied(request_id="r", workload=None, reason="no_rule", host="h", path="/") is False
        assert registry.get_sample_value("secretless_audit_write_errors_total", {"sink": "file:/dev/full"}) == 2
        assert a.healthy is False
        assert a.check() == "audit sink failing: file:/dev/full"
        a.close()

    def test_unopenable_path(self, tmp_path: Path, registry: CollectorRegistry, metrics: Metrics) -> None:
        """A path that cannot be created fails at write time, counted, never raised."""
        (tmp_path / "not-a-dir").write_text("")
        sink = FileSink(str(tmp_path / "not-a-dir" / "audit.log"))
        a = AuditLog([sink], key=KEY, metrics=metrics)
        assert used(a, cred()) is False
        assert registry.get_sample_value("secretless_audit_write_errors_total", {"sink": sink.name}) == 1

    def test_closed_stream(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """A closed stdout makes emit return False instead of raising."""
        stream = io.StringIO()
        stream.close()
        a = AuditLog([StdoutSink(stream)], key=KEY, metrics=metrics)
        assert a.emit("credential.issued", credential="x") is False
        assert registry.get_sample_value("secretless_audit_write_errors_total", {"sink": "stdout"}) == 1

    def test_one_failing_sink_fails_the_event(self, log_file: Path, metrics: Metrics) -> None:
        """With two sinks the event still reaches the good one, but emit reports the failure."""
        a = AuditLog([FileSink("/dev/full"), FileSink(str(log_file))], key=KEY, metrics=metrics)
        assert a.issued(cred()) is False
        assert lines(log_file)[0]["event"] == "credential.issued"
        a.close()

    def test_recovers(self, tmp_path: Path, metrics: Metrics) -> None:
        """Once the path can be created, the next write succeeds and the log is healthy again."""
        d = tmp_path / "later"
        a = AuditLog([FileSink(str(d / "audit.log"))], key=KEY, metrics=metrics)
        assert a.issued(cred()) is False
        d.mkdir()
        assert a.issued(cred()) is True
        assert a.healthy and a.check() is None
        a.close()

    def test_observer_used_fails_closed(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """Observer.used answers False when credential.used is not written and fail_closed is set."""
        obs = Observer(metrics=metrics, audit=AuditLog([FileSink("/dev/full")], key=KEY, metrics=metrics))
        assert used(obs, cred()) is False
        assert obs.audit_ready() is False
        assert registry.get_sample_value("secretless_audit_write_errors_total", {"sink": "file:/dev/full"}) == 1
        obs.close()

    def test_observer_used_log_and_continue(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """With log_and_continue the request may proceed; the failure is still counted."""
        a = AuditLog([FileSink("/dev/full")], key=KEY, metrics=metrics, fail_closed=False)
        obs = Observer(metrics=metrics, audit=a)
        assert used(obs, cred()) is True
        assert obs.audit_ready() is True
        assert a.check() is None
        assert registry.get_sample_value("secretless_audit_write_errors_total", {"sink": "file:/dev/full"}) == 1
        obs.close()

    def test_observer_writes_broker_and_denial_events(self, audit: AuditLog, log_file: Path,
                                                      metrics: Metrics) -> None:
        """The Observer's broker and denial calls produce their audit events."""
        obs = Observer(metrics=metrics, audit=audit)
        c = cred()
        obs.issued(c)
        assert used(obs, c) is True
        obs.revoked(c, reason="config_changed")
        obs.denied(request_id="r", workload=WORKLOAD, reason="method", host="h", path="/x?y", rule="r1")
        assert [e["event"] for e in lines(log_file)] == ["credential.issued", "credential.used",
                                                        "credential.revoked", "request.denied"]

    def test_set_audit_closes_previous(self, tmp_path: Path, metrics: Metrics) -> None:
        """A reload swaps the audit log and closes the old one's files."""
        first = AuditLog([FileSink(str(tmp_path / "a.log"))], key=KEY)
        obs = Observer(metrics=metrics, audit=first)
        obs.set_audit(AuditLog([FileSink(str(tmp_path / "b.log"))], key=KEY))
        assert first.sinks[0]._fd is None  # type: ignore[attr-defined]
        obs.close()


class TestCleanPath:
    def test_plain(self) -> None:
        """A path without a query is unchanged."""
        assert clean_path("/v1/x") == "/v1/x"
