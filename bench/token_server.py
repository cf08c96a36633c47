#!/usr/bin/env python3
"""Loopback OAuth2 token endpoint for the bench (client credentials grant, RFC 6749 §4.4).

Started by bench/run.py for cases (e) and (f); not a general-purpose server. Standard library
only. One HTTPS listener on 127.0.0.1 (certificate from the bench CA), one thread per
connection, HTTP/1.1 keep-alive.

    POST /<name>/token   grant_type=client_credentials, client authentication by HTTP Basic
                         (client_secret_basic) or in the form (client_secret_post)
      -> 200 {"access_token": "bt<gen>_<random>", "token_type": "Bearer", "expires_in": N}
         where N is the lifetime given for <name> with --lifetime NAME=SECONDS
      -> 401 {"error": "invalid_client"} for a wrong client_id/secret,
         400 {"error": "unsupported_grant_type" | "invalid_scope" | "invalid_request"} otherwise

<gen> is a counter over all tokens issued by this process, so the upstream (nginx) can tell
tokens apart without seeing their random part. Every call is appended to --events (JSON lines:
monotonic and wall time, name, outcome, gen, expiry) so the harness can count the calls made
inside a measured window. The client secret comes from the environment variable named by
--secret-env, never from the command line.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import os
import secrets
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote_plus


class State:
    def __init__(self, args: argparse.Namespace, secret: str) -> None:
        self.client_id = args.client_id
        self.secret = secret
        self.scope = args.scope
        self.lifetimes = dict(args.lifetime)
        self.lock = threading.Lock()
        self.gen = 0
        # Line-buffered: the harness reads it while the server runs; open for the process's lifetime.
        self.events = open(args.events, "a", buffering=1)  # noqa: SIM115

    def record(self, **event) -> None:
        event.update(mono=time.monotonic(), wall=time.time())
        with self.lock:
            self.events.write(json.dumps(event) + "\n")

    def next_gen(self) -> int:
        with self.lock:
            self.gen += 1
            return self.gen


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real authorization server
    server_version = "bench-token-server"
    timeout = 60  # an idle keep-alive connection's thread ends after this
    state: State

    def log_message(self, fmt: str, *args) -> None:  # no per-request stderr chatter
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _reject(self, name: str, status: int, error: str) -> None:
        self.state.record(name=name, outcome=error)
        self._answer(status, {"error": error})

    def do_GET(self) -> None:  # noqa: N802
        self._answer(405, {"error": "invalid_request"})

    def do_POST(self) -> None:  # noqa: N802
        st = self.state
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        parts = self.path.strip("/").split("/")
        name = parts[0] if len(parts) == 2 and parts[1] == "token" else ""
        if name not in st.lifetimes:
            self._reject(name or self.path[:40], 404, "invalid_request")
            return
        form = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
        cid, secret = form.get("client_id"), form.get("client_secret")
        auth = self.headers.get("Authorization", "")
        if auth[:6].lower() == "basic ":
            try:
                user, _, pw = base64.b64decode(auth[6:], validate=True).decode().partition(":")
                cid, secret = unquote_plus(user), unquote_plus(pw)
            except (ValueError, UnicodeDecodeError):
                cid = secret = None
        if not (cid == st.client_id and secret is not None
                and hmac.compare_digest(secret.encode(), st.secret.encode())):
            self._reject(name, 401, "invalid_client")
            return
        if form.get("grant_type") != "client_credentials":
            self._reject(name, 400, "unsupported_grant_type")
            return
        if st.scope and form.get("scope") != st.scope:
            self._reject(name, 400, "invalid_scope")
            return
        gen = st.next_gen()
        lifetime = st.lifetimes[name]
        token = f"bt{gen}_{secrets.token_urlsafe(24)}"
        st.record(name=name, outcome="issued", gen=gen, expires_wall=time.time() + lifetime)
        body = {"access_token": token, "token_type": "Bearer", "expires_in": lifetime}
        if st.scope:
            body["scope"] = st.scope
        self._answer(200, body)


def lifetime_arg(text: str) -> tuple[str, int]:
    name, _, secs = text.partition("=")
    if not name.isidentifier() or not secs.isdigit() or int(secs) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=SECONDS, got {text!r}")
    return name, int(secs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True, help="server certificate (PEM)")
    ap.add_argument("--key", required=True, help="server key (PEM)")
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--secret-env", required=True, help="environment variable holding the client secret")
    ap.add_argument("--scope", default="", help="scope the request must ask for (space-separated)")
    ap.add_argument("--lifetime", type=lifetime_arg, action="append", required=True,
                    help="NAME=SECONDS: POST /NAME/token issues tokens with this expires_in (repeatable)")
    ap.add_argument("--events", required=True, help="append one JSON line per call here")
    args = ap.parse_args()
    secret = os.environ.get(args.secret_env, "")
    if not secret:
        print(f"token_server: ${args.secret_env} is empty", file=sys.stderr)
        return 2
    Handler.state = State(args, secret)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(args.cert, args.key)
    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    httpd.daemon_threads = True
    # Handshake in the connection's own thread (on first read), not in the accept loop.
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    print(f"token_server: listening on https://127.0.0.1:{args.port}/ "
          f"({', '.join(f'/{n}/token expires_in={s}' for n, s in Handler.state.lifetimes.items())})",
          file=sys.stderr, flush=True)
    try:
        httpd.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
