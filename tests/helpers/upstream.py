"""Tests import the echo upstream from here; it lives in the package so the quickstart can use it."""

from secretless_proxy.dev.echoserver import EchoUpstream

__all__ = ["EchoUpstream"]
