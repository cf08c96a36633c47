"""End to end, issue 10 §2: a changed credential definition is never served a token minted under the old one.

Two ``secretless-proxy run`` replicas on one real redis-server, the test IdP (which encodes the
requested scope in each token, ``idp.token_scope``) and the echo upstream, which records the
Authorization header it received. The OAuth2 credential's scopes are narrowed from
``payments:admin`` to ``payments:read`` by a hot reload on both replicas, or by a restart; the
next request on either replica must carry a ``payments:read`` token, and the admin token must be
revoked at the IdP (RFC 7009).
"""

from __future__ import annotations

import copy
import signal
from pathlib import Path
from typing import Any

import test_e2e_replicas as replicas
import yaml
from helpers.e2e_replicas import started_replica
from helpers.idp import token_scope
from helpers.net import wait_for
from helpers.proxy import ProxyProcess
from test_e2e_replicas import ENV, Fleet, authorization, fleet_config

# The replica tests' fixtures (a fleet on a real redis-server, the timed IdP, workload certificates).
fleet, idp, ids, redis_server = replicas.fleet, replicas.idp, replicas.ids, replicas.redis_server

ADMIN_SCOPE, READ_SCOPE = "payments:admin", "payments:read"


def scoped_config(fleet: Fleet, scope: str) -> dict[str, Any]:
    config = fleet_config(fleet.pki, fleet.upstream, fleet.idp, fleet.redis.url)
    payments = config["credentials"]["payments"]
    payments["scopes"] = [scope]
    payments["revocation_url"] = fleet.idp.revoke_url
    return config


def config_path(proxy: ProxyProcess) -> Path:
    args = list(proxy.proc.args)  # type: ignore[arg-type]
    return Path(args[args.index("--config") + 1])


def start(fleet: Fleet, config: dict[str, Any]):
    replica = started_replica("ABCDEFG"[len(fleet.replicas)], fleet._factory(copy.deepcopy(config), env=ENV))
    fleet.replicas.append(replica)
    return replica


def reload(replica, config: dict[str, Any]) -> None:
    """Rewrite the replica's config file and wait for its 'config reloaded' line."""
    before = replica.proxy.output().count("config reloaded")
    path = config_path(replica.proxy)
    # Keep this replica's own admin listener port: a listener change only takes effect at restart.
    config = {**config, "admin": yaml.safe_load(path.read_text())["admin"]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    replica.proxy.proc.send_signal(signal.SIGHUP)  # not the file watcher's next look (up to 1 s)
    wait_for(lambda: replica.proxy.output().count("config reloaded") > before, timeout=10, what="config reloaded")


def scopes_seen(fleet: Fleet) -> list[str | None]:
    return [token_scope(v) for v in authorization(fleet.upstream, "/v1/")]


def admin_tokens(fleet: Fleet) -> list[str]:
    return [t for t, issued in fleet.idp.issued.items() if issued["scope"] == ADMIN_SCOPE]


class TestDefinitionChange:
    def test_reload_on_both_replicas(self, fleet: Fleet):
        """Scopes narrowed by a reload: the next request on A (which cached the admin token) and on B
        (which never used it, but Redis holds it) carries a payments:read token; the admin token is revoked."""
        a = start(fleet, scoped_config(fleet, ADMIN_SCOPE))
        b = start(fleet, scoped_config(fleet, ADMIN_SCOPE))
        assert fleet.session(a).get(fleet.url("/v1/before")).status_code == 200
        assert scopes_seen(fleet) == [ADMIN_SCOPE]
        narrowed = scoped_config(fleet, READ_SCOPE)
        reload(b, narrowed)  # B first: it has nothing of its own to evict, only what Redis holds
        fleet.upstream.requests.clear()
        r = fleet.session(b).get(fleet.url("/v1/b-after"))
        assert r.status_code == 200, r.text
        assert scopes_seen(fleet) == [READ_SCOPE]
        reload(a, narrowed)
        fleet.upstream.requests.clear()
        for replica in (a, b, a, b):
            assert fleet.session(replica).get(fleet.url("/v1/after")).status_code == 200
        assert scopes_seen(fleet) == [READ_SCOPE] * 4
        (old,) = admin_tokens(fleet)
        wait_for(lambda: old in [t for t, _ in fleet.idp.revoked], timeout=5, what="the admin token revoked")
        issued_read = [t for t, i in fleet.idp.issued.items() if i["scope"] == READ_SCOPE]
        assert len(issued_read) == 1, fleet.idp.issued  # one new token, shared by both replicas

    def test_restart_with_narrowed_scopes(self, fleet: Fleet):
        """A replica restarted with narrowed scopes injects a payments:read token, never the admin one
        still in Redis, and revokes the admin token it swept from the store."""
        a = start(fleet, scoped_config(fleet, ADMIN_SCOPE))
        assert fleet.session(a).get(fleet.url("/v1/before")).status_code == 200
        (old,) = admin_tokens(fleet)
        a.close()
        a.proxy.stop()
        fleet.upstream.requests.clear()
        a2 = start(fleet, scoped_config(fleet, READ_SCOPE))
        b = start(fleet, scoped_config(fleet, READ_SCOPE))
        for replica in (a2, b):
            r = fleet.session(replica).get(fleet.url("/v1/after-restart"))
            assert r.status_code == 200, r.text
        assert scopes_seen(fleet) == [READ_SCOPE, READ_SCOPE]
        wait_for(lambda: old in [t for t, _ in fleet.idp.revoked], timeout=5, what="the admin token revoked")
        assert all(old not in v for v in authorization(fleet.upstream, "/v1/"))

    def test_unchanged_definition_survives_restart(self, fleet: Fleet):
        """Restarting with the same definition reuses the token in Redis: no new token, nothing revoked."""
        config = scoped_config(fleet, READ_SCOPE)
        a = start(fleet, config)
        assert fleet.session(a).get(fleet.url("/v1/one")).status_code == 200
        a.close()
        a.proxy.stop()
        a2 = start(fleet, config)
        assert fleet.session(a2).get(fleet.url("/v1/two")).status_code == 200
        assert fleet.idp.token_calls == 1 and fleet.idp.revoked == []
        assert len(set(authorization(fleet.upstream, "/v1/"))) == 1
