"""Drive credential providers and the broker without a proxy: contexts, a hand-moved clock, fake providers.

The fake providers are small implementations of the provider protocol that count calls and whose
delay, failures and lifetimes the tests control (test_broker, test_breaker, test_definition).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from secretless_proxy.broker import BrokerEvents
from secretless_proxy.config.model import Config, Credential
from secretless_proxy.config.parse import load_config
from secretless_proxy.credentials.base import IssuedCredential, Provider, ProviderDeps, RequestContext
from secretless_proxy.dev import certs
from secretless_proxy.identity import Workload
from secretless_proxy.secretrefs import Secret

BILLING = "spiffe://example.org/ns/prod/sa/billing"
REPORTS = "spiffe://example.org/ns/prod/sa/reports"
NOW = 1_700_000_000.0  # the provider tests' fixed wall clock
CONFIG_DIR = Path(__file__).parents[2] / "config"  # the example configs
LIFETIME = 1000.0  # with skew 30 and refresh_at 0.75: refresh from +750, served until +970


def request_context(spiffe_id: str = BILLING, *, host: str = "api.example.com",
                    path: str = "/", rule: str = "r", not_after: float | None = None) -> RequestContext:
    """A provider's RequestContext for a verified workload (for driving providers directly)."""
    td, _, wl_path = spiffe_id.removeprefix("spiffe://").partition("/")
    workload = Workload(spiffe_id=spiffe_id, trust_domain=td, path="/" + wl_path,
                        not_after=time.time() + 3600 if not_after is None else not_after, cert_sha256="00")
    return RequestContext(workload=workload, host=host, port=443, method="GET", path=path, rule=rule)


def ctx(spiffe_id: str = BILLING, host: str = "api.example.com") -> RequestContext:
    """A context whose workload certificate is valid for an hour after NOW."""
    return request_context(spiffe_id, host=host, not_after=NOW + 3600)


def load_text(tmp_path: Path, text: str, *, name: str = "config.yaml", resolve: bool = False) -> Config:
    """Write ``text`` to a config file and load it (secrets resolved only when asked)."""
    path = tmp_path / name
    path.write_text(text)
    return load_config(path, resolve_secrets=resolve)


def load_example(tmp_path: Path, name: str) -> Config:
    """config/<name> loaded (secrets unresolved: they live on the deployment's disk) next to a dev/
    tree like `make dev-certs` makes (trust bundle only)."""
    (tmp_path / "config").mkdir()
    shutil.copy(CONFIG_DIR / name, tmp_path / "config" / name)
    (tmp_path / "dev" / "ca").mkdir(parents=True)
    (tmp_path / "dev" / "ca" / "ca.pem").write_bytes(certs.make_ca().cert_pem())
    return load_config(tmp_path / "config" / name, resolve_secrets=False)


CREDS_FILE = "creds.yaml"


def config_head(trust_bundle: str | Path = "ca.pem") -> str:
    """Lines 1-4 of a provider test's config: the version and a one-domain identity."""
    return f"version: 1\nidentity:\n  trust_bundle: {trust_bundle}\n  trust_domains: [example.org]\n"


def load_credential(tmp_path: Path, head: str, body: str, **kw: Any) -> Config:
    """``head`` (a config up to one credential's name) and ``body`` (that credential's keys, one per
    line) written to CREDS_FILE next to a workload CA (``ca.pem``), and loaded."""
    if not (tmp_path / "ca.pem").exists():
        (tmp_path / "ca.pem").write_bytes(certs.make_ca().cert_pem())
    (tmp_path / CREDS_FILE).write_text(head + "".join(f"    {line}\n" for line in body.strip().splitlines()))
    return load_config(tmp_path / CREDS_FILE, **kw)


def context(workload: str = BILLING) -> RequestContext:
    """The broker tests' context: a fixed far-off expiry and path ``/v1``."""
    wl = Workload(spiffe_id=workload, trust_domain="example.org", path=workload.split("example.org", 1)[1],
                  not_after=2e9, cert_sha256="00" * 32)
    return RequestContext(workload=wl, host="api.example.com", port=443, method="GET", path="/v1", rule="r")


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeProvider(Provider):
    """Issues ``tok-<n>`` credentials; ``fail``/``result``/``delay``/``gate`` steer the next calls."""

    kind = "fake"

    def __init__(self, name: str = "api", *, clock: Callable[[], float], lifetime: float | None = LIFETIME,
                 delay: float = 0.0, scope_by: str | None = "shared") -> None:
        super().__init__(Credential(name=name, kind=self.kind, settings=None), ProviderDeps(now=clock))
        self.clock, self.lifetime, self.delay, self.scope_by = clock, lifetime, delay, scope_by
        self.calls = 0
        self.fail: list[BaseException] = []  # raised by the next calls, in order
        self.down: BaseException | None = None  # raised by every call while set
        self.result: object = None  # returned instead of a credential when not None
        self.gate: asyncio.Event | None = None  # fetch waits for it when set

    def scope(self, ctx: RequestContext) -> str | None:
        return {"shared": "", "workload": ctx.workload.spiffe_id, None: None}[self.scope_by]

    async def fetch(self, ctx: RequestContext) -> IssuedCredential:
        self.calls += 1
        n = self.calls
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise self.fail.pop(0)
        if self.down is not None:
            raise self.down
        if self.result is not None:
            return self.result  # type: ignore[return-value]
        now = self.clock()
        return IssuedCredential(name=self.name, kind=self.kind, secret=Secret(f"tok-{n}"), issued_at=now,
                                expires_at=None if self.lifetime is None else now + self.lifetime)


class RevocableProvider(FakeProvider):
    """A FakeProvider whose credentials can be revoked; records what it revoked."""

    kind = "fake_revocable"
    revocable = True

    def __init__(self, *args, revoke_error: BaseException | None = None, revoke_delay: float = 0.0,
                 **kw) -> None:
        super().__init__(*args, **kw)
        self.revoked: list[IssuedCredential] = []
        self.revoke_error, self.revoke_delay = revoke_error, revoke_delay

    async def revoke(self, cred: IssuedCredential) -> None:
        if self.revoke_delay:
            await asyncio.sleep(self.revoke_delay)
        if self.revoke_error is not None:
            raise self.revoke_error
        self.revoked.append(cred)


class Recorder(BrokerEvents):
    """Collects every event as a tuple."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def fetched(self, *, credential: str, kind: str, outcome: str, seconds: float) -> None:
        self.log.append(("fetched", credential, outcome))

    def cache(self, *, credential: str, result: str) -> None:
        self.log.append(("cache", credential, result))

    def issued(self, cred: IssuedCredential) -> None:
        self.log.append(("issued", cred.name, cred.secret.reveal()))

    def revoked(self, cred: IssuedCredential, *, reason: str) -> None:
        self.log.append(("revoked", cred.secret.reveal(), reason))

    def of(self, kind: str) -> list[tuple]:
        return [e for e in self.log if e[0] == kind]
