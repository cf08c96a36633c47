"""End to end: the credential broker behind a real proxy process, against real provider servers.

Every provider is a real HTTPS server on loopback with a certificate from the test upstream CA
(the test IdP, the fake GitHub API) or moto in server mode with IAM authentication; clients are
curl, requests and httpx with workload certificates. Whatever a provider issued is checked to be
absent from the proxy's output and from everything the client received.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import requests
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from helpers.clients import curl, http_exchange, tunnel
from helpers.e2e_broker import AuthMoto, TimedIdP, metric
from helpers.github_api import GitHubApi
from helpers.idp import BODY_MARKER as IDP_MARKER
from helpers.idp import GRANT_CC, GRANT_TX
from helpers.net import free_port, wait_for
from helpers.proxy import SECRET, ProxyProcess, base_config

from secretless_proxy.credentials.aws import role_session_name
from secretless_proxy.dev import certs

BILLING = "spiffe://example.org/ns/prod/sa/billing"
REPORTS = "spiffe://example.org/ns/prod/sa/reports"
CLIENT_SECRET = "cs-" + secrets.token_urlsafe(18)
ENV = {"TEST_CLIENT_SECRET": CLIENT_SECRET}
CONTRACT = {"error", "reason", "rule", "request_id"}


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
def idp(pki) -> Iterator[TimedIdP]:
    with TimedIdP(server_cert=certs.make_server_cert(ca=pki.upstream_ca),
                  clients={"billing": CLIENT_SECRET, "keyed": None, "exchanger": CLIENT_SECRET}) as server:
        yield server
    assert not server.errors, server.errors[0]


@pytest.fixture
def sessions(pki) -> Iterator[Callable[..., requests.Session]]:
    """requests sessions through a proxy, presenting a workload certificate (closed at teardown)."""
    made: list[requests.Session] = []

    def make(proxy: ProxyProcess, spiffe_id: str = BILLING) -> requests.Session:
        s = requests.Session()
        s.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override s.verify
        s.proxies = {"https": proxy.url}
        s.verify = pki.interception_ca_cert
        s.cert = pki.svid(spiffe_id)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def oauth_credential(idp: TimedIdP, **over: Any) -> dict:
    cred = {"kind": "oauth2_client_credentials", "token_url": idp.token_url, "client_id": "billing",
            "client_secret": "env:TEST_CLIENT_SECRET"}
    cred.update(over)
    return cred


def inject_rule(upstream, credential: str = "payments", *, name: str = "billing-to-api",
                paths: tuple[str, ...] = ("/v1/**",), workloads: tuple[str, ...] = (BILLING,),
                fmt: str = "Bearer {secret}", host: str | list[str] = "localhost") -> dict:
    return {"name": name, "workloads": list(workloads),
            "to": {"host": host, "port": upstream.port, "paths": list(paths)},
            "inject": {"credential": credential, "header": "Authorization", "format": fmt}}


def auths(upstream_request: dict) -> list[str]:
    return [v for k, v in upstream_request["headers"] if k.lower() == "authorization"]


def bearer_tokens(upstream) -> list[str]:
    """The bearer token of every request the upstream saw; fails on a request without exactly one."""
    out = []
    for req in upstream.requests:
        values = auths(req)
        assert len(values) == 1 and values[0].startswith("Bearer "), f"forwarded without its credential: {req}"
        out.append(values[0].removeprefix("Bearer "))
    return out


def client_view(r: requests.Response | httpx.Response) -> str:
    """Everything a client received: status line, headers and body."""
    return f"{r.status_code} {dict(r.headers)!r} {r.text}"


def refused(r: requests.Response, status: int, reason: str, rule: str | None) -> dict:
    assert r.status_code == status, client_view(r)
    body = r.json()
    assert set(body) == CONTRACT, body
    assert (body["reason"], body["rule"]) == (reason, rule), body
    assert r.headers["X-Secretless-Request-Id"] == body["request_id"]
    assert "Traceback" not in r.text
    return body


def assert_never_leaked(proxy: ProxyProcess, tokens: list[str], *client_views: str) -> None:
    """No issued token in the proxy's output (read after it stopped) nor in anything a client got."""
    tokens = [t for t in tokens if t]
    assert tokens, "nothing was issued: the test proves nothing"
    proxy.secrets = (*proxy.secrets, *tokens)  # the proxy_factory teardown scans them as well
    proxy.stop()  # flushes and ends everything the process would still print
    out = proxy.output()
    for token in tokens:
        assert token not in out, "an issued token appeared in the proxy's output"
        for view in client_views:
            assert token not in view, "an issued token reached the client"


