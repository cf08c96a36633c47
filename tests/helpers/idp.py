"""A real OAuth2 authorization server on loopback HTTPS, strict enough to prove the providers right.

Endpoints:

- ``POST /token``: ``client_credentials`` (RFC 6749 §4.4) and token exchange (RFC 8693).
  Clients authenticate with ``client_secret_basic`` (RFC 6749 §2.3.1, form-urlencoded parts),
  ``client_secret_post``, or ``private_key_jwt`` (RFC 7523: signature checked against a JWKS,
  iss = sub = client_id, aud = the URL called, exp in the future, jti never seen before). Token
  exchange subject tokens are JWTs checked against the same JWKS; their claims are recorded.
- ``POST /revoke``: RFC 7009, same client authentication; revoked tokens are recorded.
- ``GET /.well-known/jwks.json``: serves ``published_jwks`` (to test fetching a JWKS by URL).

Anything wrong gets the RFC 6749 §5.2 error (400/401) and a reason in ``rejections``. Failure
modes (``mode``) make it misbehave on purpose: ``invalid_client`` (401), ``server_error`` (500),
``malformed`` (200, not JSON), ``empty`` (200, no body), ``hang`` (answers after
``hang_seconds``), ``no_expires_in``, ``no_access_token`` (200 JSON without one). Every error body carries ``BODY_MARKER`` so tests can
prove it never reaches an error message.
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import ssl
import threading
import traceback
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import jwt

from helpers.net import FakeHttps, QuietHandler
from secretless_proxy.dev.certs import Issued
from secretless_proxy.dev.echoserver import TlsHttpServer

__all__ = ["BODY_MARKER", "IdP", "Received", "mint_token", "token_scope"]

BODY_MARKER = "idp-private-detail-7f3a9c"
GRANT_CC = "client_credentials"
GRANT_TX = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MODES = (None, "invalid_client", "server_error", "malformed", "empty", "hang", "no_expires_in",
         "no_access_token")
# RFC 8693/8707: the only parameters that may repeat (RFC 6749 §3.2: others must not).
_REPEATABLE = frozenset({"audience", "resource"})


@dataclass(frozen=True)
class Received:
    """One request as it arrived."""

    method: str
    path: str
    form: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names

    def one(self, name: str) -> str | None:
        values = self.form.get(name)
        return values[0] if values else None


class _Reject(Exception):
    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason = status, error, reason


class IdP(FakeHttps):
    """Context manager running the server; configure it (and read what it saw) from the test."""

    thread_name = "test-idp"

    def __init__(self, *, server_cert: Issued, clients: dict[str, str | None] | None = None,
                 jwks: dict[str, Any] | str | None = None, jwks_ca: str | None = None,
                 expires_in: Any = 3600, allow_public: bool = False) -> None:
        self.clients = dict(clients or {})  # client_id -> secret; None: authenticates with private_key_jwt
        self.jwks = jwks  # a JWK Set, or a URL to fetch it from (trusting jwks_ca)
        self.jwks_ca = jwks_ca
        self.expires_in = expires_in  # sent as is; None: omitted
        self.token_type = "Bearer"
        self.allow_public = allow_public  # token exchange without client authentication
        self.subject_audience: str | None = None  # expected subject token aud; None: token_url
        self.assertion_audience: str | None = None  # expected client assertion aud; None: URL called
        self.mode: str | None = None
        self.revoke_mode: str | None = None  # None, "server_error" or "hang" (answers after hang_seconds)
        self.hang_seconds = 5.0
        self.published_jwks: dict[str, Any] | None = None
        self.requests: list[Received] = []
        self.calls: Counter[str] = Counter()  # per grant_type, and "revoke"
        self.issued: dict[str, dict[str, Any]] = {}  # token -> what it was issued for
        self.subjects: list[dict[str, Any]] = []  # verified subject token claims
        self.revoked: list[tuple[str, str | None]] = []  # (token, token_type_hint)
        self.rejections: list[str] = []
        self.errors: list[str] = []  # handler crashes: a test fixture asserts there are none
        self._seen_jti: set[str] = set()
        self._lock = threading.Lock()
        super().__init__(server_cert)

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def revoke_url(self) -> str:
        return self.url + "/revoke"

    @property
    def jwks_url(self) -> str:
        return self.url + "/.well-known/jwks.json"

    def make_server(self, ctx: ssl.SSLContext) -> _Server:
        return _Server(self, ctx)

    # -- request handling (runs in the server's threads) --

    def handle(self, h: _Handler) -> tuple[int, dict[str, str], bytes]:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        path = h.path.partition("?")[0]
        form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True) if h.command == "POST" else {}
        rec = Received(h.command, path, form, {k.lower(): v for k, v in h.headers.items()})
        with self._lock:
            self.requests.append(rec)
        if h.command == "GET" and path == "/.well-known/jwks.json" and self.published_jwks is not None:
            return _json(200, self.published_jwks)
        try:
            if h.command != "POST" or path not in ("/token", "/revoke"):
                raise _Reject(404, "invalid_request", f"no endpoint {h.command} {path}")
            ctype = rec.headers.get("content-type", "").split(";")[0].strip()
            if ctype != "application/x-www-form-urlencoded":
                raise _Reject(400, "invalid_request", f"content type {ctype!r}")
            if dup := [k for k, v in form.items() if len(v) > 1 and k not in _REPEATABLE]:
                raise _Reject(400, "invalid_request", f"repeated parameters {dup}")
            return self._revoke(rec) if path == "/revoke" else self._token(rec)
        except _Reject as r:
            with self._lock:
                self.rejections.append(r.reason)
            headers = {"WWW-Authenticate": 'Basic realm="idp"'} if r.status == 401 else {}
            status, hdrs, body = _json(r.status, {"error": r.error, "error_description": f"{r.reason} {BODY_MARKER}"})
            return status, {**hdrs, **headers}, body

    def _token(self, rec: Received) -> tuple[int, dict[str, str], bytes]:
        grant = rec.one("grant_type") or ""
        with self._lock:
            self.calls[grant] += 1
        mode = self.mode
        if mode == "hang" and self._stop.wait(self.hang_seconds):
            return 0, {}, b""  # shutting down: drop the connection
        if failure := _failure(mode):
            return failure
        client_id = self._authenticate(rec, self.token_url, public_ok=self.allow_public and grant == GRANT_TX)
        issued: dict[str, Any] = {"grant": grant, "client_id": client_id, "scope": rec.one("scope"),
                                  "audience": rec.form.get("audience", []), "resource": rec.form.get("resource", [])}
        body: dict[str, Any] = {}
        if grant == GRANT_CC:
            pass
        elif grant == GRANT_TX:
            if rec.one("subject_token_type") != JWT_TYPE:
                raise _Reject(400, "invalid_request", "subject_token_type is not the JWT type")
            claims = self._verify(rec.one("subject_token") or "", audience=self.subject_audience or self.token_url,
                                  what="subject token", require=("sub", "exp", "iat", "iss", "aud"))
            if claims["exp"] - claims["iat"] > 300:
                raise _Reject(400, "invalid_grant", "subject token lives longer than 5 minutes")
            with self._lock:
                self.subjects.append(claims)
            issued["sub"] = claims["sub"]
            body["issued_token_type"] = rec.one("requested_token_type") or ACCESS_TOKEN_TYPE
        else:
            raise _Reject(400, "unsupported_grant_type", f"grant {grant!r}")
        token = mint_token(issued["scope"])
        with self._lock:
            self.issued[token] = issued
        body.update({"access_token": token, "token_type": self.token_type})
        if self.expires_in is not None and mode != "no_expires_in":
            body["expires_in"] = self.expires_in
        if issued["scope"] is not None:
            body["scope"] = issued["scope"]
        return _json(200, body)

    def _revoke(self, rec: Received) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.calls["revoke"] += 1
        if self.revoke_mode == "server_error":
            return 503, {"Content-Type": "text/plain"}, f"busy {BODY_MARKER}".encode()
        if self.revoke_mode == "hang" and self._stop.wait(self.hang_seconds):
            return 0, {}, b""  # shutting down: drop the connection
        self._authenticate(rec, self.revoke_url, public_ok=False)
        token = rec.one("token")
        if not token:
            raise _Reject(400, "invalid_request", "no token to revoke")
        with self._lock:
            self.revoked.append((token, rec.one("token_type_hint")))
        return 200, {"Content-Length": "0"}, b""

    def _authenticate(self, rec: Received, url: str, *, public_ok: bool) -> str | None:
        """The authenticated client_id; exactly one method allowed (RFC 6749 §2.3)."""
        authz = rec.headers.get("authorization", "")
        methods = [m for m, present in (("basic", authz.startswith("Basic ")),
                                         ("post", "client_secret" in rec.form),
                                         ("jwt", "client_assertion" in rec.form)) if present]
        form_id = rec.one("client_id")
        if len(methods) > 1:
            raise _Reject(400, "invalid_request", f"more than one client authentication method: {methods}")
        if not methods:
            if public_ok:
                return form_id
            raise _Reject(401, "invalid_client", "no client authentication")
        if methods[0] == "jwt":
            if rec.one("client_assertion_type") != ASSERTION_TYPE:
                raise _Reject(400, "invalid_request", "wrong client_assertion_type")
            claims = self._verify(rec.one("client_assertion") or "", audience=self.assertion_audience or url,
                                  what="client assertion", require=("iss", "sub", "aud", "exp", "jti"))
            if claims["iss"] != claims["sub"]:
                raise _Reject(401, "invalid_client", "assertion iss != sub")
            client_id = claims["sub"]
            if client_id not in self.clients or self.clients[client_id] is not None:
                raise _Reject(401, "invalid_client", f"{client_id!r} is not a key-authenticated client")
            with self._lock:
                if claims["jti"] in self._seen_jti:
                    raise _Reject(401, "invalid_client", "assertion jti replayed")
                self._seen_jti.add(claims["jti"])
        else:
            if methods[0] == "basic":
                try:
                    decoded = base64.b64decode(authz[6:], validate=True).decode()
                except ValueError as exc:
                    raise _Reject(401, "invalid_client", "bad Basic credentials") from exc
                user, sep, password = decoded.partition(":")
                if not sep:
                    raise _Reject(401, "invalid_client", "Basic credentials without ':'")
                # RFC 6749 §2.3.1: both parts are application/x-www-form-urlencoded.
                client_id, secret = unquote_plus(user), unquote_plus(password)
            else:
                client_id, secret = form_id or "", rec.one("client_secret") or ""
            expected = self.clients.get(client_id)
            if expected is None or not hmac.compare_digest(expected.encode(), secret.encode()):
                raise _Reject(401, "invalid_client", f"wrong secret for {client_id!r}")
        if form_id is not None and form_id != client_id:
            raise _Reject(400, "invalid_request", "client_id does not match the authenticated client")
        return client_id

    def _verify(self, token: str, *, audience: str, what: str, require: tuple[str, ...]) -> dict[str, Any]:
        try:
            kid = str(jwt.get_unverified_header(token).get("kid"))
            key = jwt.PyJWKSet.from_dict(self._jwks())[kid]
            return jwt.decode(token, key, algorithms=["ES256", "RS256"], audience=audience,
                              options={"require": list(require)})
        except (jwt.PyJWTError, KeyError) as exc:
            raise _Reject(401 if what == "client assertion" else 400,
                          "invalid_client" if what == "client assertion" else "invalid_grant",
                          f"{what} rejected: {type(exc).__name__}: {exc}") from exc

    def _jwks(self) -> dict[str, Any]:
        if isinstance(self.jwks, dict):
            return self.jwks
        if isinstance(self.jwks, str):
            ctx = ssl.create_default_context(cafile=self.jwks_ca)
            with urllib.request.urlopen(self.jwks, context=ctx, timeout=5) as resp:
                return json.load(resp)
        raise KeyError("no JWKS configured")


def mint_token(scope: str | None) -> str:
    """``at-<random>``, or ``at-<random>.<base64url(scope)>`` when a scope was requested: whoever
    receives the token (the echo upstream) can tell which scope it was minted for."""
    token = "at-" + secrets.token_urlsafe(24)
    if scope is None:
        return token
    return f"{token}.{base64.urlsafe_b64encode(scope.encode()).decode().rstrip('=')}"


def token_scope(token: str) -> str | None:
    """The scope ``mint_token`` encoded in ``token`` (None: minted without one)."""
    _, dot, tail = token.removeprefix("Bearer ").partition(".")
    return base64.urlsafe_b64decode(tail + "=" * (-len(tail) % 4)).decode() if dot else None


def _failure(mode: str | None) -> tuple[int, dict[str, str], bytes] | None:
    if mode == "invalid_client":
        status, headers, body = _json(401, {"error": "invalid_client", "error_description": BODY_MARKER})
        return status, {**headers, "WWW-Authenticate": 'Basic realm="idp"'}, body
    if mode == "server_error":
        return 500, {"Content-Type": "text/html"}, f"<h1>Internal error</h1><p>{BODY_MARKER}</p>".encode()
    if mode == "malformed":
        return 200, {"Content-Type": "application/json"}, f'{{"access_token": "{BODY_MARKER}", '.encode()
    if mode == "empty":
        return 200, {"Content-Type": "application/json"}, b""
    if mode == "no_access_token":
        return _json(200, {"token_type": "Bearer", "expires_in": 60, "note": BODY_MARKER})
    return None


def _json(status: int, obj: Any) -> tuple[int, dict[str, str], bytes]:
    # RFC 6749 §5.1: token responses must not be cached.
    return status, {"Content-Type": "application/json", "Cache-Control": "no-store"}, json.dumps(obj).encode()


class _Handler(QuietHandler):
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        status, headers, body = self.server.idp.handle(self)
        if status == 0:
            self.close_connection = True
            return
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(TlsHttpServer):
    def __init__(self, idp: IdP, ctx: ssl.SSLContext) -> None:
        self.idp = idp
        super().__init__(("127.0.0.1", 0), _Handler, ssl_context=ctx)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.idp.errors.append(traceback.format_exc())
