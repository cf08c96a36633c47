"""Watch the files a config depends on and ask for a reload when one changes.

Polling (stat once a second) rather than inotify: it works the same on every filesystem,
including Kubernetes ConfigMap volumes, whose files change by a symlink swap that some
inotify setups miss, and it costs one stat per file per second.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("secretless")

Signature = tuple[tuple[str, int, int, int] | tuple[str], ...]


def signature(paths: Iterable[Path]) -> Signature:
    out: list = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((str(p), st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append((str(p),))
    return tuple(out)


class FileWatcher:
    """Calls ``on_change()`` when the signature of ``paths()`` differs from the last one seen."""

    def __init__(self, paths: Callable[[], list[Path]], on_change: Callable[[], None], *,
                 interval: float = 1.0) -> None:
        self._paths = paths
        self._on_change = on_change
        self._interval = interval
        self._last = signature(paths())
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="secretless-config-watch")

    def mark_seen(self) -> None:
        """Take the current files as the baseline (after a reload triggered some other way)."""
        self._last = signature(self._paths())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                now = signature(self._paths())
                if now != self._last:
                    self._last = now
                    self._on_change()
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any one failure
                log.error("config watcher: %s", type(exc).__name__)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
