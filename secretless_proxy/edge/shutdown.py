"""Graceful shutdown on SIGTERM (issue 8 §5): stop accepting, drain, optionally revoke, exit 0.

1. ``/readyz`` turns 503 (check ``draining``) and new client connections are refused: the
   proxy's listening sockets are closed, so a connecting client gets ECONNREFUSED at once and
   retries another replica, instead of a connection that would be cut seconds later.
2. Idle keep-alive connections are closed; a connection is closed as soon as its last
   in-flight request is answered. Requests in flight run to completion for up to
   ``limits.drain_seconds``.
3. With ``limits.revoke_on_shutdown`` the credentials this process brokered are revoked at
   their providers (those that support it: OAuth2 RFC 7009, GitHub App tokens), bounded by
   ``broker.timeout_seconds``.
4. mitmproxy shuts down (what is still open is cut) and the process exits 0.

A second SIGTERM (or SIGINT) during the drain skips what is left of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from mitmproxy import ctx

from secretless_proxy.edge.connlimits import ConnectionGuard

log = logging.getLogger("secretless")

POLL = 0.05


class Drain:
    def __init__(self, guard: ConnectionGuard, *, drain_seconds: Callable[[], float],
                 revoke: Callable[[], Awaitable[int]] | None) -> None:
        self.guard = guard
        self._drain_seconds = drain_seconds
        self._revoke = revoke  # None: revoke_on_shutdown is off
        self.started: float | None = None
        self._task: asyncio.Task | None = None

    @property
    def draining(self) -> bool:
        return self.started is not None

    def readiness(self) -> str | None:
        return "draining for shutdown" if self.draining else None

    def on_signal(self) -> None:
        """The SIGTERM handler: start the drain, or end it now when one is under way."""
        if self._task is not None:
            log.warning("second shutdown signal: stopping without waiting for in-flight requests")
            ctx.master.shutdown()
            return
        self.started = time.monotonic()
        self.guard.draining = True
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self._stop_listening()
            deadline = self.started + self._drain_seconds()  # type: ignore[operator]
            pending = self.guard.in_flight()
            log.info("SIGTERM: no longer accepting connections; draining %d in-flight request(s) for up to %gs",
                     pending, self._drain_seconds())
            self.guard.close_idle()
            while self.guard.in_flight() and time.monotonic() < deadline:
                await asyncio.sleep(POLL)
            left = self.guard.in_flight()
            if left:
                log.warning("drain deadline reached: cutting %d request(s) still in flight", left)
            else:
                log.info("drained in %.2fs", time.monotonic() - self.started)  # type: ignore[operator]
            if self._revoke is not None:
                n = await self._revoke()
                log.info("revoke_on_shutdown: %d cached credential(s) dropped and revoked where supported", n)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the process must still stop
            log.error("graceful shutdown failed (%s); stopping now", type(exc).__name__)
        finally:
            ctx.master.shutdown()

    async def _stop_listening(self) -> None:
        ps = ctx.master.addons.get("proxyserver")
        if ps is None:
            return
        try:
            await ps.servers.update([])  # mitmproxy's own way to stop every proxy-mode listener
        except Exception as exc:  # noqa: BLE001 - keep going: the guard refuses what still arrives
            log.warning("closing the listening sockets failed (%s)", type(exc).__name__)
