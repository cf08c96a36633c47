"""Start ``secretless-proxy`` processes without paying for the interpreter and its imports each time.

A proxy process spends about 1 s of CPU importing mitmproxy and the proxy before it does anything,
and the suite starts about 150 of them: on two cores that was most of the suite's time. The zygote is
one ``python`` process per test worker that has imported ``secretless_proxy.cli`` (and with it
mitmproxy) once; each proxy is a ``fork()`` of it that runs ``secretless_proxy.cli.main(argv)``, the
function the ``secretless-proxy`` console script runs. So each proxy is still its own process with
its own event loop, sockets, descriptors, signals and exit status; only the import work is shared.
In the child, before ``main`` runs, what a fresh interpreter would not have is undone: the
environment is the test's, descriptors other than 0-2 are closed, stdin is ``/dev/null``, stdout
and stderr go to the log file, ``random`` is reseeded.

The child is double-forked so that it is re-parented to the test worker, which declares itself a
child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``, Linux): the worker reaps it and reads its real
exit status (``ForkedProcess`` has the part of ``subprocess.Popen`` the tests use).

``mitmdump -s addons/secretless.py`` starts the same way, through ``mitmproxy.tools.main.mitmdump``
(what its console script runs); mitmdump loads the entry script itself, as it always does. What
still starts through ``exec``: commands with a wrapper such as ``prlimit``, other subcommands, and
everything when ``SECRETLESS_TEST_SPAWN=exec`` is set (to rule the zygote out when a test behaves
oddly). tests/test_cli.py and tests/test_mitmdump_entry.py run the console scripts themselves too.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36

_CHILD = r"""
import json, os, random, sys
import secretless_proxy.cli as cli
import secretless_proxy.server  # what `run` imports lazily: the work the zygote saves
from mitmproxy.tools import dump
from mitmproxy.tools.main import mitmdump

out = os.fdopen(1, "w", buffering=1)
for line in sys.stdin:
    req = json.loads(line)
    r, w = os.pipe()
    first = os.fork()
    if first == 0:
        pid = os.fork()
        if pid:
            os.write(w, f"{pid}\n".encode())
            os._exit(0)
        try:
            log = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0); os.dup2(log, 1); os.dup2(log, 2)
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))
            if req.get("cwd"):
                os.chdir(req["cwd"])
            os.environ.clear(); os.environ.update(req["env"])
            random.seed()
            sys.stdin = open(0, closefd=False)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            sys.argv = req["argv"]
            if req["argv"][0].endswith("mitmdump"):
                code = mitmdump(req["argv"][1:])  # what the mitmdump console script runs
            else:
                code = cli.main(req["argv"][1:])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback; traceback.print_exc(); code = 1
        sys.stdout.flush(); sys.stderr.flush()
        sys.exit(code)
    os.close(w)
    pid = os.read(r, 64).decode()
    os.close(r)
    os.waitpid(first, 0)  # now the proxy is re-parented to the test worker, which can reap it
    out.write(pid); out.flush()
"""


class ForkedProcess:
    """The part of ``subprocess.Popen`` the tests use, for a process this worker reaps as subreaper."""

    def __init__(self, pid: int, args: list[str]) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: it is gone, its status unknown
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _ensure(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
            self._proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True, bufsize=1)
        return self._proc

    def spawn(self, argv: list[str], *, env: dict[str, str], log_path: Path, cwd: Path | None) -> ForkedProcess:
        with self._lock:
            z = self._ensure()
            assert z.stdin is not None and z.stdout is not None
            z.stdin.write(json.dumps({"argv": argv, "env": env, "log": str(log_path),
                                      "cwd": str(cwd) if cwd else None}) + "\n")
            z.stdin.flush()
            line = z.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the zygote did not start the proxy (got {line!r})")
        return ForkedProcess(int(line), argv)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            self._proc.wait(timeout=10)
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()


ZYGOTE = Zygote()


def usable(cmd: list[str]) -> bool:
    """Whether ``cmd`` is ``secretless-proxy run …`` or ``mitmdump …`` from this venv, which the zygote can start."""
    if os.environ.get("SECRETLESS_TEST_SPAWN") == "exec" or not sys.platform.startswith("linux") or len(cmd) < 2:
        return False
    bindir = Path(sys.executable).parent
    return (Path(cmd[0]) == bindir / "secretless-proxy" and cmd[1] == "run") or Path(cmd[0]) == bindir / "mitmdump"
