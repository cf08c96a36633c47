"""A fake GitHub App API on loopback HTTPS, strict enough to prove the github_app provider right.

Endpoints (GitHub REST, API version 2022-11-28):

- ``POST /app/installations/{id}/access_tokens``: the ``Authorization: Bearer`` app JWT must
  verify with RS256 against the app's *public* key, with ``iss`` = the app id, ``iat`` and
  ``exp`` present and ``exp - iat`` at most 10 minutes + 60 s of back-dating. The JSON body
  (``repositories``/``permissions``) is recorded. Answers 201 with a random ``ghs_`` token and
  ``expires_at`` (``expires_at`` when set, else now + ``token_ttl``).
- ``DELETE /installation/token``: revokes the bearer token (204); unknown or already revoked
  tokens get 401.

With ``prefix`` set (``/api/v3``) it serves below that root, like GitHub Enterprise Server.
Failure modes (``mode``): ``unauthorized`` (401), ``server_error`` (500, also for revocation),
``malformed`` (201, not JSON), ``no_token`` (201 JSON without a token), ``hang`` (answers
nothing for ``hang_seconds``, then closes).
Every error body carries ``BODY_MARKER`` so tests can prove it never reaches an error message.
"""

from __future__ import annotations

import json
import secrets
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from helpers.net import FakeHttps, QuietHandler
from secretless_proxy.dev.certs import Issued
from secretless_proxy.dev.echoserver import TlsHttpServer

__all__ = ["BODY_MARKER", "GitHubApi", "TokenRequest"]

BODY_MARKER = "github-private-detail-5b1e0d"
MODES = (None, "unauthorized", "server_error", "malformed", "no_token", "hang")
MAX_JWT_LIFETIME = 10 * 60 + 60


@dataclass(frozen=True)
class TokenRequest:
    """One accepted installation token request."""

    installation_id: int
    claims: dict[str, Any]  # the verified app JWT
    body: dict[str, Any] | None
    headers: dict[str, str]
    token: str


class _Handler(QuietHandler):
    server: _Server

    def do_POST(self) -> None:
        self.server.api.handle_post(self)

    def do_DELETE(self) -> None:
        self.server.api.handle_delete(self)

    def reply(self, status: int, doc: Any = None, *, raw: bytes | None = None) -> None:
        payload = raw if raw is not None else (json.dumps(doc).encode() if doc is not None else b"")
        self.send_response(status)
        if payload:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""


class _Server(TlsHttpServer):
    def __init__(self, api: GitHubApi, ctx: ssl.SSLContext) -> None:
        self.api = api
        super().__init__(("127.0.0.1", 0), _Handler, ssl_context=ctx)


