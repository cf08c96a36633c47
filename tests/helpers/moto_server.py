"""moto in server mode in a child process: STS/IAM for the AWS tests (plain HTTP on loopback).

``MotoServer(log)`` starts it; ``MotoServer(log, auth=True)`` also creates an IAM user allowed
everything and a role ``reader`` to assume, then turns IAM authentication on, so from then on
a bad signature is SignatureDoesNotMatch and an unknown key InvalidClientTokenId.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Self

import botocore.session
import httpx

ROLE_ARN = "arn:aws:iam::123456789012:role/reader"
ADMIN_POLICY = json.dumps({"Version": "2012-10-17",
                           "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
TRUST_POLICY = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]})

_MOTO = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the test closes our stdin
server.stop()
"""


class MotoServer:
    role_arn = ROLE_ARN

    def __init__(self, log: Path, *, auth: bool = False) -> None:
        self._log = log
        self._auth = auth
        self.url = ""
        self.port = 0
        self.key_id = ""  # the IAM user's key (auth=True only)
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
        if self._auth:
            self._enable_auth()
        return self

    def _enable_auth(self) -> None:
        # Set-up goes through botocore's own (blocking) client: test code, not the event loop.
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
        self.proc = None


def _readline(stream: Any, *, timeout: float) -> str:
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return out[0] if out else ""
