"""``mitmdump -s addons/secretless.py``: the config's ``listen`` applies, and the admin listeners
that server.py owns start and stop with the proxy, as under ``secretless-proxy run``."""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from helpers.net import free_port
from helpers.proxy import BIN, SECRET, Pki, ProxyProcess, base_config, start_proxy
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.addons.tlsconfig import TlsConfig
from mitmproxy.test import taddons

from secretless_proxy.addon import Secretless
from secretless_proxy.server import AdminListeners, secretless_addons

SCRIPT = Path(__file__).parents[1] / "addons" / "secretless.py"
pytestmark = pytest.mark.e2e  # mitmdump processes (the in-process tests here are quick either way)


@pytest.fixture
def mitmdump(tmp_path: Path):
    """Start mitmdump with the entry script, a config dict and extra arguments."""
    started: list[ProxyProcess] = []

    def start(config: dict, *args: str) -> ProxyProcess:
        path = tmp_path / f"config{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [str(BIN / "mitmdump"), *args, "-s", str(SCRIPT), "--set", f"secretless_config={path}"]
        p = start_proxy(cmd, log_path=tmp_path / f"mitmdump{len(started)}.log",
                        env={**os.environ, "TEST_STRIPE_KEY": SECRET})
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()
        assert "Traceback" not in p.output(), p.output()


def mitmdump_default_port_free() -> bool:
    """mitmdump binds *:8080 before it loads any script; with 8080 taken it exits before the addon runs."""
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
        try:
            s.bind(("", 8080))
        except OSError:
            return False
    return True


def bound(p: ProxyProcess) -> list[str]:
    return re.findall(r"secretless-proxy listening on (\S+)", p.output())


class TestListen:
    def test_config_listen_is_where_mitmdump_listens(self, mitmdump, pki: Pki) -> None:
        """Without --listen-host/-p, mitmdump binds the config's listen only, not every interface."""
        if not mitmdump_default_port_free():
            pytest.skip("port 8080 is taken on this machine: mitmdump would exit before loading the script")
        port = free_port()
        p = mitmdump(base_config(pki, rules=[], listen=f"127.0.0.1:{port}"))
        assert bound(p) == [f"127.0.0.1:{port}"]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        if socket.has_ipv6:
            with pytest.raises(OSError), socket.create_connection(("::1", port), timeout=5):
                pass

    def test_command_line_port_wins(self, mitmdump, pki: Pki) -> None:
        """-p on the command line wins over the config's port; the config's host still applies."""
        p = mitmdump(base_config(pki, rules=[], listen=f"127.0.0.1:{free_port()}"), "-p", "0")
        (addr,) = bound(p)
        assert addr.startswith("127.0.0.1:") and not addr.endswith(":0")

    def test_command_line_host_and_port_win(self, mitmdump, pki: Pki) -> None:
        """--listen-host and -p both given: the config's listen is not used."""
        p = mitmdump(base_config(pki, rules=[], listen="127.0.0.2:1"), "--listen-host", "127.0.0.1", "-p", "0")
        (addr,) = bound(p)
        assert addr.startswith("127.0.0.1:")


class TestAdminListenersUnderMitmdump:
    def test_both_admin_listeners_start(self, mitmdump, pki: Pki) -> None:
        """The entry script loads server.py's AdminListeners: /healthz answers and the admin API binds."""
        admin = free_port()
        cfg = base_config(pki, rules=[], admin={"listen": f"127.0.0.1:{admin}", "api_listen": "127.0.0.1:0",
                                                "workloads": ["spiffe://example.org/ns/ops/sa/admin"]})
        p = mitmdump(cfg, "--listen-host", "127.0.0.1", "-p", "0")
        assert httpx.get(f"http://127.0.0.1:{admin}/healthz", timeout=5).text == "ok\n"
        api = re.search(r"admin API on https://127\.0\.0\.1:(\d+)", p.output())
        assert api is not None
        with socket.create_connection(("127.0.0.1", int(api.group(1))), timeout=5):
            pass
        p.stop()
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", admin), timeout=5):
            pass


