#!/usr/bin/env python3
"""One-command benchmark: direct HTTPS vs mitmdump vs secretless-proxy vs squid ssl-bump,
secretless-proxy's brokered OAuth2 credential (warm cache and forced rotation) vs static injection,
and the shared Redis store (with and without a per-request grant check) vs the in-process memory store.

Usage (from the repo root):  bash bench/run.sh [--duration 10] [--warmup 2] [--conns 20]
                                               [--cases a,b,c,d,e,f,g,h] [--rounds N] [--quick]

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
import re
import secrets
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
# OAuth2 cases (e)/(f): the bench token server (bench/token_server.py) issues "bt<gen>_<random>".
OAUTH_CLIENT_ID = "secretless-bench"
OAUTH_SCOPE = "bench.read"
OAUTH_WARM_TTL = 3600  # (e): one token outlives the whole run; the probe + warm-up prime the cache
OAUTH_SKEW = 1.0  # broker.skew_seconds for (e) and (f)

CASES = {
    "a": "direct HTTPS (no proxy)",
    "b": "mitmdump -q (CONNECT + TLS intercept)",
    "c": "secretless-proxy (mTLS + static inject)",
    "d": "squid ssl-bump + request_header_add",
    "e": "secretless-proxy (oauth2, warm cache)",
    "f": "secretless-proxy (oauth2, rotating)",
    "g": "secretless-proxy (oauth2, redis store)",
    "h": "secretless-proxy (oauth2, redis + grant)",
}
OAUTH_CASES = ("e", "f", "g", "h")  # need the bench token server
STORE_CASES = ("g", "h")  # need the harness's redis-server
# Order within a round: the secretless-proxy cases back to back, so they see the same background
# load as closely as interleaving allows; each compared pair is adjacent except (f)/(e):
# (e)/(c), (g)/(e), (h)/(g).
RUN_ORDER = "abdceghf"
# Cases (g)/(h): the store section's encryption key (a fresh one per run, in the proxy's environment).
STORE_KEY_ENV = "BENCH_STORE_KEY"
STORE_KEY_ID = "k1"
STORE_PREFIX = "secretless:"  # the store's default key_prefix
# Case (h): the grant the harness writes to Redis before each (h) case.
GRANT_WORKLOAD = "spiffe://example.org/bench"  # the SVID the load generator presents
GRANT_RULE = "bench"
GRANT_TTL = 3600.0
# --instructions: the proxy processes run under callgrind with instrumentation off until the measured
# window; instructions per request are then counted, not timed, so background load on this shared
# 2-core machine does not move them (wall-clock ratios swing by +-0.1x between runs).
PROXY_NAMES = ("mitmdump", "secretless-proxy")
INSTRUMENT = {"on": False, "slow": 1.0}  # set from --instructions in main(); slow scales start-up timeouts


# --------------------------------------------------------------------------- utilities

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout * INSTRUMENT["slow"]
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
    deadline = time.monotonic() + timeout * INSTRUMENT["slow"]
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: {path} not created within {timeout}s")


def wait_log(path: Path, text: str, proc: subprocess.Popen | None, timeout: float, what: str) -> None:
    """Wait until `text` appears in a log file (a readiness line printed after start-up finished)."""
    deadline = time.monotonic() + timeout * INSTRUMENT["slow"]
    while time.monotonic() < deadline:
        try:
            if text in path.read_text(errors="replace"):
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before logging {text!r}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not log {text!r} within {timeout}s")


def callgrind(pid: int, *args: str) -> None:
    r = subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"callgrind_control {' '.join(args)} {pid}: {(r.stderr or r.stdout).strip()}")


def callgrind_dump(pid: int) -> int:
    """Dump the counters of ``pid`` (under callgrind) and return the instructions counted since the last zeroing."""
    r = subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"callgrind_control -d {pid}: {(r.stderr or r.stdout).strip()}")
    time.sleep(0.5)
    dumps = sorted(Path(INSTRUMENT["dir"]).glob(f"**/callgrind.out.{pid}.*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise RuntimeError(f"no callgrind dump of process {pid} under {INSTRUMENT['dir']}")
    # "summary:" is the header's (0 for a dump asked for at run time); "totals:" is what was counted.
    for line in dumps[-1].read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"{dumps[-1]}: no totals line")


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
        if INSTRUMENT["on"] and name in PROXY_NAMES:
            argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no",
                    f"--callgrind-out-file={logfile.parent / 'callgrind.out.%p'}"] + argv
        log(f"start {name}: {' '.join(argv)}")
        with open(logfile, "ab") as fh:  # the child keeps its own copy of the descriptor
            p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, cwd=cwd, start_new_session=True)
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
        for _name, p in reversed(self.procs):
            self.stop(p, grace=2.0)
        self.procs.clear()


def log_lines(path: Path) -> list[str]:
    """The lines of a log another process writes; none while it has not created the file."""
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def proxy_log_warnings(path: Path, limit: int = 20) -> list[str]:
    """WARNING/ERROR/CRITICAL lines and tracebacks of a secretless-proxy log, timestamps cut, deduplicated."""
    seen: dict[str, int] = {}
    for line in log_lines(path):
        for level in (" WARNING ", " ERROR ", " CRITICAL "):
            if level in line:
                line = line[line.index(level) + 1:]
                break
        else:
            if not line.startswith("Traceback"):
                continue
        seen[line[:300]] = seen.get(line[:300], 0) + 1
    return [f"{msg} (x{n})" if n > 1 else msg for msg, n in list(seen.items())[:limit]]


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent busy so far (/proc/stat: everything but idle and iowait)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return 0.0
    vals = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


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


class Resp:
    """A minimal Redis (RESP2) client for the harness's own bookkeeping: PING, FLUSHDB, INFO, KEYS.

    Standard library only, one blocking connection to the loopback redis-server of (g)/(h); the
    proxy itself talks to Redis through redis-py, this is only what run.py needs around it.
    """

    def __init__(self, port: int, timeout: float = 2.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.rf = self.sock.makefile("rb")

    def close(self) -> None:
        try:
            self.rf.close()
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Resp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, *args: str):
        out = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = a.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))
        return self._read()

    def _read(self):
        line = self.rf.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"redis error: {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.rf.read(n + 2)[:-2]
            return data.decode(errors="replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RuntimeError(f"unexpected redis reply {line[:40]!r}")

    def commandstats(self) -> dict[str, int]:
        """Calls per command since start-up (INFO commandstats), e.g. {'evalsha': 1234, 'info': 5}."""
        stats = {}
        for line in self.call("INFO", "commandstats").splitlines():
            m = re.match(r"cmdstat_([^:]+):calls=(\d+)", line)
            if m:
                stats[m.group(1)] = int(m.group(2))
        return stats


class RedisSampler:
    """Samples redis-server's per-command call counters every `interval` s in a thread, so the
    commands inside the load generator's measured window can be interpolated afterwards."""

    def __init__(self, port: int, interval: float = 0.2) -> None:
        import threading
        self.port, self.interval = port, interval
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-sampler", daemon=True)

    def __enter__(self) -> RedisSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            with Resp(self.port) as r:
                while True:
                    self.samples.append((time.monotonic(), r.commandstats()))
                    if self._stop.wait(self.interval):
                        self.samples.append((time.monotonic(), r.commandstats()))
                        return
        except Exception as e:  # noqa: BLE001 - bookkeeping only: report, never fail the case
            self.error = f"{type(e).__name__}: {e}"

    def at(self, t: float) -> dict[str, float]:
        """Counters at monotonic time t, linearly interpolated between the two samples around it."""
        s = self.samples
        if not s:
            return {}
        if t <= s[0][0]:
            return dict(s[0][1])
        for (t0, c0), (t1, c1) in zip(s, s[1:], strict=False):
            if t0 <= t <= t1:
                w = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
                return {k: c0.get(k, 0) + w * (c1.get(k, 0) - c0.get(k, 0)) for k in set(c0) | set(c1)}
        return dict(s[-1][1])

    def between(self, lo: float, hi: float) -> dict[str, float]:
        """Commands per name in [lo, hi], without the sampler's own INFO calls."""
        a, b = self.at(lo), self.at(hi)
        d = {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b) if k != "info"}
        return {k: v for k, v in d.items() if v > 0.5}


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
    now = datetime.datetime.now(datetime.UTC)
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
    now = datetime.datetime.now(datetime.UTC)
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
        self.token_server: subprocess.Popen | None = None
        self.token_port = 0
        self.oauth_secret = ""
        self.oauth_stats: dict[str, list[dict]] = {}  # (e)-(h): token calls + upstream view, per round
        self.redis: subprocess.Popen | None = None  # (g)/(h): one redis-server for the whole run
        self.redis_port = 0
        self.redis_version = ""
        self.store_key = ""  # (g)/(h): AES-256 key of the store section, 64 hex digits, fresh per run
        self.store_stats: dict[str, list[dict]] = {}  # (g)/(h): Redis commands, keys, CPU, per round

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
        # The OAuth2 token endpoint of cases (e)/(f) gets its own certificate from the same CA.
        tok_key = ec.generate_private_key(ec.SECP256R1())
        self.token_cert = pki / "token-server.pem"
        self.token_key = pki / "token-server-key.pem"
        write_cert(make_server_cert(ca, ca_key, tok_key, UPSTREAM_HOST), self.token_cert)
        write_key(tok_key, self.token_key)
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
                client_body_temp_path {d}/body;
                keepalive_requests 10000000;
                keepalive_timeout 300s;
                # Tell the client whether the expected credential arrived, without echoing it
                # (real APIs don't reflect credentials; secretless-proxy redacts reflected ones):
                # "injected" = exactly the static bench token (c, d); "oauth" = a token of the
                # bench token server's shape (e, f), whose value changes with every rotation.
                map $http_authorization $auth_state {{
                    ""                      "none";
                    "Bearer {BENCH_TOKEN}"  "injected";
                    "~^Bearer bt[0-9]+_[A-Za-z0-9_-]{{16,}}$"  "oauth";
                    default                 "other";
                }}
                # One log line per request that carried a bench credential: its time and which
                # credential ("static", or the token server's generation number; never the secret).
                # run.py reads it to see which tokens reached the upstream, and when.
                map $http_authorization $token_tag {{
                    "Bearer {BENCH_TOKEN}"  "static";
                    "~^Bearer bt(?<token_gen>[0-9]+)_"  "$token_gen";
                    default                 "";
                }}
                log_format tokens '$msec $token_tag';
                access_log {d}/tokens.log tokens buffer=64k flush=1s if=$token_tag;
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
        self.nginx_tokens_log = d / "tokens.log"
        self.nginx = self.procs.start("nginx", ["nginx", "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")],
                                      d / "stdout.log")
        wait_port(self.upstream_port, self.nginx, 10, "nginx")

    # ---- OAuth2 token endpoint for (e)/(f)
    def start_token_server(self) -> None:
        d = self.tmp / "token-server"
        d.mkdir(mode=0o700)
        self.token_port = free_port()
        self.oauth_secret = secrets.token_urlsafe(24)
        self.token_events = d / "events.jsonl"
        env = dict(os.environ, BENCH_CLIENT_SECRET=self.oauth_secret)
        self.token_server = self.procs.start("token-server", [
            sys.executable, str(BENCH_DIR / "token_server.py"), "--port", str(self.token_port),
            "--cert", str(self.token_cert), "--key", str(self.token_key),
            "--client-id", OAUTH_CLIENT_ID, "--secret-env", "BENCH_CLIENT_SECRET", "--scope", OAUTH_SCOPE,
            "--lifetime", f"warm={OAUTH_WARM_TTL}", "--lifetime", f"rotate={int(self.args.token_ttl)}",
            "--events", str(self.token_events)], d / "token-server.log", env=env)
        self.token_log = d / "token-server.log"
        wait_port(self.token_port, self.token_server, 20, "token server")

    # ---- shared store for (g)/(h)
    def start_redis(self) -> None:
        """One loopback redis-server for the whole run, no persistence; flushed before every (g)/(h) case."""
        exe = shutil.which("redis-server", path=f"/usr/bin:/usr/local/bin:{os.environ.get('PATH', '')}")
        if not exe:
            raise SkipCase("redis-server not installed (apt-get install redis-server)")
        d = self.tmp / "redis"
        d.mkdir(mode=0o700)
        self.redis_port = free_port()
        self.store_key = secrets.token_hex(32)
        self.redis = self.procs.start("redis-server", [
            exe, "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "", "--appendonly", "no",
            "--dir", str(d), "--daemonize", "no", "--protected-mode", "yes"], d / "redis.log")
        self.redis_log = d / "redis.log"
        wait_port(self.redis_port, self.redis, 20, "redis-server")
        deadline = time.monotonic() + 10
        while True:  # listening is not the same as loaded: PING until it answers PONG
            try:
                with Resp(self.redis_port) as r:
                    if r.call("PING") == "PONG":
                        self.redis_version = next((ln.split(":", 1)[1] for ln in r.call("INFO", "server").splitlines()
                                                   if ln.startswith("redis_version:")), "?")
                        break
            except (OSError, RuntimeError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on 127.0.0.1:{self.redis_port} does not answer PING")
            time.sleep(0.1)

    def redis_keys(self) -> dict[str, int]:
        """How many credential / grant entries the store holds (key names only, never values)."""
        with Resp(self.redis_port) as r:
            names = r.call("KEYS", f"{STORE_PREFIX}*") or []
        out = {"cred": 0, "grant": 0, "other": 0}
        for n in names:
            kind = n[len(STORE_PREFIX):].split(":", 1)[0]
            out[kind if kind in ("cred", "grant") else "other"] += 1
        return out

    def store_config(self):
        """The StoreConfig the proxy's store section describes (the key is read from the environment)."""
        try:
            import secretless_proxy  # noqa: F401
        except ImportError:  # not pip-installed: the in-tree package
            sys.path.insert(0, str(REPO))
        from secretless_proxy.secretrefs import SecretRef
        from secretless_proxy.store import StoreConfig
        return StoreConfig(url=f"redis://127.0.0.1:{self.redis_port}/0",
                           encryption_keys={STORE_KEY_ID: SecretRef.parse(f"env:{STORE_KEY_ENV}")},
                           active_key=STORE_KEY_ID)

    def create_grant(self) -> str:
        """(h): write an active grant for (GRANT_WORKLOAD, GRANT_RULE) straight into Redis, sealed with
        the run's store key, through the project's own store code (what the admin API's POST /grants does)."""
        import asyncio

        config = self.store_config()
        from secretless_proxy.grants import new_grant
        from secretless_proxy.store import open_store

        os.environ[STORE_KEY_ENV] = self.store_key  # open_store resolves the key now; not left for children
        try:
            store = open_store(config)
        finally:
            os.environ.pop(STORE_KEY_ENV, None)

        async def put() -> str:
            await store.start()
            try:
                grant = new_grant(workload=GRANT_WORKLOAD, rule=GRANT_RULE, ttl=GRANT_TTL,
                                  reason="secretless bench case (h)", issued_by="bench/run.py")
                if not await store.put_grant(grant):
                    raise RuntimeError("the store refused the grant (put_grant returned False)")
                found = await store.find_grant(GRANT_WORKLOAD, GRANT_RULE)
                if found is None or found.id != grant.id:
                    raise RuntimeError("the grant just written is not found by find_grant")
                return grant.id
            finally:
                await store.close()

        return asyncio.run(put())

    def token_events_between(self, lo: float, hi: float, name: str) -> list[dict]:
        """The token server's calls for /<name>/token with monotonic time in [lo, hi]."""
        out = []
        for line in log_lines(self.token_events):
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("name") == name and lo <= ev["mono"] <= hi:
                out.append(ev)
        return out

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

    def run_loadgen(self, case: dict, conns: int, duration: float, warmup: float,
                    count_pid: int | None = None) -> dict:
        """Run the load generator; with ``count_pid`` (a process under callgrind), count that
        process's instructions over the measured window (after the warm-up) too."""
        argv = self.loadgen_argv(case, conns, duration, warmup)
        if count_pid is None:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + warmup + 60)
            if out.returncode != 0:
                raise RuntimeError(f"loadgen failed ({out.returncode}): {out.stderr.strip()}")
            return json.loads(out.stdout)
        gen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(warmup)
        callgrind(count_pid, "-z")
        callgrind(count_pid, "-i", "on")
        stdout, stderr = gen.communicate(timeout=duration + 60)
        callgrind(count_pid, "-i", "off")
        if gen.returncode != 0:
            raise RuntimeError(f"loadgen failed ({gen.returncode}): {stderr.strip()}")
        res = json.loads(stdout)
        res["instructions"] = callgrind_dump(count_pid)
        return res

    def measure(self, key: str, case: dict, proxy: subprocess.Popen | None, logfile: Path | None = None) -> None:
        # Probe first: one connection, half a second. Fails fast with a readable reason.
        probe = self.run_loadgen(case, 1, 0.5 * INSTRUMENT["slow"], 0.0)
        if probe["count"] == 0 or probe["errors"]:
            raise RuntimeError(f"probe failed: {probe['count']} ok, errors {probe['error_kinds']}, "
                               f"last error: {probe['last_error']!r}")
        log(f"case {key}: probe ok ({probe['count']} req in 0.5 s on 1 conn); "
            f"running {self.args.conns} conns, {self.args.warmup}s warm-up + {self.args.duration}s")
        groups = {"upstream": self.nginx.pid}
        if proxy is not None:
            groups["proxy"] = proxy.pid
        store = key in STORE_CASES and self.redis is not None
        if store:
            groups["redis"] = self.redis.pid
        cpu0 = {k: group_cpu_seconds(v) for k, v in groups.items()}
        busy0 = machine_busy_seconds()
        t0 = time.monotonic()
        if store:
            with RedisSampler(self.redis_port) as sampler:
                res = self.run_loadgen(case, self.args.conns, self.args.duration, self.args.warmup)
        else:
            counted = proxy.pid if INSTRUMENT["on"] and proxy is not None else None
            res = self.run_loadgen(case, self.args.conns, self.args.duration, self.args.warmup, count_pid=counted)
        wall = time.monotonic() - t0
        cpu1 = {k: group_cpu_seconds(v) for k, v in groups.items()}
        busy1 = machine_busy_seconds()
        res["cpu_pct"] = {k: round(100 * (cpu1[k] - cpu0[k]) / wall, 1) for k in groups}
        res["cpu_pct"]["loadgen"] = round(100 * res["loadgen_cpu_s"] / res["wall_s"], 1)
        # Everything else on the machine (other users' tests, the token server, the harness itself):
        # the noise that hits this case and not necessarily the others.
        ours = sum(cpu1[k] - cpu0[k] for k in groups) + res["loadgen_cpu_s"]
        res["cpu_pct"]["other"] = round(max(0.0, 100 * (busy1 - busy0 - ours) / wall), 1)
        res["round"] = self.round
        if store:
            # Redis commands in the measured window, per command name (the sampler's INFO excluded).
            cmds = sampler.between(res["t_measure_mono"], res["t_end_mono"])
            res["redis_window"] = {k: round(v) for k, v in sorted(cmds.items(), key=lambda kv: -kv[1])}
            if sampler.error:
                res.setdefault("notes", []).append(f"redis sampler: {sampler.error}")
        if proxy is not None and proxy.poll() is not None:
            res.setdefault("notes", []).append(f"proxy exited with {proxy.returncode} during the run")
            log(f"case {key}: the proxy exited with code {proxy.returncode} during the run; log tail:\n"
                f"{tail(logfile) if logfile else '(no log)'}")
        self.rounds.setdefault(key, []).append(res)
        if res.get("instructions") and res["count"]:
            res["instr_per_req"] = res["instructions"] / res["count"]
            log(f"case {key}: {res['instr_per_req'] / 1e6:.3f} M instructions per request "
                f"({res['instructions']} over {res['count']} requests)")
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
        self.measure_through("b", "mitmdump", p, port, cafile=d / "mitmproxy-ca-cert.pem", expect="auth=none",
                             logfile=d / "mitmdump.log")

    def measure_through(self, key: str, name: str, p: subprocess.Popen, port: int, *, cafile: Path, expect: str,
                        logfile: Path) -> None:
        """Case ``key`` through the proxy ``p`` on ``port``, stopped after; a failure carries its log's tail."""
        try:
            wait_port(port, p, 30, name)
            wait_file(cafile, 10, f"{name} CA")  # mitmdump writes its CA after it listens
            self.measure(key, {"cafile": cafile, "expect": expect, "proxy_port": port}, p, logfile)
        except Exception as e:
            raise RuntimeError(f"{e}\n  {name} log tail ({logfile.name}):\n{tail(logfile)}") from None
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
        self.run_secretless("c", "secretless", 'bench: {kind: static, secret: "env:BENCH_TOKEN"}', "",
                            expect="auth=injected")

    def case_e(self) -> None:
        self.run_oauth("e", "warm")

    def case_f(self) -> None:
        self.run_oauth("f", "rotate")

    def case_g(self) -> None:
        self.run_store("g", grant=False)

    def case_h(self) -> None:
        self.run_store("h", grant=True)

    def run_store(self, key: str, *, grant: bool) -> None:
        """(g)/(h): exactly (e), plus a store section pointing at the harness's redis-server.

        (g) vs (e) is the price of the shared store when the broker's L1 cache is warm; (h) adds
        `requires_grant: true` to the rule, so every request checks its grant: through the replica's
        grant cache (store/grantcache.py), one lookup in Redis per `grant_cache_seconds` (0.5 s).
        The store is flushed first, so every (g)/(h) case starts as empty as (e)'s memory store:
        the probe fetches the token from the token server and writes it to Redis (sealed).
        """
        if self.redis is None or self.redis.poll() is not None:
            raise RuntimeError("the bench redis-server is not running" + (
                f"; its log:\n{tail(self.redis_log)}" if self.redis is not None else ""))
        with Resp(self.redis_port) as r:
            r.call("FLUSHDB")
        grant_id = self.create_grant() if grant else None
        before = self.redis_keys()
        with Resp(self.redis_port) as r:
            stats0 = r.commandstats()
        store = textwrap.dedent(f"""\
            store:
              url: redis://127.0.0.1:{self.redis_port}/0
              encryption_keys: {{{STORE_KEY_ID}: "env:{STORE_KEY_ENV}"}}
              active_key: {STORE_KEY_ID}
            """)
        self.run_oauth(key, "warm", store=store, rule_extra="requires_grant: true" if grant else "",
                       env_extra={STORE_KEY_ENV: self.store_key})
        res = self.rounds[key][-1]
        after = self.redis_keys()
        with Resp(self.redis_port) as r:
            stats1 = r.commandstats()
        # Every command over the whole case (proxy start-up, probe, warm-up, measurement, stop).
        case_cmds = {k: stats1.get(k, 0) - stats0.get(k, 0) for k in stats1 if k != "info"}
        case_cmds = {k: v for k, v in sorted(case_cmds.items(), key=lambda kv: -kv[1]) if v > 0}
        reqs = res["count"]
        window = res.get("redis_window", {})
        st = {"round": self.round, "grant": bool(grant_id), "keys_before": before, "keys_after": after,
              "cmds_case": case_cmds, "cmds_window": sum(window.values()), "by_cmd": window,
              "cmds_per_req": sum(window.values()) / reqs if reqs else 0.0, "reqs": reqs,
              "redis_cpu": res["cpu_pct"].get("redis", 0.0)}
        res["store"] = st
        self.store_stats.setdefault(key, []).append(st)
        log(f"case {key}: Redis commands in the measured window: {st['cmds_window']} "
            f"({st['cmds_per_req']:.3f}/request) {window}; store keys before {before}, after {after}; "
            f"commands over the whole case: {case_cmds}")

    def run_oauth(self, key: str, endpoint: str, *, store: str = "", rule_extra: str = "",
                  env_extra: dict | None = None) -> None:
        """(e)/(f)/(g)/(h): the same proxy config as (c) except the credential, brokered from the token server.

        All use the same broker settings; only the token lifetime the server answers differs
        (e, g, h: OAUTH_WARM_TTL, f: --token-ttl), so (f) vs (e) isolates the cost of rotation;
        (g)/(h) add a Redis store section (and a grant-required rule) to (e).
        """
        if self.token_server is None or self.token_server.poll() is not None:
            raise RuntimeError("the bench token server is not running" + (
                f"; its log:\n{tail(self.token_log)}" if self.token_server is not None else ""))
        cred = (f"bench: {{kind: oauth2_client_credentials, "
                f"token_url: \"https://127.0.0.1:{self.token_port}/{endpoint}/token\", "
                f"client_id: {OAUTH_CLIENT_ID}, client_secret: \"env:BENCH_CLIENT_SECRET\", "
                f"scopes: [{OAUTH_SCOPE}]}}")
        broker = f"broker: {{skew_seconds: {OAUTH_SKEW:g}}}\n"
        t_start = time.monotonic()
        self.run_secretless(key, f"oauth-{endpoint}" + (f"-{key}" if store else ""), cred, broker + store,
                            expect="auth=oauth", rule_extra=rule_extra,
                            env_extra={"BENCH_CLIENT_SECRET": self.oauth_secret, **(env_extra or {})})
        self.oauth_accounting(key, endpoint, t_start)

    def oauth_accounting(self, key: str, endpoint: str, t_start: float) -> None:
        """Token calls the token server saw, and the tokens the upstream saw, in the measured window."""
        res = self.rounds[key][-1]
        lo, hi = res["t_measure_mono"], res["t_end_mono"]
        all_calls = self.token_events_between(t_start, time.monotonic(), endpoint)
        window = [ev for ev in all_calls if lo <= ev["mono"] <= hi]
        expiry = {}
        for ev in self.token_events_between(0, time.monotonic(), endpoint):
            if ev["outcome"] == "issued":
                expiry[str(ev["gen"])] = ev["expires_wall"]
        offset = time.time() - time.monotonic()  # wall - monotonic, to place nginx's $msec in the window
        seen = self.upstream_requests(lo + offset, hi + offset)
        gens: dict[str, int] = {}
        stale = foreign = 0
        for t, tag in seen:
            if tag in expiry:
                gens[tag] = gens.get(tag, 0) + 1
                if t > expiry[tag]:
                    stale += 1
            else:
                foreign += 1  # the static token, or a token this endpoint never issued
        st = {"round": self.round,
              "calls_window": sum(ev["outcome"] == "issued" for ev in window),
              "rejected_window": sum(ev["outcome"] != "issued" for ev in window),
              "calls_case": sum(ev["outcome"] == "issued" for ev in all_calls),
              "rejected_case": sum(ev["outcome"] != "issued" for ev in all_calls),
              "tokens_upstream": len(gens), "upstream_requests": len(seen),
              "expired_upstream": stale, "foreign_upstream": foreign}
        self.oauth_stats.setdefault(key, []).append(st)
        res["oauth"] = st
        log(f"case {key}: token server issued {st['calls_window']} token(s) in the measured window "
            f"({st['calls_case']} since the proxy started, {st['rejected_case']} rejected); upstream saw "
            f"{st['tokens_upstream']} distinct token(s) in {st['upstream_requests']} requests, "
            f"{stale} after the token's expiry, {foreign} with another credential")

    def upstream_requests(self, lo_wall: float, hi_wall: float) -> list[tuple[float, str]]:
        """(time, credential tag) of every request nginx logged in [lo_wall, hi_wall] (wall clock)."""
        wait = hi_wall + 1.3 - time.time()  # nginx flushes its log buffer at least once a second
        if wait > 0:
            time.sleep(wait)
        out = []
        for line in log_lines(self.nginx_tokens_log):
            parts = line.split()
            if len(parts) == 2 and lo_wall <= (t := float(parts[0])) <= hi_wall:
                out.append((t, parts[1]))
        return out

    def run_secretless(self, key: str, name: str, credential: str, extra: str, *, expect: str,
                       env_extra: dict | None = None, rule_extra: str = "") -> None:
        """One secretless-proxy case: fresh workload CA, SVID and interception CA; one rule; one credential."""
        base = self.secretless_argv()
        if base is None:
            raise SkipCase("secretless-proxy is not installed and secretless_proxy/cli.py does not exist")
        r = subprocess.run(base + ["--help"], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL, cwd=REPO)
        if r.returncode != 0:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise SkipCase(f"`secretless-proxy --help` exited {r.returncode}: {last[0]}")
        d = self.casedir(name)
        env = dict(os.environ, BENCH_TOKEN=BENCH_TOKEN,
                   PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
                   **(env_extra or {}))
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
        # upstream.ca_bundle is trusted for upstream TLS and for provider calls (the token server).
        conf.write_text(textwrap.dedent(f"""\
            version: 1
            identity:
              trust_bundle: {wl_ca / 'ca.pem'}
              trust_domains: [example.org]
            interception_ca: {icpt}
            upstream:
              ca_bundle: {self.bench_ca}
            credentials:
              {credential}
            rules:
              - name: bench
                workloads: ["spiffe://example.org/*"]
                to: {{host: {UPSTREAM_HOST}, port: {self.upstream_port}, private: [127.0.0.0/8]}}
                inject: {{credential: bench, header: Authorization, format: "Bearer {{secret}}"}}
            """) + (f"    {rule_extra}\n" if rule_extra else "") + "default: deny\n" + extra)
        cli("check", "--config", str(conf))  # a schema change fails here, with the checker's message in the log tail
        port = free_port()
        p = self.procs.start("secretless-proxy", base + ["run", "--config", str(conf),
                                                         "--listen", f"127.0.0.1:{port}"], logf, env=env, cwd=d)
        try:
            wait_port(port, p, 60, "secretless-proxy")
            # mitmproxy accepts connections before the addon's start-up (services.start(): broker,
            # store connection and its attach to the broker) has finished; the "listening on" line
            # is logged after it. Probing earlier would fill the broker's cache from the provider
            # before the shared store is attached, so (g)/(h) would never put the token in Redis.
            wait_log(logf, f"secretless-proxy listening on 127.0.0.1:{port}", p, 30, "secretless-proxy")
            wait_file(icpt / "mitmproxy-ca-cert.pem", 10, "secretless-proxy interception CA")
            self.measure(key, {"cafile": icpt / "mitmproxy-ca-cert.pem",
                               "expect": expect, "proxy_port": port,
                               "cert": svid / "svid.pem", "key": svid / "svid-key.pem"}, p, logf)
        except Exception as e:
            raise RuntimeError(f"{e}\n  secretless-proxy log tail:\n{tail(logf)}") from None
        finally:
            self.procs.stop(p)
            warnings = proxy_log_warnings(logf)
            if warnings and self.rounds.get(key) and self.rounds[key][-1].get("round") == self.round:
                self.rounds[key][-1]["proxy_warnings"] = warnings
            for w in warnings[:5]:
                log(f"case {key}: proxy log: {w}")

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
        self.measure_through("d", "squid", p, port, cafile=d / "bump-ca.pem", expect="auth=injected",
                             logfile=d / "cache.log")

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
               f"{'conns':>6}  {'CPU% proxy/upstream/loadgen/other':>33}")
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
            cpus = f"{cpu.get('proxy', '-')}/{cpu['upstream']}/{cpu['loadgen']}/{cpu.get('other', '-')}"
            lines.append(f"{label:<44} {r['rps']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                         f"{r['count']:>9} {r['errors']:>7} {r['connects']:>6}  {cpus:>33}"
                         + (f"  {r['rps_min']:>6.0f}-{r['rps_max']:<6.0f}" if a.rounds > 1 else ""))
        lines.append("")
        lines.append("conns = TCP+TLS (+CONNECT) setups made during warm-up + measurement (equal to the concurrency "
                     "when nothing reconnected).")
        lines.append("CPU% = CPU time / wall time over warm-up + measurement, per process group (100% = one core; "
                     "the machine has " + str(os.cpu_count()) + "); other = every other process on the machine "
                     "(background load: noise).")
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

        if len(set(a.cases) & set("abcd")) >= 2:
            lines.append("")
            lines.append("ratios (req/s ratio; latency ratio >1 = slower):")
        if {"b", "c"} <= set(a.cases):
            ratio_line("c", "b", "(c) secretless / (b) mitmdump")
        if INSTRUMENT["on"]:
            lines.append("")
            lines.append("instructions per request (callgrind, proxy process, measured window; --instructions):")
            for key in CASES:
                r = self.results.get(key)
                if r and r.get("instr_per_req"):
                    lines.append(f"  ({key}) {r['instr_per_req'] / 1e6:8.3f} M   per round: "
                                 + ", ".join(f"{x['instr_per_req'] / 1e6:.3f}" for x in self.rounds[key]
                                             if x.get("instr_per_req")))
            n, d = self.results.get("c"), self.results.get("b")
            if n and d and n.get("instr_per_req") and d.get("instr_per_req"):
                lines.append(f"  (b)/(c) instructions per request = {d['instr_per_req'] / n['instr_per_req']:.3f}x "
                             "(the throughput ratio (c)/(b) the proxy would reach on an idle core, if instructions "
                             "were all it spends)")
        if {"c", "d"} <= set(a.cases):
            ratio_line("c", "d", "(c) secretless / (d) squid")
        if "a" in a.cases:
            for k in ("b", "c", "d"):
                if k in a.cases:
                    ratio_line(k, "a", f"({k}) {CASES[k].split(' ')[0]} / (a) direct")
        oauth_block = "e" in a.cases and ("c" in a.cases or "f" in a.cases)
        if oauth_block:
            lines.append("")
            lines.extend(self.oauth_report())
        if set(STORE_CASES) & set(a.cases):
            lines.append("")
            lines.extend(self.store_report(with_e_tokens=not oauth_block))
        a_res = self.results.get("a")
        if a_res:
            best = max((self.results[k]["rps"] for k in "bcdefgh" if k in self.results), default=0)
            if best:
                lines.append("")
                lines.append(f"load-generator headroom: the generator drove direct (a) at {a_res['rps']:.0f} req/s, "
                             f"{a_res['rps'] / best:.1f}x the fastest proxy case ({best:.0f} req/s).")
        warn = [(k, w) for k in CASES for w in (self.results.get(k) or {}).get("proxy_warnings", [])]
        if warn:
            lines.append("")
            lines.append("secretless-proxy log warnings/errors (whole case: start-up, probe, warm-up, measurement, stop):")
            lines.extend(f"  ({k}) {w}" for k, w in warn)
        return "\n".join(lines)

    def paired(self, num: str, den: str, field: str) -> list[float]:
        """Per-round num/den ratio of one field, for rounds where both cases produced a result."""
        by_round = {r["round"]: r for r in self.rounds.get(den, [])}
        return [n[field] / by_round[n["round"]][field] for n in self.rounds.get(num, [])
                if n["round"] in by_round and by_round[n["round"]][field]]

    def oauth_report(self) -> list[str]:
        """(e) vs (c) and (f) vs (e), with the issue's targets, and the token accounting of (e)/(f)."""
        a = self.args
        out = ["oauth2 brokered credential vs static injection (secretless-proxy, same rule, upstream and client;"
               + (f" medians of {a.rounds} interleaved rounds)" if a.rounds > 1 else " 1 round: noisy, use --rounds 3)"),
               f"  (e): token lifetime {OAUTH_WARM_TTL} s, cache primed by probe + warm-up; "
               f"(f): token lifetime {a.token_ttl:g} s, broker.skew_seconds {OAUTH_SKEW:g} (also in (e)),"
               f" refresh-ahead at ~{self.refresh_period():.1f} s"]
        c, e, f = (self.results.get(k) for k in ("c", "e", "f"))

        def verdict(ok: bool) -> str:
            return "MET" if ok else "NOT MET"

        def per_round(vals: list[float], fmt: str = ".3f") -> str:
            return " ".join(format(v, fmt) for v in vals) if len(vals) > 1 else ""

        if c and e and c["rps"] and e["rps"]:
            tp = e["rps"] / c["rps"]
            out.append(f"  {'(e) oauth2 warm / (c) static':<40} throughput {tp:>7.3f}x   "
                       f"p50 latency {e['p50_ms'] / c['p50_ms']:>7.2f}x   p99 latency {e['p99_ms'] / c['p99_ms']:>7.2f}x"
                       f"   target throughput >= 0.95x: {verdict(tp >= 0.95)}")
            if pr := per_round(self.paired("e", "c", "rps")):
                out.append(f"  {'':<40} per-round throughput ratios: {pr}")
        elif "c" in a.cases:
            out.append(f"  {'(e) oauth2 warm / (c) static':<40} n/a (case missing)")
        if e and f and e["p99_ms"] and f["rps"]:
            p99 = f["p99_ms"] / e["p99_ms"]
            out.append(f"  {'(f) rotating / (e) warm (steady)':<40} throughput {f['rps'] / e['rps']:>7.3f}x   "
                       f"p50 latency {f['p50_ms'] / e['p50_ms']:>7.2f}x   p99 latency {p99:>7.2f}x"
                       f"   target p99 <= 1.2x: {verdict(p99 <= 1.2)}")
            if pr := per_round(self.paired("f", "e", "p99_ms"), ".2f"):
                out.append(f"  {'':<40} per-round p99 ratios: {pr}")
            out.append(f"  {'':<40} max latency: (e) {e['max_ms']:.1f} ms, (f) {f['max_ms']:.1f} ms")
        elif "f" in a.cases:
            out.append(f"  {'(f) rotating / (e) warm (steady)':<40} n/a (case missing)")
        for key in ("e", "f"):
            out.extend(self.token_lines(key))
        return out

    def token_lines(self, key: str) -> list[str]:
        """Token accounting of one OAuth2 case ((e)-(h)): what the token server and nginx saw, per round."""
        stats = self.oauth_stats.get(key) or []
        if not stats or key not in self.results:
            return []

        def col(field: str) -> str:
            return " ".join(str(st[field]) for st in stats)

        rounds = "per round " if len(stats) > 1 else ""
        line = (f"  ({key}) token calls in the measured window ({rounds}as seen by the token server): "
                f"{col('calls_window')}")
        if key == "f":
            ok = all(st["calls_window"] >= 2 for st in stats)
            line += f"  (>= 2 proves rotation: {'MET' if ok else 'NOT MET'})"
        else:
            line += "  (warm cache: 0 expected)"
        return [line,
                f"      token calls per case incl. probe + warm-up: {col('calls_case')}; rejected: "
                f"{col('rejected_case')}; distinct tokens the upstream saw in the window: "
                f"{col('tokens_upstream')}; upstream requests with an expired token: {col('expired_upstream')}"
                f"; with another credential: {col('foreign_upstream')}"]

    def store_report(self, *, with_e_tokens: bool) -> list[str]:
        """(g) Redis store vs (e) memory store, with the issue's target, and (h) grant lookup vs (g)."""
        a = self.args
        out = ["shared Redis store vs in-process memory store (secretless-proxy, oauth2 warm cache, same rule, upstream"
               " and client;" + (f" medians of {a.rounds} interleaved rounds)" if a.rounds > 1
                                 else " 1 round: noisy, use --rounds 3)")]
        if "g" in a.cases:
            out.append(f"  (g): (e) + store: redis://127.0.0.1:<port>/0 (redis-server {self.redis_version or '?'}, "
                       f"--save \"\" --appendonly no, flushed before each case), entries sealed with a per-run "
                       f"AES-256 key; the broker's in-process cache is the L1")
        if "h" in a.cases:
            out.append(f"  (h): (g) + requires_grant: true on the rule, one grant for {GRANT_WORKLOAD} written to "
                       f"Redis before each case: checked through the replica's grant cache (default "
                       f"store.grant_cache_seconds: 0.5), one grant lookup in Redis per 0.5 s")
        e, g, h = (self.results.get(k) for k in ("e", "g", "h"))

        def ratios(n: dict, d: dict) -> str:
            return (f"throughput {n['rps'] / d['rps']:>7.3f}x   p50 latency {n['p50_ms'] / d['p50_ms']:>7.2f}x   "
                    f"p99 latency {n['p99_ms'] / d['p99_ms']:>7.2f}x")

        def per_round(num: str, den: str) -> list[str]:
            if a.rounds <= 1:
                return []
            tp = " ".join(f"{v:.3f}" for v in self.paired(num, den, "rps"))
            p99 = " ".join(f"{v:.2f}" for v in self.paired(num, den, "p99_ms"))
            return [f"  {'':<40} per-round throughput ratios: {tp}; p99 ratios: {p99}"]

        if e and g and e["rps"] and g["rps"]:
            tp = g["rps"] / e["rps"]
            out.append(f"  {'(g) redis store / (e) memory store':<40} {ratios(g, e)}"
                       f"   target throughput >= 0.9x: {'MET' if tp >= 0.9 else 'NOT MET'}")
            out.extend(per_round("g", "e"))
        elif "g" in a.cases:
            out.append(f"  {'(g) redis store / (e) memory store':<40} n/a (case "
                       f"{'(e)' if 'e' not in a.cases or not e else '(g)'} missing)")
        if g and h and g["rps"] and h["rps"]:
            out.append(f"  {'(h) redis + grant / (g) redis store':<40} {ratios(h, g)}   (no target)")
            out.extend(per_round("h", "g"))
        elif "h" in a.cases:
            out.append(f"  {'(h) redis + grant / (g) redis store':<40} n/a (case missing)")
        if e and h and e["rps"] and h["rps"]:
            out.append(f"  {'(h) redis + grant / (e) memory store':<40} {ratios(h, e)}   (no target)")
        for key in STORE_CASES:
            stats = self.store_stats.get(key) or []
            if not stats or key not in self.results:
                continue
            rounds = " per round" if len(stats) > 1 else ""
            cmds = " ".join(f"{st['cmds_per_req']:.3f}" for st in stats)
            byc: dict[str, int] = {}
            for st in stats:
                for c, n in st["by_cmd"].items():
                    byc[c] = byc.get(c, 0) + n
            reqs = sum(st["reqs"] for st in stats)
            breakdown = ", ".join(f"{c} {n / reqs:.3f}" if reqs else f"{c} {n}" for c, n in
                                  sorted(byc.items(), key=lambda kv: -kv[1])) or "none"
            expect = ("grant cache: ~2.5 Lua script calls (evalsha) per second expected (one per 0.4 s: refresh "
                      "ahead at 80 % of 0.5 s), ~0.002/request at 1-2k req/s; the script's own commands are counted too"
                      if key == "h" else "L1 cache hit: 0 expected, apart from the event subscription's pings, 1/s")
            out.append(f"  ({key}) Redis commands per request in the measured window{rounds}: {cmds}  ({expect})")
            out.append(f"      by command (all rounds, per request): {breakdown}")
            entries = " ".join(f"{st['keys_after']['cred']}/{st['keys_after']['grant']}" for st in stats)
            want = (1, 1 if key == "h" else 0)
            ok = all((st["keys_after"]["cred"], st["keys_after"]["grant"]) == want for st in stats)
            out.append(f"      redis-server CPU%{rounds}: {' '.join(str(st['redis_cpu']) for st in stats)}; "
                       f"store entries after the case (cred/grant){rounds}: {entries}  "
                       f"({want[0]}/{want[1]} expected: the sealed token{' and the grant' if key == 'h' else ''}"
                       f" -> {'OK' if ok else 'UNEXPECTED'})")
        for key in (("e",) if with_e_tokens else ()) + STORE_CASES:
            out.extend(self.token_lines(key))
        return out

    def refresh_period(self) -> float:
        """When the broker refreshes a --token-ttl token (broker.py _store, default refresh_at 0.75 + ~2.5% jitter)."""
        ttl, frac = self.args.token_ttl, 0.775
        after = ttl * frac
        if after >= ttl - OAUTH_SKEW:
            after = (ttl - OAUTH_SKEW) * frac
        return after

    def run(self) -> int:
        failures: dict[str, str] = {}
        try:
            self.build_loadgen()
            self.make_pki()
            self.start_nginx()
            if set(OAUTH_CASES) & set(self.args.cases):
                try:
                    self.start_token_server()
                except Exception as e:  # noqa: BLE001 - only (e)-(h) need it
                    for key in OAUTH_CASES:
                        failures[key] = f"FAILED: token server: {str(e).splitlines()[0]}"
                    log(f"token server failed to start: {e}\n{tail(self.tmp / 'token-server' / 'token-server.log')}")
            if set(STORE_CASES) & set(self.args.cases):
                try:
                    self.start_redis()
                except SkipCase as e:
                    for key in STORE_CASES:
                        failures.setdefault(key, f"SKIPPED: {e}")
                    log(f"cases g/h skipped: {e}")
                except Exception as e:  # noqa: BLE001 - only (g)/(h) need it
                    for key in STORE_CASES:
                        failures.setdefault(key, f"FAILED: redis-server: {str(e).splitlines()[0]}")
                    log(f"redis-server failed to start: {e}\n{tail(self.tmp / 'redis' / 'redis.log')}")
            for rnd in range(1, self.args.rounds + 1):
                self.round = rnd
                for key in RUN_ORDER:
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
    if all(r.get("instr_per_req") for r in runs):
        out["instr_per_req"] = med(r["instr_per_req"] for r in runs)
    out["last_error"] = next((r["last_error"] for r in reversed(runs) if r["last_error"]), "")
    out["notes"] = [n for r in runs for n in r.get("notes", [])]
    by_msg: dict[str, list[str]] = {}  # the same warning in several rounds: one line naming the rounds
    for r in runs:
        for w in r.get("proxy_warnings", []):
            by_msg.setdefault(re.sub(r"\(kid [^)]*\)", "(kid …)", w), []).append(str(r["round"]))
    out["proxy_warnings"] = [f"round{'s' if len(rs) > 1 else ''} {','.join(rs)}: {w}" for w, rs in by_msg.items()]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, help="measured seconds per case (default 10; --quick: 6)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds per case, not counted (default 2; --quick: 1)")
    ap.add_argument("--conns", type=int, default=20, help="concurrent keep-alive connections (default 20)")
    ap.add_argument("--cases", help="comma-separated subset of a,b,c,d,e,f,g,h (default all; --quick: c,e,f,g)")
    ap.add_argument("--quick", action="store_true",
                    help="only the static-vs-oauth2 and memory-vs-redis comparisons: cases c,e,f,g, "
                         "1 s warm-up + 6 s measured (~50 s)")
    ap.add_argument("--token-ttl", type=float, default=4.0,
                    help="expires_in of the tokens in case (f), seconds (default 4: with broker.skew_seconds 1 "
                         "the proxy refreshes every ~2.3 s)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat all cases N times, interleaved; the table shows medians (default 1)")
    ap.add_argument("--nginx-workers", type=int, default=1, help="nginx worker processes (default 1)")
    ap.add_argument("--json-out", help="also write all results as JSON to this file")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs) for debugging")
    ap.add_argument("--instructions", action="store_true",
                    help="run mitmdump and secretless-proxy under valgrind's callgrind and report instructions per "
                         "request over the measured window: a count that background load does not move "
                         "(start-up is ~30x slower; use few connections, e.g. --conns 4 --warmup 8 --duration 10)")
    args = ap.parse_args()
    if args.instructions:
        if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
            ap.error("--instructions needs valgrind (Debian package valgrind)")
        INSTRUMENT.update(on=True, slow=20.0)
    if args.duration is None:
        args.duration = 6.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    if args.cases is None:
        args.cases = "c,e,f,g" if args.quick else ",".join(CASES)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in args.cases if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; choose from {','.join(CASES)}")
    if not 2 * OAUTH_SKEW <= args.token_ttl <= 600 or args.token_ttl != int(args.token_ttl):
        ap.error(f"--token-ttl must be a whole number of seconds from {2 * OAUTH_SKEW:g} to 600")
    if "f" in args.cases and args.duration < 2 * args.token_ttl:
        log(f"warning: --duration {args.duration:g} is short for --token-ttl {args.token_ttl:g}: "
            "case (f) may see fewer than 2 rotations in its window")

    bench = Bench(args)
    INSTRUMENT["dir"] = str(bench.tmp)

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
