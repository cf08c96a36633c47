"""A real DNS server on loopback (dnsmasq) for the destination tests."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from helpers.net import free_port

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

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
def free_udp_port() -> int:
    """A loopback port free for UDP *and* TCP: dnsmasq binds both, and a port busy for TCP alone fails it."""
    while True:
        port = free_port()  # below the ephemeral range, this worker's slice (helpers.net)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
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
