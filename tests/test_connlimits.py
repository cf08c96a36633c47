"""In-process tests of connection admission, deadlines, the EMFILE handler and admin-listener eviction.

The real-process behaviour (slowloris, prlimit, SIGTERM) is in test_edge_limits.py; these pin
the rules themselves with mitmproxy's tflow clients and real loopback sockets for the admin
listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from dataclasses import replace

import httpx
import pytest
from mitmproxy.test import taddons, tflow
from prometheus_client import CollectorRegistry

from secretless_proxy.admin.health import AdminServer
from secretless_proxy.config.model import LimitsConfig
from secretless_proxy.edge.connlimits import (
    ADMIN_PENDING,
    ADMIN_SOCKETS,
    FD_RESERVE,
    AcceptErrors,
    ConnectionGuard,
    RateLimitedLog,
    descriptor_budget,
)
from secretless_proxy.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refused(m: Metrics, reason: str, listener: str = "proxy") -> float:
    return m.registry.get_sample_value("secretless_connections_refused_total",
                                       {"listener": listener, "reason": reason}) or 0.0


def client(peer: str = "127.0.0.1"):
    c = tflow.tclient_conn()
    c.peername = (peer, 40000)
    return c


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


class TestRateLimitedLog:
    def test_one_line_per_interval_with_the_count(self, caplog) -> None:
        """Repeats within the interval are counted, and the next line says how many it stands for."""
        clock = Clock()
        rlog = RateLimitedLog(logging.getLogger("t"), every=10, clock=clock)
        with caplog.at_level(logging.WARNING, logger="t"):
            for _ in range(500):
                rlog.warning("k", "refusing")
            clock.now += 10
            rlog.warning("k", "refusing")
        assert [r.getMessage() for r in caplog.records] == ["refusing", "refusing (499 more since the last such line)"]

    def test_keys_are_independent(self, caplog) -> None:
        """A different kind of event is not hidden by another's interval."""
        rlog = RateLimitedLog(logging.getLogger("t"), every=10, clock=Clock())
        with caplog.at_level(logging.WARNING, logger="t"):
            rlog.warning("a", "A")
            rlog.warning("b", "B")
        assert [r.getMessage() for r in caplog.records] == ["A", "B"]


class TestAcceptErrors:
    def _handler(self, metrics: Metrics):
        seen: list[dict] = []
        h = AcceptErrors(metrics, RateLimitedLog(logging.getLogger("t")))
        h._previous = lambda loop, ctx: seen.append(ctx)
        return h, seen

    def test_emfile_counted_once_per_pause_and_not_passed_on(self, metrics: Metrics) -> None:
        """asyncio's 100 reports per wakeup count as one descriptor_limit pause and reach no other handler."""
        h, seen = self._handler(metrics)
        ctx = {"message": AcceptErrors.MESSAGE, "exception": OSError(errno.EMFILE, "Too many open files")}
        for _ in range(100):
            h(None, ctx)
        assert refused(metrics, "descriptor_limit") == 1
        assert seen == []

    def test_admin_port_is_labelled(self, metrics: Metrics) -> None:
        """An accept failure on an admin listener's socket is counted under that listener."""
        h, _ = self._handler(metrics)
        h.listeners = {9464: "admin"}

        class Sock:
            def getsockname(self):
                return ("127.0.0.1", 9464)

        h(None, {"message": AcceptErrors.MESSAGE, "socket": Sock(), "exception": OSError(errno.EMFILE, "x")})
        assert refused(metrics, "descriptor_limit", "admin") == 1

    def test_other_errors_go_to_the_previous_handler(self, metrics: Metrics) -> None:
        """Anything else is mitmproxy's business, unchanged."""
        h, seen = self._handler(metrics)
        ctx = {"message": "Task exception was never retrieved", "exception": RuntimeError("boom")}
        h(None, ctx)
        assert seen == [ctx]


class TestDescriptorBudget:
    def test_two_descriptors_per_connection_after_the_reserve(self) -> None:
        """256 descriptors with one admin listener of 64 (its 8 held unadmitted, its 8 listening sockets) carry 64 client connections."""
        assert descriptor_budget(256, 1, 64) == (256 - FD_RESERVE - 64 - ADMIN_PENDING - ADMIN_SOCKETS) // 2 == 64

    def test_never_zero(self) -> None:
        """A tiny limit still admits one connection rather than none."""
        assert descriptor_budget(16, 2, 64) == 1


