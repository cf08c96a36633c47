"""The admin listeners' HTTP layer (admin/exchange.py): what h11 frames, what we refuse on top, what we send.

``Exchange`` is fed bytes as a client would send them, in the pieces given; the last class
drives the plain admin listener over real loopback sockets for what only a socket shows.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from secretless_proxy.admin.exchange import MAX_HEAD, Exchange, Request, Response, json_doc, refused_json, text
from secretless_proxy.admin.health import AdminServer
from secretless_proxy.metrics import Metrics
from secretless_proxy.refusal import Refusal


def exchange(*pieces: bytes, max_body: int | None = None, single: tuple[bytes, ...] = ()) -> Exchange:
    """An exchange reading ``pieces`` one recv at a time, then EOF."""
    left = list(pieces)

    async def recv() -> bytes:
        return left.pop(0) if left else b""

    return Exchange(recv, max_body=max_body, single=single)


async def refusal_of(*pieces: bytes, max_body: int | None = None) -> tuple[int, str, str]:
    with pytest.raises(Refusal) as info:
        await exchange(*pieces, max_body=max_body).read()
    return info.value.status, info.value.reason, info.value.message


class TestHead:
    async def test_a_plain_request(self) -> None:
        """Method, origin-form target and lower-cased headers come out as sent."""
        r = await exchange(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: text/plain\r\n\r\n").read()
        assert (r.method, r.target, r.headers, r.body) == ("GET", "/metrics?x=1",
                                                          ((b"host", b"a"), (b"accept", b"text/plain")), b"")
        assert r.header(b"accept") == b"text/plain" and r.header(b"x-none") == b""

    async def test_head_in_many_pieces(self) -> None:
        """A head trickled a byte at a time is the same request."""
        data = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
        r = await exchange(*(data[i:i + 1] for i in range(len(data)))).read()
        assert (r.method, r.target) == ("GET", "/healthz")

    async def test_http_1_0_needs_no_host(self) -> None:
        """HTTP/1.0 without Host is a request (RFC 9112 §3.2 asks Host of 1.1 only)."""
        assert (await exchange(b"GET /healthz HTTP/1.0\r\n\r\n").read()).target == "/healthz"

    @pytest.mark.parametrize(("data", "message"), [
        (b"GARBAGE\r\n\r\n", "malformed request line"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", "malformed request line"),  # TLS
        (b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", "malformed request line"),  # leading empty line
        (b"GET /metrics\r\n\r\n", "malformed request line"),  # HTTP/0.9
        (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", "malformed request line"),
        (b"GETTINGVERYLONGMETHOD / HTTP/1.1\r\nHost: a\r\n\r\n", "malformed request line"),
        (b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", "malformed request line"),  # absolute-form
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", "malformed request line"),
        (b"GET / HTTP/1.1\r\n\r\n", "missing Host header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "duplicate header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: y\r\n\r\n", "malformed header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", "malformed header"),  # obs-fold: h11 unfolds it
        (b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n", "malformed header"),  # bare LF: h11 takes it
        (b"GET / HTTP/1.1\nHost: a\n\n", "malformed header"),  # LF-only head
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", "malformed header"),  # bare CR
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", "malformed header"),  # a control character
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7f\r\n\r\n", "malformed header"),  # DEL: h11 takes it
    ])
    async def test_malformed_heads_are_400(self, data: bytes, message: str) -> None:
        """A head that h11 or our stricter rules refuse is a 400 invalid_request in our words."""
        assert await refusal_of(data) == (400, "invalid_request", message)

    async def test_obs_text_in_values_is_taken(self) -> None:
        """Bytes 0x80-0xff in a field value are obs-text (RFC 9110 §5.5), not control characters."""
        r = await exchange(b"GET / HTTP/1.1\r\nHost: a\r\nX-Name: caf\xe9\r\n\r\n").read()
        assert r.header(b"x-name") == b"caf\xe9"

    async def test_incomplete_head_is_400(self) -> None:
        """A head cut off by EOF is 400; no bytes at all is no request, with nothing to answer."""
        assert await refusal_of(b"GET / HTTP/1.1\r\nHost: a\r\n") == (400, "invalid_request", "incomplete request")
        with pytest.raises(ConnectionResetError):
            await exchange().read()


class TestHeadSize:
    async def test_head_at_the_limit_is_taken(self) -> None:
        """A head of exactly MAX_HEAD bytes, blank line included, is read."""
        start = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: "
        data = start + b"a" * (MAX_HEAD - len(start) - 4) + b"\r\n\r\n"
        assert len(data) == MAX_HEAD
        assert (await exchange(data).read()).target == "/"

    @pytest.mark.parametrize("trickle", [False, True])
    async def test_one_byte_over_is_431(self, trickle: bool) -> None:
        """One byte more is 431, whether the head comes in one read or in many."""
        start = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: "
        data = start + b"a" * (MAX_HEAD - len(start) - 3) + b"\r\n\r\n"
        pieces = [data[i:i + 512] for i in range(0, len(data), 512)] if trickle else [data]
        assert await refusal_of(*pieces) == (431, "invalid_request", "request head too large")

    async def test_endless_head_is_431_without_its_end(self) -> None:
        """A head that never ends is refused once it passes the limit, not read on."""
        pieces = [b"GET / HTTP/1.1\r\nHost: a\r\n"] + [b"X: " + b"a" * 1000 + b"\r\n"] * 100
        assert (await refusal_of(*pieces))[0] == 431


class TestBody:
    @pytest.mark.parametrize("data", [
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 00\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",  # h11 would say 501
    ])
    async def test_no_body_means_none(self, data: bytes) -> None:
        """With max_body None any body, chunked or not, is 400."""
        assert await refusal_of(data) == (400, "invalid_request", "request bodies are not accepted")

    async def test_content_length_zero_is_no_body(self) -> None:
        """Content-Length: 0 is fine where no body is taken."""
        assert (await exchange(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n").read()).body == b""

    async def test_body_by_content_length(self) -> None:
        """A body is read by Content-Length, across reads; a pipelined request after it is never read."""
        r = await exchange(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\n\r\n{\"a\"", b":1}GET / HTTP/1.1\r\n",
                           max_body=16).read()
        assert r.body == b'{"a":1}'

    @pytest.mark.parametrize(("data", "status", "message"), [
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411,
         "send the body with Content-Length, not Transfer-Encoding"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 411,
         "send the body with Content-Length, not Transfer-Encoding"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 17\r\n\r\n", 413, "request body larger than 16 bytes"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1234567890\r\n\r\n", 400, "malformed Content-Length"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", 400, "malformed Content-Length"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel", 400, "incomplete request body"),
        # h11 folds two equal Content-Length headers into one; we count them as sent.
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}", 400, "duplicate header"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, "duplicate header"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
         "duplicate header"),
    ])
    async def test_body_refusals(self, data: bytes, status: int, message: str) -> None:
        """Where a body is taken: 411 for Transfer-Encoding, 413 over the limit, 400 when malformed."""
        assert await refusal_of(data, max_body=16) == (status, "invalid_request", message)

    async def test_single_headers_are_per_listener(self) -> None:
        """A header named in ``single`` may appear once; elsewhere the last one counts."""
        data = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Type: a\r\nContent-Type: b\r\n\r\n"
        assert (await exchange(data, max_body=16).read()).header(b"content-type") == b"b"
        with pytest.raises(Refusal, match="duplicate header"):
            await exchange(data, max_body=16, single=(b"content-type",)).read()


def parse(answer: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    return status, [tuple(line.split(b": ", 1)) for line in lines], body  # type: ignore[misc]


class TestRender:
    async def test_response_head(self) -> None:
        """Status phrase from HTTPStatus; Content-Length, Connection: close and nosniff come first."""
        e = exchange(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        await e.read()
        status, headers, body = parse(e.render(json_doc(200, {"b": 1, "a": [2]}, cache="max-age=60")))
        assert status == b"HTTP/1.1 200 OK"
        assert headers == [(b"Content-Length", b"16"), (b"Connection", b"close"), (b"X-Content-Type-Options", b"nosniff"),
                           (b"Content-Type", b"application/json"), (b"Cache-Control", b"max-age=60")]
        assert body == b'{"a":[2],"b":1}\n'

    @pytest.mark.parametrize(("status", "phrase"), [
        (413, b"Content Too Large"), (431, b"Request Header Fields Too Large"), (411, b"Length Required"),
        (415, b"Unsupported Media Type"), (408, b"Request Timeout"), (401, b"Unauthorized"),
    ])
    async def test_refusal_after_a_broken_head(self, status: int, phrase: bytes) -> None:
        """A refusal is rendered even when h11 could not parse the request: JSON error and reason."""
        e = exchange(b"GARBAGE\r\n\r\n")
        with pytest.raises(Refusal):
            await e.read()
        line, headers, body = parse(e.render(refused_json(Refusal(status, "invalid_request", "why"))))
        assert line == b"HTTP/1.1 %d %s" % (status, phrase)
        assert body == b'{"error":"why","reason":"invalid_request"}\n'

    async def test_allow_on_405(self) -> None:
        """A refusal naming allowed methods sends them as Allow."""
        r = refused_json(Refusal(405, "method_not_allowed", "no", allow=("GET", "POST")))
        assert r.headers["Allow"] == "GET, POST"

    @pytest.mark.parametrize("head", [b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", b"HEAD / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n"])
    async def test_head_gets_no_body(self, head: bytes) -> None:
        """After HEAD the body is left out, Content-Length stays; a refused HEAD too (RFC 9110 §9.3.2)."""
        e = exchange(head)
        try:
            await e.read()
            response: Response = text(200, "ok\n")
        except Refusal as exc:
            response = refused_json(exc)
        _, headers, body = parse(e.render(response))
        assert body == b"" and (b"Content-Length", str(len(response.body)).encode()) in headers

    async def test_http_1_0_answer(self) -> None:
        """An HTTP/1.0 client gets an HTTP/1.1 answer that closes (RFC 9110 §2.5)."""
        e = exchange(b"GET / HTTP/1.0\r\n\r\n")
        assert isinstance(await e.read(), Request)
        status, headers, _ = parse(e.render(text(200, "ok\n")))
        assert status == b"HTTP/1.1 200 OK" and (b"Connection", b"close") in headers


@pytest.fixture
async def admin() -> AsyncIterator[AdminServer]:
    server = AdminServer("127.0.0.1", 0, metrics=Metrics(CollectorRegistry()), readiness=lambda: {})
    await server.start()
    yield server
    await server.close()


async def send(server: AdminServer, data: bytes) -> bytes:
    """``data`` in one write from a blocking client (in a thread); everything until the server closes."""
    def exchange_bytes() -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(data)
            return b"".join(iter(lambda: s.recv(65536), b""))

    return await asyncio.to_thread(exchange_bytes)


class TestOnTheWire:
    async def test_pipelined_second_request_is_not_answered(self, admin: AdminServer) -> None:
        """Two requests in one write get one answer, then the connection closes."""
        answer = await send(admin, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
        assert answer.count(b"HTTP/1.1 ") == 1 and answer.endswith(b"\r\n\r\nok\n")

    async def test_keep_alive_is_not_kept(self, admin: AdminServer) -> None:
        """Connection: keep-alive is answered with Connection: close and the socket closes."""
        answer = await send(admin, b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
        assert b"\r\nConnection: close\r\n" in answer and answer.startswith(b"HTTP/1.1 200 OK\r\n")

    async def test_http_1_0(self, admin: AdminServer) -> None:
        """An HTTP/1.0 probe without Host is answered."""
        assert (await send(admin, b"GET /healthz HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 200 OK\r\n")

    async def test_bare_lf_head_is_400_in_words(self, admin: AdminServer) -> None:
        """A head with LF line ends is 400 with a text sentence, and the listener keeps serving."""
        answer = await send(admin, b"GET /healthz HTTP/1.1\nHost: a\n\n")
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n") and answer.endswith(b"\r\n\r\nmalformed header\n")
        async with httpx.AsyncClient(timeout=5) as c:
            assert (await c.get(f"http://127.0.0.1:{admin.port}/healthz")).status_code == 200

    async def test_405_lists_allowed_methods(self, admin: AdminServer) -> None:
        """POST to a known path is 405 with Allow, in text."""
        answer = await send(admin, b"DELETE /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n") and b"\r\nAllow: GET, HEAD\r\n" in answer

    async def test_slow_head_is_408(self, admin: AdminServer, monkeypatch: pytest.MonkeyPatch) -> None:
        """A head not complete within the deadline gets 408."""
        monkeypatch.setattr("secretless_proxy.admin.health.READ_TIMEOUT", 0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
