"""The exceptions secretless-proxy defines, as one documented tree.

Every exception class in the package is here, under ``SecretlessError``; each line names the
module that defines it. ``tests/test_reasons.py`` holds this tree to the code.

    SecretlessError              errors: base class of them all
    ├── ConfigError              errors: a configuration file is invalid (.issues: every problem found)
    ├── SecretUnavailable        errors: a secret reference could not be resolved (env var unset, file unreadable)
    ├── IdentityError            errors: a client certificate does not prove a workload identity (.reason)
    ├── CredentialError          errors: a credential could not be obtained for a request (.reason)
    │   └── ProviderError        credentials.base: a provider failed; the message is ours (.retryable)
    │       └── Backoff          breaker: not even tried, the circuit breaker is open (.retry_after)
    ├── StoreError               store.base: the shared store could not be used (.reason, .op)
    ├── SealingError             store.sealing: a sealed record does not open (unknown key, altered, truncated)
    ├── DnsError                 destinations.resolver: a host does not resolve
    │   └── DnsTimeout           destinations.resolver: the resolver did not answer in time
    ├── Refusal                  refusal: a request answered with the error contract (.status, .reason, .rule)
    │   └── BodyRefused          edge.requestbody: an HTTP/1 request body that cannot be read on (400)
    ├── NotAFile (OSError)       config.safefile: the path is a FIFO, device, directory or socket, never read
    ├── TooLarge (OSError)       config.safefile: the file is larger than its reader allows
    ├── TooLarge                 edge.bodydecode: a body decodes to more than the scan window
    ├── Undecodable (ValueError) edge.bodydecode: a body its Content-Encoding does not decode whole
    ├── _Failure                 admin.client: internal, one sentence for stderr, exit status 1
    ├── _TooLarge                config.yamlsource: internal, a document that expands past MAX_VALUES
    └── _TooDeep                 config.yamlsource: internal, aliases that nest past MAX_DEPTH

``(OSError)``: also a subclass of that builtin, so that callers handling "the file cannot be read"
as ``OSError`` handle these too. A ``.reason`` is a ``reasons.Reason``: what the refused client
reads, the audit log records and ``secretless_denied_total`` counts.

Lower libraries' errors (OSError, yaml, cryptography, redis, httpx) are converted at one boundary
with ``raise ... from exc``. Messages are full sentences and never contain a secret value.
"""

from __future__ import annotations

from dataclasses import dataclass

from secretless_proxy.reasons import Reason


class SecretlessError(Exception):
    """Base class of every error raised on purpose by secretless-proxy."""


@dataclass(frozen=True, kw_only=True)
class ConfigIssue:
    """One problem in a configuration file, located by file, line and key path."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where} {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(SecretlessError):
    """A configuration file is invalid; ``issues`` lists every problem found, in file order."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = sorted(issues, key=lambda i: (i.line or 0, i.path))
        super().__init__("\n".join(str(i) for i in self.issues))


class SecretUnavailable(SecretlessError):
    """A secret reference could not be resolved. The message names the reference, never a value."""


class IdentityError(SecretlessError):
    """A client certificate was missing or did not prove a workload identity."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = Reason(reason)  # a Reason member, or its string: anything else is a bug (ValueError)
        super().__init__(detail)


class CredentialError(SecretlessError):
    """A credential could not be obtained; the request must be refused, never forwarded."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = Reason(reason)
        super().__init__(detail)
