"""Host, path and workload patterns: parsing (strict, for config) and matching (fast, per request).

Host names are normalised before they are compared: lower case, no trailing dot, IDNA
(punycode) for non-ASCII names, no IPv6 brackets. A wildcard host ``*.example.com`` matches
any name that ends in ``.example.com`` at a label boundary (``a.example.com``,
``a.b.example.com``), never ``example.com`` itself and never ``evilexample.com``.

Path and workload globs share one syntax: ``*`` matches within one ``/``-separated segment,
``**`` matches any number of whole segments (including none when it stands alone as the last
segment after a ``/``, e.g. ``/v1/**`` matches ``/v1/`` and ``/v1/a/b``).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote

from secretless_proxy.trust.spiffe import parse_pattern, parse_spiffe_id

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_NUMERIC_TLD = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)\Z")


@lru_cache(maxsize=4096)  # twice per request on the hot path; IDNA encoding is not free
def normalize_host(host: str) -> str:
    """Canonical form of a host name or IP literal; raises ValueError if it is not one."""
    h = host.strip()
    bracketed = h.startswith("[") and h.endswith("]")
    if bracketed:
        h = h[1:-1]
        if not h:
            raise ValueError("empty host name")
        try:
            return str(ipaddress.IPv6Address(h))
        except ValueError as exc:
            raise ValueError(f"invalid host name {host!r}: brackets are for IPv6 addresses only") from exc
    if h.endswith(".") and not h.endswith(".."):
        h = h[:-1]
    if not h:
        raise ValueError("empty host name")
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        pass
    try:
        h = h.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise ValueError(f"invalid host name {host!r}") from exc
    labels = h.split(".")
    if len(h) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"invalid host name {host!r}")
    if _NUMERIC_TLD.match(labels[-1]):
        # 127.1, 010.0.0.1, 0x7f.1: resolvers read these as IPv4 in shorthand; a rule or a
        # request naming one must not be matched as if it were a DNS name.
        raise ValueError(f"invalid host name {host!r}: it looks like a shorthand IP address")
    return h


@dataclass(frozen=True, slots=True)
class HostPattern:
    """An exact host (``api.example.com``, ``10.0.0.1``) or a wildcard (``*.example.com``)."""

    text: str
    exact: str | None  # normalised exact host, or None for a wildcard
    suffix: str | None  # ".example.com" for "*.example.com"

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        if not isinstance(text, str) or not text:
            raise ValueError("host must be a non-empty string")
        if any(c in text for c in "/:@?#") and not text.startswith("["):
            raise ValueError(
                f"invalid host pattern {text!r}: give a bare host name, no scheme, port, path or user"
            )
        if text.startswith("*."):
            rest = text[2:]
            if "*" in rest:
                raise ValueError(
                    f"invalid host pattern {text!r}: only one leading '*.' wildcard is allowed"
                )
            base = normalize_host(rest)
            if "." not in base:
                raise ValueError(
                    f"host pattern {text!r} is too broad: a wildcard needs at least two labels "
                    "after '*.' (e.g. *.example.com)"
                )
            return cls(text=text, exact=None, suffix="." + base)
        if "*" in text:
            raise ValueError(
                f"unanchored host pattern {text!r}: a wildcard is only allowed as a whole "
                "leading label, as in *.example.com"
            )
        return cls(text=text, exact=normalize_host(text), suffix=None)

    def matches(self, host: str) -> bool:
        """``host`` must already be normalised."""
        if self.exact is not None:
            return host == self.exact
        assert self.suffix is not None
        return host.endswith(self.suffix) and len(host) > len(self.suffix)


@lru_cache(maxsize=1024)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = []
    segments = pattern.split("/")
    for i, seg in enumerate(segments):
        if seg == "**":
            # "/**" as the last segment also matches the bare directory ("/v1/").
            out.append(".*" if i == len(segments) - 1 else "(?:[^/]*/)*?[^/]*")
            continue
        if "**" in seg:
            raise ValueError(f"'**' must be a whole segment in {pattern!r}")
        out.append("[^/]*".join(re.escape(part) for part in seg.split("*")))
    return re.compile("/".join(out) + r"\Z")


@dataclass(frozen=True, slots=True)
class Glob:
    """A segment-aware glob over ``/``-separated text (see module docstring)."""

    text: str
    regex: re.Pattern[str]
    literal: bool

    @classmethod
    def parse(cls, text: str) -> Glob:
        return cls(text=text, regex=_glob_regex(text), literal="*" not in text)

    def matches(self, value: str) -> bool:
        if self.literal:
            return value == self.text
        return self.regex.match(value) is not None


def split_spiffe_id(text: str) -> tuple[str, str]:
    """A workload's ``spiffe://td/path`` → ``("td", "/path")``; ValueError naming what is wrong.

    The strict parser of ``spiffe.py`` (a non-root path is required), under its old name.
    """
    sid = parse_spiffe_id(text)
    return sid.trust_domain, sid.path


@dataclass(frozen=True, slots=True)
class WorkloadPattern:
    """An exact SPIFFE ID or a path glob within one trust domain: ``spiffe://example.org/ns/*/sa/billing``.

    Parsed by the same rules as the IDs it is matched against (``spiffe.parse_pattern``).
    """

    text: str
    trust_domain: str
    path: Glob

    @classmethod
    def parse(cls, text: str) -> WorkloadPattern:
        if not isinstance(text, str):
            raise ValueError("a workload pattern must be a string")
        sid = parse_pattern(text)
        return cls(text=text, trust_domain=sid.trust_domain, path=Glob.parse(sid.path))

    def matches(self, trust_domain: str, path: str) -> bool:
        return trust_domain == self.trust_domain and self.path.matches(path)


# "..;x" counts too: Tomcat/Spring drop ";params" from a segment and then resolve the "..".
_DOT_SEGMENT = re.compile(r"(?:^|/)\.{1,2}(?:[/;]|$)")
_STILL_ENCODED = re.compile(r"%(?:2e|2f|5c|u)", re.IGNORECASE)


def canonical_path(raw_path: str) -> str | None:
    """The path a rule is matched against, or None if it cannot be matched safely.

    Percent-decoding happens first so ``/v1/%2e%2e/admin`` is seen as the traversal it is; a
    path with dot segments, backslashes, control characters or a ``#`` is refused rather than
    guessed at (the upstream may resolve it differently than we would).
    """
    if "#" in raw_path:
        return None  # a fragment in a request target hides what follows it from the rule (review 17)
    path = raw_path.split("?", 1)[0]
    if not path.startswith("/"):
        return None
    lowered = path.lower()
    if "%2f" in lowered or "%5c" in lowered:
        # An encoded slash is one segment to us and maybe two to the upstream: refuse, don't guess.
        return None
    try:
        decoded = unquote(path, errors="strict") if "%" in path else path
    except UnicodeDecodeError:
        return None
    if "\\" in decoded or _DOT_SEGMENT.search(decoded) or any(ord(c) < 0x20 or c == "\x7f" for c in decoded):
        return None
    if _STILL_ENCODED.search(decoded):
        return None  # %252e%252e, %u002e: an upstream that decodes twice sees a dot, slash or backslash (review 26)
    if not decoded.isascii():
        folded = unicodedata.normalize("NFKC", decoded)
        if "\\" in folded or folded.count("/") != decoded.count("/") or _DOT_SEGMENT.search(folded):
            return None  # fullwidth dots (U+FF0E) or slashes fold to '..' or '/' on upstreams that normalise (review 26)
    return decoded