def config_path(proxy: ProxyProcess) -> Path:
    args = list(proxy.proc.args)  # type: ignore[arg-type]
    return Path(args[args.index("--config") + 1])


def rewrite_config(proxy: ProxyProcess, config: dict) -> None:
    """Rewrite the config file in place, SIGHUP the proxy (the file watcher would take up to a
    second; its own tests are in test_e2e_observability) and wait until it says it reloaded."""
    before = proxy.output().count("config reloaded")
    config_path(proxy).write_text(yaml.safe_dump(config, sort_keys=False))
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: proxy.output().count("config reloaded") > before, timeout=10, what="'config reloaded'")


def signing_extra() -> tuple[int, str, dict]:
    """An admin listener on a free port and the issuer served by it: (port, issuer, config keys)."""
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    return port, issuer, {"admin": {"listen": f"127.0.0.1:{port}"}, "signing": {"issuer": issuer}}


def fetch_jwks(admin_port: int) -> dict:
    r = httpx.get(f"http://127.0.0.1:{admin_port}/.well-known/jwks.json", trust_env=False, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def verify_with_jwks(token: str, jwks: dict, **kw: Any) -> dict:
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(jwks)[kid]
    return jwt.decode(token, key, algorithms=["ES256", "RS256"], **kw)


# -- steady state --------------------------------------------------------------------------------


class TestSteadyState:
    def test_no_provider_calls_after_warm_up(self, proxy_factory, pki, upstream, idp, sessions):
        """After the first token, 30 requests on kept-alive and fresh connections make no token call."""
        p = proxy_factory(base_config(pki, rules=[inject_rule(upstream)],
                                      credentials={"payments": oauth_credential(idp)}), env=ENV)
        s = sessions(p)
        views = []
        r = s.get(f"{upstream.url}/v1/warm")
        assert r.status_code == 200, client_view(r)
        views.append(client_view(r))
        assert idp.calls[GRANT_CC] == 1
        for i in range(25):
            r = s.get(f"{upstream.url}/v1/charges/{i}")
            assert r.status_code == 200
            views.append(client_view(r))
        cert, key = pki.svid(BILLING)
        for i in range(5):  # new connections, new TLS handshakes: still the cached token
            c = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key,
                     f"{upstream.url}/v1/curl/{i}", proxy=p.url)
            assert c.status == 200, c
            views.append(c.body)
        assert idp.calls[GRANT_CC] == 1 and idp.token_calls == 1
        (token,) = idp.issued
        assert bearer_tokens(upstream) == [token] * 31
        assert "[REDACTED]" in views[-1]  # the echo upstream sent the token back; the proxy redacted it
        assert_never_leaked(p, [token], *views)


# -- refresh-ahead -------------------------------------------------------------------------------


class TestRefreshAhead:
    LIFETIME = 8  # expires_in the IdP announces
    SKEW = 0.5
    DELAY = 0.6  # the IdP answers the refresh this late: no request may wait for it

    def test_refresh_before_expiry_blocks_no_request(self, proxy_factory, pki, upstream, idp, sessions):
        """A client loop across the refresh point: one early second token call, no request delayed by it."""
        idp.expires_in = self.LIFETIME
        p = proxy_factory(base_config(pki, rules=[inject_rule(upstream)],
                                      credentials={"payments": oauth_credential(idp)},
                                      broker={"skew_seconds": self.SKEW}), env=ENV)
        s = sessions(p)
        assert s.get(f"{upstream.url}/v1/warm").status_code == 200
        (t0,) = idp.token_times
        idp.hang_seconds = self.DELAY  # "hang" answers after hang_seconds: a slow token endpoint
        idp.mode = "hang"
        samples: list[tuple[float, float, int]] = []  # (sent at, latency, status)
        views = []
        while time.time() < t0 + self.LIFETIME + 1:
            sent = time.time()
            r = s.get(f"{upstream.url}/v1/loop")
            samples.append((sent, time.time() - sent, r.status_code))
            views.append(client_view(r))
            time.sleep(0.02)
        assert all(status == 200 for _, _, status in samples), [x for x in samples if x[2] != 200]
        # One refresh, ahead of expiry: not before refresh_at (0.75) of the lifetime, before it ended.
        assert idp.token_calls == 2, idp.token_times
        refresh = idp.token_times[1] - t0
        assert 0.75 * self.LIFETIME - 0.2 <= refresh < self.LIFETIME - self.SKEW, refresh
        first, second = list(idp.issued)
        tokens = bearer_tokens(upstream)[1:]  # [0] is the warm-up
        assert len(tokens) == len(samples)
        switch = tokens.index(second)
        assert tokens == [first] * switch + [second] * (len(tokens) - switch)
        # Nothing was served with the first token once it was within the skew of its expiry.
        for (sent, _, _), token in zip(samples, tokens, strict=True):
            if sent >= t0 + self.LIFETIME - self.SKEW:
                assert token == second
        steady = [lat for sent, lat, _ in samples if sent < t0 + 0.75 * self.LIFETIME - 0.5]
        around = [lat for sent, lat, _ in samples if sent >= t0 + 0.75 * self.LIFETIME - 0.5]
        assert len(steady) > 20 and len(around) > 20, (len(steady), len(around))
        assert max(around) < max(steady) + 0.5, (max(around), max(steady))
        assert max(around) < self.DELAY, f"a request waited for the refresh: {max(around):.3f}s"
        assert_never_leaked(p, [first, second], *views)


