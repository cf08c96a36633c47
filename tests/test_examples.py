"""Every example config in config/ passes `secretless-proxy check` once the files it names exist."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from secretless_proxy.dev import certs

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "config").glob("*.yaml"))
CLI = Path(sys.executable).parent / "secretless-proxy"


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of config/ beside a dev/ holding what `make dev-certs` and an operator provide."""
    root = tmp_path_factory.mktemp("examples")
    shutil.copytree(ROOT / "config", root / "config")
    dev = root / "dev"
    certs.write_ca(certs.make_ca(), dev / "ca")
    (dev / "signing-key.pem").write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    gh = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    (dev / "github-app.pem").write_bytes(gh)
    (dev / "aws").mkdir()
    (dev / "aws" / "access-key-id").write_text("AKIAEXAMPLEEXAMPLE00\n")
    (dev / "aws" / "secret-access-key").write_text("example/secret/access/key/0000000000000000\n")
    (dev / "demo-api-key").write_text("sk_demo_example\n")
    (dev / "billing-client-secret").write_text("client-secret-example\n")
    return root, {"GHES_APP_PRIVATE_KEY": gh.decode()}


def test_there_is_an_example_per_kind():
    """config/ has an example for every credential kind."""
    from secretless_proxy.credentials.registry import KINDS

    text = "\n".join(p.read_text() for p in EXAMPLES)
    missing = [k for k in KINDS if f"kind: {k}" not in text]
    assert not missing, f"no example config uses kind(s): {missing}"


@pytest.mark.slow  # runs the CLI in a subprocess (an interpreter start and mitmproxy's imports each)
@pytest.mark.parametrize("example", [p.name for p in EXAMPLES])
def test_example_passes_check(layout, example):
    """`secretless-proxy check` accepts the example and prints no traceback."""
    root, env = layout
    r = subprocess.run([str(CLI), "check", str(root / "config" / example)], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and "Traceback" not in r.stderr
