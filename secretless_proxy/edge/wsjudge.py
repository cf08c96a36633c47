"""An open WebSocket is judged on the trust and rules that are loaded now (hostile review 17).

A WebSocket is one HTTP request that never ends: its handshake passed identity and a rule, then
messages flow for as long as both sides like, on the upstream session (and credential) the
handshake opened. Every other request on a kept-alive connection is judged on the runtime loaded
when it arrives (trust/proof.py); a WebSocket must not outlive a removed CA, an expired leaf or the
rule that admitted it either. So each message is judged again before it is relayed:

- the connection's proof under the current runtime's verifier (``Proof.current``: re-verified
  once per reload, then an identity comparison and an expiry check per message);
- after a reload (a new runtime object), the handshake's request through the new policy: the
  same rule must decide, injecting the same credential (or none).

When it no longer holds, the message is dropped and the flow killed; edge/layerguard.py closes both
sides of a killed WebSocket (mitmproxy itself never checks a kill after a message hook).
"""

from __future__ import annotations

import weakref

from mitmproxy import http

from secretless_proxy.errors import IdentityError
from secretless_proxy.policy import Decision
from secretless_proxy.reasons import Reason
from secretless_proxy.refusal import Refusal
from secretless_proxy.trust.proof import Proof

RULE = "secretless.rule"
CREDENTIAL = "secretless.credential"


class Rejudge:
    """Remembers, per WebSocket flow, which runtime last confirmed its rule."""

    def __init__(self) -> None:
        self._confirmed: weakref.WeakKeyDictionary[http.HTTPFlow, object] = weakref.WeakKeyDictionary()

    def refusal(self, flow: http.HTTPFlow, proof: Proof | None, runtime) -> Refusal | None:
        """Why ``flow``'s WebSocket must close now, or None if it still holds under ``runtime``."""
        if runtime is None or proof is None:
            return Refusal(407, Reason.IDENTITY_MISSING, "the WebSocket's connection has no identity under the loaded config")
        try:
            workload = proof.current(runtime.verifier)
        except IdentityError as exc:
            return Refusal(407, exc.reason, str(exc))
        if self._confirmed.get(flow) is runtime:
            return None
        req = flow.request
        result = runtime.policy.decide(workload, host=req.host, port=req.port, scheme=req.scheme,
                                       method=req.method, path=req.path)
        name = flow.metadata.get(RULE)
        if not isinstance(result, Decision) or result.rule.name != name or \
                (result.rule.inject.credential if result.rule.inject else None) != flow.metadata.get(CREDENTIAL):
            return Refusal(403, Reason.NO_RULE, "the rule that admitted this WebSocket no longer allows it", name)
        self._confirmed[flow] = runtime
        return None
