"""Durations people type on the command line: ``90s``, ``15m``, ``1h``, ``7d``, ``1h30m``.

Apart from the config's field readers, which take numbers of seconds (``ttl_seconds: 60``): these
are the unit-suffixed spans of ``certs init --ttl``, ``certs issue --ttl`` and ``grant --ttl``.
"""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["parse_ttl"]

_TTL = re.compile(r"(?:(\d{1,9})d)?(?:(\d{1,9})h)?(?:(\d{1,9})m)?(?:(\d{1,9})s)?\Z")


def parse_ttl(text: str) -> timedelta:
    """Parse "90s", "15m", "1h", "7d", "1h30m" (units in d, h, m, s order) into a timedelta."""
    match = _TTL.match(text.strip())
    if not text.strip() or match is None:
        raise ValueError(f"invalid TTL {text!r}: use e.g. 90s, 15m, 1h, 7d")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    try:
        ttl = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    except OverflowError:
        raise ValueError(f"invalid TTL {text!r}: it is too large") from None
    if ttl <= timedelta(0):
        raise ValueError(f"invalid TTL {text!r}: it must be greater than zero")
    return ttl
