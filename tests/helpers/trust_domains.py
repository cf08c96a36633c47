"""The two-trust-domain identity section that config and policy tests start from, and its CA files."""

from __future__ import annotations

from pathlib import Path

from secretless_proxy.dev.certs import Issued, write_ca

# Lines 1-4 of a config: example.org and partner.example, each with its own bundle.
TWO_DOMAINS = """\
version: 1
identity:
  trust_domains: [example.org, partner.example]
  trust_bundles: {example.org: ca/ca.pem, partner.example: partner/ca.pem}
"""


def write_two_domain_cas(base: Path, ca: Issued, partner_ca: Issued) -> None:
    """The bundles TWO_DOMAINS names, under ``base``: ca/ca.pem (example.org), partner/ca.pem (partner.example)."""
    write_ca(ca, base / "ca")
    write_ca(partner_ca, base / "partner")
