#!/usr/bin/env python3
"""One-command benchmark: direct HTTPS vs mitmdump vs secretless-proxy vs squid ssl-bump.

Usage (from the repo root):  bash bench/run.sh [--duration 10] [--warmup 2] [--conns 20] [--cases a,b,c,d]

Everything (CAs, keys, configs, the compiled load generator, logs) lives in a fresh
temporary directory under /tmp that is deleted at the end (use --keep-tmp to keep it).
Every process the harness starts runs in its own process group and is killed at the end,
also on error or Ctrl-C. See bench/README.md for what each case measures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
UPSTREAM_HOST = "localhost"  # resolves to 127.0.0.1 via /etc/hosts for every proxy; no DNS traffic
BENCH_TOKEN = "bench-token-0123456789abcdef"
SQUID_HELPER_DIR = Path("/usr/lib/squid")

CASES = {
    "a": "direct HTTPS (no proxy)",
    "b": "mitmdump -q (CONNECT + TLS intercept)",
    "c": "secretless-proxy (mTLS + static inject)",
    "d": "squid ssl-bump + request_header_add",
}


# --------------------------------------------------------------------------- utilities

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def wait_file(path: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: {path} not created within {timeout}s")


def tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in lines[-n:])


class Procs:
    """Processes started by the harness; each in its own session/process group."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], logfile: Path, env: dict | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        log(f"start {name}: {' '.join(argv)}")
        fh = open(logfile, "ab")
        p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, cwd=cwd, start_new_session=True)
        fh.close()
        self.procs.append((name, p))
        return p

    def stop(self, p: subprocess.Popen, grace: float = 3.0) -> None:
        """SIGTERM the process group of p, then SIGKILL what is left."""
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # The group may still hold children (nginx workers, squid helpers) even if the leader exited.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass

    def stop_all(self) -> None:
        for name, p in reversed(self.procs):
            self.stop(p, grace=2.0)
        self.procs.clear()


