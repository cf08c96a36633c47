"""What one client connection has proven, judged on the trust that is loaded *now*.

A TLS handshake proves an identity once, but a kept-alive connection lives on across reloads:
a CA removed from a bundle, a trust domain dropped from the config or a leaf that expired must
refuse the next request on that connection too (issue 9). So the proof keeps the chain and the
verifier that judged it; when the current runtime's verifier is another one (a reload swapped
it), the stored chain is verified again, once, and that result stands until the next swap.

Only a successful proof is re-judged: a failed one never turns into an identity by a reload,
and two different certificates on one connection stay a conflict (the client reconnects).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509

from secretless_proxy.errors import IdentityError
from secretless_proxy.identity import IdentityVerifier, Workload
from secretless_proxy.reasons import Reason


@dataclass
class Proof:
    result: Workload | IdentityError | None = None
    chain: tuple[x509.Certificate, ...] = ()
    verifier: IdentityVerifier | None = None

    def handshake(self, chain: Sequence[x509.Certificate], verifier: IdentityVerifier) -> IdentityError | None:
        """Judge the chain one handshake presented; returns the refusal, if it is one.

        The first failure sticks: a later handshake on the same connection never upgrades it.
        """
        if isinstance(self.result, IdentityError):
            return None  # already refused (and counted) on this connection
        try:
            found: Workload | IdentityError = verifier.verify(chain)
        except IdentityError as exc:
            found = exc
        if isinstance(self.result, Workload) and isinstance(found, Workload) and found.spiffe_id != self.result.spiffe_id:
            found = IdentityError(Reason.IDENTITY_CONFLICT, "two different workload certificates were presented on one connection")
        self.result, self.chain, self.verifier = found, tuple(chain), verifier
        return found if isinstance(found, IdentityError) else None

    def current(self, verifier: IdentityVerifier | None, *, now: float | None = None) -> Workload:
        """The identity under ``verifier`` (the current runtime's); IdentityError if there is none."""
        if self.result is None:
            raise IdentityError(Reason.IDENTITY_MISSING, "no client certificate was presented; present your workload certificate")
        if isinstance(self.result, IdentityError):
            raise self.result
        if verifier is not None and verifier is not self.verifier:
            self.verifier = verifier
            try:
                found = verifier.verify(self.chain)
            except IdentityError as exc:
                self.result = exc
                raise
            # The same chain cannot name another workload; a mismatch would be a verifier bug.
            self.result = found if found.spiffe_id == self.result.spiffe_id else IdentityError(
                Reason.IDENTITY_CONFLICT, "the workload identity changed on an open connection")
            if isinstance(self.result, IdentityError):
                raise self.result
        if self.result.not_after < (time.time() if now is None else now):
            raise IdentityError(Reason.IDENTITY_EXPIRED, "the client certificate has expired")
        return self.result
