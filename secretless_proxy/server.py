"""A lean mitmproxy Master: only the addons secretless-proxy needs.

mitmdump loads ~40 default addons and dispatches every hook of every flow to each of them;
measured on a 2-core machine that dispatch halves throughput (1,090 vs 595 plain-HTTP
keep-alive req/s). Here the Master holds core, proxyserver, next_layer, tlsconfig and ours.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from mitmproxy import exceptions, master, options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig
from prometheus_client import disable_created_metrics

from . import hardening
from .addon import Secretless

log = logging.getLogger("secretless")


def build_master(*, config_path: str, listen: tuple[str, int] | None) -> master.Master:
    """A Master configured from ``config_path``; raises OptionsError with a readable message."""
    opts = options.Options()
    m = master.Master(opts)
    m.addons.add(errorcheck.ErrorCheck(repeat_errors_on_stderr=True), core.Core(),
                 proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(), Secretless())
    # Identity is proven on the client connection, so HTTP/2 on it is fine; h2 *upstream* is too.
    m.options.update(secretless_config=config_path)
    addon = m.addons.get("secretless")
    cfg = addon.runtime.config
    host, port = listen or cfg.listen or ("127.0.0.1", 8080)
    m.options.update(listen_host=host, listen_port=port)
    return m


async def _serve(config_path: str, listen: tuple[str, int] | None) -> int:
    try:
        m = build_master(config_path=config_path, listen=listen)
    except exceptions.OptionsError as exc:
        print(f"secretless-proxy: {exc}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
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
