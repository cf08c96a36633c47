"""Connect floods against the admin listener, the admin API and the proxy port (issue 8 §4, hostile
reviews 23 and 34): probes from an unrelated address keep being answered.

A real proxy process under ``prlimit --nofile=256``; four threads flood from 127.0.0.1, .2, .4
and .5 as fast as they can open sockets (each holds its last 25 and closes the older ones: below
the per-client cap); the probes come from 127.0.0.3, a fresh connection each with a 3 s budget,
as a kubelet sends them (on the admin API: an admin's mTLS request). Static floods of idle connections are in test_edge_limits.py
(``TestAdminUnderAttack``, ``TestDescriptorLimit``), the anonymous HTTP/2 flood in
test_abuse_close.py.
"""

from __future__ import annotations

import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import requests
from helpers.net import free_port
from helpers.proxy import base_config

pytestmark = [pytest.mark.slow, pytest.mark.e2e,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux: prlimit, 127.0.0.0/8")]

ADMIN = "spiffe://example.org/ns/ops/sa/admin"
FLOODERS = ("127.0.0.1", "127.0.0.2", "127.0.0.4", "127.0.0.5")
PROBER = "127.0.0.3"


@pytest.fixture
def proxy(proxy_factory, pki):
    cfg = base_config(pki, rules=[])
    cfg["admin"] = {"listen": f"127.0.0.1:{free_port()}", "api_listen": "127.0.0.1:0", "workloads": [ADMIN]}
    p = proxy_factory(cfg, wrap=("prlimit", "--nofile=256", "--"))
    p.admin = int(re.search(r"admin listener on 127\.0\.0\.1:(\d+)", p.output()).group(1))
    p.api = int(re.search(r"admin API on https://127\.0\.0\.1:(\d+)", p.output()).group(1))
    return p


def client_hello() -> bytes:
    """A real ClientHello: what a stalled TLS client sends before it goes silent."""
    out, into = ssl.MemoryBIO(), ssl.MemoryBIO()
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    tls = ctx.wrap_bio(into, out)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


@contextmanager
def flood(port: int, *, send: bytes = b"") -> Iterator[list[int]]:
    """Four addresses opening connections to ``port`` as fast as they can; ``send`` (then silence)
    waits for each connection first. Yields [connections opened]."""
    stop = threading.Event()
    opened = [0]

    def one(source: str) -> None:
        held: list[socket.socket] = []
        while not stop.is_set():
            s = socket.socket()
            try:
                s.bind((source, 0))
                if send:
                    s.settimeout(0.5)
                    s.connect(("127.0.0.1", port))
                    s.sendall(send)
                else:
                    s.setblocking(False)
                    try:
                        s.connect(("127.0.0.1", port))
                    except BlockingIOError:
                        pass
            except OSError:
                s.close()
                time.sleep(0.001)
                continue
            held.append(s)
            opened[0] += 1
            if len(held) > 25:  # under limits.admin_max_connections_per_client (32) per address
                held.pop(0).close()
        for s in held:
            s.close()

    threads = [threading.Thread(target=one, args=(a,), daemon=True) for a in FLOODERS]
    for t in threads:
        t.start()
    try:
        time.sleep(1)  # the flood is at full rate before the first probe
        yield opened
    finally:
        stop.set()
        for t in threads:
            t.join(5)


def probe(port: int, path: str, tls: ssl.SSLContext | None = None) -> bool:
    """One probe from PROBER on a fresh connection (over TLS with ``tls``): a 200 within 3 s."""
    s = socket.socket()
    try:
        s.bind((PROBER, 0))
        s.settimeout(3)
        deadline = time.monotonic() + 3
        s.connect(("127.0.0.1", port))
        with (tls.wrap_socket(s, server_hostname="127.0.0.1") if tls else s) as conn:
            conn.settimeout(max(0.01, deadline - time.monotonic()))
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            return conn.recv(20).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
    finally:
        s.close()


def probes(port: int) -> int:
    """20 probes, /healthz and /readyz, four at a time (a kubelet probing several pods)."""
    with ThreadPoolExecutor(4) as pool:
        return sum(pool.map(lambda path: probe(port, path), ("/healthz", "/readyz") * 10))


def refused(proxy, listener: str) -> float:
    text = requests.get(f"http://127.0.0.1:{proxy.admin}/metrics", timeout=5, proxies={"http": None}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f'secretless_connections_refused_total{{listener="{listener}"'))


