"""Trust bundle files: the CA certificates of one trust domain, as PEM or as a SPIFFE bundle.

A SPIFFE bundle (SPIFFE Trust Domain and Bundle §4; X509-SVID §6) is a JWKS document, as
SPIRE's bundle endpoint and ``spire-server bundle show -format spiffe`` write it::

    {"keys": [{"use": "x509-svid", "kty": "EC", "crv": "P-256", "x": "...", "y": "...",
               "x5c": ["<base64 DER CA certificate>"]},
              {"use": "jwt-svid", "kid": "...", ...}],
     "spiffe_sequence": 3, "spiffe_refresh_hint": 300}

Only ``use: x509-svid`` entries matter here; for each, the first ``x5c`` value is the CA
certificate and the rest are ignored (X509-SVID §6.2); an entry without ``x5c`` is ignored. A
bundle with no X509-SVID CA means the trust domain does not issue X509-SVIDs: refused, since
such a domain could never authenticate anyone here.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509

from secretless_proxy.config.safefile import NotAFile, TooLarge, read_limited

BundleFormat = Literal["auto", "pem", "spiffe"]
FORMATS = ("auto", "pem", "spiffe")
MAX_BUNDLE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class BundleSource:
    """Where one trust domain's CA certificates come from."""

    path: Path
    format: BundleFormat = "auto"  # auto: a JSON object is a SPIFFE bundle, anything else PEM


def load_bundle(source: BundleSource) -> list[x509.Certificate]:
    """Every CA certificate of the bundle; ValueError naming the file and what is wrong."""
    path = source.path
    try:
        data = read_limited(path, limit=MAX_BUNDLE_BYTES)
    except (NotAFile, TooLarge) as exc:
        raise ValueError(f"cannot read trust bundle: {exc}") from exc
    except OSError as exc:
        raise ValueError(f"cannot read trust bundle {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_BUNDLE_BYTES:
        raise ValueError(f"trust bundle {path} is larger than {MAX_BUNDLE_BYTES} bytes")
    fmt = source.format
    if fmt == "auto":
        fmt = "spiffe" if data.lstrip()[:1] == b"{" else "pem"
    certs = _spiffe(path, data) if fmt == "spiffe" else _pem(path, data)
    for cert in certs:
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        except ValueError:
            raise ValueError(f"trust bundle {path} contains a certificate with malformed extensions") from None
        if bc is None or not bc.ca:
            raise ValueError(f"trust bundle {path} contains a certificate that is not a CA: "
                             f"{cert.subject.rfc4514_string()}")
    return certs


def _pem(path: Path, data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValueError(f"trust bundle {path} holds no valid PEM certificate") from exc


def _spiffe(path: Path, data: bytes) -> list[x509.Certificate]:
    where = f"SPIFFE bundle {path}"
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ValueError(f"{where} is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError(f"{where} must be a JSON object with a 'keys' list (a JWKS document)")
    for name in ("spiffe_sequence", "spiffe_refresh_hint"):
        value = doc.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{where}: {name} must be a non-negative integer, got {value!r}")
    certs: list[x509.Certificate] = []
    for i, key in enumerate(doc["keys"]):
        if not isinstance(key, dict):
            raise ValueError(f"{where}: keys[{i}] must be a JSON object")
        if key.get("use") != "x509-svid":
            continue  # jwt-svid keys and others: not for certificates
        x5c = key.get("x5c")
        if not x5c:
            continue  # X509-SVID §6.2: an x509-svid entry without x5c MUST be ignored
        if not isinstance(x5c, list) or not isinstance(x5c[0], str):
            raise ValueError(f"{where}: keys[{i}].x5c must be a list of base64 DER certificates")
        try:
            der = base64.b64decode(x5c[0], validate=True)
            certs.append(x509.load_der_x509_certificate(der))
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{where}: keys[{i}].x5c[0] is not a base64 DER certificate") from exc
    if not certs:
        raise ValueError(f"{where} has no x509-svid key with a certificate: this trust domain "
                         "issues no X509-SVIDs")
    return certs
