"""Shared fixtures: a test PKI, real TLS echo upstreams and a real proxy process on loopback.

The proxy runs as ``secretless-proxy run`` (or ``mitmdump -s``) in a subprocess on port 0;
the port is read from its log. Every proxy fixture checks at teardown that the secrets it was
given never appear in anything the process printed.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from upstream import EchoUpstream  # noqa: E402

from secretless_proxy import certs  # noqa: E402

BIN = Path(sys.executable).parent
SECRET = "sk_test_51SECRETvalue0123456789"
LISTENING = re.compile(r"secretless-proxy listening on [^\s:]+:(\d+)")
LOOPBACK_NETS = ("127.0.0.0/8", "::1/128")


@dataclass
class Pki:
    dir: Path
    workload_ca: certs.Issued
    upstream_ca: certs.Issued
    trust_bundle: Path
    upstream_ca_file: Path
    interception_dir: Path
    _n: int = 0

    def svid(self, spiffe_id: str | None = "spiffe://example.org/ns/prod/sa/billing", *,
             ca: certs.Issued | None = None, **kw) -> tuple[str, str]:
        """Issue a client certificate; returns (cert_path, key_path) for curl/requests."""
        ca = ca or self.workload_ca
        leaf = certs.make_svid(ca=ca, spiffe_id=spiffe_id, **kw)
        self._n += 1
        out = self.dir / f"svid{self._n}"
        cert, key = certs.write_svid(leaf, out, ca=ca)
        return str(cert), str(key)

    @property
    def interception_ca_cert(self) -> str:
        return str(self.interception_dir / "mitmproxy-ca-cert.pem")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    wca = certs.make_ca(common_name="test workload CA")
    uca = certs.make_ca(common_name="test upstream CA")
    certs.write_ca(wca, d / "workload")
    (d / "upstream-ca.pem").write_bytes(uca.cert_pem())
    return Pki(dir=d, workload_ca=wca, upstream_ca=uca, trust_bundle=d / "workload" / "ca.pem",
               upstream_ca_file=d / "upstream-ca.pem", interception_dir=d / "interception")


@pytest.fixture(scope="session")
def upstream(pki: Pki) -> Iterator[EchoUpstream]:
    with EchoUpstream(server_cert=certs.make_server_cert(ca=pki.upstream_ca)) as up:
        yield up


@pytest.fixture(autouse=True)
def _clear_upstream_log(request: pytest.FixtureRequest) -> None:
    if "upstream" in request.fixturenames:
        request.getfixturevalue("upstream").requests.clear()


def base_config(pki: Pki, *, rules: list[dict], credentials: dict | None = None, **extra) -> dict:
    cfg = {
        "version": 1,
        "identity": {"trust_bundle": str(pki.trust_bundle), "trust_domains": ["example.org"]},
        "interception_ca": str(pki.interception_dir),
        # The test upstreams listen on loopback, which is refused by default (issue 16): allowed here
        # explicitly, as a test-only operator allowance; test_e2e_destination.py runs without it.
        "upstream": {"ca_bundle": str(pki.upstream_ca_file), "allow_private": list(LOOPBACK_NETS)},
        "credentials": credentials if credentials is not None else {"stripe": {"kind": "static", "secret": "env:TEST_STRIPE_KEY"}},
        "rules": rules,
        "default": "deny",
    }
    cfg.update(extra)
    return cfg


@dataclass
class ProxyProcess:
    proc: subprocess.Popen
    log_path: Path
    port: int = 0
    secrets: tuple[str, ...] = ()
    _lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_proxy(cmd: list[str], *, log_path: Path, env: dict[str, str], timeout: float = 20,
                cwd: Path | None = None) -> ProxyProcess:
    with open(log_path, "wb") as fh:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL, cwd=cwd)
    p = ProxyProcess(proc=proc, log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = LISTENING.search(p.output())
        if m:
            p.port = int(m.group(1))
            return p
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited with {proc.returncode}:\n{p.output()}")
        time.sleep(0.05)
    p.stop()
    raise AssertionError(f"proxy did not start within {timeout}s:\n{p.output()}")


@pytest.fixture
def proxy_factory(pki: Pki, tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Start a proxy with a config dict; ``via="mitmdump"`` uses the plain -s entry script."""
    started: list[ProxyProcess] = []

    def start(config: dict, *, env: dict[str, str] | None = None, via: str = "run",
              wrap: tuple[str, ...] = (), cwd: Path | None = None) -> ProxyProcess:
        """``wrap`` prefixes the command (e.g. ``("prlimit", "--nofile=256", "--")``); the proxy
        keeps the pid (prlimit execs it). ``cwd`` is the proxy's working directory."""
        n = len(started)
        cfg_path = tmp_path / f"config{n}.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        full_env = {**os.environ, "TEST_STRIPE_KEY": SECRET, **(env or {})}
        if via == "run":
            cmd = [str(BIN / "secretless-proxy"), "run", "--config", str(cfg_path), "--listen", "127.0.0.1:0"]
        else:
            # Default flow_detail: mitmdump prints every flow's URL, so a query credential
            # left in the flow would show up in the output this fixture searches.
            cmd = [str(BIN / "mitmdump"), "--listen-host", "127.0.0.1", "-p", "0",
                   "-s", str(Path(__file__).parents[1] / "addons" / "secretless.py"),
                   "--set", f"secretless_config={cfg_path}"]
        p = start_proxy([*wrap, *cmd], log_path=tmp_path / f"proxy{n}.log", env=full_env, cwd=cwd)
        p.secrets = (SECRET, *(env or {}).values())
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()
    for p in started:
        out = p.output()
        for s in p.secrets:
            assert s not in out, "a secret appeared in the proxy's output"
        assert "Traceback" not in out, out