def group_cpu_seconds(pgid: int) -> float:
    """user+system CPU seconds of all live processes in a process group (from /proc)."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        # fields[0] is state (field 3); pgrp is field 5, utime 14, stime 15
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / tck


# --------------------------------------------------------------------------- PKI

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "secretless-bench")])


def write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_ca(cn: str, key) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))


def make_server_cert(ca_cert, ca_key, key, host: str) -> x509.Certificate:
    import ipaddress
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(_name(host)).issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))


# --------------------------------------------------------------------------- bench

class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.procs = Procs()
        self.tmp = Path(tempfile.mkdtemp(prefix="secretless-bench-"))
        # squid drops privileges to 'proxy' when started as root; it must traverse this dir.
        self.tmp.chmod(0o711)
        self.bindir = Path(sys.executable).parent
        self.results: dict[str, dict] = {}  # aggregated over rounds
        self.rounds: dict[str, list[dict]] = {}  # one entry per round
        self.upstream_port = 0
        self.nginx: subprocess.Popen | None = None
        self.round = 1

    # ---- setup
    def build_loadgen(self) -> None:
        out = self.tmp / "loadgen"
        cc = os.environ.get("CC", "gcc")
        argv = [cc, "-O2", "-pthread", "-o", str(out), str(BENCH_DIR / "loadgen.c"), "-lssl", "-lcrypto"]
        log("compile " + " ".join(argv))
        subprocess.run(argv, check=True, timeout=120)
        self.loadgen = out

    def make_pki(self) -> None:
        pki = self.tmp / "pki"
        pki.mkdir(mode=0o755)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = make_ca("secretless-bench upstream CA", ca_key)
        self.bench_ca = pki / "bench-ca.pem"
        write_cert(ca, self.bench_ca)
        self.bench_ca.chmod(0o644)
        srv_key = ec.generate_private_key(ec.SECP256R1())
        srv = make_server_cert(ca, ca_key, srv_key, UPSTREAM_HOST)
        self.upstream_cert = pki / "upstream.pem"
        self.upstream_key = pki / "upstream-key.pem"
        write_cert(srv, self.upstream_cert)
        write_key(srv_key, self.upstream_key)
        del ca_key  # the upstream CA key is not needed after this and never written to disk

    # ---- upstream
    def start_nginx(self) -> None:
        d = self.tmp / "nginx"
        d.mkdir()
        (d / "body").mkdir()
        self.upstream_port = free_port()
        conf = d / "nginx.conf"
        conf.write_text(textwrap.dedent(f"""\
            daemon off;
            master_process on;
            worker_processes {self.args.nginx_workers};
            pid {d}/nginx.pid;
            error_log {d}/error.log warn;
            events {{ worker_connections 4096; }}
            http {{
                access_log off;
                client_body_temp_path {d}/body;
                keepalive_requests 10000000;
                keepalive_timeout 300s;
                # Tell the client whether the expected credential arrived, without echoing it
                # (real APIs don't reflect credentials; secretless-proxy redacts reflected ones).
                map $http_authorization $auth_state {{
                    ""                      "none";
                    "Bearer {BENCH_TOKEN}"  "injected";
                    default                 "other";
                }}
                server {{
                    listen 127.0.0.1:{self.upstream_port} ssl;
                    server_name {UPSTREAM_HOST};
                    ssl_certificate {self.upstream_cert};
                    ssl_certificate_key {self.upstream_key};
                    ssl_protocols TLSv1.2 TLSv1.3;
                    location / {{
                        default_type text/plain;
                        return 200 "ok auth=$auth_state\\n";
                    }}
                }}
            }}
            """))
        self.nginx = self.procs.start("nginx", ["nginx", "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")],
                                      d / "stdout.log")
        wait_port(self.upstream_port, self.nginx, 10, "nginx")

    # ---- load generation
    def loadgen_argv(self, case: dict, conns: int, duration: float, warmup: float) -> list[str]:
        argv = [str(self.loadgen), "--target", f"{UPSTREAM_HOST}:{self.upstream_port}",
                "--sni", UPSTREAM_HOST, "--cafile", str(case["cafile"]),
                "--conns", str(conns), "--duration", str(duration), "--warmup", str(warmup),
                "--expect-body", case["expect"]]
        if case.get("proxy_port"):
            argv += ["--proxy", f"127.0.0.1:{case['proxy_port']}"]
        else:
            argv += ["--connect", f"127.0.0.1:{self.upstream_port}"]
        if case.get("cert"):
            argv += ["--cert", str(case["cert"]), "--key", str(case["key"])]
        return argv

    def run_loadgen(self, case: dict, conns: int, duration: float, warmup: float) -> dict:
        argv = self.loadgen_argv(case, conns, duration, warmup)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + warmup + 60)
        if out.returncode != 0:
            raise RuntimeError(f"loadgen failed ({out.returncode}): {out.stderr.strip()}")
        return json.loads(out.stdout)

    def measure(self, key: str, case: dict, proxy: subprocess.Popen | None, logfile: Path | None = None) -> None:
        # Probe first: one connection, half a second. Fails fast with a readable reason.
        probe = self.run_loadgen(case, 1, 0.5, 0.0)
        if probe["count"] == 0 or probe["errors"]:
            raise RuntimeError(f"probe failed: {probe['count']} ok, errors {probe['error_kinds']}, "
                               f"last error: {probe['last_error']!r}")
        log(f"case {key}: probe ok ({probe['count']} req in 0.5 s on 1 conn); "
            f"running {self.args.conns} conns, {self.args.warmup}s warm-up + {self.args.duration}s")
        groups = {"upstream": self.nginx.pid}
        if proxy is not None:
            groups["proxy"] = proxy.pid
        cpu0 = {k: group_cpu_seconds(v) for k, v in groups.items()}
        t0 = time.monotonic()
        res = self.run_loadgen(case, self.args.conns, self.args.duration, self.args.warmup)
        wall = time.monotonic() - t0
        cpu1 = {k: group_cpu_seconds(v) for k, v in groups.items()}
        res["cpu_pct"] = {k: round(100 * (cpu1[k] - cpu0[k]) / wall, 1) for k in groups}
        res["cpu_pct"]["loadgen"] = round(100 * res["loadgen_cpu_s"] / res["wall_s"], 1)
        if proxy is not None and proxy.poll() is not None:
            res.setdefault("notes", []).append(f"proxy exited with {proxy.returncode} during the run")
            log(f"case {key}: the proxy exited with code {proxy.returncode} during the run; log tail:\n"
                f"{tail(logfile) if logfile else '(no log)'}")
        self.rounds.setdefault(key, []).append(res)
        log(f"case {key}: {res['rps']:.0f} req/s, p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, "
            f"errors {res['errors']} {res['error_kinds'] or ''} status {res['status']}")

    # ---- cases
    def casedir(self, name: str, mode: int = 0o755) -> Path:
        d = self.tmp / f"{name}-round{self.round}"
        d.mkdir(mode=mode)
        return d

    def case_a(self) -> None:
        self.measure("a", {"cafile": self.bench_ca, "expect": "auth=none"}, None)

    def case_b(self) -> None:
        d = self.casedir("mitmdump")
        port = free_port()
        exe = shutil.which("mitmdump", path=f"{self.bindir}:{os.environ.get('PATH', '')}")
        if not exe:
            raise RuntimeError("mitmdump not found next to the Python interpreter or on PATH")
        p = self.procs.start("mitmdump", [
            exe, "-q", "--listen-host", "127.0.0.1", "--listen-port", str(port),
            "--set", f"confdir={d}", "--set", f"ssl_verify_upstream_trusted_ca={self.bench_ca}"],
            d / "mitmdump.log")
        try:
            wait_port(port, p, 30, "mitmdump")
            wait_file(d / "mitmproxy-ca-cert.pem", 10, "mitmdump CA")
            self.measure("b", {"cafile": d / "mitmproxy-ca-cert.pem", "expect": "auth=none",
                               "proxy_port": port}, p, d / "mitmdump.log")
        except Exception as e:
            raise RuntimeError(f"{e}\n  mitmdump log tail:\n{tail(d / 'mitmdump.log')}") from None
        finally:
            self.procs.stop(p)

    def secretless_argv(self) -> list[str] | None:
        exe = shutil.which("secretless-proxy", path=f"{self.bindir}:{os.environ.get('PATH', '')}")
        if exe:
            return [exe]
        if (REPO / "secretless_proxy" / "cli.py").exists():
            # Not pip-installed: run the in-tree package with the same interpreter.
            return [sys.executable, "-c", "import sys; from secretless_proxy.cli import main; sys.exit(main())"]
        return None

    def case_c(self) -> None:
        base = self.secretless_argv()
        if base is None:
            raise SkipCase("secretless-proxy is not installed and secretless_proxy/cli.py does not exist")
        r = subprocess.run(base + ["--help"], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL, cwd=REPO)
        if r.returncode != 0:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise SkipCase(f"`secretless-proxy --help` exited {r.returncode}: {last[0]}")
        d = self.casedir("secretless")
        env = dict(os.environ, BENCH_TOKEN=BENCH_TOKEN,
                   PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep))
        logf = d / "secretless.log"

        def cli(*a: str) -> None:
            with open(logf, "ab") as fh:
                r = subprocess.run(base + list(a), stdout=fh, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL, timeout=60, cwd=d)
            if r.returncode != 0:
                raise RuntimeError(f"`secretless-proxy {' '.join(a)}` exited {r.returncode}\n{tail(logf)}")

        wl_ca, svid, icpt = d / "workload-ca", d / "svid", d / "interception-ca"
        cli("certs", "init", "--out", str(wl_ca))
        cli("certs", "issue", "--ca", str(wl_ca), "--spiffe-id", "spiffe://example.org/bench",
            "--ttl", "1h", "--out", str(svid))
        icpt.mkdir()
        conf = d / "config.yaml"
        conf.write_text(textwrap.dedent(f"""\
            version: 1
            identity:
              trust_bundle: {wl_ca / 'ca.pem'}
              trust_domains: [example.org]
            interception_ca: {icpt}
            upstream:
              ca_bundle: {self.bench_ca}
            credentials:
              bench: {{kind: static, secret: "env:BENCH_TOKEN"}}
            rules:
              - name: bench
                workloads: ["spiffe://example.org/*"]
                to: {{host: {UPSTREAM_HOST}, port: {self.upstream_port}}}
                inject: {{credential: bench, header: Authorization, format: "Bearer {{secret}}"}}
            default: deny
            """))
        port = free_port()
        p = self.procs.start("secretless-proxy", base + ["run", "--config", str(conf),
                                                         "--listen", f"127.0.0.1:{port}"], logf, env=env, cwd=d)
        try:
            wait_port(port, p, 60, "secretless-proxy")
            wait_file(icpt / "mitmproxy-ca-cert.pem", 10, "secretless-proxy interception CA")
            self.measure("c", {"cafile": icpt / "mitmproxy-ca-cert.pem",
                               "expect": "auth=injected", "proxy_port": port,
                               "cert": svid / "svid.pem", "key": svid / "svid-key.pem"}, p, logf)
        except Exception as e:
            raise RuntimeError(f"{e}\n  secretless-proxy log tail:\n{tail(logf)}") from None
        finally:
            self.procs.stop(p)

    def case_d(self) -> None:
        squid = shutil.which("squid", path=f"/usr/sbin:{os.environ.get('PATH', '')}")
        certgen = SQUID_HELPER_DIR / "security_file_certgen"
        if not squid or not certgen.exists():
            raise SkipCase("squid with ssl-bump not installed (apt-get install squid-openssl)")
        d = self.casedir("squid", mode=0o700)
        ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ca = make_ca("secretless-bench squid bump CA", ca_key)
        write_cert(ca, d / "bump-ca.pem")
        write_key(ca_key, d / "bump-ca-key.pem")
        db = d / "ssl_db"
        subprocess.run([str(certgen), "-c", "-s", str(db), "-M", "16MB"], check=True, timeout=30,
                       stdout=subprocess.DEVNULL)
        port = free_port()
        conf = d / "squid.conf"
        conf.write_text(textwrap.dedent(f"""\
            http_port 127.0.0.1:{port} ssl-bump tls-cert={d}/bump-ca.pem tls-key={d}/bump-ca-key.pem generate-host-certificates=on dynamic_cert_mem_cache_size=16MB
            sslcrtd_program {certgen} -s {db} -M 16MB
            sslcrtd_children 4 startup=1 idle=1
            acl step1 at_step SslBump1
            ssl_bump peek step1
            ssl_bump bump all
            tls_outgoing_options cafile={self.bench_ca}
            request_header_add Authorization "Bearer {BENCH_TOKEN}" all
            http_access allow all
            cache deny all
            cache_mem 8 MB
            access_log none
            cache_store_log none
            cache_log {d}/cache.log
            pid_filename {d}/squid.pid
            coredump_dir {d}
            netdb_filename none
            visible_hostname secretless-bench
            workers 1
            shutdown_lifetime 1 seconds
            # 'localhost' comes from /etc/hosts; never send DNS queries off the machine.
            hosts_file /etc/hosts
            dns_nameservers 127.0.0.1
            """))
        # squid drops root privileges to cache_effective_user (default 'proxy').
        try:
            pw = pwd.getpwnam("proxy")
            for root, dirs, files in os.walk(d):
                for n in [root] + [os.path.join(root, x) for x in dirs + files]:
                    os.chown(n, pw.pw_uid, pw.pw_gid)
        except KeyError:
            pass
        r = subprocess.run([squid, "-k", "parse", "-f", str(conf)], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"squid -k parse failed:\n{r.stdout}{r.stderr}")
        p = self.procs.start("squid", [squid, "-N", "-f", str(conf)], d.parent / f"{d.name}-stdout.log")
        try:
            wait_port(port, p, 30, "squid")
            self.measure("d", {"cafile": d / "bump-ca.pem", "expect": "auth=injected",
                               "proxy_port": port}, p, d / "cache.log")
        except Exception as e:
            raise RuntimeError(f"{e}\n  squid cache.log tail:\n{tail(d / 'cache.log')}") from None
        finally:
            self.procs.stop(p)

    # ---- report
    def report(self, failures: dict[str, str]) -> str:
        a = self.args
        lines = []
        lines.append("")
        lines.append(f"secretless-proxy bench: {a.conns} keep-alive HTTPS connections per case, "
                     f"{a.warmup:g} s warm-up + {a.duration:g} s measured, loopback, {os.cpu_count()} CPUs")
        if a.rounds > 1:
            lines.append(f"{a.rounds} interleaved rounds: req/s, p50, p99 and CPU% are medians over rounds; "
                         f"requests/errors/conns are totals; 'req/s range' is min-max over rounds")
        lines.append(f"upstream: nginx ({a.nginx_workers} worker) https://{UPSTREAM_HOST}:<port>/ "
                     f"(tiny text body); client: bench/loadgen.c (C, OpenSSL, 1 thread/conn)")
        lines.append("")
        hdr = (f"{'case':<44} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9} {'errors':>7} "
               f"{'conns':>6}  {'CPU% proxy/upstream/loadgen':>27}")
        if a.rounds > 1:
            hdr += f"  {'req/s range':>13}"
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for key, title in CASES.items():
            if key not in a.cases:
                continue
            label = f"({key}) {title}"
            r = self.results.get(key)
            if r is None:
                lines.append(f"{label:<44} {'-':>9} {'-':>8} {'-':>8} {'-':>9} {'-':>7} {'-':>6}  "
                             f"{failures.get(key, 'not run')}")
                continue
            cpu = r["cpu_pct"]
            cpus = f"{cpu.get('proxy', '-')}/{cpu['upstream']}/{cpu['loadgen']}"
            lines.append(f"{label:<44} {r['rps']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                         f"{r['count']:>9} {r['errors']:>7} {r['connects']:>6}  {cpus:>27}"
                         + (f"  {r['rps_min']:>6.0f}-{r['rps_max']:<6.0f}" if a.rounds > 1 else ""))
        lines.append("")
        lines.append("conns = TCP+TLS (+CONNECT) setups made during warm-up + measurement (equal to the concurrency "
                     "when nothing reconnected).")
        lines.append("CPU% = CPU time / wall time over warm-up + measurement, per process group (100% = one core; "
                     "the machine has " + str(os.cpu_count()) + ").")
        details = []
        for key in CASES:
            r = self.results.get(key)
            if r and (r["errors"] or set(r["status"]) - {"200"} or r.get("notes")):
                details.append(f"  ({key}) errors={r['error_kinds']} status={r['status']} "
                               f"last_error={r['last_error']!r} {' '.join(r.get('notes', []))}")
        if details:
            lines.append("errors / non-200 responses:")
            lines.extend(details)

        def ratio_line(num: str, den: str, text: str) -> None:
            n, d = self.results.get(num), self.results.get(den)
            if not n or not d or not d["rps"] or not n["rps"]:
                lines.append(f"  {text:<40} n/a (case missing)")
                return
            lines.append(f"  {text:<40} throughput {n['rps'] / d['rps']:>7.3f}x   "
                         f"p50 latency {n['p50_ms'] / d['p50_ms']:>7.2f}x   "
                         f"p99 latency {n['p99_ms'] / d['p99_ms']:>7.2f}x")

        lines.append("")
        lines.append("ratios (req/s ratio; latency ratio >1 = slower):")
        ratio_line("c", "b", "(c) secretless / (b) mitmdump")
        ratio_line("c", "d", "(c) secretless / (d) squid")
        for k in ("b", "c", "d"):
            ratio_line(k, "a", f"({k}) {CASES[k].split(' ')[0]} / (a) direct")
        a_res = self.results.get("a")
        if a_res:
            best = max((self.results[k]["rps"] for k in ("b", "c", "d") if k in self.results), default=0)
            if best:
                lines.append("")
                lines.append(f"load-generator headroom: the generator drove direct (a) at {a_res['rps']:.0f} req/s, "
                             f"{a_res['rps'] / best:.1f}x the fastest proxy case ({best:.0f} req/s).")
        return "\n".join(lines)

    def run(self) -> int:
        failures: dict[str, str] = {}
        try:
            self.build_loadgen()
            self.make_pki()
            self.start_nginx()
            for rnd in range(1, self.args.rounds + 1):
                self.round = rnd
                for key in "abcd":
                    if key not in self.args.cases or key in failures:
                        continue
                    log(f"=== round {rnd}/{self.args.rounds} case ({key}) {CASES[key]}")
                    try:
                        getattr(self, f"case_{key}")()
                    except SkipCase as e:
                        failures[key] = f"SKIPPED: {e}"
                        log(f"case {key} skipped: {e}")
                    except Exception as e:  # noqa: BLE001 - report and go on with the other cases
                        failures[key] = f"FAILED (round {rnd}): {str(e).splitlines()[0]}"
                        log(f"case {key} FAILED: {e}")
                    time.sleep(0.5)
            self.results = {k: aggregate(v) for k, v in self.rounds.items() if v and k not in failures}
        finally:
            self.procs.stop_all()
        report = self.report(failures)
        print(report, flush=True)
        if self.args.json_out:
            Path(self.args.json_out).write_text(json.dumps(
                {"args": {k: v for k, v in vars(self.args).items()}, "results": self.results, "rounds": self.rounds,
                 "failures": failures}, indent=2, default=str))
        hard = [k for k, v in failures.items() if v.startswith("FAILED")]
        return 1 if hard else 0

    def cleanup(self) -> None:
        self.procs.stop_all()
        if self.args.keep_tmp:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


class SkipCase(Exception):
    pass


def aggregate(runs: list[dict]) -> dict:
    """Median of the per-round rates/latencies, sums of counts. One round: returned as is."""
    import statistics

    if len(runs) == 1:
        return dict(runs[0], rounds=1, rps_min=runs[0]["rps"], rps_max=runs[0]["rps"])
    med = statistics.median
    out: dict = {"rounds": len(runs)}
    for k in ("rps", "p50_ms", "p90_ms", "p99_ms", "mean_ms"):
        out[k] = med(r[k] for r in runs)
    out["max_ms"] = max(r["max_ms"] for r in runs)
    out["rps_min"] = min(r["rps"] for r in runs)
    out["rps_max"] = max(r["rps"] for r in runs)
    for k in ("count", "errors", "connects"):
        out[k] = sum(r[k] for r in runs)
    for k in ("error_kinds", "status"):
        acc: dict = {}
        for r in runs:
            for kk, v in r[k].items():
                acc[kk] = acc.get(kk, 0) + v
        out[k] = acc
    out["cpu_pct"] = {k: round(med(r["cpu_pct"][k] for r in runs), 1) for k in runs[0]["cpu_pct"]}
    out["last_error"] = next((r["last_error"] for r in reversed(runs) if r["last_error"]), "")
    out["notes"] = [n for r in runs for n in r.get("notes", [])]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per case (default 10)")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per case, not counted (default 2)")
    ap.add_argument("--conns", type=int, default=20, help="concurrent keep-alive connections (default 20)")
    ap.add_argument("--cases", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat all cases N times, interleaved; the table shows medians (default 1)")
    ap.add_argument("--nginx-workers", type=int, default=1, help="nginx worker processes (default 1)")
    ap.add_argument("--json-out", help="also write all results as JSON to this file")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs) for debugging")
    args = ap.parse_args()
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in args.cases if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; choose from a,b,c,d")

    bench = Bench(args)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        return bench.run()
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); stopping everything")
        return 130
    finally:
        bench.cleanup()


if __name__ == "__main__":
    sys.exit(main())
