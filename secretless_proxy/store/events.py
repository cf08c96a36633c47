"""Signed store events: only a proxy that holds the store keys can tell replicas to drop or revoke (issue 10 §4).

Anyone who can ``PUBLISH`` on the Redis channel could otherwise inject evictions or grant
revocations into every replica, or replay old ones. Every event a ``RedisStore`` publishes is
signed, and every event it receives is verified before any subscriber sees it.

Wire format (JSON object, at most ``base.MAX_EVENT_BYTES``)::

    {"type", <its one field>, "origin", "ts": ms since the epoch, "nonce": 16 hex, "kid": key id, "sig": 64 hex}

``sig`` is HMAC-SHA256 (RFC 2104) under a subkey of store key ``kid`` (``Sealer.derive``, purpose
"store events"), over the canonical JSON array ``[channel, type, field value, origin, ts, nonce]``:
an event signed for one deployment's channel (``key_prefix``) does not verify on another's.

Refused, counted (``on_reject(reason)``) and logged by reason only:

- ``malformed``  not JSON, too large, unknown type, fields missing;
- ``unsigned``   no signature at all (a plain ``PUBLISH``);
- ``forged``     unknown key id, or the signature does not match (any field altered);
- ``stale``      ``ts`` more than ``max_age`` (30 s) away from this replica's clock, past or future;
- ``replayed``   a nonce already seen within ``max_age`` (the same event published again).

Clocks of replicas must agree within ``max_age`` (NTP); key rotation follows the sealing keys'
procedure (add the new key everywhere before making it active).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from secretless_proxy.store import base
from secretless_proxy.store.base import Event, check_event
from secretless_proxy.store.sealing import Sealer

log = logging.getLogger(__name__)

PURPOSE = "store events"
MAX_AGE = 30.0
REJECT_REASONS = frozenset({"malformed", "unsigned", "forged", "stale", "replayed"})
MAX_NONCES = 100_000  # nonces remembered (within max_age); beyond it the oldest are forgotten first
_SIGNED = ("ts", "nonce", "kid", "sig")


class EventSigner:
    """Signs outgoing events and verifies incoming ones for one channel; see the module docstring."""

    def __init__(self, sealer: Sealer, channel: str, *, max_age: float = MAX_AGE,
                 now: Callable[[], float] = time.time,
                 on_reject: Callable[[str], None] | None = None) -> None:
        self._sealer = sealer
        self._channel = channel
        self._max_age = max_age
        self._now = now
        self._on_reject = on_reject
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it may be forgotten

    def __repr__(self) -> str:
        return f"EventSigner(channel={self._channel!r})"

    def sign(self, event: Mapping[str, Any]) -> str:
        """The wire form of a checked event (``origin`` included by the caller)."""
        checked = check_event(event)
        kid = self._sealer.active_key_id
        fields = {**checked, "ts": int(self._now() * 1000), "nonce": secrets.token_hex(8), "kid": kid}
        fields["sig"] = self._mac(kid, checked, fields["ts"], fields["nonce"])
        return json.dumps(fields, separators=(",", ":"))

    def verify(self, data: bytes | str) -> Event | None:
        """The event if it is well formed, genuine, fresh and new; else None (counted as its reason)."""
        try:
            if len(data) > base.MAX_EVENT_BYTES:
                raise ValueError("too large")
            raw = json.loads(data)
            if not isinstance(raw, dict):
                raise ValueError("not an object")
            event = check_event(raw)
        except (ValueError, TypeError, UnicodeDecodeError):
            return self._reject("malformed")
        if not any(k in raw for k in _SIGNED):
            return self._reject("unsigned")
        ts, nonce, kid, sig = (raw.get(k) for k in _SIGNED)
        if (not isinstance(ts, int) or isinstance(ts, bool) or not isinstance(nonce, str) or len(nonce) != 16
                or not isinstance(kid, str) or not isinstance(sig, str)):
            return self._reject("malformed")
        if "origin" in raw and raw.get("origin") != event.get("origin"):
            return self._reject("malformed")  # check_event dropped an origin it did not accept
        if kid not in self._sealer.key_ids or not hmac.compare_digest(sig, self._mac(kid, event, ts, nonce)):
            return self._reject("forged")
        now = self._now()
        if abs(now - ts / 1000) > self._max_age:
            return self._reject("stale")
        self._forget(now)
        if nonce in self._seen:
            return self._reject("replayed")
        self._seen[nonce] = ts / 1000 + self._max_age
        if len(self._seen) > MAX_NONCES:
            self._seen.popitem(last=False)
        return event

    # -- internals ------------------------------------------------------------------------

    def _mac(self, kid: str, event: Event, ts: int, nonce: str) -> str:
        field = base.EVENTS[event["type"]]
        message = json.dumps([self._channel, event["type"], "" if field is None else event[field],
                              event.get("origin", ""), ts, nonce], separators=(",", ":"))
        return hmac.new(self._sealer.derive(PURPOSE, kid), message.encode(), hashlib.sha256).hexdigest()

    def _forget(self, now: float) -> None:
        while self._seen:
            nonce, until = next(iter(self._seen.items()))
            if until >= now:
                break
            del self._seen[nonce]

    def _reject(self, reason: str) -> None:
        log.warning("refused a %s event on %s", reason, self._channel)
        if self._on_reject is not None:
            try:
                self._on_reject(reason)
            except Exception as exc:  # noqa: BLE001 - a metrics hook must not break the listener
                log.warning("store on_event_rejected hook raised %s", type(exc).__name__)
        return None
