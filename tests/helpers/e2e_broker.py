"""Helpers for the broker end-to-end tests: a timed IdP, moto with IAM auth, metrics and polling."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx

from helpers.idp import IdP, Received
from helpers.moto_server import MotoServer


class TimedIdP(IdP):
    """The test IdP, also recording when each token request arrived (``time.time()``)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.token_times: list[float] = []

    def _token(self, rec: Received) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.token_times.append(time.time())
        return super()._token(rec)

    @property
    def token_calls(self) -> int:
        return len(self.token_times)


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.eE+-]+|NaN|[+-]Inf)$')


def metric(admin_port: int, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``, read from /metrics."""
    text = httpx.get(f"http://127.0.0.1:{admin_port}/metrics", trust_env=False, timeout=5).text
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


class AuthMoto(MotoServer):
    """An authenticating moto (see moto_server): the STS the AWS e2e test assumes its role at."""

    def __init__(self, log: Path) -> None:
        super().__init__(log, auth=True)
