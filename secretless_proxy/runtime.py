"""Everything derived from one loaded config, built completely before it goes live.

A reload builds a new ``Runtime`` from the new file; only when that fully succeeds does the
addon swap it in (one attribute assignment), so in-flight requests finish under the runtime
they started with and new ones see the new one. A failed build leaves the old one serving.
"""

from __future__ import annotations

from dataclasses import dataclass

from secretless_proxy.config.model import Config, Credential
from secretless_proxy.config.parse import load_config
from secretless_proxy.credentials.base import Provider, ProviderDeps
from secretless_proxy.credentials.registry import KINDS
from secretless_proxy.identity import IdentityVerifier
from secretless_proxy.policy import Policy
from secretless_proxy.trust.bundles import load_bundle


@dataclass(frozen=True, kw_only=True)
class Runtime:
    config: Config
    policy: Policy
    verifier: IdentityVerifier
    providers: dict[str, Provider]

    @classmethod
    def load(cls, path: str, deps: ProviderDeps) -> Runtime:
        """Parse, validate and build; raises ConfigError or ValueError/OSError naming what is wrong."""
        return cls.build(load_config(path), deps)

    @classmethod
    def build(cls, config: Config, deps: ProviderDeps) -> Runtime:
        bundles = {td: load_bundle(source) for td, source in config.identity.bundles.items()}
        providers = {name: KINDS[c.kind].provider(c, deps) for name, c in config.credentials.items()}
        return cls(config=config, policy=Policy(config.rules),
                   verifier=IdentityVerifier(bundles=bundles),
                   providers=providers)


def changed_credentials(old: dict[str, Credential], new: dict[str, Credential]) -> set[str]:
    """Names whose definition changed or disappeared: their cached values must be evicted."""
    return {name for name, cred in old.items() if _comparable(new.get(name)) != _comparable(cred)}


def _comparable(cred: Credential | None) -> tuple | None:
    # The line number moves when unrelated lines are edited; it is not part of the definition.
    return None if cred is None else (cred.kind, cred.settings, cred.owner)