def check_log(proxy) -> None:
    out = proxy.output()
    assert "Traceback" not in out, out
    assert out.count("\n") < 60, out  # one line per reason every 10 s, whatever the flood's size


class TestConnectFloods:
    @pytest.mark.parametrize("target", ["admin", "api", "proxy"])
    def test_probes_answered_during_a_connect_flood(self, proxy, target):
        """Connections that send nothing, from four addresses, on each port: 19 of 20 probes answered in 3 s."""
        port = {"admin": proxy.admin, "api": proxy.api, "proxy": proxy.port}[target]
        with flood(port) as opened:
            answered = probes(proxy.admin)
        print(f"\n[{target} connect flood] probes answered {answered}/20, connections opened {opened[0]}, "
              f"refused {refused(proxy, {'api': 'admin_api'}.get(target, target))}")
        assert answered >= 19
        assert refused(proxy, {"api": "admin_api"}.get(target, target)) >= 100  # the flood was counted
        check_log(proxy)

    def test_probes_answered_during_a_request_flood(self, proxy):
        """Whole requests on the admin port, never read back, from four addresses: the slots they hold
        are not all out of a probe's reach, 19 of 20 probes answered in 3 s (review 34)."""
        with flood(proxy.admin, send=b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") as opened:
            answered = probes(proxy.admin)
        print(f"\n[admin request flood] probes answered {answered}/20, connections opened {opened[0]}")
        assert answered >= 19
        check_log(proxy)

    @pytest.mark.parametrize("target", ["api", "admin"])
    def test_probes_answered_during_a_stalled_head_flood(self, proxy, target):
        """A ClientHello on the admin API, half a request head on the admin port, then silence, from
        four addresses: 19 of 20 probes answered in 3 s."""
        port, send, listener = ((proxy.api, client_hello(), "admin_api") if target == "api"
                                else (proxy.admin, b"GET /hea", "admin"))
        with flood(port, send=send) as opened:
            answered = probes(proxy.admin)
        print(f"\n[{target} stalled heads] probes answered {answered}/20, connections opened {opened[0]}, "
              f"refused {refused(proxy, listener)}")
        assert answered >= 19
        assert refused(proxy, listener) >= 100
        check_log(proxy)


# A TLS handshake record header (RFC 8446 §5.1) declaring 65535 bytes that never come: more than a
# record may hold (2^14 + 256), so it cannot be the start of a ClientHello the listener waits for.
STALLED_RECORD_HEADER = b"\x16\x03\x01\xff\xff"


class TestAdminApiUnderStalledHandshakes:
    @pytest.mark.parametrize("sent", ["oversized-record", "record-never-completed", "client-hello"])
    def test_admin_requests_answered(self, proxy, pki, sent):
        """Connections that send a TLS record header, or a whole ClientHello, and stall, from four
        addresses: 19 of 20 admin mTLS requests answered in 3 s (hostile review 34)."""
        ctx = ssl.create_default_context(cafile=pki.interception_ca_cert)
        ctx.load_cert_chain(*pki.svid(ADMIN))
        header = {"oversized-record": STALLED_RECORD_HEADER, "record-never-completed": b"\x16\x03\x01\x02\x00",
                  "client-hello": client_hello()}[sent]
        with flood(proxy.api, send=header) as opened, ThreadPoolExecutor(4) as pool:
            answered = sum(pool.map(lambda _: probe(proxy.api, "/v1/grants", ctx), range(20)))
        print(f"\n[api stalled {sent}] admin requests answered {answered}/20, connections opened "
              f"{opened[0]}, refused {refused(proxy, 'admin_api')}")
        assert answered >= 19
        check_log(proxy)