class TestAdmission:
    @pytest.fixture(autouse=True)
    def _own_master(self):
        # A master of its own: mitmproxy's ctx.master outlives a taddons.context, and one left with
        # a Proxyserver by an earlier test (TestListeningAddress) made these connections "not
        # listening" when a worker ran them in that order.
        with taddons.context():
            yield

    def guard(self, metrics: Metrics, **limits) -> ConnectionGuard:
        lim = replace(LimitsConfig(), **limits)
        return ConnectionGuard(metrics, lambda: lim)

    def test_per_client_cap(self, metrics: Metrics) -> None:
        """The (n+1)th connection from one address is refused; another address is admitted."""
        g = self.guard(metrics, max_connections=10, max_connections_per_client=2)
        conns = [client("10.0.0.1") for _ in range(3)]
        for c in conns:
            g.client_connected(c)
        assert [c.error for c in conns] == [None, None, "refused: max_connections_per_client"]
        other = client("10.0.0.2")
        g.client_connected(other)
        assert other.error is None and g.open_connections == 3
        assert refused(metrics, "max_connections_per_client") == 1

    def test_ipv4_mapped_ipv6_is_the_same_client(self, metrics: Metrics) -> None:
        """::ffff:10.0.0.1 and 10.0.0.1 share one per-client budget."""
        g = self.guard(metrics, max_connections=10, max_connections_per_client=1)
        a, b = client("10.0.0.1"), client("::ffff:10.0.0.1")
        g.client_connected(a)
        g.client_connected(b)
        assert (a.error, b.error) == (None, "refused: max_connections_per_client")

    def test_global_cap_and_release(self, metrics: Metrics) -> None:
        """At max_connections the next is refused; a disconnect frees a slot."""
        g = self.guard(metrics, max_connections=2, max_connections_per_client=2)
        a, b, c = client("10.0.0.1"), client("10.0.0.2"), client("10.0.0.3")
        for x in (a, b, c):
            g.client_connected(x)
        assert c.error == "refused: max_connections"
        g.client_disconnected(a)
        d = client("10.0.0.3")
        g.client_connected(d)
        assert d.error is None

    def test_descriptor_cap_lowers_the_configured_one(self, metrics: Metrics) -> None:
        """The effective cap is the smaller of max_connections and what the descriptors carry."""
        g = self.guard(metrics, max_connections=4096)
        g.fd_cap = 1
        a, b = client("10.0.0.1"), client("10.0.0.2")
        g.client_connected(a)
        g.client_connected(b)
        assert (a.error, b.error) == (None, "refused: max_connections")

    def test_draining_refuses_everything(self, metrics: Metrics) -> None:
        """During a shutdown drain no new connection is admitted."""
        g = self.guard(metrics)
        g.draining = True
        c = client()
        g.client_connected(c)
        assert c.error == "refused: shutting_down"
        assert refused(metrics, "shutting_down") == 1

    def test_admission_bug_refuses(self, metrics: Metrics) -> None:
        """If admission itself fails, the connection is closed, never admitted."""
        g = ConnectionGuard(metrics, lambda: 1 / 0)  # type: ignore[arg-type,return-value]
        c = client()
        g.client_connected(c)
        assert c.error == "admission failed"


class TestListeningAddress:
    """Under mitmdump -s, connections accepted on mitmdump's default *:8080 just before the config's
    `listen` applied reached the addon after the rebind and were served (hostile review 19)."""

    async def test_a_connection_on_an_address_no_longer_listened_on_is_refused(self, metrics: Metrics) -> None:
        """A real Proxyserver bound to 127.0.0.1:<port>: a client on 127.0.0.2:8080 is refused not_listening,
        one on the bound address is admitted; with no server bound (mid-rebind) every one is refused."""
        from mitmproxy.addons.next_layer import NextLayer
        from mitmproxy.addons.proxyserver import Proxyserver

        ps = Proxyserver()
        with taddons.context(ps, NextLayer()) as tctx:
            tctx.options.listen_host, tctx.options.listen_port = "127.0.0.1", 0
            assert await ps.setup_servers()
            try:
                (bound,) = [a for a in ps.listen_addrs() if a[0] == "127.0.0.1"]
                g = ConnectionGuard(metrics, lambda: LimitsConfig())
                early, ok = client("127.0.0.1"), client("127.0.0.1")
                early.sockname, ok.sockname = ("127.0.0.2", 8080), bound
                g.client_connected(early)
                g.client_connected(ok)
                assert (early.error, ok.error) == ("refused: not_listening", None)
                mapped = client("127.0.0.1")
                mapped.sockname = ("::ffff:127.0.0.1", bound[1])
                g.client_connected(mapped)
                assert mapped.error is None
                await ps.servers.update([])
                late = client("127.0.0.1")
                late.sockname = bound
                g.client_connected(late)
                assert late.error == "refused: not_listening"
                assert refused(metrics, "not_listening") == 2
            finally:
                await ps.servers.update([])


