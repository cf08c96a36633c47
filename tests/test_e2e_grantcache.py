"""End to end, issue 12 §2: grant checks served from each replica's memory, and where that stops.

Proxy replicas on one real redis-server (the fleet of test_e2e_replicas). Redis's own ``INFO
commandstats`` counts the grant lookups (``EVALSHA``). Most tests set ``grant_cache_seconds: 30``
so that the staleness bound cannot be what refuses: a refusal within a second is then the event,
the outage or the reconnect doing its job. The frozen-Redis test keeps the default bound (0.5 s),
which is all a server that stops answering without closing its sockets leaves to go on.
"""

from __future__ import annotations

import time

import requests
import test_e2e_replicas as replicas
from helpers.e2e_broker import metric
from helpers.e2e_replicas import redis_client
from helpers.net import wait_for
from test_e2e_replicas import Fleet, readyz, refused

fleet, idp, ids, redis_server = replicas.fleet, replicas.idp, replicas.ids, replicas.redis_server
LONG = {"grant_cache_seconds": 30}  # longer than any test: only events, health and reconnects end an entry
DEFAULT_BOUND = 0.5


def evalsha_calls(fleet: Fleet) -> int:
    with redis_client(fleet.redis.url) as r:
        return int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def warm(fleet: Fleet, session: requests.Session, path: str = "/grant/warm") -> None:
    r = session.get(fleet.url(path))
    assert r.status_code == 200, r.text


class TestCachedChecks:
    N = 30

    def test_cached_requests_send_no_evalsha_and_a_revocation_on_a_refuses_on_b(self, fleet: Fleet):
        """B's warm grant costs Redis no EVALSHA for 30 requests; revoked through A, B refuses the next request."""
        a, b = fleet.start(2, store=LONG)
        created = fleet.admin(a).grant("ops-grant")
        assert created.status_code == 201, created.text
        sb = fleet.session(b)
        warm(fleet, sb)
        before = evalsha_calls(fleet)
        for i in range(self.N):
            r = sb.get(fleet.url(f"/grant/{i}"))
            assert r.status_code == 200, r.text
        assert evalsha_calls(fleet) - before == 0  # every one of them a hit in B's memory
        assert metric(b.metrics_port, "secretless_grant_cache_total", result="hit") >= self.N
        assert fleet.admin(a).revoke(created.json()["id"]).status_code == 200
        # The event reaches B over pub/sub while this request travels: B refuses as soon as it has it,
        # within a second, though its cache bound here is 30 s (under load the event can trail the
        # first request by a few milliseconds, which the full suite saw once).
        t0 = time.monotonic()
        while (r := sb.get(fleet.url("/grant/revoked"))).status_code == 200:
            assert time.monotonic() - t0 < 1.0, "the revocation event did not end B's cached grant"
        refused(r, 403, "grant_required", "ops-grant")
        assert time.monotonic() - t0 < 1.0

    def test_grant_on_a_honoured_on_b_at_once(self, fleet: Fleet):
        """A refusal is never cached: B refused before the grant, then honours a grant made through A at once."""
        a, b = fleet.start(2, store=LONG)
        sb = fleet.session(b)
        refused(sb.get(fleet.url("/grant/before")), 403, "grant_required", "ops-grant")
        assert fleet.admin(a).grant("ops-grant").status_code == 201
        warm(fleet, sb, "/grant/after")


class TestFailClosed:
    def test_redis_killed_the_next_request_is_503_despite_a_warm_cache(self, fleet: Fleet):
        """Redis killed with B's cache warm for 30 s: the first request after it is 503 store_unavailable."""
        (b,) = fleet.start(1, store=LONG)
        assert fleet.admin(b).grant("ops-grant").status_code == 201
        sb = fleet.session(b)
        warm(fleet, sb)
        warm(fleet, sb, "/grant/hit")
        assert metric(b.metrics_port, "secretless_grant_cache_total", result="hit") >= 1
        fleet.redis.stop()  # SIGKILL: the sockets close with the process
        t0 = time.monotonic()
        refused(sb.get(fleet.url("/grant/outage")), 503, "store_unavailable", "ops-grant")
        assert time.monotonic() - t0 < 2.0  # the store's fail-fast deadline, not the cache's 30 s
        assert metric(b.metrics_port, "secretless_grant_cache_total", result="bypass") >= 1

    def test_reconnect_drops_the_cache(self, fleet: Fleet):
        """Redis restarted empty: once B is reconnected it refuses the grant Redis lost, though its entry was fresh."""
        (b,) = fleet.start(1, store=LONG)
        assert fleet.admin(b).grant("ops-grant").status_code == 201
        sb = fleet.session(b)
        warm(fleet, sb)
        fleet.redis.restart()  # no request in the gap: only the reconnect can tell B
        wait_for(lambda: readyz(b).status_code == 200, timeout=10, what="B reconnected")
        refused(sb.get(fleet.url("/grant/after")), 403, "grant_required", "ops-grant")

    def test_frozen_redis_is_honoured_at_most_the_bound_then_503(self, fleet: Fleet):
        """Redis frozen (SIGSTOP, sockets open): 200 only within the 0.5 s bound of the last lookup, then 503."""
        (b,) = fleet.start(1)
        assert fleet.admin(b).grant("ops-grant").status_code == 201
        sb = fleet.session(b)
        warm(fleet, sb)
        fleet.redis.pause()
        frozen = time.monotonic()
        seen: list[tuple[float, requests.Response]] = []
        try:
            while time.monotonic() - frozen < 2.5:
                sent = time.monotonic() - frozen
                seen.append((sent, sb.get(fleet.url(f"/grant/frozen/{len(seen)}"), timeout=10)))
                time.sleep(0.02)
        finally:
            fleet.redis.resume()
        honoured = [sent for sent, r in seen if r.status_code == 200]
        assert not honoured or max(honoured) < DEFAULT_BOUND + 0.1, honoured
        for _sent, r in seen:
            if r.status_code != 200:
                refused(r, 503, "store_unavailable", "ops-grant")
        assert seen[-1][1].status_code == 503
