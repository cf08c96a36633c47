"""Loopback ports and polling, for tests that wait on another process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable


def free_port() -> int:
    """A loopback port that was free a moment ago (for listeners whose port goes into a config).

    Another process may take it before the listener binds: where the proxy can bind port 0 and say
    which port it got, prefer that.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for[T](predicate: Callable[[], T], *, timeout: float = 10, interval: float = 0.05,
                what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def accept_loop(sock: socket.socket, handle: Callable[[socket.socket], None], *,
                accepted: Callable[[], None] = lambda: None, stop: Callable[[], bool] = lambda: False) -> None:
    """Accept until the listening socket is closed (or ``stop()``); each connection is handled by
    ``handle`` in a daemon thread, after ``accepted()`` (a counter) is called. A listening socket with a
    timeout wakes up to look at ``stop()``."""
    while not stop():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        accepted()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()
