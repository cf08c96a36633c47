"""The mitmproxy addon: the front door that wires identity → policy → credential → inject.

It contains no policy, identity or injection logic of its own. Every hook catches its own
errors and answers with a refusal: mitmproxy's ``safecall`` would otherwise log the exception
and let the flow continue — past a denial, or without its credential.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from dataclasses import dataclass

from mitmproxy import ctx, exceptions, http, tls
from mitmproxy.connection import Client
from mitmproxy.net.http import url

from . import identity as ident
from . import inject, tlsfiles
from .config import Config, load_config
from .errors import ConfigError, IdentityError, SecretUnavailable
from .identity import IdentityVerifier, Workload, load_trust_bundle
from .matching import normalize_host
from .policy import Decision, Deny, Policy

log = logging.getLogger("secretless")

HOST_MISMATCH = "host_mismatch"
CREDENTIAL_UNAVAILABLE = "credential_unavailable"
INTERNAL = "internal_error"
REQUEST_ID_HEADER = "X-Secretless-Request-Id"


@dataclass(frozen=True, kw_only=True)
class Runtime:
    """Everything derived from one loaded config; swapped as a whole."""

    config: Config
    policy: Policy
    verifier: IdentityVerifier

    @classmethod
    def build(cls, config: Config) -> Runtime:
        roots = load_trust_bundle(config.identity.trust_bundle)
        return cls(config=config, policy=Policy(config.rules),
                   verifier=IdentityVerifier(roots=roots, trust_domains=config.identity.trust_domains))


@dataclass
class ConnState:
    """What one client connection has proven: its identity and, once tunnelled, its target."""

    identity: Workload | IdentityError | None = None
    connect: tuple[str, int] | None = None  # normalised CONNECT authority
    inner_sni: str | None = None  # SNI of the handshake inside the tunnel


@dataclass
class Refusal(Exception):
    status: int
    reason: str
    message: str
    rule: str | None = None


@dataclass(frozen=True, slots=True)
class _Injected:
    """Where a flow carries its credential, to scrub the flow and redact echoes."""

    header: str | None
    query: str | None
    needles: tuple[str, ...]

    def scrub(self, request: http.Request) -> None:
        """Remove the credential from the flow's copy of a request that has been sent."""
        if self.header is not None:
            request.headers[self.header] = "[REDACTED]"
        if self.query is not None:
            request.query.set_all(self.query, ["[REDACTED]"])


