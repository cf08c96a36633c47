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
from mitmproxy.test import taddons, tflow

from secretless_proxy import certs
from secretless_proxy.addon import Secretless

WORKLOAD = "spiffe://example.org/bench"


async def per_request_us(credential: dict, *, flows: int, repeats: int) -> float:
    """Median microseconds per request through the three hooks, after one warm-up request."""
    d = Path(tempfile.mkdtemp(prefix="secretless-overhead-"))
    ca = certs.make_ca()
    certs.write_ca(ca, d / "ca")
    cfg = {"version": 1, "identity": {"trust_bundle": str(d / "ca" / "ca.pem"), "trust_domains": ["example.org"]},
           "interception_ca": str(d / "ic"), "audit": {"sinks": [f"file:{d / 'audit.log'}"]},
           "credentials": {"c": credential},
           "rules": [{"name": "r", "workloads": [WORKLOAD], "to": {"host": "api.example.com"},
                      "inject": {"credential": "c", "header": "Authorization", "format": "Bearer {secret}"}}]}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    addon = Secretless()
    with taddons.context(Proxyserver(), TlsConfig(), addon) as tctx:
        tctx.configure(addon, secretless_config=str(d / "config.yaml"))
        await addon.services.start()
        client = tflow.tclient_conn()
        client.sni = "api.example.com"
        client.certificate_list = [mcerts.Cert(certs.make_svid(ca=ca, spiffe_id=WORKLOAD).cert)]
        addon.tls_established_client(tls.TlsData(conn=client, context=None))  # type: ignore[arg-type]
        batch = []
        for _ in range(flows):
            f = tflow.tflow(client_conn=client)
            f.request.scheme, f.request.host, f.request.port = "https", "api.example.com", 443
            f.request.headers["Host"] = "api.example.com"
            batch.append((f, tflow.tresp()))
        samples = []
        for _ in range(repeats + 1):  # the first pass warms the cache and is dropped
            t0 = time.perf_counter()
            for f, resp in batch:
                f.response = None
                await addon.request(f)
                assert f.response is None, f.response  # injected, not refused
                f.response = resp
                addon.responseheaders(f)
                addon.response(f)
            samples.append((time.perf_counter() - t0) / flows * 1e6)
        await addon.services.stop()
        return statistics.median(samples[1:])


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flows", type=int, default=6000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    logging.disable(logging.WARNING)
    os.environ["BENCH_STATIC_KEY"] = "sk_bench_" + os.urandom(8).hex()
    static = await per_request_us({"kind": "static", "secret": "env:BENCH_STATIC_KEY"}, flows=args.flows, repeats=args.repeats)
    brokered = await per_request_us({"kind": "jwt", "ttl_seconds": 3600}, flows=args.flows, repeats=args.repeats)
    print(f"addon overhead per request (median of {args.repeats} x {args.flows} flows):")
    print(f"  static injection (sync fast path)        {static:7.1f} us")
    print(f"  brokered credential, warm cache (jwt)    {brokered:7.1f} us   ratio {brokered / static:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