# -- single flight -------------------------------------------------------------------------------


class TestSingleFlight:
    N = 50

    def test_50_concurrent_first_requests_on_open_tunnels(self, proxy_factory, pki, upstream, idp):
        """50 requests released together on 50 open mTLS tunnels share one token call."""
        admin_port = free_port()
        idp.mode, idp.hang_seconds = "hang", 1.0  # the first fetch is still in flight when all arrive
        p = proxy_factory(base_config(pki, rules=[inject_rule(upstream)],
                                      credentials={"payments": oauth_credential(idp)},
                                      admin={"listen": f"127.0.0.1:{admin_port}"}), env=ENV)
        cert = pki.svid(BILLING)

        def open_tunnel(_: int) -> ssl.SSLSocket:
            return tunnel(p.port, ("localhost", upstream.port), sni="localhost", ca=pki.interception_ca_cert,
                          cert=cert)

        with ThreadPoolExecutor(10) as pool:
            socks = list(pool.map(open_tunnel, range(self.N)))
        barrier = threading.Barrier(self.N)

        def send(sock: ssl.SSLSocket) -> tuple[int, bytes]:
            barrier.wait(timeout=20)
            return http_exchange(sock, f"GET /v1/x HTTP/1.1\r\nHost: localhost:{upstream.port}\r\n\r\n")

        try:
            with ThreadPoolExecutor(self.N) as pool:
                results = list(pool.map(send, socks))
        finally:
            for sock in socks:
                sock.close()
        assert [status for status, _ in results] == [200] * self.N, results[:3]
        assert idp.token_calls == 1, idp.token_times
        (token,) = idp.issued
        assert bearer_tokens(upstream) == [token] * self.N
        # Most requests missed the cache and waited for the one in-flight fetch (single flight).
        misses = metric(admin_port, "secretless_credential_cache_total", credential="payments", result="miss")
        assert misses >= self.N // 2, misses
        assert metric(admin_port, "secretless_credential_fetch_total", credential="payments") == 1
        assert_never_leaked(p, [token], *(body.decode() for _, body in results))

    async def test_50_concurrent_first_requests_from_httpx(self, proxy_factory, pki, upstream, idp):
        """50 concurrent httpx requests, each on its own connection with the client cert: one token call."""
        idp.mode, idp.hang_seconds = "hang", 1.0
        p = proxy_factory(base_config(pki, rules=[inject_rule(upstream)],
                                      credentials={"payments": oauth_credential(idp)}), env=ENV)
        tls = ssl.create_default_context(cafile=pki.interception_ca_cert)
        tls.load_cert_chain(*pki.svid(BILLING))
        limits = httpx.Limits(max_connections=self.N, max_keepalive_connections=self.N)
        async with httpx.AsyncClient(proxy=p.url, verify=tls, trust_env=False, limits=limits, timeout=20) as c:
            responses = await asyncio.gather(*(c.get(f"{upstream.url}/v1/n/{i}") for i in range(self.N)))
        assert [r.status_code for r in responses] == [200] * self.N
        assert idp.token_calls == 1, idp.token_times
        (token,) = idp.issued
        assert bearer_tokens(upstream) == [token] * self.N
        assert_never_leaked(p, [token], *(client_view(r) for r in responses))


# -- provider down -------------------------------------------------------------------------------


