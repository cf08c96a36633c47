"""Addon overhead per request, in process: static injection vs a brokered credential on a warm cache.

The socket benchmark (run.sh) swings ±25% round to round on a 2-core machine, which hides
differences of a few percent. This measures only what secretless-proxy adds — the request,
responseheaders and response hooks with identity, policy, broker, injection, redaction,
metrics and a file audit sink — on mitmproxy's test flows, side by side in one run, and prints
the ratio. Usage: .venv/bin/python bench/addon_overhead.py [--flows 6000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml
from mitmproxy import certs as mcerts
from mitmproxy import tls
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.addons.tlsconfig import TlsConfig
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.test import taddons, tflow

from secretless_proxy.addon import Secretless
from secretless_proxy.dev import certs

WORKLOAD = "spiffe://example.org/bench"
HOST = "localhost"


async def per_request_us(credential: dict, *, flows: int, repeats: int) -> float:
    """Median microseconds per request through the three hooks, after one warm-up request."""
    return (await per_request_modes(credential, flows=flows, repeats=repeats, modes=("warm",)))["warm"]


async def per_request_modes(credential: dict, *, flows: int, repeats: int, modes: tuple[str, ...]) -> dict[str, float]:
    """Median microseconds per request for each destination mode, passes interleaved (one context).

    ``warm`` — the destination check as the proxy runs it (resolve through the warm cache,
    classify, pin); ``off`` — admission skipped, i.e. the request path before issue 16;
    ``connect`` — ``warm`` plus the server_connect/server_connected hooks on every request (the
    cost when no upstream connection is ever reused).
    """
    d = Path(tempfile.mkdtemp(prefix="secretless-overhead-"))
    ca = certs.make_ca()
    certs.write_ca(ca, d / "ca")
    cfg = {"version": 1, "identity": {"trust_bundle": str(d / "ca" / "ca.pem"), "trust_domains": ["example.org"]},
           "interception_ca": str(d / "ic"), "audit": {"sinks": [f"file:{d / 'audit.log'}"]},
           "credentials": {"c": credential},
           "rules": [{"name": "r", "workloads": [WORKLOAD], "to": {"host": HOST},
                      "inject": {"credential": "c", "header": "Authorization", "format": "Bearer {secret}"}}],
           # localhost (/etc/hosts) through the system resolver, cached for the whole run: a warm cache
           "upstream": {"allow_private": ["127.0.0.0/8"], "resolver": {"system_cache_seconds": 3600}}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    addon = Secretless()
    with taddons.context(Proxyserver(), TlsConfig(), addon) as tctx:
        tctx.configure(addon, secretless_config=str(d / "config.yaml"))
        await addon.services.start()
        client = tflow.tclient_conn()
        client.sni = HOST
        real_admit = addon.destinations.admit

        async def skip(flow, decision) -> None:
            return None
        client.certificate_list = [mcerts.Cert(certs.make_svid(ca=ca, spiffe_id=WORKLOAD).cert)]
        addon.tls_established_client(tls.TlsData(conn=client, context=None))  # type: ignore[arg-type]
        batch = []
        for _ in range(flows):
            f = tflow.tflow(client_conn=client)
            f.request.scheme, f.request.host, f.request.port = "https", HOST, 443
            f.request.headers["Host"] = HOST
            batch.append((f, tflow.tresp(), ServerConnectionHookData(server=tflow.tserver_conn(), client=client)))
        samples: dict[str, list[float]] = {m: [] for m in modes}
        for _, destination in [(r, m) for r in range(repeats + 1) for m in modes]:  # first round: warm-up
            addon.destinations.admit = skip if destination == "off" else real_admit  # type: ignore[method-assign]
            addon._decided.clear()  # each pass decides its flows again (a decided flow is skipped in `request`)
            t0 = time.perf_counter()
            for f, resp, conn in batch:
                f.response = None
                await addon.request(f)
                assert f.response is None, f.response  # injected, not refused
                if destination == "connect":
                    conn.server.__dict__.update(address=(HOST, 443), state=ConnectionState.CLOSED, error=None)
                    addon.server_connect(conn)
                    assert conn.server.error is None and conn.server.address == ("127.0.0.1", 443)
                    conn.server.state, conn.server.peername = ConnectionState.OPEN, ("127.0.0.1", 443)
                    addon.server_connected(conn)
                f.response = resp
                addon.responseheaders(f)
                addon.response(f)
            samples[destination].append((time.perf_counter() - t0) / flows * 1e6)
        await addon.services.stop()
        return {m: statistics.median(v[1:]) for m, v in samples.items()}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flows", type=int, default=6000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    logging.disable(logging.WARNING)
    os.environ["BENCH_STATIC_KEY"] = "sk_bench_" + os.urandom(8).hex()
    static = await per_request_us({"kind": "static", "secret": "env:BENCH_STATIC_KEY"}, flows=args.flows, repeats=args.repeats)
    brokered = await per_request_us({"kind": "jwt", "ttl_seconds": 3600}, flows=args.flows, repeats=args.repeats)
    dest = await per_request_modes({"kind": "static", "secret": "env:BENCH_STATIC_KEY"}, flows=args.flows,
                                   repeats=args.repeats, modes=("off", "warm", "connect"))
    unchecked, checked, connect = dest["off"], dest["warm"], dest["connect"]
    print(f"addon overhead per request (median of {args.repeats} x {args.flows} flows):")
    print(f"  static injection (sync fast path)        {static:7.1f} us")
    print(f"  brokered credential, warm cache (jwt)    {brokered:7.1f} us   ratio {brokered / static:.2f}x")
    print(f"destination check (issue 16), static injection, warm resolver cache (passes interleaved, "
          f"median of {args.repeats}):")
    print(f"  without the check (the path before it)   {unchecked:7.1f} us")
    print(f"  with the check                           {checked:7.1f} us   ratio {checked / unchecked:.2f}x   "
          f"(+{checked - unchecked:.1f} us)")
    print(f"  with the check + connect hooks each time {connect:7.1f} us   ratio {connect / unchecked:.2f}x   "
          "(no keep-alive reuse: one upstream connection per request)")


if __name__ == "__main__":
    asyncio.run(main())
