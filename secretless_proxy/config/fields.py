"""Config field readers on top of ``yamlsource.Source``: seconds, secret references, URLs.

Shared by every section parser (the config file's own sections, the store's, each credential
kind's), so they live beside ``yamlsource`` and import nothing but it and ``secrets``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from secretless_proxy.config.yamlsource import Path_, Source
from secretless_proxy.secretrefs import SecretRef


def secret_ref(src: Source, p: Path_, value: Any, base: Path) -> SecretRef | None:
    s = src.string(p, value)
    if s is None:
        return None
    try:
        return SecretRef.parse(s, base_dir=base)
    except ValueError as exc:
        src.error(p, str(exc))
        return None


def url(src: Source, p: Path_, value: Any, *, https_only: bool = True) -> str | None:
    """An absolute http(s) URL; plain http only for loopback unless ``https_only`` is False."""
    s = src.string(p, value)
    if s is None:
        return None
    try:
        parts = urlsplit(s)
        hostname, _ = parts.hostname, parts.port
    except ValueError:  # "Invalid IPv6 URL" (an unbalanced '['), or a port that is not 0-65535
        hostname = None
    if not hostname or parts.scheme not in ("https", "http"):
        src.error(p, f"must be an absolute https:// URL, got {s!r}")
        return None
    if parts.scheme == "http" and https_only and hostname not in ("127.0.0.1", "localhost", "::1"):
        src.error(p, f"{s!r} would send credentials in plaintext: use https:// (http:// is allowed for loopback only)")
        return None
    return s


def seconds(src: Source, p: Path_, value: Any, *, lo: float, hi: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        src.error(p, f"must be a number of seconds from {lo:g} to {hi:g}, got {value!r}")
        return None
    return float(value)