class TestPhases:
    def test_request_lifecycle(self, metrics: Metrics) -> None:
        """Handshake deadline at accept, none while a request is in flight, idle deadline after it."""
        with taddons.context():
            g = ConnectionGuard(metrics, lambda: LimitsConfig())
            f = tflow.tflow()
            g.client_connected(f.client_conn)
            conn = g._conns[f.client_conn]
            assert (conn.phase, conn.deadline is not None) == ("handshake", True)
            g.requestheaders(f)
            assert (conn.phase, conn.deadline, g.in_flight()) == ("active", None, 1)
            g.response(f)
            assert (conn.phase, g.in_flight()) == ("idle", 0)
            assert conn.deadline is not None

    def test_refused_head_keeps_a_deadline_for_its_body(self, metrics: Metrics) -> None:
        """A request answered on its head (flow.response set) gets request_head_timeout for the body it owes."""
        with taddons.context():
            g = ConnectionGuard(metrics, lambda: LimitsConfig())
            f = tflow.tflow(resp=True)
            g.client_connected(f.client_conn)
            g.requestheaders(f)
            conn = g._conns[f.client_conn]
            assert (conn.phase, conn.deadline is not None) == ("request_head", True)

    def test_websocket_is_in_flight_until_it_ends(self, metrics: Metrics) -> None:
        """An open WebSocket is never idle; its end starts the idle deadline."""
        with taddons.context():
            g = ConnectionGuard(metrics, lambda: LimitsConfig())
            f = tflow.twebsocketflow()
            g.client_connected(f.client_conn)
            g.requestheaders(f)
            g.response(f)
            g.websocket_start(f)
            conn = g._conns[f.client_conn]
            assert (conn.phase, conn.deadline, g.in_flight()) == ("active", None, 1)
            g.websocket_end(f)
            assert (conn.phase, g.in_flight()) == ("idle", 0)

    def test_connect_restarts_the_handshake_clock(self, metrics: Metrics) -> None:
        """A CONNECT head is not a request in flight: the inner handshake gets its own deadline."""
        with taddons.context():
            g = ConnectionGuard(metrics, lambda: LimitsConfig())
            f = tflow.tflow()
            f.request.method = "CONNECT"
            g.client_connected(f.client_conn)
            g.http_connect(f)
            g.requestheaders(f)
            conn = g._conns[f.client_conn]
            assert (conn.phase, conn.tunnelled, g.in_flight()) == ("handshake", True, 0)


@contextlib.asynccontextmanager
async def admin_listener(metrics: Metrics, *, max_connections: int, max_per_client: int):
    """An AdminServer on a free port with these caps, and a list of held (reader, writer) pairs that
    is closed, with the server, when the test is done."""
    server = AdminServer("127.0.0.1", 0, metrics=metrics, readiness=lambda: {})
    server.set_limits(max_connections=max_connections, max_per_client=max_per_client, metrics=metrics)
    host, port = await server.start()
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        yield server, f"{host}:{port}", held
    finally:
        for _, w in held:
            w.close()
        await server.close()


async def hold(where: str, n: int, held: list, *, head: bytes = b"") -> None:
    """Open ``n`` connections to ``where`` that send ``head`` (nothing by default) and wait."""
    host, _, port = where.rpartition(":")
    for _ in range(n):
        r, w = await asyncio.open_connection(host, int(port))
        if head:
            w.write(head)
        held.append((r, w))


