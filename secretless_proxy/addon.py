"""The mitmproxy addon: the front door that wires identity → policy → broker → inject → audit.

It contains no policy, identity, credential or injection logic of its own. Every hook catches
its own errors and answers with a refusal: mitmproxy's ``safecall`` would otherwise log the
exception and let the flow continue — past a denial, or without its credential.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import weakref
from dataclasses import dataclass, field

from mitmproxy import ctx, exceptions, http, tls
from mitmproxy.connection import Client
from mitmproxy.net.http import url
from prometheus_client import CollectorRegistry

from secretless_proxy import inject, redaction, sigv4
from secretless_proxy.admin.exchange import Listener
from secretless_proxy.audit import AuditLog, clean_path
from secretless_proxy.breaker import Backoff
from secretless_proxy.config.model import LimitsConfig, Rule
from secretless_proxy.credentials.base import IssuedCredential, RequestContext
from secretless_proxy.destinations.pinning import Destinations, proxy_listeners, upstream_refusal
from secretless_proxy.edge import (
    bodydecode,
    connlimits,
    hardening,
    layerguard,
    ownheaders,
    protocols,
    requesthead,
    requesttarget,
    wsjudge,
)
from secretless_proxy.edge.connlimits import ConnectionGuard
from secretless_proxy.edge.httplayers import SCAN_LIMIT, SENT, TARGET, Guard, GuardedHttpLayer
from secretless_proxy.edge.shutdown import Drain
from secretless_proxy.errors import ConfigError, CredentialError, IdentityError
from secretless_proxy.identity import Workload
from secretless_proxy.matching import normalize_host
from secretless_proxy.metrics import Metrics, decision_for
from secretless_proxy.observe import Observer
from secretless_proxy.policy import Decision, Deny
from secretless_proxy.reasons import Reason
from secretless_proxy.refusal import (
    DENY_MESSAGES,
    REQUEST_ID_HEADER,
    Refusal,
    decoded_too_large,
    error_response,
)
from secretless_proxy.services import Services
from secretless_proxy.store import StoreError
from secretless_proxy.trust.proof import Proof

log = logging.getLogger("secretless")

DEFAULT_LISTEN = ("127.0.0.1", 8080)  # where the proxy listens without `listen` (README)


@dataclass
class ConnState:
    """What one client connection has proven: its identity and, once tunnelled, its target."""

    proof: Proof = field(default_factory=Proof)  # the identity and the trust it was judged on
    connect: tuple[str, int] | None = None  # normalised CONNECT authority
    inner_sni: str | None = None  # SNI of the handshake inside the tunnel

    @property
    def identity(self) -> Workload | IdentityError | None:
        return self.proof.result


@dataclass(frozen=True, slots=True)
class _Injected:
    """What a flow carries: where its credential sits (to scrub and redact) and for the audit."""

    header: str | None
    query: str | None
    needles: redaction.Needles = field(repr=False)  # every form of the secret an echo may take
    cred: IssuedCredential = field(repr=False)
    rule: str
    workload: str
    started: float
    echo_check: bool = True

    def scrub(self, request: http.Request) -> None:
        """Remove the credential from the flow's copy of a request that has been sent."""
        if self.header is not None:
            request.headers[self.header] = "[REDACTED]"
        if self.query is not None:
            request.query.set_all(self.query, ["[REDACTED]"])
        for name in ("X-Amz-Security-Token",):
            if name in request.headers:
                request.headers[name] = "[REDACTED]"


