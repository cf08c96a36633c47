"""Provider storms (issue 10 §3): how many token-endpoint calls a failing provider gets, and what clients see.

Real parts on loopback: the test IdP (``tests/helpers/idp.py``, counting every token call), the echo
upstream, one ``secretless-proxy run`` process with the default broker settings, and a few
client threads with workload certificates sending requests back to back. Scenarios:

- ``500``:   the token endpoint answers 500 to every call; ``--requests`` (80) requests.
- ``empty``: the token endpoint answers an empty 200; 60 requests.
- ``slow``:  the token endpoint answers after 10 s (the broker times out after 5 s); requests for
             ``--slow-seconds`` (20), then it recovers: requests continue until the first 200.
             Reported: p50/p90 request latency while slow, and how long 503s continued after recovery.

Usage (from the repository root; about 1 minute)::

    .venv/bin/python bench/storm.py                 # all three
    .venv/bin/python bench/storm.py --scenarios 500 --clients 4

Run it against another checkout's package with ``PYTHONPATH=/path/to/checkout`` (the proxy
process imports from it; the harness only needs the test helpers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers.e2e_broker import TimedIdP  # noqa: E402
from helpers.proxy import BIN, start_proxy  # noqa: E402
from helpers.upstream import EchoUpstream  # noqa: E402

from secretless_proxy.dev import certs  # noqa: E402

WORKLOAD = "spiffe://example.org/ns/prod/sa/billing"
CLIENT_SECRET = "cs-storm-0123456789abcdef"


def pki(d: Path) -> dict[str, str]:
    wca, uca = certs.make_ca(common_name="storm workload CA"), certs.make_ca(common_name="storm upstream CA")
    certs.write_ca(wca, d / "workload")
    (d / "upstream-ca.pem").write_bytes(uca.cert_pem())
    cert, key = certs.write_svid(certs.make_svid(ca=wca, spiffe_id=WORKLOAD), d / "svid", ca=wca)
    return {"trust": str(d / "workload" / "ca.pem"), "upstream_ca": str(d / "upstream-ca.pem"),
            "interception": str(d / "interception"), "cert": str(cert), "key": str(key), "_uca": uca}  # type: ignore[dict-item]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))] if ordered else float("nan")


class Harness:
    def __init__(self, tmp: Path, clients: int) -> None:
        self.tmp, self.clients = tmp, clients
        tmp.mkdir(parents=True, exist_ok=True)
        self.p = pki(tmp)
        uca = self.p.pop("_uca")
        self.idp = TimedIdP(server_cert=certs.make_server_cert(ca=uca), clients={"billing": CLIENT_SECRET}).__enter__()
        self.upstream = EchoUpstream(server_cert=certs.make_server_cert(ca=uca)).__enter__()
        config = {
            "version": 1,
            "identity": {"trust_bundle": self.p["trust"], "trust_domains": ["example.org"]},
            "interception_ca": self.p["interception"],
            "upstream": {"ca_bundle": self.p["upstream_ca"]},
            "credentials": {"payments": {"kind": "oauth2_client_credentials", "token_url": self.idp.token_url,
                                         "client_id": "billing", "client_secret": "env:STORM_CLIENT_SECRET"}},
            "rules": [{"name": "billing", "workloads": [WORKLOAD],
                       "to": {"host": "localhost", "port": self.upstream.port},
                       "inject": {"credential": "payments", "header": "Authorization",
                                  "format": "Bearer {secret}"}}],
            "default": "deny",
        }
        cfg = tmp / "config.yaml"
        cfg.write_text(yaml.safe_dump(config))
        env = {**os.environ, "STORM_CLIENT_SECRET": CLIENT_SECRET}
        self.proxy = start_proxy([str(BIN / "secretless-proxy"), "run", "--config", str(cfg), "--listen",
                                  "127.0.0.1:0"], log_path=tmp / "proxy.log", env=env)
        self.local = threading.local()

    def session(self) -> requests.Session:
        s = getattr(self.local, "s", None)
        if s is None:
            s = self.local.s = requests.Session()
            s.trust_env = False
            s.proxies = {"https": self.proxy.url}
            s.verify = str(Path(self.p["interception"]) / "mitmproxy-ca-cert.pem")
            s.cert = (self.p["cert"], self.p["key"])
        return s

    def one(self, results: list[tuple[float, float, int, str | None]]) -> None:
        t0 = time.monotonic()
        try:
            r = self.session().get(f"{self.upstream.url}/v1/x", timeout=60)
            status, retry = r.status_code, r.headers.get("Retry-After")
        except requests.RequestException:
            status, retry = 0, None
        results.append((t0, time.monotonic() - t0, status, retry))

    def run(self, *, count: int | None = None, until: float | None = None,
            stop: threading.Event | None = None) -> list[tuple[float, float, int, str | None]]:
        """Requests from ``clients`` threads: ``count`` in all, or until monotonic ``until`` / ``stop``."""
        results: list[tuple[float, float, int, str | None]] = []
        lock = threading.Lock()
        left = [count]

        def worker() -> None:
            while True:
                with lock:
                    if count is not None:
                        if left[0] <= 0:
                            return
                        left[0] -= 1
                if until is not None and time.monotonic() >= until:
                    return
                if stop is not None and stop.is_set():
                    return
                self.one(results)

        threads = [threading.Thread(target=worker) for _ in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def close(self) -> None:
        self.proxy.stop()
        self.upstream.__exit__(None, None, None)
        self.idp.__exit__(None, None, None)


def failing(h: Harness, mode: str, requests_: int) -> dict:
    h.idp.mode = mode
    before = h.idp.token_calls
    started = time.monotonic()
    res = h.run(count=requests_)
    statuses = [s for _, _, s, _ in res]
    return {"scenario": mode, "requests": len(res), "provider_calls": h.idp.token_calls - before,
            "seconds": round(time.monotonic() - started, 2), "status_counts": {str(s): statuses.count(s) for s in set(statuses)},
            "retry_after": sorted({r for *_, r in res if r is not None})[:5],
            "p50_s": round(percentile([d for _, d, _, _ in res], 50), 4)}


def slow(h: Harness, seconds: float) -> dict:
    h.idp.mode, h.idp.hang_seconds = "hang", 10.0
    before = h.idp.token_calls
    res = h.run(until=time.monotonic() + seconds)
    calls_slow = h.idp.token_calls - before
    h.idp.mode = None
    recovered = time.monotonic()
    after: list[tuple[float, float, int, str | None]] = []
    deadline = recovered + 60
    while time.monotonic() < deadline:
        batch = h.run(count=h.clients)
        after += batch
        if any(s == 200 for _, _, s, _ in batch):
            break
    first_ok = min((t0 + d for t0, d, s, _ in after if s == 200), default=float("nan"))
    last_503 = max((t0 + d for t0, d, s, _ in after if s == 503), default=recovered)
    lat = [d for _, d, _, _ in res]
    return {"scenario": "slow (10 s)", "requests_while_slow": len(res), "provider_calls_while_slow": calls_slow,
            "p50_s": round(percentile(lat, 50), 3), "p90_s": round(percentile(lat, 90), 3),
            "max_s": round(max(lat), 3) if lat else None,
            "first_200_after_recovery_s": round(first_ok - recovered, 3),
            "503s_after_recovery_s": round(max(0.0, last_503 - recovered), 3),
            "requests_after_recovery": len(after)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--scenarios", default="500,empty,slow")
    ap.add_argument("--clients", type=int, default=4, help="client threads sending back to back")
    ap.add_argument("--slow-seconds", type=float, default=20.0)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    out = []
    with tempfile.TemporaryDirectory(prefix="storm-") as tmp:
        for name in args.scenarios.split(","):
            h = Harness(Path(tmp) / name, args.clients)  # a fresh proxy per scenario: no state carried over
            try:
                if name == "500":
                    out.append(failing(h, "server_error", 80))
                elif name == "empty":
                    out.append(failing(h, "empty", 60))
                elif name == "slow":
                    out.append(slow(h, args.slow_seconds))
                else:
                    raise SystemExit(f"unknown scenario {name!r}")
            finally:
                h.close()
            print(json.dumps(out[-1]), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