class GitHubApi(FakeHttps):
    """Context manager running the fake API; ``url`` is the API root (``base_url``)."""

    thread_name = "github-api"

    def __init__(self, *, server_cert: Issued, app_id: int, public_key: rsa.RSAPublicKey,
                 installation_id: int, token_ttl: float = 3600) -> None:
        self.app_id = app_id
        self.public_key = public_key
        self.installation_id = installation_id
        self.token_ttl = token_ttl
        self.expires_at: str | None = None  # forces the expires_at answered
        self.mode: str | None = None
        self.prefix = ""  # API root path, e.g. "/api/v3" like GitHub Enterprise Server
        self.hang_seconds = 5.0
        self.calls: Counter[str] = Counter()  # "POST /app/...", "DELETE /installation/token"
        self.token_requests: list[TokenRequest] = []
        self.rejections: list[str] = []
        self.revoked: list[str] = []
        self._live: set[str] = set()
        self._lock = threading.Lock()
        super().__init__(server_cert)

    def reset(self) -> None:
        with self._lock:
            self.mode, self.expires_at, self.prefix, self.hang_seconds = None, None, "", 5.0
            self.calls.clear()
            self.token_requests.clear()
            self.rejections.clear()
            self.revoked.clear()

    # -- endpoints ------------------------------------------------------------------------

    def handle_post(self, h: _Handler) -> None:
        with self._lock:
            self.calls[f"POST {h.path}"] += 1
        raw = h.body()
        path = self._route(h.path)
        parts = path.split("/")  # "", "app", "installations", "{id}", "access_tokens"
        if len(parts) != 5 or parts[1:3] != ["app", "installations"] or parts[4] != "access_tokens":
            return self._fail(h, 404, f"no route {h.path}")
        if not self._failure_mode(h):
            return None
        claims = self._verify_app_jwt(h.headers.get("Authorization", ""))
        if isinstance(claims, str):
            return self._fail(h, 401, claims)
        if parts[3] != str(self.installation_id):
            return self._fail(h, 404, f"unknown installation {parts[3]}")
        if h.headers.get("X-GitHub-Api-Version") != "2022-11-28" or "vnd.github" not in h.headers.get("Accept", ""):
            return self._fail(h, 400, "missing API version or Accept header")
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return self._fail(h, 400, "body is not JSON")
        if self.mode == "malformed":
            return h.reply(201, raw=b"{not json " + BODY_MARKER.encode())
        if self.mode == "no_token":
            return h.reply(201, {"expires_at": "2030-01-01T00:00:00Z", "note": BODY_MARKER})
        token = "ghs_" + secrets.token_urlsafe(27)
        expires = self.expires_at or datetime.fromtimestamp(time.time() + self.token_ttl, UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        with self._lock:
            self._live.add(token)
            self.token_requests.append(TokenRequest(installation_id=int(parts[3]), claims=claims, body=body,
                                                    headers=dict(h.headers.items()), token=token))
        perms = (body or {}).get("permissions") or {"contents": "read", "metadata": "read"}
        return h.reply(201, {"token": token, "expires_at": expires, "permissions": perms,
                             "repository_selection": "selected" if (body or {}).get("repositories") else "all"})

    def handle_delete(self, h: _Handler) -> None:
        with self._lock:
            self.calls[f"DELETE {h.path}"] += 1
        if self._route(h.path) != "/installation/token":
            return self._fail(h, 404, f"no route {h.path}")
        if self.mode == "server_error":
            return self._fail(h, 500, "Server Error")
        scheme, _, token = h.headers.get("Authorization", "").partition(" ")
        with self._lock:
            known = scheme.lower() in ("bearer", "token") and token in self._live
            if known:
                self._live.discard(token)
                self.revoked.append(token)
        if not known:
            return self._fail(h, 401, "Bad credentials")
        return h.reply(204)

    def _route(self, path: str) -> str:
        """The path below the API root; "" (no route) when it is not under ``prefix``."""
        return path.removeprefix(self.prefix) if path.startswith(self.prefix + "/") else ""

    def _failure_mode(self, h: _Handler) -> bool:
        """Answers for the failure modes that fire before any check; False when one did."""
        if self.mode == "hang":
            self._stop.wait(self.hang_seconds)
            h.close_connection = True
            return False
        if self.mode == "unauthorized":
            self._fail(h, 401, "A JSON web token could not be decoded")
            return False
        if self.mode == "server_error":
            self._fail(h, 500, "Server Error")
            return False
        return True

    def _verify_app_jwt(self, header: str) -> dict[str, Any] | str:
        scheme, _, token = header.partition(" ")
        if scheme != "Bearer" or not token:
            return "no Bearer app JWT"
        try:
            claims = jwt.decode(token, self.public_key, algorithms=["RS256"],
                                options={"require": ["iat", "exp", "iss"], "verify_iss": False})
        except jwt.PyJWTError as exc:
            return f"app JWT rejected: {type(exc).__name__}"
        if str(claims["iss"]) != str(self.app_id):
            return f"iss {claims['iss']!r} is not the app id"
        if claims["exp"] - claims["iat"] > MAX_JWT_LIFETIME:
            return "exp is too far in the future"
        if claims["iat"] > time.time() + 1:
            return "iat is in the future"
        return claims

    def _fail(self, h: _Handler, status: int, reason: str) -> None:
        with self._lock:
            self.rejections.append(reason)
        h.reply(status, {"message": f"{reason} ({BODY_MARKER})",
                         "documentation_url": "https://docs.github.com/rest"})

    # -- lifecycle --------------------------------------------------------------------------

    def make_server(self, ctx: ssl.SSLContext) -> _Server:
        return _Server(self, ctx)
