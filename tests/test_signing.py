"""Tests for secretless_proxy.signing: the proxy's JWT signer, its JWKS and discovery document."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import pickle
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from secretless_proxy.config.model import SigningConfig
from secretless_proxy.secretrefs import SecretRef
from secretless_proxy.signing import JwtSigner, _thumbprint

ISSUER = "https://secretless.example.org"
NOW = 1_700_000_000.0


def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
        password: bytes | None = None) -> bytes:
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def config_for(tmp_path: Path, key_pem: bytes | None, *, key_id: str | None = None) -> SigningConfig:
    ref = None
    if key_pem is not None:
        (tmp_path / "signing.pem").write_bytes(key_pem)
        ref = SecretRef.parse("file:signing.pem", base_dir=tmp_path)
    return SigningConfig(issuer=ISSUER, key=ref, key_id=key_id)


def verify(signer: JwtSigner, token: str, **kw: object) -> dict:
    """Decode ``token`` the way a receiving service would: key from the published JWKS by kid."""
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(signer.jwks())[kid]
    return jwt.decode(token, key, algorithms=[signer.alg], issuer=signer.issuer, **kw)


class TestFromConfig:
    def test_ec_p256_key_signs_es256(self, tmp_path: Path) -> None:
        """An EC P-256 PEM key gives an ES256 signer with the configured issuer."""
        signer = JwtSigner.from_config(config_for(tmp_path, pem(ec.generate_private_key(ec.SECP256R1()))),
                                       default_issuer="https://unused")
        assert (signer.alg, signer.issuer) == ("ES256", ISSUER)

    def test_rsa_2048_key_signs_rs256(self, tmp_path: Path) -> None:
        """An RSA key of 2048 bits gives an RS256 signer whose tokens verify against its JWKS."""
        signer = JwtSigner.from_config(config_for(tmp_path, pem(rsa.generate_private_key(65537, 2048))),
                                       default_issuer="https://unused")
        assert signer.alg == "RS256"
        assert verify(signer, signer.mint({"sub": "x"}, ttl=60))["sub"] == "x"

    def test_key_id_from_config(self, tmp_path: Path) -> None:
        """signing.key_id replaces the thumbprint as kid, in the header and the JWKS."""
        signer = JwtSigner.from_config(
            config_for(tmp_path, pem(ec.generate_private_key(ec.SECP256R1())), key_id="proxy-2024"),
            default_issuer=ISSUER)
        assert signer.kid == "proxy-2024"
        assert jwt.get_unverified_header(signer.mint({}, ttl=60))["kid"] == "proxy-2024"
        assert signer.jwks()["keys"][0]["kid"] == "proxy-2024"

    def test_no_config_generates_key_and_warns(self, caplog: pytest.LogCaptureFixture) -> None:
        """Without a configured key a P-256 key is generated, with a warning that replicas won't share it."""
        with caplog.at_level(logging.WARNING, logger="secretless_proxy.signing"):
            signer = JwtSigner.from_config(None, default_issuer="https://proxy.local/")
        assert (signer.alg, signer.issuer) == ("ES256", "https://proxy.local")
        assert "Replicas will not share it" in caplog.text
        assert signer.kid in caplog.text

    def test_config_without_key_keeps_issuer(self, caplog: pytest.LogCaptureFixture) -> None:
        """A signing section without a key still uses its issuer and key_id."""
        with caplog.at_level(logging.WARNING, logger="secretless_proxy.signing"):
            signer = JwtSigner.from_config(SigningConfig(issuer=ISSUER, key=None, key_id="dev"),
                                           default_issuer="https://unused")
        assert (signer.issuer, signer.kid) == (ISSUER, "dev")

    @pytest.mark.parametrize(
        ("key_pem", "fragment"),
        [
            (lambda: pem(rsa.generate_private_key(65537, 1024)), "RSA keys must have at least 2048 bits, got 1024"),
            (lambda: pem(ec.generate_private_key(ec.SECP384R1())), "EC keys must be on curve P-256 (ES256), got secp384r1"),
            (lambda: pem(ed25519.Ed25519PrivateKey.generate()), "use an EC P-256 or an RSA (2048 bits or more) key"),
            (lambda: pem(ec.generate_private_key(ec.SECP256R1()), b"pw"), "is not an unencrypted PEM private key"),
            (lambda: _pem_armour("PRIVATE KEY", "bm90IGEga2V5").encode(),
             "is not an unencrypted PEM private key"),
        ],
        ids=["rsa-1024", "ec-p384", "ed25519", "encrypted", "garbage"],
    )
    def test_unusable_key_rejected(self, tmp_path: Path, key_pem, fragment: str) -> None:
        """A key the signer cannot use is a ValueError naming the reference and what to use instead."""
        with pytest.raises(ValueError, match=r"signing\.key: file:.*signing\.pem.*" + fragment.replace("(", r"\(").replace(")", r"\)")):
            JwtSigner.from_config(config_for(tmp_path, key_pem()), default_issuer=ISSUER)

    def test_missing_key_file(self, tmp_path: Path) -> None:
        """A key file that does not exist is a ValueError saying so."""
        cfg = SigningConfig(issuer=ISSUER, key=SecretRef.parse(f"file:{tmp_path}/nope.pem"), key_id=None)
        with pytest.raises(ValueError, match=r"signing\.key: cannot resolve file:.*nope\.pem: secret file .* does not exist"):
            JwtSigner.from_config(cfg, default_issuer=ISSUER)


