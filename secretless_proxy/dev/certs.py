"""A small development PKI: a workload CA, X509-SVID-style client certificates, TLS server certs.

Everything is minted at run time with ``cryptography``; no key is ever shipped in the repo.
Leaves follow the X509-SVID profile (spiffe/spiffe standards/X509-SVID.md): ECDSA P-256,
exactly one URI SAN holding the SPIFFE ID, CA=false, digitalSignature, clientAuth.
Several knobs exist only so tests can mint deliberately *broken* certificates.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secretless_proxy.trust.spiffe import parse_spiffe_id

__all__ = [
    "Issued",
    "load_ca",
    "make_ca",
    "make_server_cert",
    "make_svid",
    "validate_spiffe_id",
    "write_ca",
    "write_svid",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# Back-dating tolerates clock skew between the minting host and the verifier.
_SKEW = timedelta(minutes=5)
_CA_CERT_FILE = "ca.pem"
_CA_KEY_FILE = "ca-key.pem"
_SVID_CERT_FILE = "svid.pem"
_SVID_KEY_FILE = "svid-key.pem"
# RFC 5280 ub-common-name; cryptography refuses longer CNs.
_MAX_CN = 64


@dataclass(frozen=True, kw_only=True, repr=False)
class Issued:
    """A certificate and its private key, held in memory."""

    cert: x509.Certificate
    key: PrivateKey

    def cert_pem(self) -> bytes:
        """The certificate, PEM encoded."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self.key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        # Deliberately subject-only: a repr can end up in logs and must never carry key material.
        return f"Issued(subject={self.cert.subject.rfc4514_string()!r})"


# --- SPIFFE IDs -------------------------------------------------------------------------------


def validate_spiffe_id(s: str) -> str:
    """Return ``s`` unchanged if it is a valid workload SPIFFE ID, else raise ValueError saying why.

    The same strict parser the proxy verifies certificates with (``spiffe.py``): a certificate
    minted here is one the proxy accepts, and no other.
    """
    parse_spiffe_id(s)
    return s


# --- minting ------------------------------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _validity(*, not_before: datetime | None, ttl: timedelta) -> tuple[datetime, datetime]:
    """(not_before, not_after): back-dated by the skew allowance, valid for ``ttl`` after that."""
    if ttl <= timedelta(0):
        raise ValueError("the certificate TTL must be greater than zero")
    start = not_before if not_before is not None else datetime.now(UTC) - _SKEW
    if start.tzinfo is None:
        raise ValueError("not_before must be timezone-aware")
    return start, start + _SKEW + ttl


def _ski(key: PrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def _aki(issuer: Issued) -> x509.AuthorityKeyIdentifier:
    """AKI matching the issuer's own SKI when it has one (so path building finds it)."""
    try:
        ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _cn(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text[:_MAX_CN] or "unnamed")])


