"""The admin API (``admin.api_listen``): grants and the credential inventory, over mTLS.

Endpoints, JSON in and out (``{"error": sentence, "reason": code}`` on every refusal):

- ``POST /v1/grants`` ``{workload, rule, ttl_seconds, reason?, break_glass?}`` → 201, the grant
- ``GET /v1/grants`` → ``{"grants": [...]}``: active and revoked-but-unexpired, each with ``state``
- ``GET /v1/grants/{id}`` → the grant; ``DELETE /v1/grants/{id}[?reason=TEXT]`` → 200, the grant
  as revoked (``revoke_reason`` is TEXT, default ``manual``); 404 unknown or expired
- ``GET /v1/credentials`` → ``{"credentials": [...]}``: every definition with kind, owner,
  lifetime (``long-lived`` static key or ``brokered``), what this process has cached (scope,
  expiry, last use) and the rules that inject it. Never a value, not even a secret reference.

**Who may call.** The listener asks every client for a certificate but finishes the handshake
without one, or with one it cannot verify: verification is ours, exactly as on the proxy port
(``identity.py``: chain to the workload trust bundle, validity, X509-SVID leaf, trust domain),
so a refused caller gets an answer saying why (401 with the identity reason) instead of a bare
TLS alert. A verified workload that no ``admin.workloads`` pattern matches gets 403
``not_admin``. Every refusal is an ``admin.denied`` audit event.

**Why pyOpenSSL over memory BIOs, not ``ssl``.** Python's ``ssl`` has no verify callback: with
``CERT_OPTIONAL`` OpenSSL itself aborts the handshake on a certificate it cannot verify, and
``getpeercert()`` returns the leaf only (``get_verified_chain`` needs 3.13). mitmproxy's own TLS
layer works the same way as this one: a pyOpenSSL ``Connection`` over memory BIOs, a callback
that accepts, verification left to the caller; intermediates the client sends are used. The
client still proves possession of its key (CertificateVerify). Sessions are never resumed:
every connection presents its certificate again.

**HTTP** is ``adminhttp``'s, as for ``admin.py``: HTTP/1.x on h11, one request per connection, a
head of at most 8 KiB and a ``Content-Length`` body of at most 16 KiB, all read (with the TLS
handshake) within 5 s, else the connection closes unanswered; at most 64 connections. A POST
must say ``Content-Type: application/json``: a browser holding an admin certificate cannot send
that cross-origin without a CORS preflight, which this API never grants.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import SSL

from secretless_proxy.admin.exchange import (
    READ_TIMEOUT,
    WRITE_TIMEOUT,
    Exchange,
    Listener,
    Request,
    Response,
    json_doc,
    refused_json,
)
from secretless_proxy.audit import AuditLog, clean_path, rfc3339
from secretless_proxy.broker import CachedInfo
from secretless_proxy.config.model import Config, Rule
from secretless_proxy.dev.certs import Issued, make_server_cert
from secretless_proxy.errors import IdentityError
from secretless_proxy.grants import Grant, check_text, new_grant, valid_grant_id
from secretless_proxy.identity import IdentityVerifier, Workload
from secretless_proxy.matching import WorkloadPattern, split_spiffe_id
from secretless_proxy.metrics import Metrics
from secretless_proxy.reasons import Reason
from secretless_proxy.refusal import Refusal
from secretless_proxy.store.base import Store, StoreError

log = logging.getLogger("secretless.adminapi")

MAX_BODY = 16384
MAX_RECORD = 2**14 + 256  # RFC 8446 §5.2: the longest TLS record a peer may send
LONG_LIVED_KINDS = frozenset({"static"})  # injected as stored; every other kind is minted per lifetime
# Identity refusals: 401 here, where the proxy port says 407. This is an origin server, not a
# proxy (RFC 9110 §15.5.2, §15.5.8); the reason codes are the same closed set on both.
IDENTITY_STATUS = 401
_GRANT_FIELDS = ("workload", "rule", "ttl_seconds", "reason", "break_glass")


class AdminApi:
    """The routes of the admin API; no sockets. ``caller`` is an already verified admin."""

    def __init__(self, *, store: Store, config: Callable[[], Config], snapshot: Callable[[], list[CachedInfo]],
                 audit: Callable[[], AuditLog], metrics: Metrics, now: Callable[[], float] = time.time,
                 last_used: Callable[[], Mapping[str, float]] = dict) -> None:
        self.store = store
        self.config = config
        self.snapshot = snapshot
        self.last_used = last_used  # credential name → last injection, static keys included
        self.audit = audit
        self.metrics = metrics
        self.now = now
        metrics.track_grants()

    async def handle(self, method: str, path: str, body: bytes, caller: Workload) -> Response:
        """Answer one request; never raises."""
        try:
            return await self._route(method, path, body, caller)
        except Refusal as exc:
            return refused_json(exc)
        except StoreError as exc:
            return refused_json(Refusal(503, Reason.STORE_UNAVAILABLE, str(exc)))
        except Exception as exc:  # noqa: BLE001 - a bug answers 500, it never takes the listener down
            log.error("admin API %s %s failed (%s)", method, clean_path(path), type(exc).__name__)
            return refused_json(Refusal(500, Reason.INTERNAL_ERROR, "the admin API failed to answer; see the proxy log"))

    async def _route(self, method: str, target: str, body: bytes, caller: Workload) -> Response:
        path, _, query = target.partition("?")
        if path == "/v1/grants":
            _allow(method, "GET", "POST")
            _params(query)
            return await (self._list() if method == "GET" else self._create(body, caller))
        if path.startswith("/v1/grants/"):
            _allow(method, "GET", "DELETE")
            grant_id = path.removeprefix("/v1/grants/")
            if method == "GET":
                _params(query)
                return json_doc(200, _grant_doc(await self._existing(grant_id), self.now()))
            return await self._revoke(grant_id, _params(query, "reason").get("reason"), caller)
        if path == "/v1/credentials":
            _allow(method, "GET")
            _params(query)
            return json_doc(200, {"credentials": self._inventory()})
        raise Refusal(404, Reason.NOT_FOUND, "no such endpoint (known: /v1/grants, /v1/grants/{id}, /v1/credentials)")

    # -- grants --------------------------------------------------------------------------------

    async def _list(self) -> Response:
        now = self.now()
        return json_doc(200, {"grants": [_grant_doc(g, now) for g in await self.store.list_grants()]})

    async def _create(self, body: bytes, caller: Workload) -> Response:
        data = _json_object(body)
        unknown = sorted(set(data) - set(_GRANT_FIELDS))
        if unknown:
            raise Refusal(400, Reason.INVALID_REQUEST, f"unknown field '{unknown[0]}' (known: {', '.join(_GRANT_FIELDS)})")
        for name in ("workload", "rule", "ttl_seconds"):
            if name not in data:
                raise Refusal(400, Reason.INVALID_REQUEST, f"missing required field '{name}'")
        rule = self._grantable_rule(data["rule"])
        workload = _workload(data["workload"], rule)
        glass = data.get("break_glass", False)
        reason = data.get("reason", "")
        if not isinstance(glass, bool):
            raise Refusal(400, Reason.INVALID_REQUEST, "break_glass must be true or false")
        if not isinstance(reason, str):
            raise Refusal(400, Reason.INVALID_REQUEST, "reason must be a string")
        if glass and not rule.break_glass:
            raise Refusal(400, Reason.BREAK_GLASS_NOT_PERMITTED, f"rule '{rule.name}' does not permit break-glass "
                                                             "grants (it would need break_glass: true)")
        if glass and not reason.strip():
            raise Refusal(400, Reason.REASON_REQUIRED, "a break-glass grant needs a reason: say why the emergency "
                                                   "access is needed")
        try:
            grant = new_grant(workload=workload, rule=rule.name, ttl=data["ttl_seconds"], reason=reason,
                              issued_by=caller.spiffe_id, break_glass=glass, now=self.now)
        except ValueError as exc:
            raise Refusal(400, Reason.INVALID_GRANT, str(exc)) from None
        if not await self.store.put_grant(grant):
            raise Refusal(409, Reason.GRANT_CONFLICT, "the store refused the new grant (its id is revoked or it "
                                                  "expired already); try again")
        audit = self.audit()
        if not _audited(audit, "grant.created", grant, grant.reason, issued_by=grant.issued_by) and audit.fail_closed:
            # An emergency grant nobody can trace must not exist: take it back.
            await self.store.revoke_grant(grant.id, reason="audit_unavailable")
            raise Refusal(503, Reason.AUDIT_UNAVAILABLE, "the audit log could not record the grant, so it was not "
                                                     "issued; fix the audit sink and try again")
        self.metrics.grant_created(break_glass=glass)
        log.info("grant %s issued by %s: %s may use rule '%s'%s", grant.id, grant.issued_by, grant.workload,
                 grant.rule, " (break-glass)" if glass else "")
        return json_doc(201, _grant_doc(grant, self.now()))

    async def _revoke(self, grant_id: str, reason: str | None, caller: Workload) -> Response:
        reason = reason if reason else "manual"
        try:
            check_text("reason", reason, required=True)
        except ValueError as exc:
            raise Refusal(400, Reason.INVALID_REQUEST, str(exc)) from None
        grant = await self._existing(grant_id)
        if grant.revoked:  # idempotent: the first revocation stands and was audited then
            return json_doc(200, _grant_doc(grant, self.now()))
        revoked = await self.store.revoke_grant(grant_id, reason=reason)
        if revoked is None:
            raise _not_found(grant_id)  # expired between the two calls
        if not _audited(self.audit(), "grant.revoked", revoked, reason, revoked_by=caller.spiffe_id):
            log.error("grant %s was revoked but the audit log could not record it", grant_id)
        self.metrics.grant_revoked(reason="manual")
        log.info("grant %s revoked by %s", grant_id, caller.spiffe_id)
        return json_doc(200, _grant_doc(revoked, self.now()))

    async def _existing(self, grant_id: str) -> Grant:
        grant = await self.store.get_grant(grant_id) if valid_grant_id(grant_id) else None
        if grant is None:
            raise _not_found(grant_id)
        return grant

    def _grantable_rule(self, name: Any) -> Rule:
        if not isinstance(name, str):
            raise Refusal(400, Reason.INVALID_REQUEST, "rule must be a rule name (a string)")
        rules = self.config().rules
        rule = next((r for r in rules if r.name == name), None)
        grantable = ", ".join(r.name for r in rules if r.requires_grant) or "none"
        if rule is None:
            raise Refusal(400, Reason.UNKNOWN_RULE, f"unknown rule {name!r} (rules that take grants: {grantable})")
        if not rule.requires_grant:
            raise Refusal(400, Reason.RULE_NOT_GRANTABLE, f"rule '{name}' does not say requires_grant: true, so it "
                                                      f"applies without a grant (rules that take grants: {grantable})")
        return rule

    # -- inventory -----------------------------------------------------------------------------

    def _inventory(self) -> list[dict[str, Any]]:
        cfg = self.config()
        cached: dict[str, list[CachedInfo]] = {}
        for info in self.snapshot():
            cached.setdefault(info.name, []).append(info)
        used = self.last_used()
        out = []
        for name, cred in sorted(cfg.credentials.items()):
            entries = cached.get(name, [])
            last = max([e.last_used for e in entries] + ([used[name]] if name in used else []), default=None)
            expiries = [e.expires_at for e in entries if e.expires_at is not None]
            out.append({
                "name": name, "kind": cred.kind, "owner": cred.owner,
                "lifetime": "long-lived" if cred.kind in LONG_LIVED_KINDS else "brokered",
                "expires_at": min(expiries, default=None),  # the soonest, as the expiry gauge shows it
                "last_used": last,
                "cached": [{"scope": e.scope, "issued_at": e.issued_at, "expires_at": e.expires_at,
                            "last_used": e.last_used} for e in entries],
                "rules": [r.name for r in cfg.rules if r.inject is not None and r.inject.credential == name],
            })
        return out


class AdminApiServer(Listener):
    """The admin API's TLS listener; ``server.AdminListeners`` starts and closes it with the process."""

    name = "admin_api"
    log = log
    quiet = (ConnectionError, TimeoutError, SSL.Error)  # SSL.Error: the client does not speak TLS
    peek_size = 5 + MAX_RECORD  # a whole first record, however long a ClientHello may be

    def __init__(self, host: str, port: int, *, api: AdminApi, verifier: Callable[[], IdentityVerifier],
                 admins: Callable[[], tuple[WorkloadPattern, ...]], server_cert: Issued) -> None:
        super().__init__(host, port)
        self.api = api
        self.verifier = verifier
        self.admins = admins
        self._tls = _server_context(server_cert)

    def complete_request(self, data: bytes) -> bool:
        # What a client sends first is its ClientHello, often in more than one segment: a handshake
        # record (RFC 8446 §5.1: type 22, legacy version 3.x, a 2-byte length). Only the whole first
        # record counts, never its header alone: five bytes and silence made a connection look busy,
        # so it was never evicted and a few addresses filled the caps (hostile review 34). A record
        # declaring more than a record may hold is no ClientHello: it will never be complete.
        if len(data) < 5 or data[0] != 0x16 or data[1] != 0x03:
            return False
        length = int.from_bytes(data[3:5], "big")
        return 0 < length <= MAX_RECORD and len(data) >= 5 + length

    def listening(self, host: str, port: int) -> None:
        log.info("admin API on https://%s:%d (/v1/grants /v1/credentials; mTLS, admin.workloads only)", host, port)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    task: asyncio.Task[None]) -> None:
        tls = _TlsStream(SSL.Connection(self._tls, None), reader, writer)
        exchange = Exchange(tls.recv, max_body=MAX_BODY, single=(b"content-type",))
        request: Request | None = None
        response: Response | None = None
        async with asyncio.timeout(READ_TIMEOUT):  # expiry: closed unanswered, like a stalled handshake
            await tls.handshake()
            caller, refusal = self._identify(tls.conn)
            try:
                request = await exchange.read()
            except Refusal as exc:
                response = refused_json(exc)
            self.request_read(task)
        if refusal is not None:  # answered before anything else: no hints for strangers
            response = refused_json(refusal)
            self._denied(refusal, caller, request)
        elif request is not None:
            assert caller is not None
            response = await self._answer(request, caller)
        assert response is not None
        async with asyncio.timeout(WRITE_TIMEOUT):
            await tls.send(exchange.render(response))
            await tls.close()

    def _identify(self, conn: SSL.Connection) -> tuple[Workload | None, Refusal | None]:
        """The verified caller on this connection, and the refusal to send unless it is an admin."""
        try:
            # On the server side OpenSSL's peer chain may or may not include the leaf: put it first once.
            leaf = conn.get_peer_certificate(as_cryptography=True)
            chain = [] if leaf is None else [leaf, *(c for c in conn.get_peer_cert_chain(as_cryptography=True) or []
                                                     if c != leaf)]
        except Exception as exc:  # noqa: BLE001 - a certificate cryptography cannot even load
            return None, Refusal(IDENTITY_STATUS, Reason.IDENTITY_INVALID, f"the client certificate is malformed ({type(exc).__name__})")
        if not chain:
            return None, Refusal(IDENTITY_STATUS, Reason.IDENTITY_MISSING, "no client certificate was presented; the admin API needs "
                                                           "an admin's X509-SVID (secretless-proxy --cert/--key)")
        try:
            # The same verifier as the proxy port: the leaf's own trust domain's bundle, strict IDs.
            workload = self.verifier().verify(chain)
        except IdentityError as exc:
            return None, Refusal(IDENTITY_STATUS, exc.reason, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug in verification: refuse, never let through
            log.error("admin API cannot verify identities (%s)", type(exc).__name__)
            return None, Refusal(503, Reason.NOT_CONFIGURED, "the admin API cannot verify identities right now; see the "
                                                        "proxy log")
        admin = any(p.matches(workload.trust_domain, workload.path) for p in self.admins())
        if not admin:
            return workload, Refusal(403, Reason.NOT_ADMIN, f"workload {workload.spiffe_id} is not listed under "
                                                       "admin.workloads")
        return workload, None

    async def _answer(self, request: Request, caller: Workload) -> Response:
        if request.method == "POST":
            ctype = request.header(b"content-type").split(b";", 1)[0].strip().lower()
            if ctype != b"application/json":
                return refused_json(Refusal(415, Reason.UNSUPPORTED_MEDIA_TYPE, "send the request body as application/json"))
        return await self.api.handle(request.method, request.target, request.body, caller)

    def _denied(self, refusal: Refusal, caller: Workload | None, request: Request | None) -> None:
        """``admin.denied``: ``workload`` is a verified caller refused anyway (not_admin)."""
        try:
            self.api.audit().emit("admin.denied", workload=caller.spiffe_id if caller else None, reason=refusal.reason,
                                  error=refusal.message, method=request.method if request else None,
                                  path=clean_path(request.target) if request else None)
        except Exception as exc:  # noqa: BLE001 - auditing a refusal must not turn it into a crash
            log.error("auditing an admin API refusal failed (%s)", type(exc).__name__)


def api_server_cert(confdir: Path, hosts: tuple[str, ...], *, ttl: dt.timedelta = dt.timedelta(days=365)) -> Issued:
    """The API's server certificate, issued by the interception CA in ``confdir``.

    Clients that already trust ``<confdir>/mitmproxy-ca-cert.pem`` trust the API. ``hosts`` are
    the names clients connect to; wildcard addresses (``0.0.0.0``, ``::``) are dropped, and with
    none left the certificate names ``localhost``, ``127.0.0.1`` and ``::1``. Never outlives the CA.
    """
    path = Path(confdir) / "mitmproxy-ca.pem"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"the interception CA {path} cannot be read ({exc.strerror or type(exc).__name__}); "
                         "mitmproxy creates it at start") from None
    try:
        cert = x509.load_pem_x509_certificate(data)
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{path} must hold the interception CA's PEM certificate and unencrypted key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) or key.public_key() != cert.public_key():
        raise ValueError(f"{path}: the private key does not match the CA certificate")
    names = tuple(dict.fromkeys(h.strip("[]") for h in hosts if h.strip("[]") not in ("", "0.0.0.0", "::")))
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    if left <= dt.timedelta(0):
        raise ValueError(f"the interception CA in {path} has expired; replace it (clients must trust the new one)")
    return make_server_cert(ca=Issued(cert=cert, key=key), hosts=names or ("localhost", "127.0.0.1", "::1"),
                            ttl=min(ttl, left))


