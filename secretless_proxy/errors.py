"""The exceptions secretless-proxy raises, as one documented tree.

    SecretlessError
    ├── ConfigError          a configuration file is invalid (carries every issue found)
    ├── SecretUnavailable    a secret reference could not be resolved (env var unset, file unreadable)
    ├── IdentityError        a client certificate does not prove a workload identity (has .reason)
    └── CredentialError      a credential could not be obtained for a request (has .reason)

Lower libraries' errors (OSError, yaml, cryptography) are converted at one boundary with
``raise ... from exc``. Messages are full sentences and never contain a secret value.
"""

from __future__ import annotations

from dataclasses import dataclass


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
        self.reason = reason
        super().__init__(detail)


class CredentialError(SecretlessError):
    """A credential could not be obtained; the request must be refused, never forwarded."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(detail)