class TestProviderDown:
    LIFETIME = 4
    SKEW = 1.0

    @pytest.mark.parametrize("how", ["server_error", "stopped"])
    def test_cached_token_until_expiry_then_503(self, proxy_factory, pki, upstream, sessions, how):
        """With the IdP down the cached token serves until expiry minus skew, then 503; never a bare request."""
        with ExitStack() as stack:
            idp = stack.enter_context(TimedIdP(server_cert=certs.make_server_cert(ca=pki.upstream_ca),
                                               clients={"billing": CLIENT_SECRET}, expires_in=self.LIFETIME))
            p = proxy_factory(base_config(pki, rules=[inject_rule(upstream)],
                                          credentials={"payments": oauth_credential(idp)},
                                          broker={"skew_seconds": self.SKEW, "retries": 1}), env=ENV)
            s = sessions(p)
            assert s.get(f"{upstream.url}/v1/warm").status_code == 200
            (t0,) = idp.token_times
            (token,) = idp.issued
            if how == "stopped":
                stack.close()  # the IdP process is gone: connections are refused
            else:
                idp.mode = "server_error"
            down_at = time.time()
            samples: list[tuple[float, float, requests.Response]] = []
            while time.time() < t0 + self.LIFETIME + 0.5:
                sent = time.time()
                r = s.get(f"{upstream.url}/v1/loop")
                samples.append((sent, time.time(), r))
                time.sleep(0.05)
            refresh_attempts = idp.token_times[1:]
            recovered = None
            if how == "server_error":  # the provider is back: the next request gets a fresh token
                idp.mode = None
                recovered = s.get(f"{upstream.url}/v1/back")
                if recovered.status_code == 503:  # damped (issue 10 §3): the next probe is Retry-After away
                    time.sleep(int(recovered.headers["Retry-After"]))
                    recovered = s.get(f"{upstream.url}/v1/back")
        assert not idp.errors
        deadline = t0 + self.LIFETIME - self.SKEW
        ok = [x for x in samples if x[2].status_code == 200]
        bad = [x for x in samples if x[2].status_code != 200]
        # The cached token kept serving while the provider was down...
        assert len([x for x in ok if x[0] > down_at]) >= 10, len(ok)
        assert all(sent < deadline + 0.1 for sent, _, _ in ok), [sent - t0 for sent, _, _ in ok][-3:]
        # ...then an honest refusal, and never a 200 again without a provider.
        assert len(bad) >= 3, len(bad)
        first_bad = samples.index(bad[0])
        assert all(r.status_code != 200 for _, _, r in samples[first_bad:])
        assert bad[0][1] > deadline - 0.3, bad[0][1] - t0
        for _, _, r in bad:
            refused(r, 503, "credential_unavailable", "billing-to-api")
            assert IDP_MARKER not in r.text
        # Every forwarded request carried the one token the IdP issued; nothing went out bare.
        tokens = bearer_tokens(upstream)
        assert tokens[:1 + len(ok)] == [token] * (1 + len(ok))
        if recovered is not None:
            assert refresh_attempts and refresh_attempts[0] < deadline, [t - t0 for t in refresh_attempts]
            assert recovered.status_code == 200, client_view(recovered)
            assert len(idp.issued) == 2 and tokens[1 + len(ok):] == [list(idp.issued)[1]]
        else:
            assert len(tokens) == 1 + len(ok)
        assert p.proc.poll() is None
        views = [client_view(r) for _, _, r in samples] + ([client_view(recovered)] if recovered is not None else [])
        assert_never_leaked(p, list(idp.issued), *views)


# -- provider failures -----------------------------------------------------------------------------


