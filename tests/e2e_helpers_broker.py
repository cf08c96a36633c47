"""Helpers for the broker end-to-end tests: a timed IdP, moto with IAM auth, metrics and polling."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import botocore.session
import httpx
from idp import IdP, Received

ADMIN_POLICY = json.dumps({"Version": "2012-10-17",
                           "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
TRUST_POLICY = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]})


class TimedIdP(IdP):
    """The test IdP, also recording when each token request arrived (``time.time()``)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.token_times: list[float] = []

    def _token(self, rec: Received) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.token_times.append(time.time())
        return super()._token(rec)

    @property
    def token_calls(self) -> int:
        return len(self.token_times)


def free_port() -> int:
    """A loopback port that was free a moment ago (for listeners whose port goes into the config)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for[T](predicate: Callable[[], T], *, timeout: float = 10, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.eE+-]+|NaN|[+-]Inf)$')


def metric(admin_port: int, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``, read from /metrics."""
    text = httpx.get(f"http://127.0.0.1:{admin_port}/metrics", trust_env=False, timeout=5).text
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


# -- moto (STS and IAM) in server mode, with IAM authentication on -------------------------------

_MOTO = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the test closes our stdin
server.stop()
"""


class AuthMoto:
    """moto in a child process with an IAM user allowed everything and a role ``reader`` to assume.

    After start-up moto authenticates every request: a bad signature is SignatureDoesNotMatch and
    an unknown key is InvalidClientTokenId.
    """

    role_arn = "arn:aws:iam::123456789012:role/reader"

    def __init__(self, log: Path) -> None:
        self._log = log
        self.url = ""
        self.port = 0
        self.key_id = ""
        self.secret = ""
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Self:
        with open(self._log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", _MOTO], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        assert self.proc.stdout is not None
        line = _readline(self.proc.stdout, timeout=30)
        if not line.strip().isdigit():
            self.__exit__()
            raise AssertionError(f"moto did not start:\n{self._log.read_text()}")
        self.port = int(line)
        self.url = f"http://127.0.0.1:{self.port}"
        iam = botocore.session.Session().create_client(
            "iam", region_name="us-east-1", endpoint_url=self.url,
            aws_access_key_id="testing", aws_secret_access_key="testing")
        try:
            iam.create_user(UserName="secretless-proxy")
            key = iam.create_access_key(UserName="secretless-proxy")["AccessKey"]
            iam.put_user_policy(UserName="secretless-proxy", PolicyName="all", PolicyDocument=ADMIN_POLICY)
            iam.create_role(RoleName="reader", AssumeRolePolicyDocument=TRUST_POLICY)
            iam.put_role_policy(RoleName="reader", PolicyName="all", PolicyDocument=ADMIN_POLICY)
        finally:
            iam.close()
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        reset = httpx.post(self.url + "/moto-api/reset-auth", content=b"0", trust_env=False, timeout=10)
        assert reset.status_code == 200, reset.text
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def _readline(stream: Any, *, timeout: float) -> str:
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return out[0] if out else ""
