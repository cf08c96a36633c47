"""Shared fixtures: a test PKI, real TLS echo upstreams, real proxy processes and a DNS server on loopback.

Only fixtures and hooks live here; the values and helpers tests import are in ``helpers/`` (pytest's
``pythonpath`` puts this folder on the import path). Every proxy fixture checks at teardown that the
secrets it was given never appear in anything the process printed.

Markers (registered in pyproject.toml, strict): ``e2e`` is set here on every test that uses a fixture
starting a server process (the proxy, redis-server, dnsmasq, nginx, moto, an IdP), and by
``pytestmark`` in modules that start them inline; ``make test-fast`` deselects ``e2e`` and ``slow``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from helpers import zygote
from helpers.clients import OPEN_SOCKETS
from helpers.dns import DNS_RECORDS, DnsServer, start_dnsmasq
from helpers.proxy import BIN, ENTRY_SCRIPT, SECRET, Pki, ProxyProcess, ProxyView, start_proxy
from helpers.targets import CountingTarget
from helpers.upstream import EchoUpstream

from secretless_proxy.dev import certs

# Fixtures that start a server process (or, for the proxy factories, may): a test using one is e2e.
E2E_FIXTURES = {"proxy_factory", "module_proxy_factory", "shared_proxy_factory", "dnsmasq", "redis_server", "moto", "auth_moto"}


def pytest_sessionfinish() -> None:
    zygote.ZYGOTE.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def ca() -> certs.Issued:
    """A workload CA for config tests (example.org); a module may define its own ``ca``."""
    return certs.make_ca()


@pytest.fixture(scope="module")
def partner_ca() -> certs.Issued:
    return certs.make_ca(common_name="partner CA")


@pytest.fixture(scope="session")
def upstream(pki: Pki) -> Iterator[EchoUpstream]:
    with EchoUpstream(server_cert=certs.make_server_cert(ca=pki.upstream_ca)) as up:
        yield up


@pytest.fixture(scope="module")
def tls_counting_target(pki: Pki) -> Iterator[CountingTarget]:
    """A TLS ``CountingTarget`` for the module (tests that need a fresh one ``reset()`` it)."""
    with CountingTarget.tls(pki.upstream_ca) as t:
        yield t


@pytest.fixture(autouse=True)
def _clear_upstream_log(request: pytest.FixtureRequest) -> None:
    if "upstream" in request.fixturenames:
        request.getfixturevalue("upstream").requests.clear()


class _ProxyStarter:
    """Starts proxies with config dicts in one directory; ``close()`` stops them and checks their output."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[ProxyProcess] = []
        self._shared: dict[str, ProxyProcess] = {}

    def __call__(self, config: dict, *, env: dict[str, str] | None = None, via: str = "run",
                 wrap: tuple[str, ...] = (), cwd: Path | None = None,
                 config_file: Path | None = None) -> ProxyProcess:
        """``via="mitmdump"`` uses the plain -s entry script. ``wrap`` prefixes the command (e.g.
        ``("prlimit", "--nofile=256", "--")``); the proxy keeps the pid (prlimit execs it). ``cwd`` is
        the proxy's working directory. ``config_file``: a file the test laid out itself (a kubelet-style
        ConfigMap directory), used instead of writing ``config`` to a new one."""
        n = len(self.started)
        cfg_path = config_file or self.workdir / f"config{n}.yaml"
        if config_file is None:
            cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        full_env = {**os.environ, "TEST_STRIPE_KEY": SECRET, **(env or {})}
        if via == "run":
            cmd = [str(BIN / "secretless-proxy"), "run", "--config", str(cfg_path), "--listen", "127.0.0.1:0"]
        else:
            # Default flow_detail: mitmdump prints every flow's URL, so a query credential
            # left in the flow would show up in the output this fixture searches.
            cmd = [str(BIN / "mitmdump"), "--listen-host", "127.0.0.1", "-p", "0",
                   "-s", str(ENTRY_SCRIPT), "--set", f"secretless_config={cfg_path}"]
        p = start_proxy([*wrap, *cmd], log_path=self.workdir / f"proxy{n}.log", env=full_env, cwd=cwd)
        p.secrets = (SECRET, *(env or {}).values())
        self.started.append(p)
        return p

    def shared(self, config: dict, **kw) -> ProxyView:
        """The running proxy started here with this very config and these arguments (started on
        first use), seen from now on: tests that only read share one process."""
        key = yaml.safe_dump([config, sorted((kw.get("env") or {}).items()), kw.get("via", "run"),
                              list(kw.get("wrap", ())), str(kw.get("cwd"))])
        p = self._shared.get(key)
        if p is None:
            p = self._shared[key] = self(config, **kw)
        assert p.proc.poll() is None, f"a shared proxy exited with {p.proc.returncode}:\n{p.output()}"
        listen = (config.get("admin") or {}).get("listen")
        admin_port = int(listen.rpartition(":")[2]) if isinstance(listen, str) else None
        return ProxyView(base=p, offset=p.log_path.stat().st_size, admin_port=admin_port)

    def close(self) -> None:
        for p in self.started:
            p.stop()
        for p in self.started:
            check_output(p)


def check_output(p: ProxyProcess | ProxyView) -> None:
    out = p.output()
    for s in p.secrets:
        assert s not in out, "a secret appeared in the proxy's output"
    assert "Traceback" not in out, out


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Start a proxy with a config dict; stopped and checked at the end of the test."""
    starter = _ProxyStarter(tmp_path)
    yield starter
    starter.close()


@pytest.fixture(scope="module")
def module_proxy_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ProxyProcess]]:
    """``proxy_factory`` for proxies a whole module shares (tests that only read); checked at module end."""
    starter = _ProxyStarter(tmp_path_factory.mktemp("proxy"))
    yield starter
    starter.close()


@pytest.fixture
def shared_proxy_factory(module_proxy_factory: _ProxyStarter) -> Iterator[Callable[..., ProxyView]]:
    """``proxy_factory`` whose proxies the module's tests share when their configs are the same.

    Each test gets the shared process seen from its own start (``ProxyView``): its output is
    checked for secrets and tracebacks at the test's end, as ``proxy_factory`` does, and the process
    must still be running then. For tests that only send requests: one that signals, limits or
    reconfigures its proxy, or counts on fresh metrics, uses ``proxy_factory``.
    """
    views: list[ProxyView] = []

    def start(config: dict, **kw) -> ProxyView:
        views.append(module_proxy_factory.shared(config, **kw))
        return views[-1]

    yield start
    for v in views:
        assert v.proc.poll() is None, f"the shared proxy exited during this test:\n{v.output()}"
        check_output(v)


@pytest.fixture(autouse=True)
def _close_open_sockets():
    yield
    while OPEN_SOCKETS:
        OPEN_SOCKETS.pop().close()


@pytest.fixture(scope="session")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    """The session's DNS server, answering DNS_RECORDS (test modules with other names start their own)."""
    server = start_dnsmasq(DNS_RECORDS, log_path=tmp_path_factory.mktemp("dns") / "dnsmasq.log")
    yield server
    server.stop()