class TestProviderFailures:
    @pytest.mark.parametrize(("mode", "calls"), [
        ("invalid_client", 1),  # 401: final, not retried
        ("server_error", 2),
        ("malformed", 2),
        ("empty", 2),
        ("hang", 2),  # past timeout_seconds, twice
    ])
    def test_clear_503_and_other_rules_keep_working(self, proxy_factory, pki, upstream, idp, sessions,
                                                      mode, calls):
        """A failing token endpoint gives 503 credential_unavailable; other rules keep serving."""
        idp.mode, idp.hang_seconds = mode, 3.0
        rules = [inject_rule(upstream, name="to-payments", paths=("/v1/pay/**",)),
                 inject_rule(upstream, "stripe", name="to-stripe", paths=("/v1/static/**",))]
        creds = {"payments": oauth_credential(idp), "stripe": {"kind": "static", "secret": "env:TEST_STRIPE_KEY"}}
        p = proxy_factory(base_config(pki, rules=rules, credentials=creds,
                                      broker={"timeout_seconds": 1, "retries": 1}), env=ENV)
        s = sessions(p)
        started = time.monotonic()
        r = s.post(f"{upstream.url}/v1/pay/charges", data="amount=1")
        elapsed = time.monotonic() - started
        body = refused(r, 503, "credential_unavailable", "to-payments")
        assert IDP_MARKER not in r.text and "Traceback" not in body["error"]
        assert elapsed < (4.5 if mode == "hang" else 2.0), elapsed
        assert idp.token_calls == calls, idp.token_times
        # Still refusing (no stuck state), and the proxy still serves the other rule.
        refused(s.get(f"{upstream.url}/v1/pay/again"), 503, "credential_unavailable", "to-payments")
        ok = s.get(f"{upstream.url}/v1/static/x")
        assert ok.status_code == 200, client_view(ok)
        assert [(req["path"], auths(req)) for req in upstream.requests] == [("/v1/static/x", [f"Bearer {SECRET}"])]
        assert p.proc.poll() is None
        out = p.output()
        assert IDP_MARKER not in out
        assert "credential payments unavailable for rule to-payments" in out
        issued = list(idp.issued)  # "hang": the IdP answered after the proxy gave up
        p.stop()
        for token in issued:
            assert token not in p.output()


class TestBrokerReload:
    def test_broker_settings_take_effect_on_reload(self, proxy_factory, pki, upstream, idp, sessions):
        """A reload that changes broker.retries is applied to the next provider call (not silently ignored)."""
        idp.mode = "server_error"  # retryable: each request makes 1 + retries token calls
        config = base_config(pki, rules=[inject_rule(upstream)], credentials={"payments": oauth_credential(idp)},
                             broker={"retries": 0})
        p = proxy_factory(config, env=ENV)
        s = sessions(p)
        refused(s.get(f"{upstream.url}/v1/x"), 503, "credential_unavailable", "billing-to-api")
        assert idp.token_calls == 1
        config["broker"] = {"retries": 2}
        rewrite_config(p, config)
        refused(s.get(f"{upstream.url}/v1/x"), 503, "credential_unavailable", "billing-to-api")
        assert idp.token_calls - 1 == 3, "broker.retries from the reloaded config was not applied"
        assert upstream.requests == []


# -- client authentication --------------------------------------------------------------------------


class TestClientAuthentication:
    @pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post", "private_key_jwt"])
    def test_idp_accepts_the_proxy_client(self, proxy_factory, pki, upstream, idp, sessions, method):
        """client_secret (basic, post) and private_key_jwt verified against the proxy's published JWKS."""
        extra: dict = {}
        if method == "private_key_jwt":
            admin_port, issuer, extra = signing_extra()
            cred = oauth_credential(idp, client_id="keyed", client_auth="private_key_jwt")
            del cred["client_secret"]
            idp.jwks = issuer + "/.well-known/jwks.json"  # the IdP fetches it from the proxy per check
        elif method == "client_secret_post":
            cred = oauth_credential(idp, client_secret_method="post")
        else:
            cred = oauth_credential(idp)
        p = proxy_factory(base_config(pki, rules=[inject_rule(upstream)], credentials={"payments": cred},
                                      **extra), env=ENV)
        s = sessions(p)
        r = s.get(f"{upstream.url}/v1/charges")
        assert r.status_code == 200, (client_view(r), idp.rejections)
        assert idp.rejections == []
        (token,) = idp.issued
        assert bearer_tokens(upstream) == [token]
        (req,) = [q for q in idp.requests if q.path == "/token"]
        assert req.one("grant_type") == GRANT_CC
        if method == "client_secret_basic":
            assert req.headers["authorization"].startswith("Basic ") and "client_secret" not in req.form
        elif method == "client_secret_post":
            assert req.one("client_secret") == CLIENT_SECRET and "authorization" not in req.headers
        else:
            assert "client_secret" not in req.form and "authorization" not in req.headers
            assertion = req.one("client_assertion")
            assert assertion is not None
            jwks = fetch_jwks(admin_port)
            claims = verify_with_jwks(assertion, jwks, audience=idp.token_url)
            assert (claims["iss"], claims["sub"]) == ("keyed", "keyed")
            assert_never_leaked(p, [token, assertion], client_view(r))
            return
        assert_never_leaked(p, [token], client_view(r))