# -- clients ---------------------------------------------------------------------------------


@dataclass
class CurlResult:
    status: int
    body: str
    stderr: str


def curl(*args: str, proxy: str, timeout: float = 20) -> CurlResult:
    """Run the real curl binary; returns status and body (never raises on HTTP errors)."""
    assert shutil.which("curl"), "curl is required for the end-to-end tests"
    out = subprocess.run(["curl", "-sS", "--max-time", "15", "-x", proxy, "-w", "\n%{http_code}", *args],
                         capture_output=True, text=True, timeout=timeout)
    body, _, code = out.stdout.rpartition("\n")
    return CurlResult(status=int(code or 0), body=body, stderr=out.stderr)


# Raw sockets a test opened (hostile-client tests keep many): closed after every test, pass or fail.
OPEN_SOCKETS: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_open_sockets():
    yield
    while OPEN_SOCKETS:
        OPEN_SOCKETS.pop().close()


def tunnel(proxy_port: int, target: tuple[str, int], *, sni: str, ca: str,
           cert: tuple[str, str] | None = None) -> ssl.SSLSocket:
    """CONNECT through the proxy, then TLS with the given SNI (and client cert)."""
    raw = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    raw.sendall(f"CONNECT {target[0]}:{target[1]} HTTP/1.1\r\nHost: {target[0]}:{target[1]}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = raw.recv(4096)
        assert chunk, "proxy closed during CONNECT"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False  # the SNI under test may deliberately differ from the target
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx.wrap_socket(raw, server_hostname=sni)


def http_exchange(sock: ssl.SSLSocket, request: str) -> tuple[int, bytes]:
    """Send one raw HTTP/1.1 request on a kept-alive socket and read one response."""
    import http.client

    sock.sendall(request.encode())
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    body = resp.read()
    return resp.status, body


def request_context(spiffe_id: str = "spiffe://example.org/ns/prod/sa/billing", *, host: str = "api.example.com",
                    path: str = "/", rule: str = "r", not_after: float | None = None):
    """A provider's RequestContext for a verified workload (for driving providers directly)."""
    from secretless_proxy.credentials.base import RequestContext
    from secretless_proxy.identity import Workload

    td, _, wl_path = spiffe_id.removeprefix("spiffe://").partition("/")
    workload = Workload(spiffe_id=spiffe_id, trust_domain=td, path="/" + wl_path,
                        not_after=time.time() + 3600 if not_after is None else not_after, cert_sha256="00")
    return RequestContext(workload=workload, host=host, port=443, method="GET", path=path, rule=rule)


# -- a real DNS server on loopback (dnsmasq) --------------------------------------------------

# name → addresses, answered by the session's dnsmasq (authoritative for these zones, NXDOMAIN
# for other names in them). One host-record line per address, so a name may have several.
DNS_ZONES = ("example.com", "dest.test")
DNS_RECORDS: dict[str, tuple[str, ...]] = {
    "api.example.com": ("127.0.0.1",),
}


@dataclass
class DnsServer:
    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def queries(self, name: str) -> int:
        """How many queries for ``name`` dnsmasq has logged so far."""
        return sum(1 for line in self.log_path.read_text(errors="replace").splitlines()
                   if re.search(rf"query\[\w+\] {re.escape(name)} from", line))


def free_udp_port() -> int:
    """A loopback port free for UDP *and* TCP: dnsmasq binds both, and a port busy for TCP alone fails it."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


def start_dnsmasq(records: dict[str, tuple[str, ...]], *, log_path: Path, zones=DNS_ZONES, ttl: int = 300) -> DnsServer:
    """dnsmasq on 127.0.0.1:<free port>, no upstream servers, no /etc/hosts, query log to a file."""
    assert Path("/usr/sbin/dnsmasq").exists(), "dnsmasq is required (Makefile SYSTEM_DEPS)"
    # The port is free when picked, but another process can take it before dnsmasq binds (the suite
    # and whatever else runs on the machine open loopback ports all the time): try a few ports.
    for attempt in range(5):
        try:
            return _start_dnsmasq(records, log_path=log_path, zones=zones, ttl=ttl, port=free_udp_port())
        except _PortTaken:
            if attempt == 4:
                raise AssertionError("dnsmasq: every port tried was taken before it could bind") from None
    raise AssertionError("unreachable")


class _PortTaken(Exception):
    pass


def _start_dnsmasq(records: dict[str, tuple[str, ...]], *, log_path: Path, zones, ttl: int, port: int) -> DnsServer:
    args = ["/usr/sbin/dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--no-negcache", "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={port}", "--pid-file=",
            "--log-queries", f"--log-facility={log_path}", f"--local-ttl={ttl}", "--user=" + os.environ.get("USER", "root")]
    args += [f"--local=/{z}/" for z in zones]
    for name, addrs in records.items():
        args += [f"--host-record={name},{a}" for a in addrs]
    err = log_path.with_suffix(".stderr")
    with open(err, "wb") as fh:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=fh, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = err.read_text(errors="replace")
            if "Address already in use" in text:
                raise _PortTaken
            raise AssertionError(f"dnsmasq exited: {text}")
        if log_path.exists() and "started" in log_path.read_text(errors="replace"):
            return DnsServer(port=port, proc=proc, log_path=log_path)
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("dnsmasq did not start")


@pytest.fixture(scope="session")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    """The session's DNS server, answering DNS_RECORDS (test modules with other names start their own)."""
    log_path = tmp_path_factory.mktemp("dns") / "dnsmasq.log"
    server = start_dnsmasq(DNS_RECORDS, log_path=log_path)
    yield server
    server.proc.terminate()
    server.proc.wait(timeout=10)
