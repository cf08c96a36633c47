"""The configuration model: a frozen, typed description of one config file, as plain data.

``configparse.load_config`` builds it from YAML (every error names file, line and key path);
everything else reads it. It imports no provider and no store code: those modules import the
model, never the other way round, and each credential kind's settings (``credentials/<kind>.py``)
meet the model only through the small ``CredentialSettings`` protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from secretless_proxy.destinations.addresses import NOTHING, Allowance
from secretless_proxy.destinations.resolver import ResolverConfig
from secretless_proxy.matching import Glob, HostPattern, WorkloadPattern
from secretless_proxy.secretrefs import SecretRef
from secretless_proxy.trust.config import IdentityConfig

MEMORY = "memory://"


class CredentialSettings(Protocol):
    """What the model needs of a kind's settings (a frozen dataclass in ``credentials/<kind>.py``)."""

    def secret_refs(self) -> dict[str, SecretRef]:
        """Every secret reference the settings hold, by config key: resolved by ``check`` and at start."""
        ...


@dataclass(frozen=True, kw_only=True)
class Credential:
    """A credential definition: its kind's settings (``credentials/<kind>.py``) and who owns it."""

    name: str
    kind: str
    settings: CredentialSettings
    owner: str | None = None
    line: int | None = None

    def secret_refs(self) -> dict[str, SecretRef]:
        return self.settings.secret_refs()


@dataclass(frozen=True, kw_only=True)
class SigningConfig:
    """The proxy's own JWT signing key (minted JWTs, token-exchange subjects, client assertions)."""

    issuer: str
    key: SecretRef | None  # PEM private key (EC P-256 or RSA); None: generated at start (dev only)
    key_id: str | None


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """Where audit events go and what happens when they cannot be written."""

    sinks: tuple[str, ...] = ("stdout",)  # "stdout" or "file:/path"
    fingerprint_key: SecretRef | None = None  # HMAC key; None: random per process (fingerprints
    # then correlate within one process only)
    fail_closed: bool = True  # refuse credential use when the audit record cannot be written


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    skew: float = 30.0  # a credential is served only until expires_at - skew
    refresh_at: float = 0.75  # refresh in the background after this fraction of the lifetime
    timeout: float = 5.0  # per provider call
    retries: int = 2  # extra attempts after a failed provider call
    max_wait: float = 10.0  # longest a request waits for a credential (the fill goes on without it)


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    """Bounds on what one client may hold of the proxy: bytes, time and connections.

    Every one of them is on by default: an anonymous client that can reach the port must not be
    able to exhaust memory, descriptors or the event loop for every other workload.
    """

    max_request_head_bytes: int = 64 * 1024  # request line + headers; over it: 431
    max_request_body_bytes: int = 16 * 1024 * 1024  # over it: 413 (bodies are streamed, not buffered)
    max_response_scan_bytes: int = 16 * 1024 * 1024  # inject-rule responses checked for echoes up to this
    max_response_scan_total_bytes: int = 64 * 1024 * 1024  # all responses being checked at once, the process
    max_response_head_bytes: int = 64 * 1024  # upstream status line + headers; over it: 502
    handshake_timeout: float = 10.0  # TLS handshake / CONNECT head, from accept
    request_head_timeout: float = 15.0  # from the first byte of a request to the end of its head
    request_body_timeout: float = 30.0  # the longest a request body may go without bytes arriving; over it: 408
    idle_timeout: float = 60.0  # keep-alive connection with no request in flight
    max_connections: int = 4096  # concurrent client connections, all clients
    max_connections_per_client: int = 256  # concurrent client connections from one address
    admin_max_connections: int = 64  # each admin listener (admin.listen, admin.api_listen)
    admin_max_connections_per_client: int = 32  # one address's share of an admin listener
    drain_seconds: float = 25.0  # on SIGTERM or SIGINT: how long in-flight requests may take to finish
    revoke_on_shutdown: bool = False  # on SIGTERM or SIGINT: revoke brokered credentials that support it


@dataclass(frozen=True, kw_only=True)
class Injection:
    """How a credential goes into the request: exactly one of header, basic or query."""

    credential: str
    header: str | None = None
    format: str = "{secret}"
    basic_username: str | None = None
    basic_password: str | None = None
    query: str | None = None
    sigv4: bool = False  # re-sign the request with AWS SigV4 (aws_sigv4 credentials)
    sigv4_region: str | None = None  # default: derived from the host
    sigv4_service: str | None = None
    # Buffer the response (up to limits.max_response_scan_bytes) to check it for an echoed
    # credential. False streams it unchecked: for APIs that never echo, such as S3 downloads.
    echo_check: bool = True

    @property
    def target(self) -> str:
        if self.sigv4:
            return "sigv4"
        if self.header is not None:
            return "header"
        return "basic" if self.basic_password is not None else "query"


@dataclass(frozen=True, kw_only=True)
class Destination:
    hosts: tuple[HostPattern, ...]
    ports: frozenset[int]
    methods: frozenset[str] | None
    paths: tuple[Glob, ...] | None
    private: Allowance = NOTHING  # non-public addresses this rule may reach (destinations/pinning.py)


@dataclass(frozen=True, kw_only=True)
class Rule:
    name: str
    index: int
    line: int | None
    workloads: tuple[WorkloadPattern, ...]
    to: Destination
    action: Literal["allow", "inject"]
    inject: Injection | None
    allow_plaintext: bool
    requires_grant: bool = False  # applies only while a grant exists for (workload, rule)
    break_glass: bool = False  # break-glass grants may be issued for this rule


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """TLS material for ``rediss://``: a CA bundle (default: the system's), a client cert and key."""

    ca_bundle: Path | None = None
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """The ``store:`` section (``storeconfig.py`` reads it). ``url`` is ``memory://`` or a Redis URL."""

    url: str = MEMORY
    encryption_keys: Mapping[str, SecretRef] = field(default_factory=dict)
    active_key: str | None = None
    password: SecretRef | None = None
    tls: TlsFiles | None = None
    key_prefix: str = "secretless:"
    timeout: float = 0.5
    grant_cache: float = 0.5  # seconds a found grant is served from memory (store/grantcache.py); 0: off

    @property
    def kind(self) -> str:
        return "memory" if self.url == MEMORY else "redis"


@dataclass(frozen=True, kw_only=True)
class Config:
    source: Path
    digest: str  # sha256 of the file, to tell which config is loaded
    identity: IdentityConfig
    listen: tuple[str, int] | None
    interception_ca: Path | None
    upstream_ca_bundle: Path | None
    store: StoreConfig
    credentials: dict[str, Credential] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    admin_listen: tuple[str, int] | None = None
    admin_api_listen: tuple[str, int] | None = None  # mTLS admin API (grants, inventory)
    admin_workloads: tuple[WorkloadPattern, ...] = ()  # identities allowed to use the admin API
    signing: SigningConfig | None = None
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    resolver: ResolverConfig = field(default_factory=ResolverConfig)
    allow_private: Allowance = NOTHING  # upstream.allow_private: networks every rule may reach (dev/test)
