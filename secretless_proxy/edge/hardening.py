r"""Process hardening applied before any secret is loaded: no core dumps, no ptrace by peers.

The proxy's memory holds brokered credentials and provider secrets. A core file written on a
crash (``kernel.core_pattern``) or a same-user ``ptrace``/``/proc/<pid>/mem`` read would copy
them out. ``PR_SET_DUMPABLE 0`` makes the process non-dumpable (no core file, ``/proc/<pid>``
owned by root, ptrace refused to non-root peers); ``RLIMIT_CORE 0`` also stops a core file when
something re-enables dumpability. Both are inherited by nothing we exec (we exec nothing).

The log is hardened too: every argument of every log record (the values a client or an upstream
chose: a path, a host, a header) has its control characters escaped as ``\xNN`` (``\n`` and ``\t``
too), so an HTTP/2 ``:path`` with ESC, FF or VT cannot clear a terminal or forge a log line
(hostile review 4.17). The format strings are the proxy's own and keep their layout.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re
import resource
import sys

log = logging.getLogger("secretless")

PR_SET_DUMPABLE = 4  # <linux/prctl.h>
PR_GET_DUMPABLE = 3


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def set_non_dumpable() -> int | None:
    """``prctl(PR_SET_DUMPABLE, 0)``; returns ``PR_GET_DUMPABLE`` read back (None where prctl does not exist)."""
    libc = _libc()
    if libc is None:
        return None
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
    return libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)


def disable_core_dumps() -> tuple[int | None, int]:
    """RLIMIT_CORE 0 (soft and hard: nothing in the process can raise it again) and non-dumpable;
    returns (dumpable, core limit) as read back, for the log."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return set_non_dumpable(), resource.getrlimit(resource.RLIMIT_CORE)[0]


def raise_nofile_limit() -> int:
    """Raise the soft descriptor limit to the hard one (a common default is 1,024 of 1,048,576); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


# C0 and C1 controls, DEL, and the separators str.splitlines() also breaks on.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(value: object) -> object:
    if isinstance(value, str) and _CONTROL.search(value):
        return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}", value)
    return value


_base_factory = logging.getLogRecordFactory()


def _record(*args, **kwargs) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    if isinstance(record.args, tuple) and record.args:
        record.args = tuple(_escaped(a) for a in record.args)
    elif isinstance(record.msg, str) and not record.args:
        record.msg = _escaped(record.msg)  # a message built before the call (mitmproxy logs f-strings)
    return record


def escape_log_arguments() -> None:
    """Install the record factory above, once per process (idempotent)."""
    if logging.getLogRecordFactory() is not _record:
        logging.setLogRecordFactory(_record)


_applied = False


def apply() -> None:
    """Everything above, once per process, logged; a failure is logged, never fatal (fail-safe order:
    RLIMIT_CORE first, which alone already stops core files)."""
    global _applied
    if _applied:
        return
    _applied = True
    escape_log_arguments()
    try:
        dumpable, core = disable_core_dumps()
        log.info("core dumps disabled (dumpable=%s, RLIMIT_CORE=%d)", dumpable, core)
    except (OSError, ValueError) as exc:
        log.error("could not disable core dumps (%s): a crash may write secrets to a core file", exc)
    raise_nofile_limit()