def _builder(*, subject: x509.Name, issuer: x509.Name, key: PrivateKey, start: datetime,
             end: datetime) -> x509.CertificateBuilder:
    """What every certificate minted here starts with: names, key, a random serial, validity."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )


def _sign(builder: x509.CertificateBuilder, *, issuer_key: PrivateKey) -> x509.Certificate:
    return builder.sign(private_key=issuer_key, algorithm=hashes.SHA256())


def make_ca(
    *,
    common_name: str = "secretless dev workload CA",
    ttl: timedelta = timedelta(days=365),
    parent: Issued | None = None,
    not_before: datetime | None = None,
) -> Issued:
    """An ECDSA P-256 CA: self-signed root, or an intermediate signed by ``parent``."""
    key = _new_key()
    subject = _cn(common_name)
    start, end = _validity(not_before=not_before, ttl=ttl)
    if parent is None:
        issuer_name, issuer_key = subject, key
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
    else:
        issuer_name, issuer_key = parent.cert.subject, parent.key
        aki = _aki(parent)
    builder = (
        _builder(subject=subject, issuer=issuer_name, key=key, start=start, end=end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(_ski(key), critical=False)
        .add_extension(aki, critical=False)
    )
    return Issued(cert=_sign(builder, issuer_key=issuer_key), key=key)


def _key_usage(
    *, digital_signature: bool = False, cert_sign: bool = False, key_agreement: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_svid(
    *,
    ca: Issued,
    spiffe_id: str | None,
    ttl: timedelta = timedelta(hours=1),
    extra_uris: tuple[str, ...] = (),
    dns_names: tuple[str, ...] = (),
    not_before: datetime | None = None,
    ca_flag: bool = False,
    eku: tuple[x509.ObjectIdentifier, ...] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    key_usage_digital_signature: bool = True,
) -> Issued:
    """An X509-SVID-style leaf for ``spiffe_id``; the other knobs mint broken ones for tests.

    ``extra_uris`` are not validated. ``eku=None`` (or ``()``) omits the EKU extension.
    ``key_usage_digital_signature=False`` sets keyAgreement instead (a KeyUsage needs one bit).
    """
    if spiffe_id is not None:
        validate_spiffe_id(spiffe_id)
    key = _new_key()
    start, end = _validity(not_before=not_before, ttl=ttl)
    uris = ((spiffe_id,) if spiffe_id is not None else ()) + tuple(extra_uris)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns_names]
    subject = _cn(_svid_common_name(spiffe_id=spiffe_id, dns_names=dns_names))
    builder = (
        _builder(subject=subject, issuer=ca.cert.subject, key=key, start=start, end=end)
        .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
        .add_extension(
            _key_usage(
                digital_signature=key_usage_digital_signature,
                key_agreement=not key_usage_digital_signature,
            ),
            critical=True,
        )
        .add_extension(_ski(key), critical=False)
        .add_extension(_aki(ca), critical=False)
    )
    if sans:  # an empty SAN extension is malformed, so "no SAN" means omitting it
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return Issued(cert=_sign(builder, issuer_key=ca.key), key=key)


def _svid_common_name(*, spiffe_id: str | None, dns_names: tuple[str, ...]) -> str:
    """A readable CN; X509-SVID gives the subject no meaning, so this is cosmetic only."""
    if spiffe_id is not None:
        trust_domain, _, path = spiffe_id.removeprefix("spiffe://").partition("/")
        return path or trust_domain
    return dns_names[0] if dns_names else "no SPIFFE ID"


def make_server_cert(
    *,
    ca: Issued,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    ttl: timedelta = timedelta(days=1),
) -> Issued:
    """A TLS server certificate for test upstreams, with DNS and IP SANs for ``hosts``."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or IP address")
    key = _new_key()
    start, end = _validity(not_before=None, ttl=ttl)
    builder = (
        _builder(subject=_cn(hosts[0]), issuer=ca.cert.subject, key=key, start=start, end=end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_host_sans(hosts)), critical=False)
        .add_extension(_ski(key), critical=False)
        .add_extension(_aki(ca), critical=False)
    )
    return Issued(cert=_sign(builder, issuer_key=ca.key), key=key)


def _host_sans(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            sans.append(x509.DNSName(host))
    return sans


# --- files --------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write via a same-directory temp file created with ``mode``, then rename over ``path``.

    Creating the file with its final mode means a key is never readable by others, even briefly.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed or an old temp file widened it
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_ca(ca: Issued, out: Path) -> tuple[Path, Path]:
    """Write ``out/ca.pem`` and ``out/ca-key.pem`` (mode 0600); return both paths."""
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / _CA_CERT_FILE, out / _CA_KEY_FILE
    _write_atomic(cert_path, ca.cert_pem(), mode=0o644)
    _write_atomic(key_path, ca.key_pem(), mode=0o600)
    return cert_path, key_path


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def write_svid(svid: Issued, out: Path, *, ca: Issued | None = None) -> tuple[Path, Path]:
    """Write ``out/svid.pem`` and ``out/svid-key.pem`` (0600); return both paths.

    If ``ca`` is an intermediate it is appended to ``svid.pem``, so peers that only trust
    the root can still build the chain. A root is never appended (peers already have it).
    """
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / _SVID_CERT_FILE, out / _SVID_KEY_FILE
    chain = svid.cert_pem()
    if ca is not None and not _is_self_signed(ca.cert):
        chain += ca.cert_pem()
    _write_atomic(cert_path, chain, mode=0o644)
    _write_atomic(key_path, svid.key_pem(), mode=0o600)
    return cert_path, key_path


def _read(path: Path, *, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{what} file {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{what} file {path} cannot be read: {exc.strerror}") from exc


def load_ca(directory: Path) -> Issued:
    """Load ``ca.pem`` + ``ca-key.pem`` written by :func:`write_ca`; ValueError names a bad file."""
    cert_path, key_path = directory / _CA_CERT_FILE, directory / _CA_KEY_FILE
    cert_data = _read(cert_path, what="CA certificate")
    key_data = _read(key_path, what="CA private key")
    try:
        cert = x509.load_pem_x509_certificate(cert_data)
    except ValueError as exc:
        raise ValueError(f"CA certificate file {cert_path} is not a PEM certificate") from exc
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Chain suppressed on purpose: parser errors must not drag key bytes into tracebacks.
        raise ValueError(
            f"CA private key file {key_path} is not an unencrypted PEM private key"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"CA private key file {key_path} holds an unsupported key type")
    if key.public_key() != cert.public_key():
        raise ValueError(f"CA private key file {key_path} does not match {cert_path}")
    _require_ca(cert, path=cert_path)
    return Issued(cert=cert, key=key)


def _require_ca(cert: x509.Certificate, *, path: Path) -> None:
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ValueError(f"CA certificate file {path} is not a CA certificate (BasicConstraints)")
