"""End to end, issue 10 §4: two proxy replicas on one redis-server ignore events they cannot verify.

The attacker is redis-py with plain access to Redis: it publishes a grant revocation (what a
replica on main honoured, refusing the grant's rule everywhere) and replays a genuine event it
captured off the channel. Neither has any effect, both are counted on every replica
(``secretless_store_events_rejected_total``), and a genuine revocation still stops both replicas.
"""

from __future__ import annotations

import json
import time

import test_e2e_replicas as replicas
from helpers.e2e_broker import metric
from helpers.e2e_replicas import PREFIX, redis_client
from helpers.net import wait_for
from test_e2e_replicas import Fleet, metric_sum, refused

fleet, idp, ids, redis_server = replicas.fleet, replicas.idp, replicas.ids, replicas.redis_server
CHANNEL = f"{PREFIX}events"


class TestForgedEvents:
    def test_forged_and_replayed_events_have_no_effect(self, fleet: Fleet):
        """A forged revocation and a replayed event change nothing on A or B and are counted; a real revocation works."""
        a, b = fleet.start(2)
        created = fleet.admin(a).grant("ops-grant")
        assert created.status_code == 201, created.text
        gid = created.json()["id"]
        sa, sb = fleet.session(a), fleet.session(b)
        for s in (sa, sb):
            assert s.get(fleet.url("/grant/before")).status_code == 200
        with redis_client(fleet.redis.url) as r:
            pubsub = r.pubsub()
            pubsub.subscribe(CHANNEL)
            assert pubsub.get_message(timeout=2)["type"] == "subscribe"
            # A forged revocation of the live grant, and an unsigned eviction.
            r.publish(CHANNEL, json.dumps({"type": "grant_revoked", "id": gid, "origin": "attacker"}))
            r.publish(CHANNEL, json.dumps({"type": "credential_evicted", "key": "payments/x/y"}))
            for replica in (a, b):
                wait_for(lambda rp=replica: metric(rp.metrics_port, "secretless_store_events_rejected_total",
                                                   reason="unsigned") == 2, timeout=5, what="unsigned events counted")
            for s in (sa, sb):
                assert s.get(fleet.url("/grant/after-forgery")).status_code == 200  # the grant still holds
            # A genuine event captured off the channel (a grant created through B), published again.
            assert fleet.admin(b).grant("ops-grant-oauth").status_code == 201
            deadline = time.monotonic() + 5
            captured = None
            while captured is None:
                assert time.monotonic() < deadline, "no grant_created event seen on the channel"
                msg = pubsub.get_message(timeout=1)
                if msg and msg["type"] == "message" and json.loads(msg["data"])["type"] == "grant_created":
                    captured = msg["data"]
            r.publish(CHANNEL, captured)
            pubsub.close()
        both = [a, b]
        wait_for(lambda: metric_sum(both, "secretless_store_events_rejected_total", reason="replayed") == 2,
                 timeout=5, what="the replay counted on both replicas")
        assert metric_sum(both, "secretless_store_events_rejected_total", reason="forged") == 0
        # The genuine revocation through B still stops A at once.
        assert fleet.admin(b).revoke(gid).status_code == 200
        refused(sa.get(fleet.url("/grant/revoked")), 403, "grant_required", "ops-grant")
        refused(sb.get(fleet.url("/grant/revoked")), 403, "grant_required", "ops-grant")