class _ShutdownCancellation(logging.Filter):
    """Drop asyncio's report of client tasks cancelled while the proxy shuts down.

    On Python 3.12.1 the stream callback calls ``task.exception()`` on a task that shutdown
    cancelled and logs the CancelledError with a traceback: noise, not an error.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


_SHUTDOWN_FILTER = _ShutdownCancellation()


class Secretless:
    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.services: Services | None = None
        self.metrics = Metrics(registry or CollectorRegistry())
        self.observer = Observer(metrics=self.metrics)
        # Bound by server.AdminListeners (the process owns them): for the destination check and
        # the connection guard's counters.
        self.admin_listeners: tuple[Listener, ...] = ()
        self._started: Services | None = None  # the services start_services() started
        self._rebind = False  # the proxy port was bound before configure() applied `listen`
        self.stopping = False  # an admin listener could not bind: running() must not report the proxy up
        self._conns: weakref.WeakKeyDictionary[Client, ConnState] = weakref.WeakKeyDictionary()
        # Secret-bearing strings per flow, kept off flow.metadata so saved flows never hold them.
        self._injected: weakref.WeakKeyDictionary[http.HTTPFlow, _Injected] = weakref.WeakKeyDictionary()
        self._reload_pending: asyncio.Task | None = None
        self.destinations = Destinations(config=lambda: self.services.config if self.services else None,
                                         listeners=self._own_listeners)
        # Connection caps and deadlines (edge/connlimits.py): a sub-addon, so mitmdump -s loads it too.
        self.guard = ConnectionGuard(self.metrics, lambda: self.services.config.limits if self.services else None,
                                     identified=self._identified)
        self.addons = [self.guard]
        self.drain: Drain | None = None
        # Flows decided on their head (requestheaders), and sigv4 flows whose signature waits for the body.
        self._decided: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self._allowed: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self._sign_later: weakref.WeakKeyDictionary[http.HTTPFlow, tuple] = weakref.WeakKeyDictionary()
        self._forced = False
        self._ws_rejudge = wsjudge.Rejudge()  # open WebSockets, judged again per message
        self._guard = Guard(limits=self._limits, on_refusal=self._report_refusal,
                            report_connection=lambda c, reason: self.gate.report(c, reason),
                            upstreams=self.destinations, on_upstream_failure=self._upstream_failed,
                            on_reset=self.guard.stream_reset, admit_stream=self.guard.admit_stream,
                            unsent=self._unsent)
        self.gate = protocols.Gate(max_head=lambda: self._limits().max_request_head_bytes,
                                   report=self._connection_refused,
                                   make_http=lambda c, mode: GuardedHttpLayer(c, mode, guard=self._guard))

    @property
    def runtime(self):
        return self.services.runtime if self.services else None

    # -- configuration --------------------------------------------------------------------

    def load(self, loader) -> None:
        logging.getLogger("asyncio").addFilter(_SHUTDOWN_FILTER)  # idempotent: same object
        layerguard.install(response_head_limit=lambda: self._limits().max_response_head_bytes,
                           websocket_limit=lambda from_client: self._limits().max_request_body_bytes if from_client
                           else self._limits().max_response_scan_bytes)  # mitmproxy's trailers, quoted parse errors, WS control frames (idempotent)
        # Before any secret is loaded: no core dumps, no ptrace (issue 8 §7). `secretless-proxy run`
        # does it before it builds its master (server.run); here it is for mitmdump/mitmweb -s.
        # Never for a bare Master, which is also what mitmproxy's in-process test helpers build:
        # RLIMIT_CORE 0 cannot be raised again, and that process is the test runner.
        if type(loader.master).__module__.startswith("mitmproxy.tools."):
            hardening.apply()
        loader.add_option(
            name="secretless_config", typespec=str, default="",
            help="Path of the secretless-proxy YAML config (rules, credentials, identity).",
        )

    def configure(self, updated: set[str]) -> None:
        protocols.check_options(ctx.options, updated, forced=self._forced)
        if "ssl_insecure" in updated and ctx.options.ssl_insecure:
            raise exceptions.OptionsError(
                "ssl_insecure is not allowed with secretless-proxy: credentials must only reach verified upstreams"
            )
        if "stream_large_bodies" in updated and ctx.options.stream_large_bodies:
            raise exceptions.OptionsError(
                "stream_large_bodies is not allowed with secretless-proxy: a streamed response cannot be "
                "checked for an echoed credential before the client sees it"
            )
        if "secretless_config" not in updated:
            return
        path = ctx.options.secretless_config
        if not path:
            # Not an OptionsError: mitmproxy re-applies the previous (empty) value when a new
            # value fails, and that error would hide the real one. Without a config every
            # request is refused, and running() stops the proxy.
            self.services = None
            return
        try:
            services = Services(path, events=self.observer, on_store_error=self.metrics.store_error,
                                on_event_rejected=self.metrics.store_event_rejected,
                                on_grant_lookup=self.metrics.grant_lookup)
        except ConfigError as exc:
            raise exceptions.OptionsError(f"secretless_config={path} is invalid:\n{exc}") from None
        except (ValueError, OSError) as exc:
            raise exceptions.OptionsError(f"secretless_config={path}: {exc}") from None
        self._force_options(services)
        self._apply_listen(services)
        self.services = services
        self.observer.set_audit(AuditLog.from_config(services.config.audit, metrics=self.metrics))
        self.observer.config_loaded(services.config.digest)
        cfg = services.config
        log.info("loaded %s (%d rules, %d credentials, sha256 %s)", cfg.source, len(cfg.rules),
                 len(cfg.credentials), cfg.digest[:12])

    def _force_options(self, services: Services) -> None:
        # The options our security model depends on, set before the config goes live so that
        # plain `mitmdump -s addons/secretless.py` is exactly as strict as `secretless-proxy run`.
        wanted = {
            "request_client_cert": True,
            **protocols.FORCED,  # no raw relay, no upstream connection before a request passed policy
            "ssl_verify_upstream_trusted_ca": str(services.upstream_bundle),
            "confdir": str(services.confdir),
        }
        missing = [k for k in wanted if k not in ctx.options]
        if missing:
            raise exceptions.OptionsError(
                f"secretless-proxy needs mitmproxy's proxyserver and tlsconfig addons (missing options: {', '.join(missing)})")
        changes = {k: v for k, v in wanted.items() if getattr(ctx.options, k) != v}
        if changes:
            ctx.options.update(**changes)
        self._forced = True

    def _apply_listen(self, services: Services) -> None:
        # The config's `listen` (default 127.0.0.1:8080) for each of listen_host and listen_port the
        # command line left at mitmproxy's default: plain mitmdump would bind every interface.
        # `--listen-host`/`-p` (and `secretless-proxy run --listen`) win, each on its own.
        host, port = services.config.listen or DEFAULT_LISTEN
        wanted = {name: value for name, value in (("listen_host", host), ("listen_port", port))
                  if not ctx.options.has_changed(name)}
        if not wanted:
            return
        ctx.options.update(**wanted)
        # mitmdump loads -s scripts only once its proxy servers are bound (mitmproxy does not rebind
        # on a changed listen_host); running() binds them again where `listen` says.
        ps = ctx.master.addons.get("proxyserver")
        self._rebind = ps is not None and any(True for _ in ps.servers)

    async def _bind_again(self) -> bool:
        self._rebind = False
        ps = ctx.master.addons.get("proxyserver")
        await ps.servers.update([])  # stop all first: the new address may share the old port
        # Connections mitmdump accepted on its own default address (every interface) before this
        # rebind are not on the address `listen` names: closed, not served (hostile review 19). Those
        # accepted but not yet handed to a handler are refused on arrival (connlimits: not_listening).
        early = list(ps.connections.values())
        for handler in early:
            connlimits.close_connection(handler, handler.client, "accepted before the config's listen applied")
        if not await ps.setup_servers():
            log.error("cannot listen on %s:%s (the config's listen); stopping", ctx.options.listen_host,
                      ctx.options.listen_port)
            ctx.master.shutdown()
            return False
        return True

    async def start_services(self) -> Services | None:
        """Start the services once (the admin listeners answer from them); None without a config.

        ``server.AdminListeners`` calls it before it binds them; ``running()`` calls it again.
        """
        services = self.services
        if services is not None and self._started is not services:
            await services.start()
            services.on_reload = self._after_reload
            self._started = services
        return services

    async def running(self) -> None:
        services = await self.start_services()
        if services is None:
            log.error("no config loaded: pass --set secretless_config=FILE; stopping")
            ctx.master.shutdown()
            return
        if self.stopping:
            return
        if self._rebind and not await self._bind_again():
            return
        self.destinations.listeners_changed()  # the admin listeners' bound ports are known now
        self.guard.start(admin_listeners={x.port: x.name for x in self.admin_listeners})
        self.drain = Drain(self.guard, drain_seconds=lambda: services.config.limits.drain_seconds,
                           revoke=self._revoke_all if services.config.limits.revoke_on_shutdown else None)
        try:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, self._sighup)
            # Both replace the handlers mitmdump or `run` installed (master.shutdown): Ctrl-C drains
            # and revokes as SIGTERM does (hostile review 31).
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.drain.on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):
            log.warning("SIGHUP reload and graceful SIGTERM/SIGINT are not available here; the config file is "
                        "still watched")
        ps = ctx.master.addons.get("proxyserver")
        for addr in (ps.listen_addrs() if ps is not None else []):
            log.info("secretless-proxy listening on %s:%d", addr[0], addr[1])

    async def _revoke_all(self) -> int:
        broker = self.services.broker if self.services else None
        if broker is None:
            return 0
        broker.stop_issuing()  # a fetch that lands from now on is revoked, never injected
        n = await broker.evict(None, reason="shutdown")
        await broker.fetches_settled()
        await broker.revocations_settled()  # awaited here, not abandoned when the loop stops
        return n

    async def done(self) -> None:
        # server.AdminListeners, before this addon in the chain, closed the admin listeners already.
        await self.guard.stop()
        if self.services is not None:
            await self.services.stop()
        self.observer.close()

    def _sighup(self) -> None:
        log.info("SIGHUP: reopening audit files and reloading the config")
        self.observer.reopen()
        if self.services is not None:
            self.services.reload()

    def _after_reload(self, ok: bool) -> None:
        services = self.services
        assert services is not None
        if not ok:
            self.observer.config_reload_failed()
            return
        if services.audit_changed:
            self.observer.set_audit(AuditLog.from_config(services.config.audit, metrics=self.metrics))
        self.observer.config_loaded(services.config.digest)
        if ctx.options.ssl_verify_upstream_trusted_ca != str(services.upstream_bundle):
            ctx.options.update(ssl_verify_upstream_trusted_ca=str(services.upstream_bundle))

    def readiness(self) -> dict[str, str | None]:
        """The /readyz checks: None means passing, a string says what fails."""
        if self.services is None:
            return {"config": "no config loaded"}
        return self.services.readiness() | {"audit": self.observer.audit.check(),
                                            "draining": self.drain.readiness() if self.drain else None}

    # -- connection hooks -------------------------------------------------------------------

    def next_layer(self, nextlayer) -> None:
        # Only TLS interception and HTTP go on (edge/protocols.py).
        try:
            if nextlayer.layer is None and (default := ctx.master.addons.get("nextlayer")) is not None:
                default.next_layer(nextlayer)  # mitmdump may call us first: take mitmproxy's view, then judge it
            self.gate.next_layer(nextlayer)
        except Exception as exc:  # noqa: BLE001 - fail closed: a failed decision refuses the connection
            log.error("layer decision failed (%s); connection refused", type(exc).__name__)
            nextlayer.layer = self.gate.refusal_layer(nextlayer.context, Reason.PROTOCOL_REFUSED,
                                                      "the proxy could not classify this connection")

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        self.gate.clienthello(data)

    def tls_start_client(self, data: tls.TlsData) -> None:
        protocols.only_http_alpn(data)  # after mitmproxy's tlsconfig: never h3 over TCP

    def _limits(self) -> LimitsConfig:
        return self.services.config.limits if self.services is not None else LimitsConfig()

    def _connection_refused(self, context, reason: str, request_id: str) -> None:
        """A refusal below HTTP flows (non-HTTP bytes, oversized head): log, audit, count."""
        st = self._conns.get(context.client)
        who = st.identity.spiffe_id if st and isinstance(st.identity, Workload) else None
        address = context.server.address
        host = f"{address[0]}:{address[1]}" if address else ""
        peer = context.client.peername
        log.info("refused connection %s from %s to %s: %s", request_id, f"{peer[0]}:{peer[1]}" if peer else "?",
                 host or "the proxy", reason)
        self.observer.denied(request_id=request_id, workload=who, reason=reason, host=host, path="")
        self.observer.request_done(rule=None, decision=decision_for(reason), overhead_seconds=0.0)

    def tls_established_client(self, data: tls.TlsData) -> None:
        try:
            self._on_client_tls(data.conn)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - fail closed; the type only (no certificate bytes, no traceback)
            log.error("identity check failed unexpectedly (%s); the connection is refused", type(exc).__name__)
            st = self._conns.setdefault(data.conn, ConnState())  # type: ignore[arg-type]
            st.proof.result = IdentityError(Reason.IDENTITY_INVALID, "the client certificate could not be checked")

    def _on_client_tls(self, client: Client) -> None:
        st = self._conns.setdefault(client, ConnState())
        if st.connect is not None:
            st.inner_sni = client.sni
        if not client.certificate_list:
            # The inner handshake of a proxy-hop (HTTPS_PROXY=https://) connection replaces the
            # certificate list with an empty one; the identity proven on the outer hop stays.
            return
        runtime = self.runtime
        if runtime is None:
            st.proof.result = IdentityError(Reason.IDENTITY_UNTRUSTED, "the proxy has no trust bundle loaded")
            return
        refused = st.proof.handshake([c.to_cryptography() for c in client.certificate_list], runtime.verifier)
        if refused is not None:
            self.observer.cert_rejected(refused.reason)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        st = self._conns.setdefault(flow.client_conn, ConnState())
        refusal = protocols.connect_refusal(flow)
        if refusal is not None:
            self._refuse(flow, refusal)
            return
        try:
            st.connect = (normalize_host(flow.request.host), flow.request.port)
        except ValueError:
            self._refuse(flow, Refusal(400, Reason.HOST_MISMATCH, "the CONNECT target is not a valid host"))

    # -- request path ----------------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Identity and policy are decided on the head: a refused request's body is never read
        # (httplayers.GuardedHttpStream answers at once), an allowed one is streamed.
        if flow.response or flow.error or not flow.live:
            return
        if not self.guard.admit_request(flow):
            return  # its connection is being closed for abuse (edge/connlimits.py): not judged, not audited
        await self._decide(flow, on_head=True)

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if flow in self._sign_later:
            await self._decide(flow, on_head=False, sign_only=True)
        elif flow not in self._decided:
            await self._decide(flow, on_head=False)  # not seen on its head (in-process tests, replays)

    async def _decide(self, flow: http.HTTPFlow, *, on_head: bool, sign_only: bool = False) -> None:
        self._decided.add(flow)
        started = time.perf_counter()
        rule, decision = None, "error"
        try:
            if sign_only:
                rule, decision = self._sign_deferred(flow)
            else:
                rule, decision = await self._authorize_and_inject(flow, on_head=on_head)
        except Refusal as refusal:
            rule, decision = refusal.rule, decision_for(refusal.reason)
            self._refuse(flow, refusal)
        except Exception as exc:  # noqa: BLE001 - fail closed on any bug
            # The type only: an exception message might quote a value we must not log.
            log.error("request %s refused after an internal error (%s)", flow.id, type(exc).__name__)
            self._refuse(flow, Refusal(502, Reason.INTERNAL_ERROR, "the proxy failed to process this request"))
        finally:
            if decision != "pending":  # a sigv4 request is counted once, when it is signed
                self.observer.request_done(rule=rule, decision=decision, overhead_seconds=time.perf_counter() - started)

    async def _authorize_and_inject(self, flow: http.HTTPFlow, *, on_head: bool) -> tuple[str, str]:
        services = self.services
        if services is None or services.broker is None:
            raise Refusal(503, Reason.NOT_CONFIGURED, "the proxy has no configuration loaded")
        runtime = services.runtime  # one runtime for the whole request, even across a reload
        req = flow.request
        _check_head(req, services.config.limits)
        if (bad_head := requesthead.parsed_refusal(req, flow.metadata)) is not None:  # CR/LF/NUL: HTTP/2 too
            raise bad_head
        st = self._conns.get(flow.client_conn) or ConnState()
        workload = _require_identity(st, runtime)
        host, port = self._destination(flow, st)
        for refusal in (ownheaders.method_refusal(req), protocols.upgrade_refusal(req)):
            if refusal is not None:
                raise refusal
        result = runtime.policy.decide(workload, host=host, port=port, scheme=req.scheme,
                                       method=req.method, path=req.path)
        if isinstance(result, Deny):
            raise Refusal(403, result.reason, DENY_MESSAGES[result.reason], result.rule)
        assert isinstance(result, Decision)
        rule = result.rule
        await self.destinations.admit(flow, result)  # resolve, check and pin the addresses: before any credential
        flow.metadata["secretless.rule"] = rule.name
        flow.metadata["secretless.workload"] = workload.spiffe_id
        grant_id = await self._require_grant(services, rule, workload) if rule.requires_grant else None
        ownheaders.strip(req, websocket=bool(req.headers.get("upgrade")))
        if rule.inject is None:
            req.stream = on_head  # nothing to inject or redact: stream the body through
            self._allowed.add(flow)
            return rule.name, "allowed"
        if not self.observer.audit_ready():
            raise Refusal(503, Reason.AUDIT_UNAVAILABLE, "the audit log cannot be written; credentials are withheld", rule.name)
        rctx = RequestContext(workload=workload, host=host, port=port, method=req.method,
                              path=req.path.split("?", 1)[0], rule=rule.name, grant_id=grant_id)
        try:
            cred = runtime.providers[rule.inject.credential].fetch_now(rctx) \
                or await services.broker.get(rule.inject.credential, rctx)
        except Exception as exc:  # noqa: BLE001 - any failure to obtain it means: refuse
            detail = str(exc) if isinstance(exc, CredentialError) else f"{type(exc).__name__} (message withheld)"
            log.warning("credential %s unavailable for rule %s: %s", rule.inject.credential, rule.name, detail)
            raise Refusal(503, Reason.CREDENTIAL_UNAVAILABLE, "the credential for this rule could not be obtained", rule.name,
                          retry_after=exc.retry_after if isinstance(exc, Backoff) else None) from None
        if not flow.live or flow.response is not None:
            raise Refusal(502, Reason.INTERNAL_ERROR, "the request ended while its credential was brokered", rule.name)
        if rule.inject.sigv4 and on_head:
            # The signature covers the body: sign in `request`, once the (bounded) body is in.
            self._sign_later[flow] = (rule, cred, workload, services)
            return rule.name, "pending"
        self._inject(flow, rule, cred, workload, services)
        req.stream = on_head  # the head carries the credential; the body has nothing to inject
        return rule.name, "injected"

    def _sign_deferred(self, flow: http.HTTPFlow) -> tuple[str, str]:
        rule, cred, workload, services = self._sign_later.pop(flow)
        self._inject(flow, rule, cred, workload, services)
        return rule.name, "injected"

    def _inject(self, flow: http.HTTPFlow, rule: Rule, cred: IssuedCredential, workload: Workload,
                services: Services) -> None:
        req, inj = flow.request, rule.inject
        assert inj is not None
        if inj.echo_check:
            # A range of a response is a piece the echo check sees alone: 14-character slices at
            # chosen offsets would rebuild a credential that no slice holds whole (hostile review
            # 4.12). The upstream sends the whole representation (RFC 9110 §14.2 lets it ignore Range).
            for name in ("range", "if-range"):
                req.headers.pop(name, None)
        if inj.sigv4:
            try:
                needles = sigv4.sign(req, cred, region=inj.sigv4_region, service=inj.sigv4_service)
            except ValueError as exc:  # our own sentence (unknown region, chunk-signed upload): no secret
                raise Refusal(503, Reason.CREDENTIAL_UNAVAILABLE, f"the request cannot be signed: {exc}", rule.name) from None
            header, query = "Authorization", None
        else:
            needles = inject.apply(req, inj, cred.secret)
            header = inj.header or ("Authorization" if inj.basic_password is not None else None)
            query = inj.query
        self._injected[flow] = _Injected(header=header, query=query, needles=needles, cred=cred,
                                         rule=rule.name, workload=workload.spiffe_id, started=time.time(),
                                         echo_check=inj.echo_check)
        flow.metadata["secretless.credential"] = cred.name
        services.last_used[cred.name] = time.time()

    async def _require_grant(self, services: Services, rule: Rule, workload: Workload) -> str:
        """The id of an active grant for (workload, rule): from the store, or from this replica's grant
        cache within its bounds (store/grantcache.py: events, expiry, staleness). No store answer: fail closed."""
        try:
            grant = await services.grants.find(workload.spiffe_id, rule.name)
        except StoreError:
            raise Refusal(503, Reason.STORE_UNAVAILABLE, "grants cannot be checked right now; this rule fails closed", rule.name) from None
        if grant is None or grant.id in services.store.revoked_grant_ids():
            raise Refusal(403, Reason.GRANT_REQUIRED, "this rule applies only while a grant exists for this workload", rule.name)
        services.grant_in_use(grant)
        return grant.id

    def _destination(self, flow: http.HTTPFlow, st: ConnState) -> tuple[str, int]:
        """The host and port the proxy will connect to, after checking every name agrees.

        mitmproxy connects to ``request.host``/``request.port``: the absolute-form authority,
        or — inside a CONNECT tunnel — the Host header. So the CONNECT target, the inner SNI and
        the Host header must all name that same destination, for every request on the tunnel.
        """
        req = flow.request
        try:
            host = normalize_host(req.host)
            header = req.host_header
            if header is not None:
                h_host, h_port = url.parse_authority(header, check=True)
                if normalize_host(h_host) != host or (h_port is not None and h_port != req.port):
                    raise ValueError("host header")
            if st.connect is not None:
                if st.connect != (host, req.port):
                    raise ValueError("connect")
                if st.inner_sni and normalize_host(st.inner_sni) != host:
                    raise ValueError("sni")
            requesttarget.check(flow.metadata.get(TARGET, (req.scheme, req.authority)),
                                host=host, port=req.port, scheme=req.scheme)
        except ValueError:
            raise Refusal(403, Reason.HOST_MISMATCH, "the request target, Host header, TLS SNI and CONNECT target must "
                                              "name the same destination") from None
        if req.host != host:
            # Connect to exactly the name the policy decided on (``API.Example.com.`` → ``api.example.com``).
            req.host = host
        requesttarget.rewrite(req, host=host, port=req.port)  # origin form, the decided Host
        return host, req.port

    def _refuse(self, flow: http.HTTPFlow, refusal: Refusal) -> None:
        self._report_refusal(flow, refusal)
        self._sign_later.pop(flow, None)
        flow.request.headers.pop("expect", None)  # no `100 Continue`: the body is not wanted
        flow.response = error_response(flow.id, refusal)

    def _identified(self, client: Client) -> bool:
        st = self._conns.get(client)
        return st is not None and isinstance(st.identity, Workload)

    def _report_refusal(self, flow: http.HTTPFlow, refusal: Refusal) -> None:
        """Log, audit and count a refusal (the caller answers the client)."""
        st = self._conns.get(flow.client_conn)
        who = st.identity.spiffe_id if st and isinstance(st.identity, Workload) else None
        path = clean_path(flow.request.path)
        log.info("refused %s %s %s%s for %s: %s", flow.id, flow.request.method, flow.request.pretty_host,
                 path, who or "unknown", refusal.reason)
        self.observer.denied(request_id=flow.id, workload=who, reason=refusal.reason,
                             host=flow.request.pretty_host, path=path, rule=refusal.rule)

    # -- upstream connections: only to the addresses admit() checked (destinations/pinning.py) ----------

    def server_connect(self, data) -> None:
        try:
            self.destinations.server_connect(data)
        except Exception as exc:  # noqa: BLE001 - fail closed: no checked address, no connection
            log.error("upstream connection refused after an internal error (%s)", type(exc).__name__)
            data.server.error = "secretless-proxy: the destination check failed"

    def server_connected(self, data) -> None:
        try:
            self.destinations.server_connected(data)
        except Exception as exc:  # noqa: BLE001 - an unverified connection is never reused
            log.error("upstream connection check failed (%s)", type(exc).__name__)
            data.server.error = "secretless-proxy: the destination check failed"

    def server_connect_error(self, data) -> None:
        self.destinations.server_connect_error(data)

    def _own_listeners(self) -> list[tuple[str, int]]:
        """Every socket this process listens on, as bound (a configured port 0 is the real port here)."""
        admin = [(x.host, x.port) for x in self.admin_listeners if x.port]
        return [*proxy_listeners(), *admin]

    def _upstream_failed(self, flow: http.HTTPFlow, error: str) -> Refusal:
        """A failed upstream connection: the error contract, audited and counted. mitmproxy's text
        (which may name the resolved address) goes to the proxy log only."""
        log.warning("request %s to %s:%d: the upstream connection failed: %s", flow.id, flow.request.host,
                    flow.request.port, error)
        refusal = upstream_refusal(error, host=flow.request.host, rule=flow.metadata.get("secretless.rule"))
        self._unsent(flow)
        self._report_refusal(flow, refusal)
        return refusal

    def _unsent(self, flow: http.HTTPFlow) -> None:
        """A request refused before it went upstream, after its head was decided: its credential was
        not used (no ``credential.used``), and the flow's copy of the request no longer holds it."""
        self._sign_later.pop(flow, None)
        injected = self._injected.pop(flow, None)
        if injected is not None:
            injected.scrub(flow.request)

    # -- response path -----------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            return
        flow.response.headers[REQUEST_ID_HEADER] = flow.id
        injected = self._injected.get(flow)
        if injected is None:
            if flow in self._allowed:
                flow.response.stream = True  # allow rules: nothing to redact, never buffer
            return
        try:
            redaction.redact_message(flow.response, injected.needles)
            # The request has been sent: scrub the copy in the flow so later addons, dumps
            # and saved flows never see the credential.
            injected.scrub(flow.request)
            if injected.echo_check:
                # The echo check needs the whole body: bounded (httplayers withholds past it).
                flow.metadata[SCAN_LIMIT] = self._limits().max_response_scan_bytes
            else:
                flow.response.stream = True  # inject.echo_check: false (APIs that never echo)
        except bodydecode.Undecodable:  # a body already here (in-process callers) that cannot be checked
            flow.response = error_response(flow.id, self._undecodable(flow, injected.rule))
        except Exception as exc:  # noqa: BLE001
            log.error("redaction failed for %s (%s); response withheld", flow.id, type(exc).__name__)
            flow.response = error_response(flow.id, Refusal(502, Reason.INTERNAL_ERROR, "the proxy failed to process the response"))

    def response(self, flow: http.HTTPFlow) -> None:
        # A WebSocket keeps its needles until websocket_end: its messages are redacted too.
        injected = self._injected.get(flow) if flow.websocket else self._injected.pop(flow, None)
        if injected is None or flow.response is None:
            return
        if injected.echo_check and flow.response.status_code == 206:
            # A part of a representation is checked alone: parts at chosen offsets, each shorter than a
            # block of the credential, rebuild it (hostile review 5.12: x-ms-range, answered 206). Range
            # itself is never sent on these rules (_inject); a vendor's own range header may be.
            refusal = Refusal(502, Reason.RESPONSE_TOO_LARGE, "the upstream answered with a part of the response "
                              "(206), which cannot be checked for an echoed credential; it was withheld (ranges "
                              "need inject.echo_check: false)", injected.rule)
            self._report_refusal(flow, refusal)
            flow.response = error_response(flow.id, refusal)
            self._audit_used(flow, injected, flow.response.status_code)
            return
        try:
            redaction.redact_message(flow.response, injected.needles, max_body=self._limits().max_response_scan_bytes)
        except bodydecode.TooLarge:  # a compressed body that inflates past the scan window
            refusal = decoded_too_large(self._limits().max_response_scan_bytes, injected.rule)
            self._report_refusal(flow, refusal)
            flow.response = error_response(flow.id, refusal)
        except bodydecode.Undecodable:  # it cannot be checked, so it is withheld (hostile review 4.11)
            flow.response = error_response(flow.id, self._undecodable(flow, injected.rule))
        except Exception as exc:  # noqa: BLE001
            log.error("redaction failed for %s (%s); response withheld", flow.id, type(exc).__name__)
            flow.response = error_response(flow.id, Refusal(502, Reason.INTERNAL_ERROR, "the proxy failed to process the response"))
        self._audit_used(flow, injected, flow.response.status_code)

    def _undecodable(self, flow: http.HTTPFlow, rule: str) -> Refusal:
        refusal = Refusal(502, Reason.RESPONSE_UNDECODABLE, "the upstream's response body does not decode for "
                          "its Content-Encoding (unknown, stacked or damaged), so it cannot be checked for an "
                          "echoed credential; it was withheld", rule)
        self._report_refusal(flow, refusal)
        return refusal

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            return
        # mitmproxy keeps every message of an open WebSocket (for its UI): only the one judged now is
        # kept, so memory is one message, not the connection's history (hostile review 4.13).
        del flow.websocket.messages[:-1]
        try:  # judged on the trust and rules loaded now (edge/wsjudge.py); a killed flow is closed (edge/layerguard.py)
            st = self._conns.get(flow.client_conn)
            refusal = self._ws_rejudge.refusal(flow, st.proof if st else None, self.runtime)
        except Exception as exc:  # noqa: BLE001 - fail closed
            log.error("re-judging WebSocket %s failed (%s); closed", flow.id, type(exc).__name__)
            refusal = Refusal(502, Reason.INTERNAL_ERROR, "the proxy failed to judge this WebSocket")
        if refusal is not None:
            flow.websocket.messages[-1].drop()
            self._report_refusal(flow, refusal)
            if flow.killable:
                flow.kill()
            return
        injected = self._injected.get(flow)
        if injected is None:
            return
        try:
            redaction.redact_websocket_message(flow.websocket.messages[-1], injected.needles)
        except Exception as exc:  # noqa: BLE001 - fail closed: the message is not relayed
            log.error("redaction failed for a WebSocket message of %s (%s); message dropped", flow.id, type(exc).__name__)
            flow.websocket.messages[-1].drop()

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._injected.pop(flow, None)

    def error(self, flow: http.HTTPFlow) -> None:
        # The request ended without a response: a transport failure on either side (the client's
        # HTTP/2 protocol error too, hostile review 29), so the line does not say which.
        log.warning("request %s to %s:%d ended without a response: %s", flow.id, flow.request.host, flow.request.port,
                    layerguard.clean_message(flow.error.msg) if flow.error else "unknown error")  # never the peer's bytes
        if not flow.metadata.get(SENT):  # ended before its head went upstream: its credential was not used
            self._unsent(flow)
        injected = self._injected.pop(flow, None)
        if injected is not None:
            injected.scrub(flow.request)
            self._audit_used(flow, injected, None)

    def _audit_used(self, flow: http.HTTPFlow, injected: _Injected, status: int | None) -> None:
        self.observer.used(request_id=flow.id, workload=injected.workload, rule=injected.rule,
                           cred=injected.cred, method=flow.request.method, host=flow.request.host,
                           path=clean_path(flow.request.path), status=status,
                           duration=time.time() - injected.started)


def _check_head(req: http.Request, limits: LimitsConfig) -> None:
    """431/413 on the head: a head that arrived in one piece over the limit, a declared body over it."""
    size = len(req.data.method) + len(req.data.path) + len(req.data.authority) + 14
    size += sum(len(k) + len(v) + 4 for k, v in req.data.headers.fields)
    if size > limits.max_request_head_bytes:
        raise Refusal(431, Reason.HEAD_TOO_LARGE,
                      f"the request head is larger than limits.max_request_head_bytes ({limits.max_request_head_bytes} bytes)")
    declared = req.headers.get("content-length", "")
    if declared.strip().isdigit() and int(declared) > limits.max_request_body_bytes:
        raise Refusal(413, Reason.BODY_TOO_LARGE,
                      f"the request body is larger than limits.max_request_body_bytes ({limits.max_request_body_bytes} bytes)")


def _require_identity(st: ConnState, runtime) -> Workload:
    """The connection's workload, judged on ``runtime``'s trust (re-verified after a reload)."""
    try:
        return st.proof.current(runtime.verifier)
    except IdentityError as exc:
        raise Refusal(407, exc.reason, str(exc)) from None
