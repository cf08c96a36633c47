"""The ``identity`` config section: trust domains and one trust bundle per trust domain.

An SVID is valid only when it chains to the bundle of its *own* trust domain (SPIFFE-ID §3,
issue 9): one store holding every domain's CA would let a partner's CA mint our IDs. So::

    identity:
      trust_domains: [example.org, partner.example]
      trust_bundles:
        example.org: ca/example-org.pem                 # PEM, one or more CA certificates
        partner.example: {path: partner.json, format: spiffe}   # SPIFFE bundle (JWKS), e.g. SPIRE's

``format`` is ``auto`` by default (a JSON object is a SPIFFE bundle, anything else PEM). The
single-domain shorthand stays: ``trust_bundle: FILE`` with exactly one trust domain. Every
domain needs a bundle and every bundle a domain; one CA certificate in two domains' bundles
is refused, as it would let either domain's issuer mint the other's IDs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from secretless_proxy.config.yamlsource import Path_, Source
from secretless_proxy.secretrefs import expand_user
from secretless_proxy.trust.bundles import FORMATS, BundleSource, load_bundle
from secretless_proxy.trust.spiffe import parse_trust_domain

MIGRATION = "see 'Trust bundles per trust domain' in the README"


@dataclass(frozen=True, kw_only=True)
class IdentityConfig:
    trust_domains: tuple[str, ...]
    bundles: dict[str, BundleSource] = field(default_factory=dict)  # trust domain → its bundle

    def bundle_files(self) -> list[Path]:
        """Every bundle file, to watch for changes."""
        return [b.path for b in self.bundles.values()]


def parse_identity(src: Source, value: Any, base: Path) -> IdentityConfig | None:
    p: Path_ = ("identity",)
    m = src.mapping(p, value, required=("trust_domains",), optional=("trust_bundle", "trust_bundles"))
    if m is None or "trust_domains" not in m:
        return None
    domains = _domains(src, p + ("trust_domains",), m["trust_domains"])
    if "trust_bundle" in m and "trust_bundles" in m:
        src.error(p + ("trust_bundle",), "give either trust_bundle (one trust domain) or trust_bundles "
                                         "(one bundle per trust domain), not both")
        return None
    if "trust_bundle" not in m and "trust_bundles" not in m:
        src.error(p, "missing required key 'trust_bundles' (or 'trust_bundle' for a single trust domain)")
        return None
    if domains is None:
        return None
    if "trust_bundle" in m:
        if len(domains) != 1:
            src.error(p + ("trust_bundle",), f"one trust bundle cannot serve {len(domains)} trust domains: each "
                                             f"domain's CA could then issue the others' IDs; give identity."
                                             f"trust_bundles with one file per domain ({MIGRATION})")
            return None
        source = _source(src, p + ("trust_bundle",), m["trust_bundle"], base)
        bundles = {domains[0]: source} if source else {}
    else:
        bundles, failed = _bundles(src, p + ("trust_bundles",), m["trust_bundles"], base)
        for i, td in enumerate(domains):
            if td not in bundles and td not in failed:
                src.error(p + ("trust_domains", i), f"trust domain '{td}' has no bundle under identity.trust_bundles: "
                                                    "its workloads could never be verified")
        for td in bundles:
            if td not in domains:
                src.error(p + ("trust_bundles", td), f"bundle for '{td}', which is not in identity.trust_domains "
                                                     f"({', '.join(domains)}); add the domain or remove the bundle")
    _check_contents(src, p, bundles, shorthand="trust_bundle" in m)
    if len(bundles) != len(domains) or set(bundles) != set(domains):
        return None
    return IdentityConfig(trust_domains=tuple(domains), bundles=bundles)


def _domains(src: Source, p: Path_, value: Any) -> list[str] | None:
    items = src.string_list(p, value)
    if items is None:
        return None
    ok = True
    for i, d in enumerate(items):
        try:
            parse_trust_domain(d)
        except ValueError as exc:
            src.error(p + (i,), str(exc))
            ok = False
        if d in items[:i]:
            src.error(p + (i,), f"trust domain '{d}' is listed twice")
            ok = False
    if not items:
        src.error(p, "name at least one trust domain")
        ok = False
    return items if ok else None


def _bundles(src: Source, p: Path_, value: Any, base: Path) -> tuple[dict[str, BundleSource], set[str]]:
    """(trust domain → bundle, the domains whose entry was wrong and already reported)."""
    out: dict[str, BundleSource] = {}
    failed: set[str] = set()
    if not isinstance(value, dict) or not value:
        src.error(p, "must map each trust domain to its bundle file, e.g. {example.org: ca.pem}")
        return out, failed
    for td, spec in value.items():
        try:
            parse_trust_domain(td)
        except ValueError as exc:
            src.error(p + (str(td),), str(exc))
            continue
        source = _source(src, p + (td,), spec, base)
        if source is None:
            failed.add(td)
        else:
            out[td] = source
    return out, failed


def _source(src: Source, p: Path_, value: Any, base: Path) -> BundleSource | None:
    fmt = "auto"
    if isinstance(value, dict):
        m = src.mapping(p, value, required=("path",), optional=("format",))
        if m is None or "path" not in m:
            return None
        if "format" in m and (fmt := src.choice(p + ("format",), m["format"], FORMATS)) is None:
            return None
        where, raw = p + ("path",), m["path"]
    else:
        where, raw = p, value
    s = src.string(where, raw)
    if s is None:
        return None
    try:
        path = expand_user(s)
        path = path if path.is_absolute() else base / path
        exists = path.is_file()
    except ValueError as exc:
        src.error(where, str(exc))
        return None
    except OSError as exc:  # ENAMETOOLONG, ELOOP...: is_file() only swallows "does not exist"
        src.error(where, f"file {s[:200]} cannot be read ({exc.strerror or type(exc).__name__})")
        return None
    if not exists:
        src.error(where, f"file {path} does not exist")
        return None
    return BundleSource(path=path, format=fmt)  # type: ignore[arg-type]


def _check_contents(src: Source, p: Path_, bundles: dict[str, BundleSource], *, shorthand: bool) -> None:
    """Load every bundle now, so `check` reports a bad file with the key that names it."""
    owner: dict[str, str] = {}
    for td, source in bundles.items():
        key = p + (("trust_bundle",) if shorthand else ("trust_bundles", td))
        try:
            certs = load_bundle(source)
        except ValueError as exc:
            src.error(key, str(exc))
            continue
        for cert in certs:
            fp = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
            if owner.setdefault(fp, td) != td:
                src.error(key, f"CA certificate {cert.subject.rfc4514_string()} (sha256 {fp[:16]}) is also in the "
                               f"bundle of '{owner[fp]}': a CA belongs to one trust domain, or it could "
                               "issue the other domain's IDs")