# -- TLS and HTTP ------------------------------------------------------------------------------

def _server_context(cert: Issued) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.use_certificate(cert.cert)
    ctx.use_privatekey(cert.key)
    ctx.check_privatekey()
    # Ask for a certificate, accept whatever comes (or nothing): _identify decides, with reasons.
    ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: True)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_options(SSL.OP_NO_TICKET)
    return ctx


class _TlsStream:
    """One server-side TLS connection: pyOpenSSL over memory BIOs, bytes through asyncio streams."""

    def __init__(self, conn: SSL.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conn = conn
        self.reader = reader
        self.writer = writer
        conn.set_accept_state()

    async def handshake(self) -> None:
        while True:
            try:
                self.conn.do_handshake()
            except SSL.WantReadError:
                await self._flush()
                await self._feed()
                continue
            await self._flush()
            return

    async def recv(self) -> bytes:
        """Decrypted bytes; b"" when the peer closed the TLS session."""
        while True:
            try:
                return self.conn.recv(65536)
            except SSL.WantReadError:
                await self._flush()
                if not await self._feed(eof_ok=True):
                    return b""
            except SSL.ZeroReturnError:
                return b""

    async def send(self, data: bytes) -> None:
        self.conn.sendall(data)
        await self._flush()

    async def close(self) -> None:
        try:
            self.conn.shutdown()
        except SSL.Error:
            return
        await self._flush()

    async def _feed(self, *, eof_ok: bool = False) -> bool:
        data = await self.reader.read(65536)
        if not data:
            if eof_ok:
                return False
            raise ConnectionResetError("the client closed the connection")
        self.conn.bio_write(data)
        return True

    async def _flush(self) -> None:
        out = bytearray()
        while True:
            try:
                out += self.conn.bio_read(65536)
            except SSL.WantReadError:
                break
        if out:
            self.writer.write(bytes(out))
            await self.writer.drain()


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise Refusal(405, Reason.METHOD_NOT_ALLOWED, f"{method} is not allowed here (allowed: {', '.join(allowed)})",
                      allow=allowed)


def _params(query: str, *known: str) -> dict[str, str]:
    """The query parameters, each at most once and each one of ``known``."""
    try:
        parsed = parse_qs(query, keep_blank_values=True, strict_parsing=False, max_num_fields=8,
                          errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise Refusal(400, Reason.INVALID_REQUEST, "malformed query string") from None
    for name, values in parsed.items():
        if name not in known:
            raise Refusal(400, Reason.INVALID_REQUEST, f"unknown query parameter {name!r}"
                                                   + (f" (known: {', '.join(known)})" if known else ""))
        if len(values) > 1:
            raise Refusal(400, Reason.INVALID_REQUEST, f"query parameter {name!r} given twice")
    return {name: values[0] for name, values in parsed.items()}


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Refusal(400, Reason.INVALID_JSON, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Refusal(400, Reason.INVALID_JSON, "the request body must be a JSON object")
    return data


def _workload(value: Any, rule: Rule) -> str:
    """The exact SPIFFE ID a grant may name for ``rule``, or _Refusal."""
    if not isinstance(value, str) or "*" in value:
        raise Refusal(400, Reason.INVALID_REQUEST, f"workload must be one exact SPIFFE ID, not a pattern, got {value!r}")
    try:
        td, path = split_spiffe_id(value)
    except ValueError as exc:
        raise Refusal(400, Reason.INVALID_REQUEST, str(exc)) from None
    if not any(p.matches(td, path) for p in rule.workloads):
        patterns = ", ".join(p.text for p in rule.workloads)
        raise Refusal(400, Reason.WORKLOAD_NOT_COVERED, f"rule '{rule.name}' does not cover workload {value} "
                                                    f"(its workloads: {patterns}); a grant cannot widen a rule")
    return value


def _not_found(grant_id: str) -> Refusal:
    shown = f" {grant_id}" if valid_grant_id(grant_id) else ""
    return Refusal(404, Reason.GRANT_NOT_FOUND, f"no grant{shown}: unknown, expired or not a grant id")


def _audited(audit: AuditLog, event: str, grant: Grant, reason: str, **who: str) -> bool:
    """``grant.created`` / ``grant.revoked``; whether every sink took it."""
    return audit.emit(event, grant_id=grant.id, workload=grant.workload, rule=grant.rule,
                      expires_at=rfc3339(grant.expires_at), reason=reason, **who, break_glass=grant.break_glass)


def _grant_doc(grant: Grant, now: float) -> dict[str, Any]:
    doc = dataclasses.asdict(grant)
    doc["state"] = "revoked" if grant.revoked else "active" if now < grant.expires_at else "expired"
    return doc
