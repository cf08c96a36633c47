"""The proxy's long-lived parts and their lifecycle: config runtime, broker, HTTP client, watcher.

``configure()`` loads the first config synchronously (a bad file stops start-up with every
error listed); ``start()``/``stop()`` run in mitmproxy's ``running()``/``done()`` because the
HTTP client, the broker's tasks and the watcher need the event loop. ``reload()`` never
raises: a bad config is logged with file:line and key path and the last good one keeps
serving.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509

from secretless_proxy.broker import Broker, BrokerEvents
from secretless_proxy.config.model import Config
from secretless_proxy.credentials.base import ProviderDeps
from secretless_proxy.errors import ConfigError
from secretless_proxy.grants import Grant
from secretless_proxy.metrics import Degraded
from secretless_proxy.reload import FileWatcher
from secretless_proxy.runtime import Runtime, changed_credentials
from secretless_proxy.signing import JwtSigner
from secretless_proxy.store import Store, open_store
from secretless_proxy.store.grantcache import GrantCache
from secretless_proxy.trust import tlsfiles
from secretless_proxy.trust.bundles import load_bundle

log = logging.getLogger("secretless")


class Services:
    def __init__(self, config_path: str, *, events: BrokerEvents | None = None,
                 on_store_error: Callable[[str], None] | None = None,
                 on_event_rejected: Callable[[str], None] | None = None,
                 on_grant_lookup: Callable[[str], None] | None = None) -> None:
        self.config_path = config_path
        self.events = events or BrokerEvents()
        self.deps = ProviderDeps()
        self.runtime = Runtime.load(config_path, self.deps)  # raises ConfigError & co.
        self.deps.signer = _signer(self.config, None)
        self.upstream_bundle = tlsfiles.upstream_ca_bundle(self.config)
        self.broker: Broker | None = None
        self.watcher: FileWatcher | None = None
        self.reload_error: str | None = None
        self.audit_changed = False
        self.on_reload: Callable[[bool], None] | None = None
        self._tasks: set[asyncio.Task] = set()
        self.confdir = tlsfiles.confdir(self.config)  # fixed for the process: mitmproxy's certstore
        self.store: Store = open_store(self.config.store, on_error=on_store_error,  # fixed for the process
                                       on_event_rejected=on_event_rejected)
        # Grant checks without a round trip per request; the memory store's lookup never leaves the
        # process, so it goes uncached (ttl 0).
        self.grants = GrantCache(self.store, on_lookup=on_grant_lookup,
                                 ttl=0.0 if self.config.store.kind == "memory" else self.config.store.grant_cache)
        self._grant_expiry: dict[str, float] = {}  # grants in use → when their credentials must go
        self.last_used: dict[str, float] = {}  # credential name → last injection (for the inventory)
        self._unsubscribe: Callable[[], None] | None = None
        self._unsubscribe_grants: Callable[[], None] | None = None

    @property
    def config(self) -> Config:
        return self.runtime.config

    async def start(self) -> None:
        self.deps.http = _http_client(self.upstream_bundle, self.config)
        broker = Broker(self.runtime.providers, config=self.config.broker, events=self.events)
        if self.config.store.kind != "memory":
            broker.attach_store(self.store)
        self._unsubscribe = self.store.subscribe(self._on_store_event)
        self._unsubscribe_grants = self.store.subscribe(self.grants.on_event)
        # Published only once wired: mitmproxy already accepts connections while running() awaits,
        # and a request seeing a broker must never see one without its shared store.
        self.broker = broker
        await self.store.start()  # never raises: an unreachable Redis is retried in the background
        # A restart with changed definitions: what the fleet cached under the old ones goes (and is revoked).
        self._spawn(broker.retire_stale())
        self.watcher = FileWatcher(self._watched, self.reload)
        self.watcher.start()
        self._spawn(self._expire_grants())

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._unsubscribe_grants is not None:
            self._unsubscribe_grants()
        if self.watcher is not None:
            await self.watcher.stop()
        if self.broker is not None:
            await self.broker.aclose()
        if self.deps.http is not None:
            await self.deps.http.aclose()
        for task in list(self._tasks):
            task.cancel()
        await self.store.close()

    # -- grants and shared state -----------------------------------------------------------------

    def grant_in_use(self, grant: Grant) -> None:
        """Remember a grant a request used, so its credentials are evicted the moment it expires."""
        self._grant_expiry[grant.id] = grant.expires_at

    async def _on_store_event(self, event: dict[str, Any]) -> None:
        broker = self.broker
        if broker is None:
            return
        kind = event.get("type")
        if kind == "credential_evicted":
            broker.drop_local(event["key"])
        elif kind == "grant_revoked":
            self._grant_expiry.pop(event["id"], None)
            await broker.evict_grant(event["id"], reason="grant_revoked")
        elif kind == "resync":  # events may have been missed during an outage: trust nothing cached
            broker.drop_local(None)

    async def _expire_grants(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.time()
            for gid in [g for g, exp in self._grant_expiry.items() if exp <= now]:
                del self._grant_expiry[gid]
                if self.broker is None:
                    continue
                try:
                    await self.broker.evict_grant(gid, reason="grant_expired")
                except Exception as exc:  # noqa: BLE001 - this loop must outlive one bad eviction
                    log.error("evicting the credentials of expired grant %s failed (%s)", gid, type(exc).__name__)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _watched(self) -> list[Path]:
        cfg = self.config
        return [Path(self.config_path), *cfg.identity.bundle_files()] + (
            [cfg.upstream_ca_bundle] if cfg.upstream_ca_bundle else [])

    def reload(self) -> bool:
        """Load the config file again; swap it in only if it is entirely valid. Never raises."""
        ok = self._reload()
        if self.watcher is not None:
            self.watcher.mark_seen()
        if self.on_reload is not None:
            self.on_reload(ok)
        return ok

    def _reload(self) -> bool:
        try:
            runtime = Runtime.load(self.config_path, self.deps)
            bundle = tlsfiles.upstream_ca_bundle(runtime.config)
            signer = _signer(runtime.config, self.deps.signer if runtime.config.signing == self.config.signing else None)
        except ConfigError as exc:
            for issue in exc.issues:
                log.error("config reload rejected, still serving the previous config: %s", issue)
            self.reload_error = f"{len(exc.issues)} error(s) in {self.config_path}, first: {exc.issues[0]}"
            return False
        except (ValueError, OSError) as exc:
            log.error("config reload rejected, still serving the previous config: %s", exc)
            self.reload_error = str(exc)
            return False
        except Exception as exc:  # noqa: BLE001 - whatever the cause, a failed reload is counted and shown
            log.error("config reload rejected, still serving the previous config: %s: unexpected %s",
                      self.config_path, type(exc).__name__)
            self.reload_error = f"{self.config_path}: unexpected {type(exc).__name__}"
            return False
        old = self.runtime
        for what, before, after in (("listen", old.config.listen, runtime.config.listen),
                                    ("store", old.config.store, runtime.config.store),
                                    ("admin.api_listen", old.config.admin_api_listen, runtime.config.admin_api_listen),
                                    ("interception_ca", old.config.interception_ca, runtime.config.interception_ca),
                                    ("admin.listen", old.config.admin_listen, runtime.config.admin_listen)):
            if before != after:
                log.warning("config reload: %s changed; it takes effect at the next restart", what)
        self.deps.signer = signer
        self.audit_changed = runtime.config.audit != old.config.audit
        self.runtime = runtime  # the swap: new requests see the new rules from here on
        self.reload_error = None
        if bundle != self.upstream_bundle:
            self.upstream_bundle = bundle
            if runtime.config.broker == old.config.broker:
                self._replace_http_client()
        if runtime.config.broker != old.config.broker:
            self._replace_http_client()  # its default timeout is broker.timeout
        if self.broker is not None:
            self.broker.reconfigure(runtime.config.broker)
            changed = changed_credentials(old.config.credentials, runtime.config.credentials)
            self.broker.replace_providers(runtime.providers)
            if changed:  # tokens minted under the old definitions: out of every cache, revoked
                self._spawn(self.broker.retire_stale(changed))
        log.info("config reloaded: %s (%d rules, %d credentials, sha256 %s)", self.config_path,
                 len(runtime.config.rules), len(runtime.config.credentials), runtime.config.digest[:12])
        return True

    def oidc_documents(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(jwks, openid-configuration) for the admin listener: how IdPs federate with the proxy."""
        signer = self.deps.signer
        if signer is None:
            raise LookupError("no signing key")
        return signer.jwks(), signer.openid_configuration()

    def readiness(self) -> dict[str, str | None]:
        """Ready with a loaded config, its trust bundles and the interception CA. A rejected reload, or
        a bundle file that no longer loads, leaves the last good one serving: ``Degraded``, not unready
        (every replica reads the same ConfigMap; the reload counter and its alert report it)."""
        checks: dict[str, str | None] = {
            "config": Degraded(f"last reload failed, the previous config serves: {self.reload_error}")
            if self.reload_error else None}
        checks["trust_bundle"] = None
        for td, source in self.config.identity.bundles.items():
            try:
                load_bundle(source)
            except ValueError as exc:
                checks["trust_bundle"] = Degraded(f"trust domain {td}: {exc} (the bundle loaded before serves)")
                break
        ca = self.confdir / "mitmproxy-ca-cert.pem"
        try:
            x509.load_pem_x509_certificate(ca.read_bytes())
            checks["interception_ca"] = None
        except (OSError, ValueError) as exc:
            checks["interception_ca"] = f"{ca}: {getattr(exc, 'strerror', None) or 'not a PEM certificate'}"
        checks["store"] = None if self.store.healthy else f"the {self.config.store.kind} store is unreachable"
        return checks

    def _replace_http_client(self) -> None:
        old = self.deps.http
        self.deps.http = _http_client(self.upstream_bundle, self.config)
        if old is not None:
            async def close_later() -> None:
                await asyncio.sleep(self.config.broker.timeout * 4)  # let in-flight fetches finish
                await old.aclose()
            self._spawn(close_later())


