"""A real ``redis-server`` process for tests: ephemeral port, no persistence, stop and restart on the same port.

The binary comes from PATH (Debian package ``redis-server``). ``stop()`` kills it (SIGKILL by
default, as a crash would), ``pause()``/``resume()`` freeze it (SIGSTOP/SIGCONT: a server that
accepts connections but never answers, like a network partition), ``start()`` brings it back
on the same port with an empty dataset (``--save "" --appendonly no``).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers.net import free_port

BINARY = "redis-server"


def require_redis_server() -> str:
    """The redis-server path, or skip the test with a reason a developer can act on."""
    path = shutil.which(BINARY)
    if path is None:
        pytest.skip("redis-server is not on PATH (install the Debian package redis-server)")
    return path


class RedisServer:
    """One redis-server process on 127.0.0.1; ``url`` is where it listens."""

    def __init__(self, *args: str, port: int | None = None, sentinel: bool = False, tls: bool = False) -> None:
        self.binary = require_redis_server()
        self.args = list(args)
        self.port = port or free_port()
        self.sentinel = sentinel
        self.tls = tls
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None, "already running"
        port_args = (["--port", "0", "--tls-port", str(self.port)] if self.tls else ["--port", str(self.port)])
        if self.sentinel:  # Sentinel rewrites its config file: it needs one of its own
            conf = self.dir / "sentinel.conf"
            conf.write_text("\n".join(self.args) + "\n")
            cmd = [self.binary, str(conf), "--sentinel", *port_args]
        else:
            cmd = [self.binary, *port_args, *self.args]
        cmd += ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self._listening():
                return
            time.sleep(0.02)
        log = (self.dir / "redis.log").read_text(errors="replace") if (self.dir / "redis.log").exists() else ""
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log[-2000:]}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused process must be able to die
            self.proc.send_signal(sig)
        self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def _listening(self) -> bool:
        """A TCP connect for TLS servers, a PING/PONG exchange for plain ones."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                if self.tls:
                    return True
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False
