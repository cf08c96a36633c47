"""Graceful shutdown on SIGTERM or SIGINT (issue 8 §5, hostile review 31): stop accepting, drain,
optionally revoke, exit 0.

SIGINT (Ctrl-C, ``kill -INT``, supervisors that send it) does exactly what SIGTERM does, under
``secretless-proxy run`` and under ``mitmdump -s``: the addon installs this handler for both.

1. ``/readyz`` turns 503 (check ``draining``) and new client connections are refused: the
   proxy's listening sockets are closed, so a connecting client gets ECONNREFUSED at once and
   retries another replica, instead of a connection that would be cut seconds later.
2. Idle keep-alive connections are closed; a connection is closed as soon as its last
   in-flight request is answered. Requests in flight run to completion for up to
   ``limits.drain_seconds``.
3. With ``limits.revoke_on_shutdown`` the credentials this process brokered are revoked at
   their providers (those that support it: OAuth2 RFC 7009, GitHub App tokens). The
   revocations are awaited, each bounded by ``broker.timeout_seconds``, before mitmproxy stops.
4. mitmproxy shuts down (what is still open is cut) and the process exits 0.

A second signal (SIGTERM or SIGINT) during the drain ends the drain at once; step 3 still runs
(a credential left valid at its provider is what the option exists to prevent, and it is
bounded), then step 4. Further signals while revoking are logged and change nothing.
"""

from __future__ import annotations

import asyncio
import logging
import signal
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
        self._revoke = revoke  # None: revoke_on_shutdown is off; else drops, revokes and awaits (bounded)
        self.started: float | None = None
        self._task: asyncio.Task | None = None
        self._cut = False  # a second signal: stop waiting for in-flight requests
        self._revoking = False

    @property
    def draining(self) -> bool:
        return self.started is not None

    def readiness(self) -> str | None:
        return "draining for shutdown" if self.draining else None

    def on_signal(self, signum: int = signal.SIGTERM) -> None:
        """The SIGTERM and SIGINT handler: start the drain, or end it now when one is under way."""
        name = signal.Signals(signum).name
        if self._task is None:
            self.started = time.monotonic()
            self.guard.draining = True
            self._task = asyncio.get_running_loop().create_task(self._run(name))
        elif self._revoking:
            log.warning("%s: already stopping; revoking brokered credentials first (bounded by "
                        "broker.timeout_seconds)", name)
        elif not self._cut:
            self._cut = True
            then = ("revoking brokered credentials (revoke_on_shutdown, bounded by broker.timeout_seconds), "
                    "then stopping" if self._revoke is not None else "stopping")
            log.warning("second shutdown signal (%s): ending the drain now; %s", name, then)

    async def _run(self, name: str) -> None:
        try:
            await self._stop_listening()
            deadline = self.started + self._drain_seconds()  # type: ignore[operator]
            pending = self.guard.in_flight()
            log.info("%s: no longer accepting connections; draining %d in-flight request(s) for up to %gs",
                     name, pending, self._drain_seconds())
            self.guard.close_idle()
            while self.guard.in_flight() and time.monotonic() < deadline and not self._cut:
                await asyncio.sleep(POLL)
            left = self.guard.in_flight()
            if left:
                why = "second signal" if self._cut else "drain deadline reached"
                log.warning("%s: cutting %d request(s) still in flight", why, left)
                self.guard.close_all()  # cut now, not at the end of the revocation: no new request on them
            else:
                log.info("drained in %.2fs", time.monotonic() - self.started)  # type: ignore[operator]
            if self._revoke is not None:
                self._revoking = True
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
