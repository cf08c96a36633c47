"""Tests for the dev PKI (secretless_proxy.dev.certs) and the echo upstream test helper."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    ClientVerifier,
    PolicyBuilder,
    Store,
    VerificationError,
)
from helpers.upstream import EchoUpstream

from secretless_proxy.dev.certs import (
    Issued,
    load_ca,
    make_ca,
    make_server_cert,
    make_svid,
    validate_spiffe_id,
    write_ca,
    write_svid,
)

SPIFFE_ID = "spiffe://example.org/ns/prod/sa/api"


@pytest.fixture(scope="module")
def root() -> Issued:
    return make_ca()


@pytest.fixture(scope="module")
def intermediate(root: Issued) -> Issued:
    return make_ca(common_name="secretless dev intermediate", parent=root)


@pytest.fixture(scope="module")
def svid(root: Issued) -> Issued:
    return make_svid(ca=root, spiffe_id=SPIFFE_ID)


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory, root: Issued) -> Path:
    cert_path, _ = write_ca(root, tmp_path_factory.mktemp("ca"))
    return cert_path


def ext[T: x509.ExtensionType](cert: x509.Certificate, kind: type[T]) -> x509.Extension[T]:
    return cert.extensions.get_extension_for_class(kind)


def client_verifier(root: Issued, *, at: datetime | None = None) -> ClientVerifier:
    return (
        PolicyBuilder()
        .store(Store([root.cert]))
        .time(at or datetime.now(UTC))
        .build_client_verifier()
    )


class TestIssued:
    def test_repr_shows_subject_not_key(self, root: Issued) -> None:
        """repr/str name the subject and contain no key material."""
        text = repr(root)
        assert "secretless dev workload CA" in text
        assert "PRIVATE" not in text and "key" not in text.lower()
        assert str(root) == text

    def test_pem_round_trip(self, root: Issued) -> None:
        """cert_pem loads back to the same cert; key_pem is unencrypted PKCS#8."""
        assert x509.load_pem_x509_certificate(root.cert_pem()) == root.cert
        assert root.key_pem().startswith(b"-----BEGIN " + b"PRIVATE KEY-----")  # split: no key marker in the repo