class TestAdminEviction:
    async def test_full_listener_evicts_the_oldest_silent_connection(self, metrics: Metrics) -> None:
        """With every slot held by silent connections, a probe is answered and the oldest silent one is closed."""
        async with admin_listener(metrics, max_connections=4, max_per_client=5) as (_, where, held):
            await hold(where, 4, held)
            await asyncio.sleep(0.05)
            async with httpx.AsyncClient(timeout=3) as c:
                assert (await c.get(f"http://{where}/healthz")).status_code == 200
            assert await asyncio.wait_for(held[0][0].read(), 2) == b""  # the oldest was closed
            assert refused(metrics, "max_connections", "admin") == 1

    async def test_per_client_cap_on_the_admin_listener(self, metrics: Metrics) -> None:
        """One address holds at most max_per_client connections: a third silent one is held unadmitted,
        and once its request is in it takes the slot of the oldest silent one, which closes."""
        async with admin_listener(metrics, max_connections=10, max_per_client=2) as (server, where, held):
            await hold(where, 3, held)
            await asyncio.sleep(0.05)
            assert len(server._handlers) == 2 and len(server._pending) == 1
            held[2][1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(held[2][0].read(), 2)).startswith(b"HTTP/1.1 200")
            assert await asyncio.wait_for(held[0][0].read(), 2) == b""
            assert refused(metrics, "max_connections_per_client", "admin") == 1

    async def test_a_probe_from_an_address_at_its_cap_is_answered(self, metrics: Metrics) -> None:
        """Half-sent heads fill one address's share (a sidecar's localhost, a node IP): a probe from that
        address still gets /healthz, 20 times out of 20; the heads pay with their own slots (review 22)."""
        async with admin_listener(metrics, max_connections=64, max_per_client=8) as (_, where, held):
            await hold(where, 8, held, head=b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            await asyncio.sleep(0.05)
            async with httpx.AsyncClient(timeout=3) as c:
                answers = [(await c.get(f"http://{where}/healthz", headers={"Connection": "close"})).status_code
                           for _ in range(20)]
            assert answers == [200] * 20

    async def test_a_flood_from_several_addresses_does_not_evict_a_probe(self, metrics: Metrics) -> None:
        """Silent connections from four addresses fill the listener; a probe from a fifth is answered,
        20 times out of 20: the address holding the most silent connections gives up one (review 23)."""
        async with admin_listener(metrics, max_connections=16, max_per_client=8) as (_, where, held):
            host, _, port = where.rpartition(":")

            async def probe() -> int:
                r, w = await asyncio.open_connection(host, int(port), local_addr=("127.0.0.6", 0))
                try:
                    w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    await w.drain()
                    head = await asyncio.wait_for(r.read(), 3)
                    return int(head.split(b" ", 2)[1]) if head else 0
                finally:
                    w.close()

            stop = asyncio.Event()

            async def flood(source: str) -> None:
                while not stop.is_set():
                    held.append(await asyncio.open_connection(host, int(port), local_addr=(source, 0)))
                    if len(held) > 400:  # keep our own descriptors bounded: drop what the server closed
                        for _, w in held[:200]:
                            w.close()
                        del held[:200]

            floods = [asyncio.create_task(flood(f"127.0.0.{2 + k}")) for k in range(4)]
            try:
                await asyncio.sleep(0.2)
                results = [await probe() for _ in range(20)]
                assert results == [200] * 20
            finally:
                stop.set()
                await asyncio.gather(*floods, return_exceptions=True)


def closed_for(m: Metrics, reason: str) -> float:
    return m.registry.get_sample_value("secretless_connections_closed_total",
                                       {"listener": "proxy", "reason": reason}) or 0.0


class TestAbuse:
    async def test_anonymous_connection_gets_a_bounded_number_of_streams(self, metrics: Metrics) -> None:
        """Without identity: 8 streams admitted, the 9th closes the connection (counted once); with one: no limit."""
        with taddons.context():
            g = ConnectionGuard(metrics, lambda: LimitsConfig(), identified=lambda c: c.peername[0] == "10.0.0.9")
            anon, known = client("10.0.0.1"), client("10.0.0.9")
            g.client_connected(anon)
            g.client_connected(known)
            assert [g.admit_stream(anon) for _ in range(10)] == [True] * 8 + [False] * 2
            assert all(g.admit_stream(known) for _ in range(100))
            assert closed_for(metrics, "anonymous_refusals") == 1

    async def test_connect_stream_is_not_counted(self, metrics: Metrics) -> None:
        """The CONNECT that opens the tunnel does not use up one of the anonymous requests."""
        with taddons.context():
            g = ConnectionGuard(metrics, lambda: LimitsConfig())
            f = tflow.tflow()
            g.client_connected(f.client_conn)
            assert g.admit_stream(f.client_conn)  # the CONNECT
            g.http_connect(f)
            assert [g.admit_stream(f.client_conn) for _ in range(9)] == [True] * 8 + [False]

    async def test_killed_after_the_close_decision(self, metrics: Metrics) -> None:
        """After 8 refusals a request that still reaches the hooks is killed, not decided."""
        with taddons.context():
            g = ConnectionGuard(metrics, lambda: LimitsConfig())
            first = tflow.tflow(resp=True)
            g.client_connected(first.client_conn)
            for _ in range(8):
                f = tflow.tflow(resp=True)
                f.client_conn = first.client_conn
                assert g.admit_request(f)
                g.requestheaders(f)
            late = tflow.tflow()
            late.client_conn = first.client_conn
            assert not g.admit_request(late)
            assert late.error is not None and closed_for(metrics, "anonymous_refusals") == 1

    async def test_rapid_reset_closes_any_client(self, metrics: Metrics) -> None:
        """More than 200 client resets in the window close even an identified connection."""
        with taddons.context():
            g = ConnectionGuard(metrics, lambda: LimitsConfig(), identified=lambda c: True)
            c = client()
            g.client_connected(c)
            for _ in range(200):
                g.stream_reset(c)
            assert g.admit_stream(c) and closed_for(metrics, "stream_resets") == 0
            g.stream_reset(c)
            assert not g.admit_stream(c) and closed_for(metrics, "stream_resets") == 1
