"""The one SPIFFE ID parser: certificates, config patterns, grants and the dev ``certs`` command.

SPIFFE-ID §2: the scheme is ``spiffe``; the trust domain is the URI host only (no userinfo, no
port, no ``:``), lower case ``[a-z0-9._-]``, at most 255 bytes; the path is ``/``-separated
segments of ``[A-Za-z0-9._-]``, none empty, ``.`` or ``..`` (so no ``//`` and no trailing
``/``); no query, no fragment, no percent-encoding (``%`` is not in the character set), at most
2048 bytes in all. X509-SVID §5.2: a workload's ID has a non-root path, so ``spiffe://td`` (the
trust domain's own ID) and ``spiffe://td/`` never name a workload.

Anything else is refused with a ValueError whose message says what is wrong; nothing is
normalised or guessed at, because two parsers that normalise differently are how
``/ns/ci/sa/../../prod`` ends up matching a rule for ``/ns/ci/**``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048  # SPIFFE-ID §2.3
MAX_TRUST_DOMAIN_BYTES = 255  # SPIFFE-ID §2.3 (RFC 3986 host)

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+\Z")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+\Z")
_PATTERN_SEGMENT = re.compile(r"[A-Za-z0-9._*-]+\Z")  # config globs: '*' within, '**' whole


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str  # "/ns/prod/sa/billing"; "" only for a trust domain's own ID (workload=False)

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.trust_domain + self.path


def parse_spiffe_id(text: object, *, workload: bool = True) -> SpiffeId:
    """``spiffe://td/path`` → SpiffeId; ValueError naming what is wrong.

    ``workload=True`` (the default) requires a non-root path (X509-SVID §5.2).
    """
    td, path = _split(text, pattern=False)
    if workload and not path:
        raise _bad(text, "a workload's SPIFFE ID needs a path after the trust domain (X509-SVID §5.2), "
                         "e.g. spiffe://" + td + "/ns/prod/sa/api")
    return SpiffeId(td, path)


def parse_pattern(text: object) -> SpiffeId:
    """A config workload pattern: a SPIFFE ID whose path segments may hold ``*`` (``**`` whole).

    The same rules as a workload ID otherwise, so no pattern can be written that only an invalid
    ID (``/``, ``..``, ``%2e``) could match.
    """
    td, path = _split(text, pattern=True)
    if not path:
        raise _bad(text, f"workload pattern has no path: use spiffe://{td}/** for every workload of the trust domain")
    for seg in path[1:].split("/"):
        if "**" in seg and seg != "**":
            raise _bad(text, f"'**' must be a whole path segment, not part of {seg!r}")
    return SpiffeId(td, path)


def parse_trust_domain(text: object) -> str:
    """A bare trust domain name (``example.org``); ValueError naming what is wrong."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"invalid trust domain {text!r}: it must be a non-empty name such as example.org")
    if text.startswith(SCHEME_PREFIX):
        raise ValueError(f"invalid trust domain {text!r}: give the name only, without spiffe://")
    _check_trust_domain(text, lambda why: ValueError(f"invalid trust domain {text!r}: {why}"))
    return text


def _bad(text: object, why: str) -> ValueError:
    shown = text if not isinstance(text, str) or len(text) <= 120 else text[:120] + "..."
    return ValueError(f"invalid SPIFFE ID {shown!r}: {why}")


def _split(text: object, *, pattern: bool) -> tuple[str, str]:
    if not isinstance(text, str):
        raise _bad(text, "it must be a string")
    if not text:
        raise _bad(text, "it is empty")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise _bad(text, "it is not valid text") from None
    if size > MAX_ID_BYTES:
        raise _bad(text, f"it is longer than {MAX_ID_BYTES} bytes")
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise _bad(text, "it must start with 'spiffe://'")
    if scheme != "spiffe":
        raise _bad(text, f"the scheme must be 'spiffe', not {scheme!r}")
    if "?" in rest:
        raise _bad(text, "a query is not allowed")
    if "#" in rest:
        raise _bad(text, "a fragment is not allowed")
    td, slash, path = rest.partition("/")
    _check_trust_domain(td, lambda why: _bad(text, why))
    if not slash:
        return td, ""
    if not path:
        raise _bad(text, "the path must not end with '/' (SPIFFE-ID §2.2); a workload needs a path segment")
    allowed = _PATTERN_SEGMENT if pattern else _SEGMENT
    for seg in path.split("/"):
        if not seg:
            raise _bad(text, "the path has an empty segment (double or trailing '/')")
        if seg in (".", ".."):
            raise _bad(text, f"the path segment {seg!r} is not allowed")
        if not allowed.match(seg):
            if "%" in seg:
                raise _bad(text, "percent-encoding is not allowed in a SPIFFE ID")
            raise _bad(text, f"the path segment {seg!r} may only contain A-Z, a-z, 0-9, '.', '-' and '_'"
                             + (" (and '*' in a pattern)" if pattern else ""))
    return td, "/" + path


def _check_trust_domain(td: str, bad) -> None:
    if not td:
        raise bad("the trust domain is empty")
    if "@" in td:
        raise bad("user info is not allowed in the trust domain")
    if ":" in td:
        raise bad("a port is not allowed in the trust domain")
    if len(td.encode("utf-8", "replace")) > MAX_TRUST_DOMAIN_BYTES:
        raise bad(f"the trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    if not _TRUST_DOMAIN.match(td):
        if "%" in td:
            raise bad("percent-encoding is not allowed in a SPIFFE ID")
        if td.isascii() and _TRUST_DOMAIN.match(td.lower()):
            raise bad("the trust domain must be lowercase")
        raise bad("the trust domain may only contain a-z, 0-9, '.', '-' and '_'")
