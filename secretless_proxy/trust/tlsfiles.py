"""TLS files the proxy derives from its config: the upstream CA bundle and the interception CA dir."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import certifi

from secretless_proxy.config.model import Config
from secretless_proxy.config.safefile import read_limited

SYSTEM_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")
MAX_CA_BUNDLE_BYTES = 16 * 1024 * 1024  # certifi's is ~300 KB; a FIFO or /dev/zero is refused, not read
DEFAULT_CONFDIR = Path("~/.secretless-proxy").expanduser()


def confdir(config: Config) -> Path:
    """Where the interception CA lives (mitmproxy confdir layout); generated there if missing."""
    return config.interception_ca or DEFAULT_CONFDIR


def upstream_ca_bundle(config: Config) -> Path:
    """System CAs + certifi + the configured bundle, written once into the confdir.

    mitmproxy's ``ssl_verify_upstream_trusted_ca`` takes one file and replaces its default
    (certifi), so the union is built here: upstream TLS stays verified against the usual public
    roots and, when given, the operator's private CA.
    """
    parts = [Path(certifi.where())]
    parts += [Path(p) for p in SYSTEM_BUNDLES if os.path.exists(p)]
    if config.upstream_ca_bundle is not None:
        parts.append(config.upstream_ca_bundle)
    data = b"\n".join(read_limited(p, limit=MAX_CA_BUNDLE_BYTES).strip() + b"\n" for p in parts)
    # Named by content: mitmproxy caches TLS contexts by file name, so a changed bundle must
    # get a new name to be picked up on reload.
    out = confdir(config) / f"upstream-ca-bundle-{hashlib.sha256(data).hexdigest()[:12]}.pem"
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return out