def _signer(config: Config, current: JwtSigner | None) -> JwtSigner | None:
    """The proxy's JWT signer, when anything needs one: minting kinds, client assertions, JWKS."""
    if current is not None:
        return current
    needed = config.signing or config.admin_listen or any(_needs_signer(c) for c in config.credentials.values())
    return JwtSigner.from_config(config.signing, default_issuer=_default_issuer(config)) if needed else None


def _needs_signer(cred) -> bool:
    """Kinds that mint JWTs with the proxy's key: minted JWTs, token-exchange subjects,
    private_key_jwt assertions and web-identity tokens for AWS."""
    st = cred.settings
    return (cred.kind in ("jwt", "oauth2_token_exchange") or getattr(st, "auth", None) == "private_key_jwt"
            or getattr(st, "mode", None) == "web_identity")


def _default_issuer(config: Config) -> str:
    if config.admin_listen:
        host, port = config.admin_listen
        return f"http://{host}:{port}"
    return "https://secretless-proxy.invalid"


def _http_client(bundle: Path, config: Config) -> httpx.AsyncClient:
    """Provider I/O: verified TLS against the same roots as upstream traffic, bounded timeouts."""
    ctx = ssl.create_default_context(cafile=str(bundle))
    return httpx.AsyncClient(verify=ctx, timeout=httpx.Timeout(config.broker.timeout), trust_env=False,
                             follow_redirects=False)