# -- token exchange ---------------------------------------------------------------------------------


class TestTokenExchange:
    def test_subject_is_the_calling_workload_and_cached_per_workload(self, proxy_factory, pki, upstream, idp,
                                                                     sessions):
        """Each workload's subject JWT verifies against the proxy's JWKS with sub = its SPIFFE ID; one exchange each."""
        admin_port, issuer, extra = signing_extra()
        idp.jwks = issuer + "/.well-known/jwks.json"
        cred = {"kind": "oauth2_token_exchange", "token_url": idp.token_url, "client_id": "exchanger",
                "client_secret": "env:TEST_CLIENT_SECRET", "audience": ["https://orders.example.com"]}
        rule = inject_rule(upstream, "orders", workloads=(BILLING, REPORTS))
        p = proxy_factory(base_config(pki, rules=[rule], credentials={"orders": cred}, **extra), env=ENV)
        views = []
        for who, spiffe_id in (("billing", BILLING), ("reports", REPORTS)):
            s = sessions(p, spiffe_id)
            for i in range(3):
                r = s.get(f"{upstream.url}/v1/{who}/{i}")
                assert r.status_code == 200, (client_view(r), idp.rejections)
                views.append(client_view(r))
        assert idp.rejections == []
        assert idp.calls[GRANT_TX] == 2 and idp.token_calls == 2
        assert [c["sub"] for c in idp.subjects] == [BILLING, REPORTS]
        assert {c["iss"] for c in idp.subjects} == {issuer}
        assert all(c["aud"] == idp.token_url for c in idp.subjects)
        by_path = {req["path"]: auths(req)[0].removeprefix("Bearer ") for req in upstream.requests}
        assert len(by_path) == 6
        for path, token in by_path.items():
            expected = BILLING if path.startswith("/v1/billing/") else REPORTS
            assert idp.issued[token]["sub"] == expected, path
        assert len(set(by_path.values())) == 2
        # The subject tokens themselves verify with the JWKS the proxy publishes right now.
        jwks = fetch_jwks(admin_port)
        subjects = [q.one("subject_token") for q in idp.requests if q.path == "/token"]
        assert [verify_with_jwks(t, jwks, audience=idp.token_url)["sub"] for t in subjects] == [BILLING, REPORTS]
        assert_never_leaked(p, [*idp.issued, *subjects], *views)


# -- minted JWTs ------------------------------------------------------------------------------------


class TestMintedJwt:
    def test_per_request_jwt_fresh_jti_and_destination_audience(self, proxy_factory, pki, upstream, sessions):
        """per_request: every request gets a new JWT (new jti), aud = the destination host, signed per the JWKS."""
        admin_port, issuer, extra = signing_extra()
        rule = inject_rule(upstream, "workload-jwt", host=["localhost", "127.0.0.1"])
        p = proxy_factory(base_config(pki, rules=[rule], credentials={"workload-jwt": {"kind": "jwt",
                                                                                        "per_request": True}},
                                      **extra), env=ENV)
        s = sessions(p)
        views = []
        for i in range(3):
            r = s.get(f"{upstream.url}/v1/a/{i}")
            assert r.status_code == 200, client_view(r)
            views.append(client_view(r))
        cert, key = pki.svid(BILLING)
        c = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key,
                 f"https://127.0.0.1:{upstream.port}/v1/ip", proxy=p.url)
        assert c.status == 200, c
        views.append(c.body)
        tokens = bearer_tokens(upstream)
        assert len(tokens) == 4
        jwks = fetch_jwks(admin_port)
        claims = [verify_with_jwks(t, jwks, audience=aud, issuer=issuer, options={"require": ["exp", "iat", "jti"]})
                  for t, aud in zip(tokens, ["localhost"] * 3 + ["127.0.0.1"], strict=True)]
        assert {c["sub"] for c in claims} == {BILLING}
        assert len({c["jti"] for c in claims}) == 4, "a jti was reused"
        assert all(c["exp"] - c["iat"] == 60 for c in claims)
        assert all(abs(c["iat"] - time.time()) < 30 for c in claims)
        assert_never_leaked(p, tokens, *views)


# -- GitHub App -------------------------------------------------------------------------------------


APP_ID = 424242
INSTALLATION_ID = 9876543


