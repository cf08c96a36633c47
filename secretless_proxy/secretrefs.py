"""Secret values and the references that resolve them.

A ``Secret`` never shows its value in ``repr``/``str``/f-strings, so writing it to a log or an
exception message by accident prints ``Secret('****')``. The value is only reachable through
``reveal()``, which makes every use greppable.

References are ``env:NAME`` (the proxy's own environment) and ``file:/path`` (for example a
Kubernetes secret volume). File secrets are re-read when the file changes, so a rotated secret is
picked up without a restart, and a deleted one fails closed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from secretless_proxy.config.safefile import NotAFile, TooLarge, read_limited
from secretless_proxy.errors import SecretUnavailable

# A key, a token, a PEM chain: far below this. A larger file (or /dev/zero) is refused, not read.
MAX_SECRET_BYTES = 1024 * 1024

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SCHEME_WORD = re.compile(r"[a-z][a-z0-9+.-]{0,15}")  # vault, https, ...
# A value that would end up in an HTTP header must not be able to start a new header line.
_FORBIDDEN_CHARS = re.compile(r"[\r\n\x00]")


class Secret:
    """A secret value whose text representation is always masked."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret's value: only for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('****')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple:
        raise TypeError("a Secret cannot be pickled")



def expand_user(text: str) -> Path:
    """``Path(text).expanduser()``, with ``ValueError`` for a ``~user`` that does not exist.

    ``expanduser()`` raises ``RuntimeError`` for an unknown user ("~ nobody", "~x/..."), which
    would escape every parser that expects ``ValueError``.
    """
    try:
        return Path(text).expanduser()
    except RuntimeError as exc:
        raise ValueError(f"cannot expand {text[:100]!r}: the user after '~' does not exist") from exc

@dataclass(frozen=True, kw_only=True)
class SecretRef:
    """Where a secret comes from: ``env:NAME`` or ``file:/path``. Holds no value itself."""

    scheme: Literal["env", "file"]
    target: str
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.scheme}:{self.target}"

    @classmethod
    def parse(cls, text: str, *, base_dir: Path | None = None) -> SecretRef:
        """Parse ``env:NAME`` or ``file:PATH`` (relative paths resolve against ``base_dir``)."""
        # The text is never quoted back: an operator who pasted the secret itself here would find it
        # in the log and in /readyz (hostile review 5.10). A short word before the colon is named.
        scheme, sep, target = text.partition(":")
        if not sep or scheme not in ("env", "file") or not target:
            if scheme in ("env", "file"):
                what = f"nothing after {scheme}:"
            elif sep and _SCHEME_WORD.fullmatch(scheme):
                what = f"scheme {scheme!r} is not env or file"
            else:
                what = "not a reference (the value is not shown: a literal secret does not belong in the config)"
            raise ValueError(f"invalid secret reference, {what}: use env:NAME or file:/path")
        if scheme == "env":
            if not _ENV_NAME.match(target):
                raise ValueError("invalid environment variable name after env: (not shown): use letters, digits and _")
            return cls(scheme="env", target=target)
        path = expand_user(target)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return cls(scheme="file", target=str(path))

    def resolve(self) -> Secret:
        """Read the secret now. Raises SecretUnavailable naming the reference, never a value."""
        if self.scheme == "env":
            return _checked(self._env(), self)
        return self._read_file()

    def resolve_pem(self) -> Secret:
        """Read multi-line key material (PEM). It never goes into a header, so line breaks are fine."""
        value = self._env() if self.scheme == "env" else self._text()
        if not value.strip() or "\x00" in value:
            raise SecretUnavailable(f"secret {self} is empty or binary")
        return Secret(value)

    def _env(self) -> str:
        value = os.environ.get(self.target)
        if value is None:
            raise SecretUnavailable(f"environment variable {self.target} is not set")
        return value

    def _text(self) -> str:
        """The file's whole text, at most MAX_SECRET_BYTES; SecretUnavailable says why not."""
        try:
            # Bytes decoded whole: universal newlines would turn a lone CR into LF.
            return read_limited(self.target, limit=MAX_SECRET_BYTES).decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _unreadable(self.target, exc) from exc

    def _read_file(self) -> Secret:
        # Re-read only when the file changed: a stat per request is cheap, a read is not.
        try:
            st = os.stat(self.target)
        except OSError as exc:
            raise _unreadable(self.target, exc) from exc
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._cache.get("entry")
        if cached is not None and cached[0] == key:
            return cached[1]
        raw = self._text()
        # Secret files conventionally end in one newline (echo > file); it is not part of the key.
        # Only that one is dropped: any other line break makes the secret refused, not guessed at.
        value = raw[:-2] if raw.endswith("\r\n") else raw.removesuffix("\n")
        secret = _checked(value, self)
        self._cache["entry"] = (key, secret)
        return secret


def _unreadable(path: str, exc: OSError | UnicodeDecodeError) -> SecretUnavailable:
    """Why a secret file cannot be used: its name and the error's type, never its bytes."""
    if isinstance(exc, FileNotFoundError):
        return SecretUnavailable(f"secret file {path} does not exist")
    if isinstance(exc, NotAFile | TooLarge):  # a FIFO, a device, a directory, a huge file: never read
        return SecretUnavailable(f"secret file {exc}")
    return SecretUnavailable(f"secret file {path} cannot be read ({type(exc).__name__})")


def _checked(value: str, ref: SecretRef) -> Secret:
    if not value:
        raise SecretUnavailable(f"secret {ref} is empty")
    if _FORBIDDEN_CHARS.search(value):
        raise SecretUnavailable(f"secret {ref} contains a line break or NUL byte")
    return Secret(value)
