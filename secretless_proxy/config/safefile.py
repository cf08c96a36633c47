"""Read a small file the operator named, whatever is at that path.

Config files, trust bundles, CA bundles and secret files are all small. What sits at the path
may not be: a FIFO (an open() that never returns, freezing the event loop on a live reload), a
device such as ``/dev/zero`` (a read that never ends), a directory, or a huge or sparse file.
``read_limited`` opens without blocking, refuses anything but a regular file, and reads at most
``limit`` bytes, so each of these is an ``OSError`` with a message instead of a hang or a
``MemoryError``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from secretless_proxy.errors import SecretlessError


# Both are OSErrors as well: every caller of read_limited handles "the file cannot be read" as
# OSError, whatever open() or read() failed with.
class NotAFile(SecretlessError, OSError):
    """The path exists but is not a regular file (FIFO, device, directory, socket)."""


class TooLarge(SecretlessError, OSError):
    """The file is larger than the reader allows."""


def read_limited(path: str | Path, *, limit: int) -> bytes:
    """The whole content of the regular file at ``path``; OSError if it is anything else or too large."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAFile(f"{path} is not a regular file ({_kind(st.st_mode)})")
        if st.st_size > limit:
            raise TooLarge(f"{path} is larger than {_size(limit)} ({_size(st.st_size)})")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # the file grew after fstat()
                raise TooLarge(f"{path} is larger than {_size(limit)}")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n >= 1024 * 1024 else f"{n // 1024} KiB" if n >= 1024 else f"{n} bytes"