class TestKeyId:
    def test_rfc7638_example(self) -> None:
        """The thumbprint of RFC 7638 §3.1's example key is the one the RFC gives."""
        jwk = {
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
                 "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY"
                 "368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0f"
                 "M4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29",
        }
        assert _thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"

    def test_default_kid_is_ec_thumbprint(self) -> None:
        """Without key_id, kid is the SHA-256 of the canonical {crv, kty, x, y} JSON, base64url."""
        signer = JwtSigner.generate(issuer=ISSUER)
        jwk = signer.jwks()["keys"][0]
        canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode()).digest()
        assert signer.kid == base64.urlsafe_b64encode(digest).decode().rstrip("=")


class TestMint:
    def test_verifies_against_jwks(self) -> None:
        """A minted JWT verifies with the published JWKS and carries iss, iat, exp = iat + ttl and a jti."""
        signer = JwtSigner.generate(issuer=ISSUER)
        claims = verify(signer, signer.mint({"sub": "spiffe://example.org/a", "aud": "api"}, ttl=90),
                        audience="api")
        assert claims["iss"] == ISSUER
        assert claims["exp"] == claims["iat"] + 90
        assert len(claims["jti"]) >= 16

    def test_times_come_from_the_clock(self) -> None:
        """iat is the signer's clock in whole seconds; exp never exceeds iat + ttl."""
        signer = JwtSigner.generate(issuer=ISSUER, now=lambda: NOW + 0.9)
        _, claims = signer.mint_with_claims({}, ttl=30.7)
        assert (claims["iat"], claims["exp"]) == (int(NOW), int(NOW) + 30)
        assert "nbf" not in claims

    def test_fresh_jti_unless_given(self) -> None:
        """Every token gets its own jti; a caller's jti is kept."""
        signer = JwtSigner.generate(issuer=ISSUER)
        jtis = {signer.mint_with_claims({}, ttl=60)[1]["jti"] for _ in range(20)}
        assert len(jtis) == 20
        assert signer.mint_with_claims({"jti": "mine"}, ttl=60)[1]["jti"] == "mine"

    def test_issuer_may_be_overridden(self) -> None:
        """A client assertion's iss is the client ID (RFC 7523), so a given iss wins."""
        signer = JwtSigner.generate(issuer=ISSUER)
        token = signer.mint({"iss": "billing", "sub": "billing"}, ttl=60)
        assert jwt.decode(token, options={"verify_signature": False})["iss"] == "billing"

    def test_header_names_the_key(self) -> None:
        """The JOSE header carries alg, typ JWT and the signer's kid."""
        signer = JwtSigner.generate(issuer=ISSUER)
        header = jwt.get_unverified_header(signer.mint({}, ttl=60))
        assert header == {"alg": "ES256", "typ": "JWT", "kid": signer.kid}

    @pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
    def test_lifetime_claims_are_the_signers(self, claim: str) -> None:
        """Callers pass ttl; setting exp, iat or nbf themselves is refused."""
        signer = JwtSigner.generate(issuer=ISSUER)
        with pytest.raises(ValueError, match=f"the signer sets {claim} itself; pass ttl instead"):
            signer.mint({claim: 1}, ttl=60)

    def test_ttl_must_be_positive(self) -> None:
        """A lifetime under one second is refused."""
        with pytest.raises(ValueError, match="a JWT lifetime must be at least 1 second, got 0"):
            JwtSigner.generate(issuer=ISSUER).mint({}, ttl=0)

    def test_foreign_key_does_not_verify(self) -> None:
        """A token from another signer fails verification against this signer's JWKS."""
        mine, other = JwtSigner.generate(issuer=ISSUER), JwtSigner.generate(issuer=ISSUER)
        key = jwt.PyJWKSet.from_dict(mine.jwks())[mine.kid]
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(other.mint({}, ttl=60), key, algorithms=["ES256"])


class TestPublication:
    @pytest.mark.parametrize("make", [lambda: ec.generate_private_key(ec.SECP256R1()),
                                      lambda: rsa.generate_private_key(65537, 2048)], ids=["ec", "rsa"])
    def test_jwks_holds_public_members_only(self, make) -> None:
        """The JWKS has one public key with kid, alg and use=sig, and no private member."""
        signer = JwtSigner(make(), issuer=ISSUER)
        (key,) = signer.jwks()["keys"]
        assert (key["kid"], key["alg"], key["use"]) == (signer.kid, signer.alg, "sig")
        assert not {"d", "p", "q", "dp", "dq", "qi"} & key.keys()

    def test_openid_configuration(self) -> None:
        """Discovery names the issuer, the JWKS URL under it and the signing algorithm."""
        signer = JwtSigner.generate(issuer=ISSUER + "/")
        doc = signer.openid_configuration()
        assert doc["issuer"] == ISSUER
        assert doc["jwks_uri"] == ISSUER + "/.well-known/jwks.json"
        assert doc["id_token_signing_alg_values_supported"] == ["ES256"]
        assert doc["subject_types_supported"] == ["public"]
        assert doc["response_types_supported"] == ["id_token"]

    def test_repr_hides_key(self) -> None:
        """repr shows issuer, kid and alg only; a signer refuses to be pickled."""
        key = ec.generate_private_key(ec.SECP256R1())
        signer = JwtSigner(key, issuer=ISSUER)
        assert repr(signer) == f"JwtSigner(issuer={ISSUER!r}, kid={signer.kid!r}, alg='ES256')"
        d = key.private_numbers().private_value
        assert str(d) not in repr(signer) and jwt.utils.to_base64url_uint(d).decode() not in repr(signer)
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(signer)


def _pem_armour(label: str, body: str) -> str:
    """PEM armour around a body that is not a key (built, so no key marker sits in the repo)."""
    dashes = "-" * 5
    return f"{dashes}BEGIN {label}{dashes}\n{body}\n{dashes}END {label}{dashes}\n"
