"""Client certificate chain → verified workload identity (SPIFFE X509-SVID).

mitmproxy's ``request_client_cert`` accepts *any* certificate, so all verification happens
here: the leaf must hold exactly one URI SAN, a valid workload SPIFFE ID (``spiffe.py``) whose
trust domain is configured; the chain must lead to a CA in *that domain's* bundle (RFC 5280
path validation by ``cryptography``'s verifier); every certificate must be inside its validity
window; the leaf must be an end-entity certificate (CA=false) for digital signatures and carry
the clientAuth EKU when it has an EKU (SPIFFE X509-SVID §4, §5). A certificate that cannot even
be parsed is ``identity_invalid``, never an exception.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from secretless_proxy.errors import IdentityError
from secretless_proxy.reasons import Reason
from secretless_proxy.trust.spiffe import SpiffeId, parse_spiffe_id

MAX_INTERMEDIATES = 4  # X509-SVID chains are short: leaf, maybe an intermediate or two, the root


@dataclass(frozen=True, kw_only=True, slots=True)
class Workload:
    """A verified calling workload."""

    spiffe_id: str
    trust_domain: str
    path: str
    not_after: float  # epoch seconds; the identity is void after this
    cert_sha256: str


class IdentityVerifier:
    """Verifies client certificate chains; each trust domain has its own bundle (its own store).

    The leaf's SPIFFE ID names its trust domain, and that domain's bundle is the only one it may
    chain to: a partner's CA is trusted for the partner's IDs and never for ours (SPIFFE-ID §3).
    ``verify`` raises IdentityError and nothing else, whatever the certificate holds.
    """

    def __init__(self, *, bundles: Mapping[str, list[x509.Certificate]]) -> None:
        self._stores = {td: Store(roots) for td, roots in bundles.items()}
        self.trust_domains = tuple(bundles)

    def verify(self, chain: Sequence[x509.Certificate], *, now: dt.datetime | None = None) -> Workload:
        """The workload the chain proves, or IdentityError with a reason from this module."""
        try:
            with warnings.catch_warnings():  # cryptography warns on odd names: the client's, not ours
                warnings.simplefilter("ignore")
                return self._verify(chain, now or dt.datetime.now(dt.UTC))
        except IdentityError:
            raise
        except Exception as exc:  # noqa: BLE001 - cryptography parses lazily: any part may be malformed
            # The type only: the message could quote certificate bytes chosen by the client.
            raise IdentityError(Reason.IDENTITY_INVALID, f"the client certificate is malformed ({type(exc).__name__})") from None

    def _verify(self, chain: Sequence[x509.Certificate], now: dt.datetime) -> Workload:
        if not chain:
            raise IdentityError(Reason.IDENTITY_MISSING, "no client certificate was presented")
        leaf, intermediates = chain[0], _intermediates(chain[1:])
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise IdentityError(Reason.IDENTITY_EXPIRED, "the client certificate is expired or not yet valid")
        sid = _check_leaf(leaf)
        store = self._stores.get(sid.trust_domain)
        if store is None:
            raise IdentityError(Reason.IDENTITY_TRUST_DOMAIN, f"trust domain '{sid.trust_domain}' is not accepted")
        try:
            verifier = (
                PolicyBuilder().store(store).time(now).max_chain_depth(MAX_INTERMEDIATES)
                .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                                    ee_policy=ExtensionPolicy.permit_all())
                .build_client_verifier()
            )
            verifier.verify(leaf, intermediates)
        except VerificationError as exc:
            raise IdentityError(Reason.IDENTITY_UNTRUSTED, "the client certificate does not chain to the trust bundle of its "
                                           f"trust domain '{sid.trust_domain}'") from exc
        return Workload(
            spiffe_id=str(sid), trust_domain=sid.trust_domain, path=sid.path,
            not_after=leaf.not_valid_after_utc.timestamp(),
            cert_sha256=hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
        )


def _intermediates(sent: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """The intermediates a client sent, bounded so that path building stays linear.

    Path building tries every certificate whose subject matches an issuer name: four copies of
    one self-signed certificate took 49 s of CPU on the event loop with the default depth. Exact
    duplicates are dropped; more than MAX_INTERMEDIATES, or two that share a subject name (the
    only way to make the search branch), are refused.
    """
    unique = list({c.public_bytes(serialization.Encoding.DER): c for c in sent}.values())
    if len(unique) > MAX_INTERMEDIATES:
        raise IdentityError(Reason.IDENTITY_INVALID, f"the client sent {len(unique)} intermediate certificates (at most "
                                     f"{MAX_INTERMEDIATES} are accepted)")
    subjects = [c.subject for c in unique]
    if len(set(subjects)) != len(subjects):
        raise IdentityError(Reason.IDENTITY_INVALID, "two intermediate certificates in the client's chain share a subject name")
    return unique


def _check_leaf(leaf: x509.Certificate) -> SpiffeId:
    """X509-SVID leaf rules; returns the one SPIFFE ID."""
    ext = leaf.extensions
    try:
        if ext.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise IdentityError(Reason.IDENTITY_INVALID, "the client certificate is a CA certificate, not a workload certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = ext.get_extension_for_class(x509.KeyUsage).value
        if not ku.digital_signature or ku.key_cert_sign or ku.crl_sign:
            raise IdentityError(Reason.IDENTITY_INVALID, "the client certificate's key usage does not allow TLS client authentication")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise IdentityError(Reason.IDENTITY_INVALID, "the client certificate's extended key usage lacks clientAuth")
    except x509.ExtensionNotFound:
        pass
    try:
        san = ext.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        raise IdentityError(Reason.IDENTITY_INVALID, f"the client certificate must carry exactly one spiffe:// URI SAN (found {len(uris)} URI SANs)")
    try:
        return parse_spiffe_id(uris[0])
    except ValueError as exc:
        raise IdentityError(Reason.IDENTITY_INVALID, f"the client certificate's SPIFFE ID is not valid: {exc}") from None