@pytest.fixture(scope="module")
def app_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def github(pki, app_key) -> Iterator[GitHubApi]:
    with GitHubApi(server_cert=certs.make_server_cert(ca=pki.upstream_ca), app_id=APP_ID,
                   public_key=app_key.public_key(), installation_id=INSTALLATION_ID) as api:
        yield api


class TestGitHubApp:
    def _start(self, proxy_factory, pki, upstream, github, app_key, tmp_path) -> tuple[ProxyProcess, dict]:
        key_file = tmp_path / "app.pem"
        key_file.write_bytes(app_key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.TraditionalOpenSSL,
                                                   serialization.NoEncryption()))
        creds = {"github": {"kind": "github_app", "app_id": APP_ID, "installation_id": INSTALLATION_ID,
                            "private_key": f"file:{key_file}", "base_url": github.url},
                 "stripe": {"kind": "static", "secret": "env:TEST_STRIPE_KEY"}}
        rules = [inject_rule(upstream, "github", name="ci-to-github", paths=("/repos/**",), fmt="token {secret}"),
                 inject_rule(upstream, "stripe", name="to-stripe", paths=("/v1/**",))]
        config = base_config(pki, rules=rules, credentials=creds)
        return proxy_factory(config), config

    def _installation_token(self, s: requests.Session, upstream, github: GitHubApi) -> tuple[str, str]:
        upstream.requests.clear()
        r = s.get(f"{upstream.url}/repos/acme/api")
        assert r.status_code == 200, (client_view(r), github.rejections)
        (value,) = auths(upstream.requests[0])
        assert value.startswith("token ghs_"), value
        return value.removeprefix("token "), client_view(r)

    def test_changed_credential_is_revoked_and_reissued(self, proxy_factory, pki, upstream, github, app_key,
                                                         tmp_path, sessions):
        """A reload that changes the github credential revokes the cached installation token."""
        p, config = self._start(proxy_factory, pki, upstream, github, app_key, tmp_path)
        s = sessions(p)
        first, view1 = self._installation_token(s, upstream, github)
        assert first == github.token_requests[0].token
        assert self._installation_token(s, upstream, github)[0] == first  # cached
        assert github.calls == {f"POST /app/installations/{INSTALLATION_ID}/access_tokens": 1}
        config["credentials"]["github"]["permissions"] = {"contents": "read"}
        rewrite_config(p, config)
        wait_for(lambda: github.revoked, timeout=5, what="DELETE /installation/token")
        assert github.revoked == [first]
        assert github.calls["DELETE /installation/token"] == 1
        second, view2 = self._installation_token(s, upstream, github)
        assert second != first and second == github.token_requests[1].token
        assert github.token_requests[1].body == {"permissions": {"contents": "read"}}
        assert_never_leaked(p, [first, second], view1, view2)

    def test_revocation_goes_to_the_server_that_issued_the_token(self, proxy_factory, pki, upstream, github,
                                                                 app_key, tmp_path, sessions):
        """When a reload moves base_url to another GitHub, the old token is revoked where it was issued."""
        p, config = self._start(proxy_factory, pki, upstream, github, app_key, tmp_path)
        s = sessions(p)
        token, view = self._installation_token(s, upstream, github)
        with GitHubApi(server_cert=certs.make_server_cert(ca=pki.upstream_ca), app_id=APP_ID,
                       public_key=app_key.public_key(), installation_id=INSTALLATION_ID) as other:
            config["credentials"]["github"]["base_url"] = other.url
            rewrite_config(p, config)
            # The old token must not travel to a server that never issued it...
            wait_for(lambda: github.revoked or other.calls["DELETE /installation/token"], timeout=5,
                     what="a revocation")
            assert other.calls["DELETE /installation/token"] == 0, "the old token was sent to the new base_url"
            # ...and is revoked by the one that did.
            assert github.revoked == [token]
            second, view2 = self._installation_token(s, upstream, other)
            assert second == other.token_requests[0].token
        assert_never_leaked(p, [token, second], view, view2)

    def test_removed_credential_is_revoked(self, proxy_factory, pki, upstream, github, app_key, tmp_path,
                                           sessions):
        """A reload that removes the github credential and its rule revokes the token; the rule is gone."""
        p, config = self._start(proxy_factory, pki, upstream, github, app_key, tmp_path)
        s = sessions(p)
        token, view = self._installation_token(s, upstream, github)
        del config["credentials"]["github"]
        config["rules"] = [r for r in config["rules"] if r["name"] != "ci-to-github"]
        rewrite_config(p, config)
        wait_for(lambda: github.revoked, timeout=5, what="DELETE /installation/token")
        assert github.revoked == [token]
        # Only the stripe rule is left for this host: it is the nearest rule, and the path is not its.
        refused(s.get(f"{upstream.url}/repos/acme/api"), 403, "path", "to-stripe")
        assert [req["path"] for req in upstream.requests] == ["/repos/acme/api"]  # the first one only
        assert s.get(f"{upstream.url}/v1/still-served").status_code == 200
        assert_never_leaked(p, [token], view)