class _ShutdownCancellation(logging.Filter):
    """Drop asyncio's report of client tasks cancelled while the proxy shuts down.

    On Python 3.12.1 the stream callback calls ``task.exception()`` on a task that shutdown
    cancelled and logs the CancelledError with a traceback: noise, not an error.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


_SHUTDOWN_FILTER = _ShutdownCancellation()


class Secretless:
    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self._conns: weakref.WeakKeyDictionary[Client, ConnState] = weakref.WeakKeyDictionary()
        # Secret-bearing strings per flow, kept off flow.metadata so saved flows never hold them.
        self._injected: weakref.WeakKeyDictionary[http.HTTPFlow, _Injected] = weakref.WeakKeyDictionary()

    # -- configuration --------------------------------------------------------------------

    def load(self, loader) -> None:
        logging.getLogger("asyncio").addFilter(_SHUTDOWN_FILTER)  # idempotent: same object
        loader.add_option(
            name="secretless_config", typespec=str, default="",
            help="Path of the secretless-proxy YAML config (rules, credentials, identity).",
        )

    def configure(self, updated: set[str]) -> None:
        if "ssl_insecure" in updated and ctx.options.ssl_insecure:
            raise exceptions.OptionsError(
                "ssl_insecure is not allowed with secretless-proxy: credentials must only reach verified upstreams"
            )
        if "secretless_config" not in updated:
            return
        path = ctx.options.secretless_config
        if not path:
            # Not an OptionsError: mitmproxy re-applies the previous (empty) value when a new
            # value fails, and that error would hide the real one. Without a config every
            # request is refused, and running() stops the proxy.
            self.runtime = None
            return
        try:
            config = load_config(path)
            runtime = Runtime.build(config)
            bundle = tlsfiles.upstream_ca_bundle(config)
        except ConfigError as exc:
            raise exceptions.OptionsError(f"secretless_config={path} is invalid:\n{exc}") from None
        except (ValueError, OSError) as exc:
            raise exceptions.OptionsError(f"secretless_config={path}: {exc}") from None
        # The options our security model depends on, set before the config goes live so that
        # plain `mitmdump -s addons/secretless.py` is exactly as strict as `secretless-proxy run`.
        wanted = {
            "request_client_cert": True,
            "connection_strategy": "lazy",  # no upstream connection before a request passed policy
            "ssl_verify_upstream_trusted_ca": str(bundle),
            "confdir": str(tlsfiles.confdir(config)),
        }
        missing = [k for k in wanted if k not in ctx.options]
        if missing:
            raise exceptions.OptionsError(
                f"secretless-proxy needs mitmproxy's proxyserver and tlsconfig addons (missing options: {', '.join(missing)})")
        changes = {k: v for k, v in wanted.items() if getattr(ctx.options, k) != v}
        if changes:
            ctx.options.update(**changes)
        self.runtime = runtime
        log.info("loaded %s (%d rules, %d credentials, sha256 %s)", config.source,
                 len(config.rules), len(config.credentials), config.digest[:12])

    def running(self) -> None:
        if self.runtime is None:
            log.error("no config loaded: pass --set secretless_config=FILE; stopping")
            ctx.master.shutdown()
            return
        ps = ctx.master.addons.get("proxyserver")
        addrs = ps.listen_addrs() if ps is not None else []
        for addr in addrs:
            log.info("secretless-proxy listening on %s:%d", addr[0], addr[1])

    # -- connection hooks -------------------------------------------------------------------

    def tls_established_client(self, data: tls.TlsData) -> None:
        try:
            self._on_client_tls(data.conn)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - must not let a bug erase or fake an identity
            log.exception("identity check failed unexpectedly")
            self._conns[data.conn] = ConnState(identity=IdentityError(ident.INVALID, "identity check failed"))  # type: ignore[index]

    def _on_client_tls(self, client: Client) -> None:
        st = self._conns.setdefault(client, ConnState())
        if st.connect is not None:
            st.inner_sni = client.sni
        if not client.certificate_list:
            # The inner handshake of a proxy-hop (HTTPS_PROXY=https://) connection replaces the
            # certificate list with an empty one; the identity proven on the outer hop stays.
            return
        if isinstance(st.identity, IdentityError):
            return  # a failed proof on this connection is never upgraded by a later handshake
        assert self.runtime is not None
        try:
            found: Workload | IdentityError = self.runtime.verifier.verify(
                [c.to_cryptography() for c in client.certificate_list])
        except IdentityError as exc:
            found = exc
        if isinstance(st.identity, Workload) and isinstance(found, Workload) and found.spiffe_id != st.identity.spiffe_id:
            found = IdentityError(ident.CONFLICT, "two different workload certificates were presented on one connection")
        st.identity = found

    def http_connect(self, flow: http.HTTPFlow) -> None:
        st = self._conns.setdefault(flow.client_conn, ConnState())
        try:
            st.connect = (normalize_host(flow.request.host), flow.request.port)
        except ValueError:
            flow.response = _error_response(flow, Refusal(400, HOST_MISMATCH, "the CONNECT target is not a valid host"))

    # -- request path ----------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        try:
            self._authorize_and_inject(flow)
        except Refusal as refusal:
            self._refuse(flow, refusal)
        except Exception as exc:  # noqa: BLE001 - fail closed on any bug
            # The type only: an exception message might quote a value we must not log.
            log.error("request %s refused after an internal error (%s)", flow.id, type(exc).__name__)
            self._refuse(flow, Refusal(502, INTERNAL, "the proxy failed to process this request"))

    def _authorize_and_inject(self, flow: http.HTTPFlow) -> None:
        runtime = self.runtime
        if runtime is None:
            raise Refusal(503, "not_configured", "the proxy has no configuration loaded")
        st = self._conns.get(flow.client_conn) or ConnState()
        workload = _require_identity(st)
        host, port = self._destination(flow, st)
        req = flow.request
        result = runtime.policy.decide(workload, host=host, port=port, scheme=req.scheme,
                                       method=req.method, path=req.path)
        if isinstance(result, Deny):
            raise Refusal(403, result.reason, _DENY_MESSAGES[result.reason], result.rule)
        assert isinstance(result, Decision)
        rule = result.rule
        flow.metadata["secretless.rule"] = rule.name
        flow.metadata["secretless.workload"] = workload.spiffe_id
        if rule.inject is None:
            return
        cred = runtime.config.credentials[rule.inject.credential]
        try:
            secret = cred.settings.secret.resolve()
        except SecretUnavailable as exc:
            log.warning("credential %s unavailable for rule %s: %s", cred.name, rule.name, exc)
            raise Refusal(502, CREDENTIAL_UNAVAILABLE, "the credential for this rule could not be obtained", rule.name) from None
        needles = inject.apply(req, rule.inject, secret)
        inj = rule.inject
        self._injected[flow] = _Injected(
            header=inj.header or ("Authorization" if inj.basic_password is not None else None),
            query=inj.query, needles=needles)
        flow.metadata["secretless.credential"] = cred.name

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
        except ValueError:
            raise Refusal(403, HOST_MISMATCH, "the Host header, TLS SNI and CONNECT target must name the same destination") from None
        if req.host != host:
            # Connect to exactly the name the policy decided on (``API.Example.com.`` → ``api.example.com``).
            req.host = host
        return host, req.port

    def _refuse(self, flow: http.HTTPFlow, refusal: Refusal) -> None:
        st = self._conns.get(flow.client_conn)
        who = st.identity.spiffe_id if st and isinstance(st.identity, Workload) else "unknown"
        log.info("refused %s %s %s%s for %s: %s", flow.id, flow.request.method,
                 flow.request.pretty_host, flow.request.path.split("?", 1)[0], who, refusal.reason)
        flow.response = _error_response(flow, refusal)

    # -- response path -----------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            return
        flow.response.headers[REQUEST_ID_HEADER] = flow.id
        injected = self._injected.get(flow)
        if injected is None:
            return
        try:
            inject.redact(flow.response, injected.needles)
            # The request has been sent: scrub the copy in the flow so later addons, dumps
            # and saved flows never see the credential.
            injected.scrub(flow.request)
        except Exception as exc:  # noqa: BLE001
            log.error("redaction failed for %s (%s); response withheld", flow.id, type(exc).__name__)
            flow.response = _error_response(flow, Refusal(502, INTERNAL, "the proxy failed to process the response"))

    def response(self, flow: http.HTTPFlow) -> None:
        injected = self._injected.pop(flow, None)
        if injected is None or flow.response is None:
            return
        try:
            inject.redact(flow.response, injected.needles)
        except Exception as exc:  # noqa: BLE001
            log.error("redaction failed for %s (%s); response withheld", flow.id, type(exc).__name__)
            flow.response = _error_response(flow, Refusal(502, INTERNAL, "the proxy failed to process the response"))

    def error(self, flow: http.HTTPFlow) -> None:
        injected = self._injected.pop(flow, None)
        if injected is not None:
            injected.scrub(flow.request)


_DENY_MESSAGES = {
    "no_rule": "no rule allows this workload to reach this destination",
    "method": "the rule for this destination does not allow this method",
    "path": "the rule for this destination does not allow this path",
    "plaintext_upstream": "the rule does not allow sending its credential over plaintext HTTP",
}


def _require_identity(st: ConnState) -> Workload:
    if st.identity is None:
        raise Refusal(407, ident.MISSING, "no client certificate was presented; present your workload certificate")
    if isinstance(st.identity, IdentityError):
        raise Refusal(407, st.identity.reason, str(st.identity))
    if st.identity.not_after < time.time():
        raise Refusal(407, ident.EXPIRED, "the client certificate has expired")
    return st.identity


def _error_response(flow: http.HTTPFlow, refusal: Refusal) -> http.Response:
    body = json.dumps({"error": refusal.message, "reason": refusal.reason,
                       "rule": refusal.rule, "request_id": flow.id}).encode()
    return http.Response.make(refusal.status, body, {
        "Content-Type": "application/json", REQUEST_ID_HEADER: flow.id, "Cache-Control": "no-store",
    })
