"""A test PKI, the base config every e2e test starts from, and a real proxy process on port 0.

The proxy runs as ``secretless-proxy run`` (or ``mitmdump -s``) in a subprocess; the port is read
from its log. The fixtures in conftest.py start and stop these; tests use the values here.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import zygote
from secretless_proxy.dev import certs

BIN = Path(sys.executable).parent
SECRET = "sk_test_51SECRETvalue0123456789"
LISTENING = re.compile(r"secretless-proxy listening on [^\s:]+:(\d+)")
LOOPBACK_NETS = ("127.0.0.0/8", "::1/128")
ENTRY_SCRIPT = Path(__file__).parents[2] / "addons" / "secretless.py"


@dataclass
class Pki:
    dir: Path
    workload_ca: certs.Issued
    upstream_ca: certs.Issued
    trust_bundle: Path
    upstream_ca_file: Path
    interception_dir: Path
    _n: int = 0

    @classmethod
    def create(cls, d: Path) -> Pki:
        """A workload CA and an upstream CA written below ``d``."""
        wca = certs.make_ca(common_name="test workload CA")
        uca = certs.make_ca(common_name="test upstream CA")
        certs.write_ca(wca, d / "workload")
        (d / "upstream-ca.pem").write_bytes(uca.cert_pem())
        return cls(dir=d, workload_ca=wca, upstream_ca=uca, trust_bundle=d / "workload" / "ca.pem",
                   upstream_ca_file=d / "upstream-ca.pem", interception_dir=d / "interception")

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
    proc: subprocess.Popen | zygote.ForkedProcess
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


@dataclass
class ProxyView:
    """A proxy that a whole module shares, as one test sees it: its output from that test's start on.

    ``shared_proxy_factory`` hands these out; everything but ``output()`` is the shared process's.
    """

    base: ProxyProcess
    offset: int
    admin_port: int | None = None  # the port of the config's admin.listen, if it names one

    @property
    def proc(self) -> subprocess.Popen | zygote.ForkedProcess:
        return self.base.proc

    @property
    def port(self) -> int:
        return self.base.port

    @property
    def url(self) -> str:
        return self.base.url

    @property
    def log_path(self) -> Path:
        return self.base.log_path

    @property
    def secrets(self) -> tuple[str, ...]:
        return self.base.secrets

    @secrets.setter
    def secrets(self, value: tuple[str, ...]) -> None:
        self.base.secrets = value  # searched for in the whole log at the module's end too

    def output(self) -> str:
        with open(self.base.log_path, "rb") as fh:
            fh.seek(self.offset)
            return fh.read().decode(errors="replace")


def start_proxy(cmd: list[str], *, log_path: Path, env: dict[str, str], timeout: float = 20,
                cwd: Path | None = None) -> ProxyProcess:
    proc: subprocess.Popen | zygote.ForkedProcess
    with open(log_path, "wb") as fh:  # the child keeps its own copy of the descriptor
        if zygote.usable(cmd):
            proc = zygote.ZYGOTE.spawn(cmd, env=env, log_path=log_path, cwd=cwd)  # appends to the empty file
        else:
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
