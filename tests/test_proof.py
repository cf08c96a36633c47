"""Per-connection identity proofs (trust/proof.py): judged on the trust loaded now, re-verified only when it changed."""

from __future__ import annotations

import time

import pytest

from secretless_proxy.dev import certs
from secretless_proxy.errors import IdentityError
from secretless_proxy.identity import IdentityVerifier
from secretless_proxy.trust.proof import Proof

BILLING = "spiffe://example.org/ns/prod/sa/billing"


class CountingVerifier(IdentityVerifier):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.calls = 0

    def verify(self, chain, *, now=None):
        self.calls += 1
        return super().verify(chain, now=now)


@pytest.fixture(scope="module")
def ca() -> certs.Issued:
    return certs.make_ca(common_name="proof CA")


@pytest.fixture(scope="module")
def leaf(ca):
    return certs.make_svid(ca=ca, spiffe_id=BILLING).cert


class TestProof:
    def test_same_trust_is_not_verified_again(self, ca, leaf) -> None:
        """While the runtime's verifier is the one that judged the handshake, requests cost no verification."""
        v = CountingVerifier(bundles={"example.org": [ca.cert]})
        p = Proof()
        assert p.handshake([leaf], v) is None
        for _ in range(3):
            assert p.current(v).spiffe_id == BILLING
        assert v.calls == 1

    def test_new_trust_without_the_ca_refuses(self, ca, leaf) -> None:
        """After a reload whose bundle lacks the CA, the open connection's next request is identity_untrusted."""
        p = Proof()
        p.handshake([leaf], IdentityVerifier(bundles={"example.org": [ca.cert]}))
        other = IdentityVerifier(bundles={"example.org": [certs.make_ca(common_name="other").cert]})
        with pytest.raises(IdentityError, match="does not chain to the trust bundle") as info:
            p.current(other)
        assert info.value.reason == "identity_untrusted"

    def test_removed_trust_domain_refuses(self, ca, leaf) -> None:
        """A reload that drops the trust domain refuses the connection with identity_trust_domain."""
        p = Proof()
        p.handshake([leaf], IdentityVerifier(bundles={"example.org": [ca.cert]}))
        other = IdentityVerifier(bundles={"partner.example": [certs.make_ca(common_name="p").cert]})
        with pytest.raises(IdentityError) as info:
            p.current(other)
        assert info.value.reason == "identity_trust_domain"

    def test_refusal_after_reload_sticks(self, ca, leaf) -> None:
        """A connection refused under new trust is not let in again by a later reload restoring the CA."""
        good = IdentityVerifier(bundles={"example.org": [ca.cert]})
        p = Proof()
        p.handshake([leaf], good)
        with pytest.raises(IdentityError):
            p.current(IdentityVerifier(bundles={"example.org": [certs.make_ca(common_name="x").cert]}))
        with pytest.raises(IdentityError, match="does not chain"):
            p.current(IdentityVerifier(bundles={"example.org": [ca.cert]}))

    def test_equivalent_new_trust_keeps_the_identity(self, ca, leaf) -> None:
        """A reload that keeps the CA re-verifies once and keeps serving the same workload."""
        p = Proof()
        p.handshake([leaf], IdentityVerifier(bundles={"example.org": [ca.cert]}))
        v2 = CountingVerifier(bundles={"example.org": [ca.cert]})
        assert p.current(v2).spiffe_id == BILLING and p.current(v2).spiffe_id == BILLING
        assert v2.calls == 1

    def test_expiry_is_checked_on_every_request(self, ca, leaf) -> None:
        """A leaf that expires while the connection is open is identity_expired from then on."""
        v = IdentityVerifier(bundles={"example.org": [ca.cert]})
        p = Proof()
        p.handshake([leaf], v)
        with pytest.raises(IdentityError, match="has expired"):
            p.current(v, now=time.time() + 7200)

    def test_second_certificate_conflicts(self, ca, leaf) -> None:
        """A second handshake with another workload's certificate turns the connection into a conflict."""
        v = IdentityVerifier(bundles={"example.org": [ca.cert]})
        p = Proof()
        p.handshake([leaf], v)
        refused = p.handshake([certs.make_svid(ca=ca, spiffe_id="spiffe://example.org/ns/x").cert], v)
        assert refused is not None and refused.reason == "identity_conflict"
        with pytest.raises(IdentityError, match="two different workload certificates"):
            p.current(v)

    def test_no_handshake_is_missing(self) -> None:
        """No certificate on the connection: identity_missing."""
        with pytest.raises(IdentityError, match="no client certificate was presented") as info:
            Proof().current(None)
        assert info.value.reason == "identity_missing"
