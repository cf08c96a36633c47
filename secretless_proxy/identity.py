"""Client certificate chain → verified workload identity (SPIFFE X509-SVID).

mitmproxy's ``request_client_cert`` accepts *any* certificate, so all verification happens
here: the chain must lead to a CA in the trust bundle (RFC 5280 path validation by
``cryptography``'s verifier), every certificate must be inside its validity window, the leaf
must be an end-entity certificate (CA=false) for digital signatures, carry the clientAuth EKU
when it has an EKU, and hold exactly one ``spiffe://`` URI SAN whose trust domain is configured
(SPIFFE X509-SVID §4, §5).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from .errors import IdentityError
from .matching import split_spiffe_id

# The closed vocabulary of identity refusals (407 reasons, metric labels).
MISSING = "identity_missing"
UNTRUSTED = "identity_untrusted"
EXPIRED = "identity_expired"
INVALID = "identity_invalid"
TRUST_DOMAIN = "identity_trust_domain"
CONFLICT = "identity_conflict"


@dataclass(frozen=True, kw_only=True, slots=True)
class Workload:
    """A verified calling workload."""

    spiffe_id: str
    trust_domain: str
    path: str
    not_after: float  # epoch seconds; the identity is void after this
    cert_sha256: str


def load_trust_bundle(path: Path) -> list[x509.Certificate]:
    """Every CA certificate in a PEM bundle; ValueError naming the file when there is none."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read trust bundle {path}: {exc.strerror or exc}") from exc
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValueError(f"trust bundle {path} holds no valid PEM certificate") from exc
    for cert in certs:
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise ValueError(f"trust bundle {path} contains a certificate that is not a CA: {cert.subject.rfc4514_string()}")
    return certs


class IdentityVerifier:
    """Verifies client certificate chains against one trust bundle and a set of trust domains."""

    def __init__(self, *, roots: list[x509.Certificate], trust_domains: tuple[str, ...]) -> None:
        self._store = Store(roots)
        self._trust_domains = frozenset(trust_domains)

    def verify(self, chain: list[x509.Certificate], *, now: dt.datetime | None = None) -> Workload:
        """The workload the chain proves, or IdentityError with a reason from this module."""
        if not chain:
            raise IdentityError(MISSING, "no client certificate was presented")
        now = now or dt.datetime.now(dt.UTC)
        leaf, intermediates = chain[0], chain[1:]
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise IdentityError(EXPIRED, "the client certificate is expired or not yet valid")
        spiffe_id = _check_leaf(leaf)
        td, path = split_spiffe_id(spiffe_id)
        try:
            verifier = (
                PolicyBuilder().store(self._store).time(now)
                .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                                    ee_policy=ExtensionPolicy.permit_all())
                .build_client_verifier()
            )
            verifier.verify(leaf, intermediates)
        except VerificationError as exc:
            raise IdentityError(UNTRUSTED, "the client certificate does not chain to the workload trust bundle") from exc
        if td not in self._trust_domains:
            raise IdentityError(TRUST_DOMAIN, f"trust domain '{td}' is not accepted")
        return Workload(
            spiffe_id=spiffe_id, trust_domain=td, path=path,
            not_after=leaf.not_valid_after_utc.timestamp(),
            cert_sha256=hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
        )


def _check_leaf(leaf: x509.Certificate) -> str:
    """X509-SVID leaf rules; returns the one SPIFFE ID."""
    ext = leaf.extensions
    try:
        if ext.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise IdentityError(INVALID, "the client certificate is a CA certificate, not a workload certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = ext.get_extension_for_class(x509.KeyUsage).value
        if not ku.digital_signature or ku.key_cert_sign or ku.crl_sign:
            raise IdentityError(INVALID, "the client certificate's key usage does not allow TLS client authentication")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise IdentityError(INVALID, "the client certificate's extended key usage lacks clientAuth")
    except x509.ExtensionNotFound:
        pass
    try:
        san = ext.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        raise IdentityError(INVALID, f"the client certificate must carry exactly one spiffe:// URI SAN (found {len(uris)} URI SANs)")
    try:
        split_spiffe_id(uris[0])
    except ValueError as exc:
        raise IdentityError(INVALID, "the client certificate's SPIFFE ID is malformed") from exc
    return uris[0]
