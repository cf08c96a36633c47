"""The process: a lean mitmproxy Master with only the addons secretless-proxy needs, and the
admin listeners it owns.

mitmdump loads ~40 default addons and dispatches every hook of every flow to each of them;
measured on a 2-core machine that dispatch halves throughput (1,090 vs 595 plain-HTTP
keep-alive req/s). Here the Master holds core, proxyserver, next_layer, tlsconfig and ours.

``secretless_addons()`` is ours, in chain order, for this Master and for ``mitmdump -s
addons/secretless.py`` alike: ``AdminListeners`` and the ``Secretless`` addon it serves.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys

from mitmproxy import ctx, exceptions, master, options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig
from prometheus_client import disable_created_metrics

from secretless_proxy import dispatch
from secretless_proxy.addon import Secretless
from secretless_proxy.admin.api import AdminApi, AdminApiServer, api_server_cert
from secretless_proxy.admin.exchange import Listener
from secretless_proxy.admin.health import AdminServer
from secretless_proxy.edge import hardening
from secretless_proxy.services import Services

log = logging.getLogger("secretless")


class AdminListeners:
    """The process's admin listeners (``admin.listen``, ``admin.api_listen``): bound in
    ``running()``, closed in ``done()``.

    It comes before the ``Secretless`` addon in the chain because mitmproxy calls ``running()``
    and ``done()`` in chain order: here ``done()`` closes the listeners before Secretless stops
    the services they answer from, and ``running()`` starts those services first
    (``start_services()``, which Secretless's own ``running()`` then finds started). Secretless
    learns the bound ports (``admin_listeners``) before its ``running()``: the proxy never
    connects to its own listeners, and the connection guard counts refusals per listener.
    """

    def __init__(self, secretless: Secretless) -> None:
        self.secretless = secretless
        self.listeners: list[Listener] = []

    async def running(self) -> None:
        services = await self.secretless.start_services()
        if services is None:
            return  # no config: Secretless.running() says so and stops the proxy
        cfg = services.config
        if cfg.admin_listen:
            host, port = cfg.admin_listen
            try:
                await self._start(AdminServer(host, port, metrics=self.secretless.metrics,
                                              readiness=self.secretless.readiness, oidc=services.oidc_documents),
                                  services)
            except OSError as exc:
                log.error("admin listener on %s:%d failed: %s; stopping", host, port, exc.strerror or exc)
                self._stop()
                return
        if cfg.admin_api_listen:
            host, port = cfg.admin_api_listen
            try:
                await self._start(self._api(services), services)
            except (OSError, ValueError) as exc:
                log.error("admin API on %s:%d failed: %s; stopping", host, port, getattr(exc, "strerror", None) or exc)
                self._stop()

    def _stop(self) -> None:
        self.secretless.stopping = True  # its running() then neither serves nor says it listens
        ctx.master.shutdown()

    async def done(self) -> None:
        while self.listeners:
            await self.listeners.pop().close()
        self.secretless.admin_listeners = ()

    async def _start(self, listener: Listener, services: Services) -> None:
        lim = services.config.limits
        listener.set_limits(max_connections=lim.admin_max_connections,
                            max_per_client=lim.admin_max_connections_per_client, metrics=self.secretless.metrics)
        await listener.start()
        self.listeners.append(listener)
        self.secretless.admin_listeners = tuple(self.listeners)

    def _api(self, services: Services) -> AdminApiServer:
        s = self.secretless
        host, port = services.config.admin_api_listen
        api = AdminApi(store=services.store, config=lambda: services.config,
                       snapshot=lambda: services.broker.snapshot() if services.broker else [],
                       audit=lambda: s.observer.audit, metrics=s.metrics, last_used=lambda: services.last_used)
        # Bound to every address: name the machine too, so remote admins can verify the API.
        names = (socket.getfqdn(), socket.gethostname()) if host in ("0.0.0.0", "::", "") else (host,)
        cert = api_server_cert(services.confdir, hosts=tuple(dict.fromkeys(("localhost", "127.0.0.1", *names))))
        return AdminApiServer(host, port, api=api, verifier=lambda: services.runtime.verifier,
                              admins=lambda: services.config.admin_workloads, server_cert=cert)


def secretless_addons() -> list[object]:
    """Our addons in chain order (see ``AdminListeners``): what ``mitmdump -s`` loads too."""
    addon = Secretless()
    return [AdminListeners(addon), addon]


def build_master(*, config_path: str, listen: tuple[str, int] | None) -> master.Master:
    """A Master configured from ``config_path``; raises OptionsError with a readable message."""
    opts = options.Options()
    m = master.Master(opts)
    dispatch.install(m.addons)  # the chain is fixed here: each hook's handlers looked up once
    m.addons.add(errorcheck.ErrorCheck(repeat_errors_on_stderr=True), core.Core(),
                 proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(), *secretless_addons())
    # Identity is proven on the client connection, so HTTP/2 on it is fine; h2 *upstream* is too.
    m.options.update(secretless_config=config_path)  # configure() applies the config's listen
    if listen is not None:
        m.options.update(listen_host=listen[0], listen_port=listen[1])
    return m


async def _serve(config_path: str, listen: tuple[str, int] | None) -> int:
    try:
        m = build_master(config_path=config_path, listen=listen)
    except exceptions.OptionsError as exc:
        print(f"secretless-proxy: {exc}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    # Until the addon's running() replaces both with its graceful drain (edge/shutdown.py): a
    # signal before then has nothing in flight and nothing brokered to revoke.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, m.shutdown)
    await m.run()
    return 0


def run(config_path: str, listen: tuple[str, int] | None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # mitmproxy's own per-connection chatter ("client connect", ...) is noise at INFO.
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)
    # One series per metric, not a *_created twin of each: dashboards and alerts don't use them.
    disable_created_metrics()
    hardening.apply()  # before the config (and any secret) is read: no core dumps, no ptrace
    return asyncio.run(_serve(config_path, listen))
