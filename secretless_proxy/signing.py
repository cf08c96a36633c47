"""The proxy's own JWT signing key: minted workload JWTs, token-exchange subjects, client assertions.

One key per process, loaded from ``signing.key`` (PEM: EC P-256 → ES256, RSA ≥ 2048 bits →
RS256). Without one, an EC P-256 key is generated at start: fine for a laptop, wrong for
replicas (each would sign with its own key) and for restarts (earlier tokens stop verifying).

Verifiers find the public key at ``<issuer>/.well-known/jwks.json`` (``jwks()``), discovered
through ``<issuer>/.well-known/openid-configuration`` (``openid_configuration()``); the ``kid``
is the RFC 7638 thumbprint unless ``signing.key_id`` names one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from secretless_proxy.errors import SecretUnavailable

if TYPE_CHECKING:
    from secretless_proxy.config.model import SigningConfig

__all__ = ["JwtSigner"]

log = logging.getLogger(__name__)

# Claims the signer owns: a caller choosing its own lifetime would defeat ``ttl``.
_OWNED_CLAIMS = frozenset({"iat", "exp", "nbf"})
# RFC 7638 §3.2: the thumbprint covers the required public members only, in lexicographic order.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}
_MIN_RSA_BITS = 2048


class JwtSigner:
    """Signs JWTs with one private key; ``repr`` shows the issuer and key id, never the key."""

    __slots__ = ("_key", "_public_jwk", "alg", "issuer", "kid", "now")

    def __init__(self, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, *, issuer: str,
                 key_id: str | None = None, now: Callable[[], float] = time.time) -> None:
        self.alg = _algorithm(key)
        self._key = key
        self.issuer = issuer.rstrip("/")
        public = (ECAlgorithm.to_jwk(key.public_key(), as_dict=True) if isinstance(key, ec.EllipticCurvePrivateKey)
                  else RSAAlgorithm.to_jwk(key.public_key(), as_dict=True))
        self.kid = key_id or _thumbprint(public)
        self._public_jwk = {**public, "kid": self.kid, "alg": self.alg, "use": "sig"}
        self.now = now

    @classmethod
    def from_config(cls, cfg: SigningConfig | None, *, default_issuer: str,
                    now: Callable[[], float] = time.time) -> JwtSigner:
        """The signer ``cfg`` describes. Raises ValueError naming the key reference when it is unusable."""
        if cfg is None or cfg.key is None:
            signer = cls.generate(issuer=cfg.issuer if cfg else default_issuer,
                                  key_id=cfg.key_id if cfg else None, now=now)
            log.warning("signing: no signing.key configured; generated an ephemeral EC P-256 key "
                        "(kid %s). Replicas will not share it and tokens it signed stop verifying "
                        "after a restart: configure signing.key for anything but development.",
                        signer.kid)
            return signer
        try:
            pem = cfg.key.resolve_pem()
        except SecretUnavailable as exc:
            raise ValueError(f"signing.key: cannot resolve {cfg.key}: {exc}") from exc
        try:
            key = serialization.load_pem_private_key(pem.reveal().encode(), password=None)
        except (ValueError, TypeError) as exc:
            # The library's message can quote the input; ours names the reference only.
            raise ValueError(f"signing.key: {cfg.key} is not an unencrypted PEM private key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError(f"signing.key: {cfg.key} is a {type(key).__name__.removeprefix('_')}; "  # noqa: TRY004 - a config value, reported like every config error
                             "use an EC P-256 or an RSA (2048 bits or more) key")
        try:
            return cls(key, issuer=cfg.issuer, key_id=cfg.key_id, now=now)
        except ValueError as exc:
            raise ValueError(f"signing.key: {cfg.key}: {exc}") from exc

    @classmethod
    def generate(cls, *, issuer: str, key_id: str | None = None,
                 now: Callable[[], float] = time.time) -> JwtSigner:
        """A signer with a fresh EC P-256 key (development, tests)."""
        return cls(ec.generate_private_key(ec.SECP256R1()), issuer=issuer, key_id=key_id, now=now)

    def __repr__(self) -> str:
        return f"JwtSigner(issuer={self.issuer!r}, kid={self.kid!r}, alg={self.alg!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("a JwtSigner holds a private key and cannot be pickled")

    def mint(self, claims: Mapping[str, Any], *, ttl: float) -> str:
        """A signed JWT with ``claims`` plus iss (unless given), iat, exp = iat + ttl and a fresh jti (unless given)."""
        return self.mint_with_claims(claims, ttl=ttl)[0]

    def mint_with_claims(self, claims: Mapping[str, Any], *, ttl: float) -> tuple[str, dict[str, Any]]:
        """Like ``mint``, also returning the claims as signed (so callers know the exact exp)."""
        if ttl < 1:
            raise ValueError(f"a JWT lifetime must be at least 1 second, got {ttl!r}")
        if owned := _OWNED_CLAIMS & claims.keys():
            raise ValueError(f"the signer sets {', '.join(sorted(owned))} itself; pass ttl instead")
        # Whole seconds (RFC 7519 NumericDate); exp is floored so it never exceeds iat + ttl.
        # No nbf: verifiers with a slow clock would reject a token minted "in their future".
        iat = int(self.now())
        payload = {"iss": self.issuer, "jti": secrets.token_urlsafe(16), **claims,
                   "iat": iat, "exp": iat + int(ttl)}
        token = jwt.encode(payload, self._key, algorithm=self.alg, headers={"kid": self.kid, "typ": "JWT"})
        return token, payload

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set verifiers fetch from ``<issuer>/.well-known/jwks.json``."""
        return {"keys": [dict(self._public_jwk)]}

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/.well-known/jwks.json"

    def openid_configuration(self) -> dict[str, Any]:
        """OIDC discovery metadata, enough for verifiers that federate on it (cloud workload identity)."""
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [self.alg],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "jti"],
        }


def _algorithm(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"EC keys must be on curve P-256 (ES256), got {key.curve.name}")  # noqa: TRY004 - as above
        return "ES256"
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"RSA keys must have at least {_MIN_RSA_BITS} bits, got {key.key_size}")
        return "RS256"
    raise ValueError(f"unsupported key type {type(key).__name__}: use EC P-256 or RSA")


def _thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url without padding)."""
    members = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()