class TestMakeCa:
    def test_root_is_self_signed_p256_ca(self, root: Issued) -> None:
        """A root is self-signed P-256 with critical CA constraints and cert/CRL signing."""
        cert = root.cert
        assert cert.issuer == cert.subject
        cert.verify_directly_issued_by(cert)
        assert isinstance(root.key, ec.EllipticCurvePrivateKey)
        assert isinstance(root.key.curve, ec.SECP256R1)
        bc = ext(cert, x509.BasicConstraints)
        assert bc.critical and bc.value.ca
        ku = ext(cert, x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
        ski = ext(cert, x509.SubjectKeyIdentifier).value
        aki = ext(cert, x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ski.digest

    def test_intermediate_is_signed_by_parent(self, root: Issued, intermediate: Issued) -> None:
        """An intermediate is issued by its parent and its AKI points at the parent's SKI."""
        intermediate.cert.verify_directly_issued_by(root.cert)
        assert intermediate.cert.issuer == root.cert.subject
        parent_ski = ext(root.cert, x509.SubjectKeyIdentifier).value.digest
        aki = ext(intermediate.cert, x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == parent_ski

    def test_ttl_sets_validity(self) -> None:
        """The CA is valid from a few minutes ago until ttl from now."""
        before = datetime.now(UTC)
        ca = make_ca(ttl=timedelta(days=2))
        assert ca.cert.not_valid_before_utc <= before - timedelta(minutes=4)
        remaining = ca.cert.not_valid_after_utc - before
        assert timedelta(days=2) - timedelta(seconds=5) <= remaining <= timedelta(days=2, seconds=5)


class TestMakeSvid:
    def test_exactly_one_uri_san(self, svid: Issued) -> None:
        """The SAN holds exactly one URI, the SPIFFE ID, and nothing else."""
        san = ext(svid.cert, x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE_ID]
        assert len(list(san)) == 1

    def test_leaf_profile(self, svid: Issued) -> None:
        """The leaf is CA=false (critical), digitalSignature only (critical), clientAuth EKU."""
        bc = ext(svid.cert, x509.BasicConstraints)
        assert bc.critical and not bc.value.ca
        ku = ext(svid.cert, x509.KeyUsage)
        assert ku.critical and ku.value.digital_signature
        assert not ku.value.key_cert_sign and not ku.value.crl_sign
        assert list(ext(svid.cert, x509.ExtendedKeyUsage).value) == [
            ExtendedKeyUsageOID.CLIENT_AUTH
        ]

    def test_key_is_p256(self, svid: Issued) -> None:
        """The leaf key is ECDSA on P-256."""
        assert isinstance(svid.key, ec.EllipticCurvePrivateKey)
        assert isinstance(svid.key.curve, ec.SECP256R1)

    def test_valid_for_ttl_from_now(self, root: Issued) -> None:
        """Default validity starts a few minutes back and lasts ttl from now."""
        now = datetime.now(UTC)
        svid = make_svid(ca=root, spiffe_id=SPIFFE_ID, ttl=timedelta(minutes=15))
        assert svid.cert.not_valid_before_utc <= now - timedelta(minutes=4)
        remaining = svid.cert.not_valid_after_utc - now
        assert timedelta(minutes=14) < remaining <= timedelta(minutes=15, seconds=5)

    def test_verifies_against_root(self, root: Issued, svid: Issued) -> None:
        """A client verifier trusting the root accepts the SVID and reports its URI SAN."""
        verified = client_verifier(root).verify(svid.cert, [])
        assert verified.subjects == [x509.UniformResourceIdentifier(SPIFFE_ID)]

    def test_chain_through_intermediate_verifies(self, root: Issued, intermediate: Issued) -> None:
        """An SVID from an intermediate verifies against the root given the intermediate."""
        svid = make_svid(ca=intermediate, spiffe_id=SPIFFE_ID)
        verified = client_verifier(root).verify(svid.cert, [intermediate.cert])
        assert verified.chain == [svid.cert, intermediate.cert, root.cert]

    def test_chain_without_intermediate_fails(self, root: Issued, intermediate: Issued) -> None:
        """Without the intermediate, the SVID does not chain to the root."""
        svid = make_svid(ca=intermediate, spiffe_id=SPIFFE_ID)
        with pytest.raises(VerificationError):
            client_verifier(root).verify(svid.cert, [])

    def test_expired_when_not_before_in_past(self, root: Issued) -> None:
        """not_before two hours ago with a one-hour TTL yields an already-expired cert."""
        svid = make_svid(
            ca=root,
            spiffe_id=SPIFFE_ID,
            not_before=datetime.now(UTC) - timedelta(hours=2),
            ttl=timedelta(hours=1),
        )
        assert svid.cert.not_valid_after_utc < datetime.now(UTC)
        with pytest.raises(VerificationError):
            client_verifier(root).verify(svid.cert, [])

    def test_negative_knobs(self, root: Issued) -> None:
        """The test-only knobs produce the broken certs they promise."""
        svid = make_svid(
            ca=root,
            spiffe_id=None,
            extra_uris=("not a uri", "spiffe://other.org/x"),
            dns_names=("api.example.org",),
            ca_flag=True,
            eku=None,
            key_usage_digital_signature=False,
        )
        san = ext(svid.cert, x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            "not a uri",
            "spiffe://other.org/x",
        ]
        assert san.get_values_for_type(x509.DNSName) == ["api.example.org"]
        assert ext(svid.cert, x509.BasicConstraints).value.ca
        assert not ext(svid.cert, x509.KeyUsage).value.digital_signature
        with pytest.raises(x509.ExtensionNotFound):
            ext(svid.cert, x509.ExtendedKeyUsage)

    def test_no_spiffe_id_means_no_san(self, root: Issued) -> None:
        """spiffe_id=None with no extras omits the SAN extension entirely."""
        svid = make_svid(ca=root, spiffe_id=None)
        with pytest.raises(x509.ExtensionNotFound):
            ext(svid.cert, x509.SubjectAlternativeName)

    def test_long_path_still_mints(self, root: Issued) -> None:
        """A path longer than the 64-char CN limit still mints, with the full ID in the SAN."""
        long_id = "spiffe://example.org/" + "/".join(["segment"] * 20)
        svid = make_svid(ca=root, spiffe_id=long_id)
        san = ext(svid.cert, x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [long_id]

    def test_naive_not_before_refused(self, root: Issued) -> None:
        """A timezone-naive not_before is refused rather than guessed at."""
        with pytest.raises(ValueError, match="not_before must be timezone-aware"):
            make_svid(ca=root, spiffe_id=SPIFFE_ID, not_before=datetime(2020, 1, 1))

    def test_rejects_invalid_spiffe_id(self, root: Issued) -> None:
        """An invalid spiffe_id is refused before anything is minted."""
        with pytest.raises(ValueError, match="trust domain must be lowercase"):
            make_svid(ca=root, spiffe_id="spiffe://Example.org/x")


class TestMakeServerCert:
    def test_sans_and_profile(self, root: Issued) -> None:
        """Hosts become DNS or IP SANs; EKU is serverAuth and CA=false."""
        server = make_server_cert(ca=root, hosts=("localhost", "127.0.0.1", "::1"))
        san = ext(server.cert, x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["localhost"]
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
        assert list(ext(server.cert, x509.ExtendedKeyUsage).value) == [
            ExtendedKeyUsageOID.SERVER_AUTH
        ]
        assert not ext(server.cert, x509.BasicConstraints).value.ca

    def test_verifies_as_server(self, root: Issued) -> None:
        """A server verifier for 'localhost' trusting the root accepts the cert."""
        server = make_server_cert(ca=root)
        verifier = (
            PolicyBuilder()
            .store(Store([root.cert]))
            .build_server_verifier(x509.DNSName("localhost"))
        )
        assert verifier.verify(server.cert, []) == [server.cert, root.cert]

    def test_needs_a_host(self, root: Issued) -> None:
        """An empty host list is refused with a clear message."""
        with pytest.raises(ValueError, match="at least one host"):
            make_server_cert(ca=root, hosts=())


class TestFiles:
    def test_write_load_ca_round_trip(self, tmp_path: Path, root: Issued) -> None:
        """write_ca then load_ca returns the same cert and key; parents are created."""
        out = tmp_path / "a" / "b"
        cert_path, key_path = write_ca(root, out)
        assert (cert_path, key_path) == (out / "ca.pem", out / "ca-key.pem")
        loaded = load_ca(out)
        assert loaded.cert == root.cert
        assert loaded.key_pem() == root.key_pem()

    def test_ca_key_mode_0600(self, tmp_path: Path, root: Issued) -> None:
        """The CA key file is readable by its owner only."""
        _, key_path = write_ca(root, tmp_path)
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600

    def test_rewrite_keeps_key_private(self, tmp_path: Path, root: Issued) -> None:
        """Overwriting a world-readable key file leaves it at 0600."""
        key_path = tmp_path / "ca-key.pem"
        key_path.write_bytes(b"old")
        key_path.chmod(0o644)
        write_ca(root, tmp_path)
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600

    def test_load_ca_missing(self, tmp_path: Path) -> None:
        """A missing CA directory names the certificate file that is absent."""
        with pytest.raises(ValueError, match=r"CA certificate file .*ca\.pem does not exist"):
            load_ca(tmp_path / "nowhere")

    def test_load_ca_garbage_cert(self, tmp_path: Path, root: Issued) -> None:
        """A garbage ca.pem gives an error naming that file."""
        write_ca(root, tmp_path)
        (tmp_path / "ca.pem").write_text("hello")
        with pytest.raises(ValueError, match=r"ca\.pem is not a PEM certificate"):
            load_ca(tmp_path)

    def test_load_ca_garbage_key(self, tmp_path: Path, root: Issued) -> None:
        """A garbage ca-key.pem gives an error naming that file."""
        write_ca(root, tmp_path)
        (tmp_path / "ca-key.pem").write_text("hello")
        with pytest.raises(ValueError, match=r"ca-key\.pem is not an unencrypted PEM private key"):
            load_ca(tmp_path)

    def test_load_ca_mismatched_key(self, tmp_path: Path, root: Issued) -> None:
        """A key that does not belong to the certificate is refused."""
        write_ca(root, tmp_path)
        (tmp_path / "ca-key.pem").write_bytes(make_ca().key_pem())
        with pytest.raises(ValueError, match="does not match"):
            load_ca(tmp_path)

    def test_load_ca_rejects_leaf(self, tmp_path: Path, root: Issued) -> None:
        """A leaf certificate in place of the CA is refused."""
        leaf = make_svid(ca=root, spiffe_id=SPIFFE_ID)
        write_ca(leaf, tmp_path)
        with pytest.raises(ValueError, match="is not a CA certificate"):
            load_ca(tmp_path)

    def test_write_svid_root_issued(self, tmp_path: Path, root: Issued) -> None:
        """An SVID issued by a root is written alone; the key file is 0600."""
        svid = make_svid(ca=root, spiffe_id=SPIFFE_ID)
        cert_path, key_path = write_svid(svid, tmp_path, ca=root)
        assert (cert_path.name, key_path.name) == ("svid.pem", "svid-key.pem")
        assert x509.load_pem_x509_certificates(cert_path.read_bytes()) == [svid.cert]
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600

    def test_write_svid_appends_intermediate(
        self, tmp_path: Path, root: Issued, intermediate: Issued
    ) -> None:
        """An SVID issued by an intermediate is written with the intermediate after it."""
        svid = make_svid(ca=intermediate, spiffe_id=SPIFFE_ID)
        cert_path, _ = write_svid(svid, tmp_path, ca=intermediate)
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
        assert chain == [svid.cert, intermediate.cert]
        client_verifier(root).verify(chain[0], chain[1:])


class TestValidateSpiffeId:
    @pytest.mark.parametrize(
        "good",
        [
            "spiffe://example.org/workload",
            "spiffe://my_trust-domain.example.org/ns/prod/sa/api",
            "spiffe://example.org/A.b-c_D/..x/.y",
        ],
    )
    def test_good(self, good: str) -> None:
        """Valid SPIFFE IDs are returned unchanged."""
        assert validate_spiffe_id(good) == good

    @pytest.mark.parametrize(
        ("bad", "reason"),
        [
            ("spiffe://Example.org/x", "trust domain must be lowercase"),
            ("spiffe://example.org:8443/x", "a port is not allowed"),
            ("spiffe://user@example.org/x", "user info is not allowed"),
            ("spiffe://example.org/x?a=b", "a query is not allowed"),
            ("spiffe://example.org/x#frag", "a fragment is not allowed"),
            ("spiffe://example.org/a//b", "empty segment"),
            ("spiffe://example.org/x/", "empty segment"),
            ("spiffe://example.org/a/../b", "segment '..' is not allowed"),
            ("spiffe://example.org/./b", r"segment '\.' is not allowed"),
            ("https://example.org/x", "scheme must be 'spiffe'"),
            ("SPIFFE://example.org/x", "scheme must be 'spiffe'"),
            ("example.org/x", "must start with 'spiffe://'"),
            ("spiffe:///x", "trust domain is empty"),
            ("spiffe://exa$mple.org/x", "trust domain may only contain"),
            ("spiffe://example.org/a%20b", "percent-encoding is not allowed"),
            ("spiffe://example.org/a b", "may only contain A-Z"),
            ("spiffe://example.org", "needs a path after the trust domain"),
            ("", "it is empty"),
        ],
    )
    def test_bad(self, bad: str, reason: str) -> None:
        """Each kind of invalid SPIFFE ID is refused with a sentence naming the problem."""
        with pytest.raises(ValueError, match=reason):
            validate_spiffe_id(bad)


class TestEchoUpstream:
    def test_https_echoes_query_and_headers_in_order(self, root: Issued, ca_file: Path) -> None:
        """Over HTTPS, duplicate query params and header order are echoed and recorded."""
        with EchoUpstream(server_cert=make_server_cert(ca=root)) as up:
            assert up.url == f"https://localhost:{up.port}"
            with requests.Session() as session:
                resp = session.post(
                    f"{up.url}/v1/items?a=1&b=&a=2",
                    headers={"X-C": "3", "X-A": "1", "X-B": "2"},
                    data="payload",
                    verify=str(ca_file),
                    timeout=5,
                )
        assert resp.status_code == 200
        echo = resp.json()
        assert echo["method"] == "POST"
        assert echo["path"] == "/v1/items"
        assert echo["query"] == [["a", "1"], ["b", ""], ["a", "2"]]
        assert [k for k, _ in echo["headers"] if k.startswith("X-")] == ["X-C", "X-A", "X-B"]
        assert echo["body"] == "payload"
        assert up.requests == [echo]

    def test_https_echoes_duplicate_headers(self, root: Issued, ca_file: Path) -> None:
        """Repeated header lines (httpx; requests cannot send them) are echoed in order."""
        with EchoUpstream(server_cert=make_server_cert(ca=root)) as up, \
                httpx.Client(verify=ssl.create_default_context(cafile=ca_file)) as client:
            echo = client.get(
                f"{up.url}/h", headers=[("X-Dup", "one"), ("X-Other", "x"), ("X-Dup", "two")]
            ).json()
        assert [[k, v] for k, v in echo["headers"] if k.lower().startswith("x-")] == [
            ["X-Dup", "one"],
            ["X-Other", "x"],
            ["X-Dup", "two"],
        ]

    def test_keep_alive_reuses_connection(self, root: Issued, ca_file: Path) -> None:
        """Several requests on one HTTP/1.1 connection all succeed (keep-alive works)."""
        with httpx.Client(verify=ssl.create_default_context(cafile=ca_file)) as client, \
                EchoUpstream(server_cert=make_server_cert(ca=root)) as up:
            for i in range(3):
                assert client.put(f"{up.url}/r{i}", content=b"x" * i).json()["body"] == "x" * i
            # The client still holds the pooled connection here; leaving must not hang.
        assert [r["path"] for r in up.requests] == ["/r0", "/r1", "/r2"]
        ports = {h[1] for r in up.requests for h in r["headers"] if h[0].lower() == "host"}
        assert len(ports) == 1

    def test_plain_http(self) -> None:
        """With server_cert=None the upstream speaks plain HTTP, any method and path."""
        with EchoUpstream(server_cert=None) as up:
            assert up.url.startswith("http://")
            resp = requests.request("DELETE", f"{up.url}/thing?x=1", timeout=5)
        assert resp.json()["method"] == "DELETE"
        assert resp.json()["query"] == [["x", "1"]]

    def test_survives_bad_handshake(self, root: Issued, ca_file: Path) -> None:
        """Garbage instead of a TLS ClientHello is dropped quietly and the server keeps serving."""
        with EchoUpstream(server_cert=make_server_cert(ca=root)) as up:
            with socket.create_connection(("127.0.0.1", up.port), timeout=5) as raw:
                raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    assert not raw.recv(1024).startswith(b"HTTP/")  # at most a TLS alert
                except ConnectionResetError:
                    pass  # closing with our bytes unread makes the kernel send a RST
            resp = requests.get(f"{up.url}/after", verify=str(ca_file), timeout=5)
        assert resp.json()["path"] == "/after"

    def test_exit_with_idle_connection(self, root: Issued) -> None:
        """Leaving the context while a client holds an unfinished handshake does not hang."""
        with EchoUpstream(server_cert=make_server_cert(ca=root)) as up:
            idle = socket.create_connection(("127.0.0.1", up.port), timeout=5)
        idle.close()
        assert not [t for t in threading.enumerate() if "process_request_thread" in t.name]
