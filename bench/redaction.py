"""Per-request redaction cost on a typical response: the old literal needles vs the derived needle set.

"old" is the pre-issue-10 redaction (the value, plus its two URL-encodings for a query; plain
``str.replace``/``bytes.replace`` on headers and body), copied here as the baseline. "new" is
``redaction.needles_for`` (a cache lookup per request, as the injector does) + ``redact_message``
(reason, every header, the body). Both run side by side in one process on the same responses:
a 4 KB JSON body and 12 headers, without an echo (the common case) and with one echo.
Usage: .venv/bin/python bench/redaction.py [--n 3000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from urllib.parse import quote, quote_plus

from mitmproxy import http
from mitmproxy.test import tflow

from secretless_proxy import redaction

SECRET = "sk_live_51Hb3nchMarkS3cretValue0123456789"


def _old_redact(message: http.Message, needles: tuple[str, ...]) -> None:
    for name, val in list(message.headers.items(multi=True)):
        if any(n in val for n in needles):
            new = val
            for n in needles:
                new = new.replace(n, "[REDACTED]")
            message.headers.set_all(name, [new if v == val else v for v in message.headers.get_all(name)])
    raw = message.get_content(strict=True) if message.raw_content else None
    if raw:
        encoded = [n.encode() for n in needles]
        if any(n in raw for n in encoded):
            for n in encoded:
                raw = raw.replace(n, b"[REDACTED]")
            message.content = raw


def _response(echo: bool) -> http.Response:
    items = [{"id": i, "name": f"item-{i}", "price": i * 1.5, "tags": ["a", "b"]} for i in range(60)]
    doc = {"object": "list", "data": items, "has_more": False}
    if echo:
        doc["debug"] = {"authorization": f"Bearer {SECRET}"}
    resp = tflow.tresp(content=json.dumps(doc).encode())
    for i in range(10):
        resp.headers[f"X-Header-{i}"] = f"value-{i}-{'x' * 20}"
    return resp


def _time(fn, responses: list[http.Response], repeats: int) -> float:
    samples = []
    for _ in range(repeats + 1):
        batch = [r.copy() for r in responses]
        t0 = time.perf_counter()
        for r in batch:
            fn(r)
        samples.append((time.perf_counter() - t0) / len(batch) * 1e6)
    return statistics.median(samples[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    old_needles = (SECRET, quote(SECRET, safe=""), quote_plus(SECRET))
    derive = []
    for _ in range(20):
        redaction._cache.clear()
        t0 = time.perf_counter()
        redaction.needles_for(SECRET)  # the first request with a credential value pays this
        derive.append((time.perf_counter() - t0) * 1e6)
    derive_us = statistics.median(derive)
    print(f"redaction per response (median of {args.repeats} interleaved x {args.n}; 4 KB JSON body, 12 headers):")
    for echo in (False, True):
        responses = [_response(echo) for _ in range(args.n)]
        olds, news = [], []
        for _ in range(args.repeats):  # interleaved, so load on a shared machine hits both alike
            olds.append(_time(lambda r: _old_redact(r, old_needles), responses, 1))
            news.append(_time(lambda r: redaction.redact_message(r, redaction.needles_for(SECRET)), responses, 1))
        old, new = statistics.median(olds), statistics.median(news)
        label = "with one echo" if echo else "no echo      "
        print(f"  {label}  old {old:6.1f} us   new {new:6.1f} us   ratio {new / old:.2f}x")
    print(f"  deriving the needle set once per credential value: {derive_us:.0f} us "
          "(+ compiling a form's pattern the first time its anchor shows up)")


if __name__ == "__main__":
    main()
