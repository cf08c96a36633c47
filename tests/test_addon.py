"""In-process addon tests (no sockets): mitmproxy's taddons/tflow drive the hooks directly."""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import re
from datetime import UTC, datetime, timedelta

import pytest
import yaml
from helpers.proxy import SECRET, base_config
from mitmproxy import certs as mcerts
from mitmproxy import exceptions, tls
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.addons.tlsconfig import TlsConfig
from mitmproxy.test import taddons, tflow

from secretless_proxy import inject
from secretless_proxy.addon import ConnState, Secretless
from secretless_proxy.dev import certs
from secretless_proxy.secretrefs import SecretRef

BILLING = "spiffe://example.org/ns/prod/sa/billing"


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("TEST_STRIPE_KEY", SECRET)


def write_config(tmp_path, pki, **over) -> str:
    rule = {"name": "r", "workloads": [BILLING], "to": {"host": "api.example.com"},
            "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}}
    cfg = base_config(pki, rules=[rule])
    cfg["interception_ca"] = str(tmp_path / "confdir")
    cfg.update(over)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture
async def addon_ctx(tmp_path, pki, env, dnsmasq):
    addon = Secretless()
    with taddons.context(Proxyserver(), TlsConfig(), addon) as tctx:
        # api.example.com resolves (through the test's dnsmasq) to loopback, which base_config allows.
        upstream = base_config(pki, rules=[])["upstream"] | {"resolver": {"nameservers": [dnsmasq.nameserver]}}
        tctx.configure(addon, secretless_config=write_config(tmp_path, pki, upstream=upstream))
        await addon.services.start()
        yield addon, tctx
        await addon.services.stop()


def handshake(addon: Secretless, client, chain: list, sni: str = "api.example.com") -> None:
    client.sni = sni
    client.certificate_list = [mcerts.Cert(c) for c in chain]
    addon.tls_established_client(tls.TlsData(conn=client, context=None))  # type: ignore[arg-type]


def tunnelled_flow(client=None, host="api.example.com", port=443):
    f = tflow.tflow(client_conn=client) if client else tflow.tflow()
    f.request.scheme, f.request.host, f.request.port = "https", host, port
    f.request.headers["Host"] = host
    return f


def connect(addon: Secretless, client, host="api.example.com", port=443) -> None:
    c = tflow.tflow(client_conn=client)
    c.request.method, c.request.host, c.request.port = "CONNECT", host, port
    addon.http_connect(c)


class TestConfigure:
    def test_invalid_config_is_an_options_error_with_location(self, tmp_path, pki, env):
        """A bad config fails configure with file:line and key path, not a traceback."""
        addon = Secretless()
        with taddons.context(Proxyserver(), TlsConfig(), addon) as tctx:
            path = write_config(tmp_path, pki, rules=[{"name": "x", "wrkloads": [], "to": {"host": "a.com"}, "action": "allow"}])
            with pytest.raises(exceptions.OptionsError, match=r"config.yaml:\d+ rules\[0\]\.wrkloads: unknown key"):
                tctx.configure(addon, secretless_config=path)

    async def test_ssl_insecure_refused(self, addon_ctx):
        """Turning off upstream verification is refused: credentials only go to verified upstreams."""
        addon, tctx = addon_ctx
        with pytest.raises(exceptions.OptionsError, match="ssl_insecure is not allowed"):
            tctx.configure(addon, ssl_insecure=True)

    async def test_streaming_bodies_refused(self, addon_ctx):
        """Streamed responses cannot be checked for echoed credentials: the option is refused."""
        addon, tctx = addon_ctx
        with pytest.raises(exceptions.OptionsError, match="stream_large_bodies is not allowed"):
            tctx.configure(addon, stream_large_bodies="1m")

    async def test_security_options_are_forced(self, addon_ctx):
        """Loading the addon turns on client certs and lazy upstream connections."""
        _, tctx = addon_ctx
        assert tctx.options.request_client_cert is True
        assert tctx.options.connection_strategy == "lazy"
        assert re.search(r"upstream-ca-bundle-[0-9a-f]{12}\.pem$", tctx.options.ssl_verify_upstream_trusted_ca)


class TestIdentityState:
    async def test_inner_empty_handshake_keeps_outer_identity(self, addon_ctx, pki):
        """The proxy-hop identity survives the tunnel's certificate-less inner handshake."""
        addon, _ = addon_ctx
        client = tflow.tclient_conn()
        handshake(addon, client, [certs.make_svid(ca=pki.workload_ca, spiffe_id=BILLING).cert])
        connect(addon, client)
        handshake(addon, client, [])
        f = tunnelled_flow(client)
        await addon.request(f)
        assert f.response is None
        assert f.request.headers["Authorization"] == f"Bearer {SECRET}"

    async def test_two_identities_on_one_connection_conflict(self, addon_ctx, pki):
        """A second, different valid identity on one connection voids both."""
        addon, _ = addon_ctx
        client = tflow.tclient_conn()
        handshake(addon, client, [certs.make_svid(ca=pki.workload_ca, spiffe_id=BILLING).cert])
        handshake(addon, client, [certs.make_svid(ca=pki.workload_ca, spiffe_id="spiffe://example.org/other").cert])
        f = tunnelled_flow(client)
        await addon.request(f)
        assert f.response.status_code == 407
        assert json.loads(f.response.content)["reason"] == "identity_conflict"

    async def test_failed_identity_is_not_upgraded(self, addon_ctx, pki):
        """After a rejected certificate, a later valid one on the same connection does not help."""
        addon, _ = addon_ctx
        client = tflow.tclient_conn()
        rogue = certs.make_ca(common_name="rogue")
        handshake(addon, client, [certs.make_svid(ca=rogue, spiffe_id=BILLING).cert])
        handshake(addon, client, [certs.make_svid(ca=pki.workload_ca, spiffe_id=BILLING).cert])
        f = tunnelled_flow(client)
        await addon.request(f)
        assert json.loads(f.response.content)["reason"] == "identity_untrusted"

    async def test_identity_expiring_mid_connection(self, addon_ctx, pki):
        """A connection outliving its certificate stops getting credentials."""
        addon, _ = addon_ctx
        client = tflow.tclient_conn()
        handshake(addon, client, [certs.make_svid(ca=pki.workload_ca, spiffe_id=BILLING).cert])
        st: ConnState = addon._conns[client]
        st.proof.result = dataclasses.replace(st.identity, not_after=(datetime.now(UTC) - timedelta(seconds=1)).timestamp())
        f = tunnelled_flow(client)
        await addon.request(f)
        assert json.loads(f.response.content)["reason"] == "identity_expired"


class TestFailClosed:
    @pytest.mark.parametrize(("owner", "attr", "error", "status", "reason"), [
        (SecretRef, "resolve", RuntimeError(f"leaky message {SECRET}"), 503, "credential_unavailable"),
        (inject, "apply", KeyError(SECRET), 502, "internal_error"),
    ], ids=["bug-in-credential-source-503", "bug-in-injection-after-brokering-502"])
    async def test_unexpected_exception_refuses(self, addon_ctx, pki, monkeypatch, caplog, owner, attr, error,
                                                status, reason):
        """A bug in the credential source refuses the request (503 credential_unavailable); one after
        the credential is brokered still refuses (502 internal_error). Neither sends the credential
        on nor logs the exception text."""
        addon, _ = addon_ctx

        def boom(*a, **k):
            raise error

        monkeypatch.setattr(owner, attr, boom)
        client = tflow.tclient_conn()
        handshake(addon, client, [certs.make_svid(ca=pki.workload_ca, spiffe_id=BILLING).cert])
        f = tunnelled_flow(client)
        with caplog.at_level(logging.DEBUG):
            await addon.request(f)
        assert f.response.status_code == status
        assert json.loads(f.response.content)["reason"] == reason
        assert "Authorization" not in f.request.headers
        assert SECRET not in caplog.text and SECRET not in f.response.text

    async def test_no_config_refuses(self):
        """An addon without a loaded config refuses rather than forwarding."""
        addon = Secretless()
        f = tunnelled_flow()
        await addon.request(f)
        assert f.response.status_code == 503


class TestResponsePath:
    async def _injected_flow(self, addon, pki):
        client = tflow.tclient_conn()
        handshake(addon, client, [certs.make_svid(ca=pki.workload_ca, spiffe_id=BILLING).cert])
        f = tunnelled_flow(client)
        await addon.request(f)
        assert f.request.headers["Authorization"] == f"Bearer {SECRET}"
        return f

    async def test_echoed_secret_redacted_in_headers_and_gzip_body(self, addon_ctx, pki):
        """An upstream echoing the credential (even gzip-compressed) never shows it to the client."""
        addon, _ = addon_ctx
        f = await self._injected_flow(addon, pki)
        f.response = tflow.tresp()
        f.response.headers["X-Echo"] = f"Bearer {SECRET}"
        f.response.headers["Content-Encoding"] = "gzip"
        f.response.raw_content = gzip.compress(f"you sent {SECRET}".encode())
        addon.responseheaders(f)
        addon.response(f)
        assert SECRET not in str(f.response.headers)
        assert SECRET.encode() not in f.response.content
        assert b"[REDACTED]" in f.response.content
        assert f.response.headers["X-Secretless-Request-Id"] == f.id

    async def test_websocket_messages_redacted_for_the_connection_life(self, addon_ctx, pki):
        """After the 101, server messages are redacted until websocket_end; client messages pass as sent."""
        from mitmproxy.websocket import WebSocketData, WebSocketMessage
        from wsproto.frame_protocol import Opcode

        addon, _ = addon_ctx
        f = await self._injected_flow(addon, pki)
        f.response = tflow.tresp(status_code=101)
        f.websocket = WebSocketData()
        addon.responseheaders(f)
        addon.response(f)
        seen = []
        for from_client in (False, True, False):
            f.websocket.messages.append(WebSocketMessage(Opcode.TEXT, from_client, f"echo {SECRET}".encode()))
            addon.websocket_message(f)
            seen.append(f.websocket.messages[-1].text)
            assert len(f.websocket.messages) == 1  # only the message judged now is kept (bounded memory)
        assert seen == ["echo [REDACTED]", f"echo {SECRET}", "echo [REDACTED]"]
        addon.websocket_end(f)
        assert f not in addon._injected

    async def test_undecodable_body_is_withheld(self, addon_ctx, pki):
        """A body in an encoding we cannot decode cannot be checked for an echo: 502, not passed on."""
        addon, _ = addon_ctx
        f = await self._injected_flow(addon, pki)
        f.response = tflow.tresp()
        f.response.headers["Content-Encoding"] = "x-unknown"
        f.response.raw_content = f"opaque {SECRET}".encode()
        addon.responseheaders(f)
        addon.response(f)
        assert f.response.status_code == 502
        assert json.loads(f.response.content)["reason"] == "response_undecodable"
        assert SECRET.encode() not in f.response.raw_content

    async def test_injected_state_repr_shows_no_secret(self, addon_ctx, pki):
        """The per-flow record of where the credential went never shows it in a repr."""
        addon, _ = addon_ctx
        f = await self._injected_flow(addon, pki)
        assert SECRET not in repr(addon._injected[f])

    async def test_sent_request_is_scrubbed_from_the_flow(self, addon_ctx, pki):
        """After the request is sent, the flow's copy no longer holds the credential."""
        addon, _ = addon_ctx
        f = await self._injected_flow(addon, pki)
        f.response = tflow.tresp()
        addon.responseheaders(f)
        assert f.request.headers["Authorization"] == "[REDACTED]"

    async def test_errored_flow_is_scrubbed(self, addon_ctx, pki):
        """A flow whose upstream failed is scrubbed too (error hook)."""
        addon, _ = addon_ctx
        f = await self._injected_flow(addon, pki)
        addon.error(f)
        assert f.request.headers["Authorization"] == "[REDACTED]"
