"""End to end, issue 10 §3: a failing provider is damped, not hammered.

A real proxy process, the test IdP failing on purpose and counting every token call, the echo
upstream, and clients with workload certificates sending requests back to back. Provider calls
must follow the breaker's backoff schedule, not the request rate; every 503 says when to retry;
no request waits longer than ``broker.max_wait_seconds``; recovery is picked up at the next probe;
the breaker shows in the metrics.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import test_e2e_broker
from helpers.e2e_broker import TimedIdP, metric
from helpers.net import free_port, wait_for
from helpers.proxy import base_config
from test_e2e_broker import CLIENT_SECRET, ENV, inject_rule, oauth_credential, refused

from secretless_proxy.dev import certs

RULE = "billing-to-api"
sessions = test_e2e_broker.sessions  # requests sessions through a proxy with a workload certificate


@pytest.fixture
def idp(pki) -> Iterator[TimedIdP]:
    with TimedIdP(server_cert=certs.make_server_cert(ca=pki.upstream_ca), clients={"billing": CLIENT_SECRET}) as server:
        yield server
    assert not server.errors, server.errors[0]


def start(proxy_factory, pki, upstream, idp, **broker) -> tuple[object, int]:
    port = free_port()
    config = base_config(pki, rules=[inject_rule(upstream)], credentials={"payments": oauth_credential(idp)},
                         admin={"listen": f"127.0.0.1:{port}"}, broker=broker)
    return proxy_factory(config, env=ENV), port


def burst(make: Callable[[], requests.Session], url: str, n: int, clients: int = 4) -> list[tuple[float, requests.Response]]:
    """``n`` requests from ``clients`` threads back to back, a session per thread; (seconds taken, response) each."""
    local = threading.local()
    lock = threading.Lock()

    def one(_: int) -> tuple[float, requests.Response]:
        if not hasattr(local, "session"):
            with lock:  # the sessions fixture is not thread-safe
                local.session = make()
        t0 = time.monotonic()
        r = local.session.get(url, timeout=30)
        return time.monotonic() - t0, r

    with ThreadPoolExecutor(clients) as threads:
        return list(threads.map(one, range(n)))


class TestStorm:
    @pytest.mark.parametrize(("mode", "requests_"), [("server_error", 80), ("empty", 60)])
    def test_provider_calls_follow_the_schedule(self, proxy_factory, pki, upstream, idp, sessions, mode, requests_):
        """500s / empty 200s: N requests cost the first fill's attempts plus a probe or two, each 503 with Retry-After."""
        idp.mode = mode
        proxy, port = start(proxy_factory, pki, upstream, idp)
        started = time.monotonic()
        results = burst(lambda: sessions(proxy), f"{upstream.url}/v1/storm", requests_)
        elapsed = time.monotonic() - started
        for _, r in results:
            refused(r, 503, "credential_unavailable", RULE)
            assert int(r.headers["Retry-After"]) >= 1, r.headers
        # First fill: 1 + retries (2) attempts. Then one attempt per breaker step: delays of at least
        # 0.25, 0.5, 1, 2 ... s, so at most about log2(elapsed / 0.25) + 1 probes in ``elapsed``.
        probes = 2 + int(elapsed / 0.25).bit_length()
        assert idp.token_calls <= 3 + probes, (idp.token_calls, elapsed)
        assert idp.token_calls < requests_ / 4
        assert upstream.requests == []  # nothing went out without its credential
        assert metric(port, "secretless_credential_breaker_open", credential="payments") == 1
        # Refused without a call: all but the (at most 4) requests that waited for the first fill and the probes.
        assert metric(port, "secretless_credential_backoff_total", credential="payments") >= requests_ - 4 - idp.token_calls

    def test_recovery_is_picked_up_at_the_next_probe(self, proxy_factory, pki, upstream, idp, sessions):
        """After the endpoint recovers, the request sent after Retry-After gets a token; the breaker closes."""
        idp.mode = "server_error"
        proxy, port = start(proxy_factory, pki, upstream, idp)
        s = sessions(proxy)
        r = s.get(f"{upstream.url}/v1/down")
        refused(r, 503, "credential_unavailable", RULE)
        idp.mode = None
        deadline = time.monotonic() + 10
        while True:
            r = s.get(f"{upstream.url}/v1/up")
            if r.status_code == 200:
                break
            refused(r, 503, "credential_unavailable", RULE)
            assert time.monotonic() < deadline, "recovery not picked up"
            time.sleep(int(r.headers["Retry-After"]))
        assert metric(port, "secretless_credential_breaker_open", credential="payments") == 0

    def test_no_request_waits_longer_than_the_budget(self, proxy_factory, pki, upstream, idp, sessions):
        """A token endpoint that hangs: requests are refused within max_wait_seconds, fast once the breaker opens."""
        idp.mode, idp.hang_seconds = "hang", 10.0
        proxy, port = start(proxy_factory, pki, upstream, idp, timeout_seconds=3, retries=0, max_wait_seconds=1)
        results = burst(lambda: sessions(proxy), f"{upstream.url}/v1/slow", 40)
        waits = sorted(d for d, _ in results)
        for _, r in results:
            refused(r, 503, "credential_unavailable", RULE)
            assert "Retry-After" in r.headers
        assert waits[-1] < 1 + 2, waits[-4:]  # the budget (1 s) plus client and proxy overhead
        assert idp.token_calls <= 3, idp.token_calls
        wait_for(lambda: metric(port, "secretless_credential_breaker_open", credential="payments") == 1,
                 timeout=5, what="the breaker to open once the fill times out")