# -- AWS SigV4 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthMoto]:
    with AuthMoto(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


CLIENT_SIGNATURE = ("AWS4-HMAC-SHA256 Credential=AKIDCLIENTONLY/20200101/us-east-1/sts/aws4_request, "
                    "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64)


class TestAwsSigv4:
    def test_resigned_request_is_accepted_by_authenticating_sts(self, proxy_factory, pki, upstream, moto):
        """GetCallerIdentity through the proxy is re-signed with STS session keys; the client's signature is dropped."""
        creds = {"aws": {"kind": "aws_sigv4", "role_arn": moto.role_arn,
                         "base_credentials": {"access_key_id": "env:TEST_AWS_KEY_ID",
                                              "secret_access_key": "env:TEST_AWS_SECRET"},
                         "sts_endpoint": moto.url, "region": "us-east-1", "service": "sts"}}
        rules = [{"name": "to-moto", "workloads": [BILLING], "allow_plaintext": True,
                  "to": {"host": "localhost", "port": moto.port, "methods": ["POST"], "paths": ["/"]},
                  "inject": {"credential": "aws", "sigv4": {"region": "us-east-1", "service": "sts"}}},
                 {"name": "to-echo", "workloads": [BILLING],
                  "to": {"host": "localhost", "port": upstream.port},
                  "inject": {"credential": "aws", "sigv4": {"region": "us-east-1", "service": "sts"}}}]
        p = proxy_factory(base_config(pki, rules=rules, credentials=creds),
                          env={"TEST_AWS_KEY_ID": moto.key_id, "TEST_AWS_SECRET": moto.secret})
        cert, key = pki.svid(BILLING)
        client_headers = ("-H", f"Authorization: {CLIENT_SIGNATURE}", "-H", "X-Amz-Date: 20200101T000000Z",
                          "-H", "X-Amz-Security-Token: client-token")
        # Control: moto really authenticates; the client's own signature alone is refused.
        direct = httpx.post(moto.url + "/", content=b"Action=GetCallerIdentity&Version=2011-06-15", trust_env=False,
                            headers={"Authorization": CLIENT_SIGNATURE, "X-Amz-Date": "20200101T000000Z",
                                     "Content-Type": "application/x-www-form-urlencoded"})
        assert direct.status_code == 403, direct.text
        # Plain-http upstream: the client proves its identity on the proxy hop.
        r = curl("--proxy-cacert", pki.interception_ca_cert, "--proxy-cert", cert, "--proxy-key", key,
                 *client_headers, "-d", "Action=GetCallerIdentity&Version=2011-06-15",
                 f"http://localhost:{moto.port}/", proxy=f"https://localhost:{p.port}")
        assert r.status == 200, r
        assert "AKIDCLIENTONLY" not in r.body
        assert f"assumed-role/reader/{role_session_name(BILLING)}</Arn>" in r.body
        # The same credential on a TLS echo upstream shows exactly what was sent.
        e = curl("--cacert", pki.interception_ca_cert, "--cert", cert, "--key", key, *client_headers,
                 "-d", "Action=GetCallerIdentity&Version=2011-06-15", f"{upstream.url}/", proxy=p.url)
        assert e.status == 200, e
        (sent,) = upstream.requests
        headers = {}
        for k, v in sent["headers"]:
            headers.setdefault(k.lower(), []).append(v)
        (authz,) = headers["authorization"]
        assert authz.startswith("AWS4-HMAC-SHA256 Credential=") and "AKIDCLIENTONLY" not in authz
        assert "/us-east-1/sts/aws4_request" in authz
        (amz_date,) = headers["x-amz-date"]
        assert amz_date != "20200101T000000Z"
        signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        assert abs((datetime.now(UTC) - signed_at).total_seconds()) < 60
        (session_token,) = headers["x-amz-security-token"]
        assert session_token != "client-token"
        assert "[REDACTED]" in e.body  # the echo sent the signature and token back; redacted
        assert_never_leaked(p, [session_token, authz], r.body, e.body)
