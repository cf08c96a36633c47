"""Proxy memory while large bodies pass (issue 8 §3): RSS growth during 200 MiB transfers.

    .venv/bin/python bench/memory.py [--mib 200]

Starts a TLS upstream on loopback (GET streams N MiB, PUT reads and discards), a real
``secretless-proxy run`` with three rules (inject + echo check, inject with ``echo_check: false``,
allow) and drives curl with a workload certificate through it. For each case it samples the proxy's
VmRSS every 20 ms and prints the growth over the RSS measured just before the transfer. Target: at
most 64 MiB for each streamed case. The inject rule with the echo check on buffers at most
``limits.max_response_scan_bytes`` of a response and withholds a larger one (502
``response_too_large``): its row shows that bound, not a streamed download.
"""

from __future__ import annotations

import argparse
import http.server
import os
import re
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from secretless_proxy.dev import certs  # noqa: E402
from secretless_proxy.dev.echoserver import tls_server_context  # noqa: E402

BIN = Path(sys.executable).parent
WORKLOAD = "spiffe://example.org/ns/bench/sa/mem"
CHUNK = 1024 * 1024


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        n = int(self.path.rsplit("/", 1)[-1]) * CHUNK
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        block = b"d" * CHUNK
        for _ in range(n // CHUNK):
            self.wfile.write(block)

    def do_PUT(self) -> None:
        left, got = int(self.headers["Content-Length"]), 0
        while left:
            data = self.rfile.read(min(left, CHUNK))
            if not data:
                break
            left -= len(data)
            got += len(data)
        body = str(got).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # the proxy aborts a withheld download mid-body: expected, not worth a traceback


# The upstreams are on loopback, which the destination check refuses unless a rule allows it.
LOOPBACK = ["127.0.0.0/8", "::1/128"]

def upstream(ctx) -> tuple[_Server, int]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


def rss_kib(pid: int) -> int:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) if m else 0


def measure(pid: int, argv: list[str]) -> tuple[float, float, str]:
    """(baseline MiB, peak growth MiB, curl's %{http_code}) while argv runs."""
    base = rss_kib(pid)
    peak = base
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while proc.poll() is None:
        peak = max(peak, rss_kib(pid))
        time.sleep(0.02)
    peak = max(peak, rss_kib(pid))
    return base / 1024, (peak - base) / 1024, proc.stdout.read().strip()[-3:]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=200)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="secretless-mem-"))
    wca, uca = certs.make_ca(common_name="bench workload CA"), certs.make_ca(common_name="bench upstream CA")
    certs.write_ca(wca, d / "workload")
    (d / "upstream-ca.pem").write_bytes(uca.cert_pem())
    cert, key = certs.write_svid(certs.make_svid(ca=wca, spiffe_id=WORKLOAD), d / "svid", ca=wca)
    ups = [upstream(tls_server_context(certs.make_server_cert(ca=uca))) for _ in range(3)]
    ports = [p for _, p in ups]
    inject = {"credential": "k", "header": "Authorization", "format": "Bearer {secret}"}
    cfg = {
        "version": 1,
        "identity": {"trust_bundle": str(d / "workload" / "ca.pem"), "trust_domains": ["example.org"]},
        "interception_ca": str(d / "interception"), "upstream": {"ca_bundle": str(d / "upstream-ca.pem")},
        "credentials": {"k": {"kind": "static", "secret": "env:BENCH_KEY"}},
        "rules": [
            {"name": "inject-checked", "workloads": [WORKLOAD], "to": {"host": "localhost", "port": ports[0], "private": LOOPBACK}, "inject": inject},
            {"name": "inject-streamed", "workloads": [WORKLOAD], "to": {"host": "localhost", "port": ports[1], "private": LOOPBACK},
             "inject": {**inject, "echo_check": False}},
            {"name": "allow", "workloads": [WORKLOAD], "to": {"host": "localhost", "port": ports[2], "private": LOOPBACK}, "action": "allow"},
        ],
        "limits": {"max_request_body_bytes": (args.mib + 16) * CHUNK},
        "audit": {"sinks": [f"file:{d / 'audit.log'}"]},
    }
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    with open(d / "proxy.log", "wb") as log:  # the child keeps its own copy of the descriptor
        proxy = subprocess.Popen([str(BIN / "secretless-proxy"), "run", "--config", str(d / "c.yaml"),
                                  "--listen", "127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "BENCH_KEY": "bench-secret-value"})
    try:
        deadline = time.monotonic() + 20
        while not (m := re.search(rb"listening on [^\s:]+:(\d+)", (d / "proxy.log").read_bytes())):
            if time.monotonic() > deadline or proxy.poll() is not None:
                print((d / "proxy.log").read_text(), file=sys.stderr)
                return 1
            time.sleep(0.05)
        pport = int(m.group(1))
        upload = d / "upload.bin"
        with open(upload, "wb") as fh:
            fh.truncate(args.mib * CHUNK)
        curl = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{pport}",
                "--cacert", str(d / "interception" / "mitmproxy-ca-cert.pem"), "--cert", str(cert), "--key", str(key)]
        subprocess.run([*curl, f"https://localhost:{ports[2]}/1"], check=True, capture_output=True)  # warm up
        print(f"{'case':52} {'status':>6} {'RSS before':>11} {'growth':>9}")
        wrong = []
        for name, port in (("inject rule, echo check (default)", ports[0]), ("inject rule, echo_check: false", ports[1]),
                           ("allow rule", ports[2])):
            for what, extra in (("download", [f"https://localhost:{port}/{args.mib}"]),
                                ("upload", ["-T", str(upload), f"https://localhost:{port}/up"])):
                base, growth, status = measure(proxy.pid, [*curl, *extra])
                print(f"{f'{args.mib} MiB {what}, {name}':52} {status:>6} {base:>8.1f} MiB {growth:>5.1f} MiB")
                # Only the echo-checked download is over the scan window (withheld, 502); the rest must pass.
                want = "502" if (port, what) == (ports[0], "download") else "200"
                if status != want:
                    wrong.append(f"{what} through {name}: HTTP {status}, expected {want}")
        for line in wrong:
            print(f"bench: {line}: the figure above is not a transfer", file=sys.stderr)
        return 1 if wrong else 0
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        for srv, _ in ups:
            srv.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
