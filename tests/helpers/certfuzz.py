"""A seeded generator of odd and malformed client certificates (issue 9 §3).

Each case starts from a valid X509-SVID issued by the given CA and applies one to three
mutations: URI SAN lists of every size and spelling, huge SAN lists, other name types, known
extensions with garbage contents, unknown critical extensions, CA flags and key usages, names
with odd types and lengths, validity extremes, other key types and signers, junk
intermediates, and byte-level damage of the DER (kept when ``cryptography`` still loads it).

Used by ``tests/test_certfuzz.py`` (in-process and through a real proxy) and by
``bench/fuzz_certs.py`` (larger runs). Same seed, same certificates.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from secretless_proxy.dev.certs import Issued, make_ca

GOOD_ID = "spiffe://example.org/ns/prod/sa/billing"
ODD_IDS = (
    "spiffe://example.org", "spiffe://example.org/", "spiffe://example.org//a", "spiffe://example.org/a/",
    "spiffe://example.org/./a", "spiffe://example.org/a/..", "spiffe://example.org/ns/ci/../prod",
    "spiffe://example.org/%61", "spiffe://example.org/a\x00b", "spiffe://example.org/a\nb",
    "spiffe://Example.org/a", "SPIFFE://example.org/a", "spiffe://user@example.org/a",
    "spiffe://example.org:1/a", "spiffe://example.org/a?b", "spiffe://example.org/a#b", "spiffe:///a",
    "spiffe://partner.example/a", "spiffe://unknown.example/a", "https://example.org/a", "",
    "spiffe://" + "a" * 300 + "/x", "spiffe://example.org/" + "a" * 3000, "spiffe://example.org/a b",
    "spiffe://example.org/\x7f", "spiffe://example.org/a\\b", "spiffe://example.org/*",
)
_KNOWN_OIDS = (
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE, ExtensionOID.AUTHORITY_KEY_IDENTIFIER, ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.NAME_CONSTRAINTS, ExtensionOID.CRL_DISTRIBUTION_POINTS, ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
    ExtensionOID.CERTIFICATE_POLICIES, ExtensionOID.POLICY_CONSTRAINTS, ExtensionOID.INHIBIT_ANY_POLICY,
    ExtensionOID.ISSUER_ALTERNATIVE_NAME, ExtensionOID.TLS_FEATURE,
)


@dataclass
class Case:
    name: str  # the mutations applied, for reports
    chain: list[x509.Certificate]
    key: object  # the leaf's private key (for real TLS clients)
    der_damaged: bool = False


class _Spec:
    """What to build: mutated step by step, then signed."""

    def __init__(self, rng: random.Random, ca: Issued) -> None:
        self.rng = rng
        self.ca = ca
        self.signer: Issued = ca
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "billing")])
        now = dt.datetime.now(dt.UTC)
        self.not_before, self.not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(hours=1)
        self.serial = x509.random_serial_number()
        self.sans: list[x509.GeneralName] | None = [x509.UniformResourceIdentifier(GOOD_ID)]
        self.exts: dict[object, tuple[object, bool]] = {
            ExtensionOID.BASIC_CONSTRAINTS: (x509.BasicConstraints(ca=False, path_length=None), True),
            ExtensionOID.KEY_USAGE: (_ku(digital_signature=True), True),
            ExtensionOID.EXTENDED_KEY_USAGE: (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
        }
        self.extras: list[x509.Certificate] = []
        self.hash: hashes.HashAlgorithm | None = hashes.SHA256()


def _ku(**on: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    kw = {n: on.get(n, False) for n in names}
    if not kw["key_agreement"]:
        kw["encipher_only"] = kw["decipher_only"] = False
    return x509.KeyUsage(**kw)


def _text(rng: random.Random, n: int) -> str:
    alphabet = "abcXYZ019./-_%:@?#*~ \t\n\x00\x7f/"
    return "".join(rng.choice(alphabet) for _ in range(n))


# -- mutations: each changes the spec ---------------------------------------------------------------

def m_uri_count(s: _Spec) -> None:
    n = s.rng.choice((0, 2, 3, 50))
    s.sans = [x509.UniformResourceIdentifier(GOOD_ID if i == 0 else s.rng.choice(ODD_IDS + (GOOD_ID,)))
              for i in range(n)] or None


def m_odd_id(s: _Spec) -> None:
    s.sans = [x509.UniformResourceIdentifier(s.rng.choice(ODD_IDS))]


def m_random_id(s: _Spec) -> None:
    s.sans = [x509.UniformResourceIdentifier("spiffe://example.org/" + _text(s.rng, s.rng.randint(0, 40)))]


def m_huge_san(s: _Spec) -> None:
    n = s.rng.choice((500, 2000))
    s.sans = [x509.DNSName(f"h{i}.example.org") for i in range(n)] + [x509.UniformResourceIdentifier(GOOD_ID)]


def m_other_names(s: _Spec) -> None:
    rng = s.rng
    pool: list[x509.GeneralName] = [
        x509.RFC822Name("a@example.org"), x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
        x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])),
        x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4")),
        x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), bytes([0x04, 0x02, 0x41, 0x42])),
        x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.99999.2"), rng.randbytes(rng.randint(1, 20))),
        x509.DNSName("spiffe.example.org"), x509.UniformResourceIdentifier("spiffe://example.org/other"),
    ]
    s.sans = (s.sans or []) + rng.sample(pool, rng.randint(1, 4))


def m_no_san(s: _Spec) -> None:
    s.sans = None


def m_garbage_known_ext(s: _Spec) -> None:
    oid = s.rng.choice(_KNOWN_OIDS)
    junk = s.rng.choice((b"", b"\x00", b"\x30\x80", b"\x30\x03\x01\x01\xff", s.rng.randbytes(s.rng.randint(1, 64))))
    s.exts[oid] = (x509.UnrecognizedExtension(oid, junk), s.rng.random() < 0.5)
    if oid == ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
        s.sans = None


def m_unknown_ext(s: _Spec) -> None:
    oid = x509.ObjectIdentifier(f"1.3.6.1.4.1.99999.{s.rng.randint(1, 1000)}")
    s.exts[oid] = (x509.UnrecognizedExtension(oid, s.rng.randbytes(s.rng.randint(0, 200))), s.rng.random() < 0.5)


def m_ca_flag(s: _Spec) -> None:
    s.exts[ExtensionOID.BASIC_CONSTRAINTS] = (x509.BasicConstraints(ca=True, path_length=s.rng.choice((None, 0))),
                                              s.rng.random() < 0.8)


def m_drop_std_ext(s: _Spec) -> None:
    s.exts.pop(s.rng.choice((ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE,
                             ExtensionOID.EXTENDED_KEY_USAGE)), None)


def m_key_usage(s: _Spec) -> None:
    bits = s.rng.choice(({"key_cert_sign": True, "digital_signature": True}, {"crl_sign": True},
                         {"key_agreement": True, "encipher_only": True}, {"key_encipherment": True}))
    s.exts[ExtensionOID.KEY_USAGE] = (_ku(**bits), s.rng.random() < 0.5)


def m_eku(s: _Spec) -> None:
    usages = s.rng.choice(([ExtendedKeyUsageOID.SERVER_AUTH], [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE],
                           [ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.CLIENT_AUTH],
                           [x509.ObjectIdentifier("1.2.3.4.5")]))
    s.exts[ExtensionOID.EXTENDED_KEY_USAGE] = (x509.ExtendedKeyUsage(usages), s.rng.random() < 0.5)


def m_name(s: _Spec) -> None:
    rng = s.rng
    choice = rng.randrange(5)
    if choice == 0:
        s.subject = x509.Name([])
    elif choice == 1:
        s.subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x" * rng.choice((65, 1000, 5000)),
                                                  _validate=False)])
    elif choice == 2:
        s.subject = x509.Name([x509.NameAttribute(x509.ObjectIdentifier("1.2.3.4.5.6"), _text(rng, 30))])
    elif choice == 3:
        s.subject = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "ZZZ", _validate=False),
                               x509.NameAttribute(NameOID.COMMON_NAME, "\u202e\u0000evil")])
    else:
        s.subject = x509.Name([x509.RelativeDistinguishedName([
            x509.NameAttribute(NameOID.COMMON_NAME, "a"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "b")])])


def m_validity(s: _Spec) -> None:
    now = dt.datetime.now(dt.UTC)
    s.not_before, s.not_after = s.rng.choice((
        (now - dt.timedelta(days=2), now - dt.timedelta(days=1)),
        (now + dt.timedelta(days=1), now + dt.timedelta(days=2)),
        (dt.datetime(1950, 1, 1, tzinfo=dt.UTC), dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)),
        (now + dt.timedelta(hours=1), now - dt.timedelta(hours=1)),  # notAfter before notBefore
    ))


def m_serial(s: _Spec) -> None:
    s.serial = s.rng.choice((1, 2**159 - 1, 0x80))


_KEYS: dict[str, object] = {}


def m_key_type(s: _Spec) -> None:
    kind = s.rng.choice(("p384", "ed25519", "rsa"))
    if kind == "p384":
        s.key = ec.generate_private_key(ec.SECP384R1())
    elif kind == "ed25519":
        s.key = ed25519.Ed25519PrivateKey.generate()
    else:  # RSA generation is slow: one key for the whole run
        s.key = _KEYS.setdefault("rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def m_signer(s: _Spec) -> None:
    s.signer = s.rng.choice((_other_ca(), Issued(cert=s.ca.cert, key=s.key)))  # untrusted CA, or forged issuer


def m_sign_hash(s: _Spec) -> None:
    s.hash = s.rng.choice((hashes.SHA384(), hashes.SHA512(), hashes.SHA224()))


def m_extra_chain(s: _Spec) -> None:
    s.extras = s.rng.choice(([s.ca.cert], [_other_ca().cert], [s.ca.cert, s.ca.cert], [_other_ca().cert] * 5))


MUTATIONS = [m_uri_count, m_odd_id, m_random_id, m_huge_san, m_other_names, m_no_san, m_garbage_known_ext,
             m_garbage_known_ext, m_unknown_ext, m_ca_flag, m_drop_std_ext, m_key_usage, m_eku, m_name,
             m_validity, m_serial, m_key_type, m_signer, m_sign_hash, m_extra_chain]


def _other_ca() -> Issued:
    if "other" not in _KEYS:
        _KEYS["other"] = make_ca(common_name="fuzz other CA")
    return _KEYS["other"]  # type: ignore[return-value]


def _build(s: _Spec) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(s.subject).issuer_name(s.signer.cert.subject)
         .public_key(s.key.public_key()).serial_number(s.serial)  # type: ignore[attr-defined]
         .not_valid_before(s.not_before).not_valid_after(s.not_after))
    if s.sans:
        b = b.add_extension(x509.SubjectAlternativeName(s.sans), critical=False)
    for oid, (value, critical) in s.exts.items():
        if oid == ExtensionOID.SUBJECT_ALTERNATIVE_NAME and s.sans:
            continue
        b = b.add_extension(value, critical=critical)  # type: ignore[arg-type]
    key = s.signer.key
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else s.hash
    return b.sign(key, algo)  # type: ignore[arg-type]


def _damage(rng: random.Random, der: bytes) -> bytes:
    data = bytearray(der)
    what = rng.randrange(4)
    if what == 0:  # flip a few bytes anywhere after the outer header
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(4, len(data))] ^= 1 << rng.randrange(8)
    elif what == 1:  # truncate
        del data[rng.randrange(len(data) // 2, len(data)):]
    elif what == 2:  # overwrite a run with junk
        at = rng.randrange(4, len(data) - 8)
        data[at:at + 8] = rng.randbytes(8)
    else:  # rewrite a length byte in the extensions region (the last third)
        at = rng.randrange(2 * len(data) // 3, len(data))
        data[at] = rng.choice((0x00, 0x7f, 0x80, 0x81, 0xff))
    return bytes(data)


def cases(*, count: int, seed: int, ca: Issued) -> Iterator[Case]:
    """``count`` fuzz cases from ``seed``, all nominally issued by ``ca`` for example.org."""
    rng = random.Random(seed)
    made = 0
    while made < count:
        s = _Spec(rng, ca)
        applied = rng.sample(MUTATIONS, rng.randint(1, 3))
        name = "+".join(m.__name__[2:] for m in applied)
        try:
            with warnings.catch_warnings():  # odd name lengths are the point here, not a mistake
                warnings.simplefilter("ignore", UserWarning)
                for m in applied:
                    m(s)
                leaf = _build(s)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue  # cryptography refused to build it: not a certificate anyone can present
        damaged = rng.random() < 0.3
        if damaged:
            try:
                leaf = x509.load_der_x509_certificate(_damage(rng, leaf.public_bytes(Encoding.DER)))
            except Exception:  # noqa: BLE001 - InvalidVersion and friends: not even loadable
                continue  # not even loadable: a TLS stack rejects it before any hook runs
            name += "+der_damage"
        made += 1
        yield Case(name=name, chain=[leaf, *s.extras], key=s.key, der_damaged=damaged)