class TestAdminBindFailure:
    @pytest.mark.parametrize("via", ["run", "mitmdump"])
    def test_taken_admin_port_stops_the_proxy(self, tmp_path: Path, pki: Pki, via: str) -> None:
        """An admin port that cannot be bound stops the process, which never says it is listening."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            path = tmp_path / "c.yaml"
            path.write_text(yaml.safe_dump(base_config(pki, rules=[], admin={"listen": f"127.0.0.1:{port}"})))
            cmd = ([str(BIN / "secretless-proxy"), "run", "--config", str(path), "--listen", "127.0.0.1:0"]
                   if via == "run" else
                   [str(BIN / "mitmdump"), "--listen-host", "127.0.0.1", "-p", "0", "-s", str(SCRIPT),
                    "--set", f"secretless_config={path}"])
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "TEST_STRIPE_KEY": SECRET}, stdin=subprocess.DEVNULL)
        log = out.stdout + out.stderr
        assert f"admin listener on 127.0.0.1:{port} failed: " in log and "; stopping" in log, log
        assert "secretless-proxy listening on" not in log and "Traceback" not in log, log


def config_file(tmp_path: Path, pki: Pki, **extra: object) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base_config(pki, rules=[], **extra)))
    return str(path)


class TestInProcess:
    def test_entry_order(self) -> None:
        """AdminListeners comes first: mitmproxy runs done() in chain order, listeners close before services stop."""
        first, second = secretless_addons()
        assert isinstance(first, AdminListeners) and isinstance(second, Secretless)
        assert first.secretless is second

    def test_default_listen_is_loopback_8080(self, tmp_path: Path, pki: Pki, monkeypatch) -> None:
        """Without `listen` in the config the proxy listens on 127.0.0.1:8080, as the README says."""
        monkeypatch.setenv("TEST_STRIPE_KEY", SECRET)
        addon = Secretless()
        with taddons.context(Proxyserver(), TlsConfig(), addon) as tctx:
            tctx.configure(addon, secretless_config=config_file(tmp_path, pki))
            assert (tctx.options.listen_host, tctx.options.listen_port) == ("127.0.0.1", 8080)

    def test_options_set_before_are_kept(self, tmp_path: Path, pki: Pki, monkeypatch) -> None:
        """listen_host and listen_port an operator set are not overwritten, each on its own."""
        monkeypatch.setenv("TEST_STRIPE_KEY", SECRET)
        addon = Secretless()
        with taddons.context(Proxyserver(), TlsConfig(), addon) as tctx:
            tctx.options.update(listen_port=9999)
            tctx.configure(addon, secretless_config=config_file(tmp_path, pki, listen="127.0.0.3:7000"))
            assert (tctx.options.listen_host, tctx.options.listen_port) == ("127.0.0.3", 9999)


class TestNoMitmproxyErrorPage:
    def test_mitmproxys_own_body_size_limit_answers_in_the_error_contract(self, mitmdump, pki: Pki, upstream) -> None:
        """mitmproxy's body_size_limit (an option of its own, allowed under mitmdump) refuses a large body
        with its HTML page; the proxy's net under every such page answers in the error contract instead."""
        rule = {"name": "billing-to-api", "workloads": ["spiffe://example.org/ns/prod/sa/billing"],
                "to": {"host": "localhost", "port": upstream.port}, "action": "allow"}
        p = mitmdump(base_config(pki, rules=[rule]), "--listen-host", "127.0.0.1", "-p", "0",
                     "--set", "body_size_limit=1k")
        ctx = ssl.create_default_context(cafile=pki.interception_ca_cert)
        ctx.load_cert_chain(*pki.svid("spiffe://example.org/ns/prod/sa/billing"))
        with httpx.Client(proxy=p.url, verify=ctx, trust_env=False, timeout=10) as c:
            r = c.post(f"{upstream.url}/v1/x", content=b"x" * 5000)
        assert r.status_code == 413
        assert r.headers["content-type"] == "application/json", r.text
        body = r.json()
        assert body["reason"] == "body_too_large" and r.headers["x-secretless-request-id"] == body["request_id"]
        assert "mitmproxy" not in r.text and "<html" not in r.text
        assert not [q for q in upstream.requests if q["path"] == "/v1/x"]
