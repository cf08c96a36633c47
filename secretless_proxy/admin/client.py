"""``secretless-proxy grant | grants | revoke | inventory``: the admin API's command line.

Each command makes one HTTPS request to the admin API (``admin.api_listen``, ``adminapi.py``),
presenting the admin's own X509-SVID as its client certificate::

    secretless-proxy grant --workload spiffe://example.org/ns/prod/sa/billing --rule prod-db \\
        --ttl 15m --reason "INC-1234: backfill" [--break-glass]
    secretless-proxy grants
    secretless-proxy revoke GRANT_ID [--reason TEXT]
    secretless-proxy inventory

Connection options, each with an environment fallback: ``--api`` (``SECRETLESS_ADMIN_API``),
``--cert``/``--key`` (``SECRETLESS_ADMIN_CERT``/``SECRETLESS_ADMIN_KEY``), ``--cacert``
(``SECRETLESS_ADMIN_CACERT``: the interception CA's ``mitmproxy-ca-cert.pem``, which issues the
API's certificate). Proxy variables are ignored: the API is reached directly. Output is a table
for people, ``--json`` prints the API's answer for machines. Exit 0 on success, 1 on any error
with one sentence on stderr (the API's own when it refused), never a traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from secretless_proxy.errors import SecretlessError

if TYPE_CHECKING:
    import ssl

ENV = {"api": "SECRETLESS_ADMIN_API", "cert": "SECRETLESS_ADMIN_CERT", "key": "SECRETLESS_ADMIN_KEY",
       "cacert": "SECRETLESS_ADMIN_CACERT"}
TIMEOUT = 10.0


class _Failure(SecretlessError):
    """One sentence for stderr; the command exits 1."""


def add_commands(sub: Any) -> None:
    """Add ``grant``, ``grants``, ``revoke`` and ``inventory`` to the CLI's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    conn = common.add_argument_group("admin API connection")
    conn.add_argument("--api", metavar="https://HOST:PORT", help=f"the admin API (admin.api_listen); default ${ENV['api']}")
    conn.add_argument("--cert", help=f"your admin X509-SVID certificate, PEM; default ${ENV['cert']}")
    conn.add_argument("--key", help=f"its private key, PEM; default ${ENV['key']}")
    conn.add_argument("--cacert", help="CA that issued the API's certificate: <interception_ca>/mitmproxy-ca-cert.pem; "
                                       f"default ${ENV['cacert']}, else the system roots")
    common.add_argument("--json", action="store_true", help="print the API's JSON answer instead of text")

    grant = sub.add_parser("grant", parents=[common],
                           help="let one workload use a requires_grant rule for a while (admin API)")
    grant.add_argument("--workload", required=True, help="the workload's exact SPIFFE ID")
    grant.add_argument("--rule", required=True, help="a rule with requires_grant: true")
    grant.add_argument("--ttl", required=True, help="how long, e.g. 15m or 2h (60 s to 7 d; break-glass at most 4 h)")
    grant.add_argument("--reason", default="", help="why; audited (required with --break-glass)")
    grant.add_argument("--break-glass", action="store_true", help="emergency access, on a rule with break_glass: true")
    grant.set_defaults(func=_command(_grant))

    grants = sub.add_parser("grants", parents=[common], help="list active and revoked grants (admin API)")
    grants.set_defaults(func=_command(_grants))

    revoke = sub.add_parser("revoke", parents=[common], help="revoke a grant for good (admin API)")
    revoke.add_argument("id", metavar="ID", help="the grant id (see `grants`)")
    revoke.add_argument("--reason", default=None, help="why; audited (default: manual)")
    revoke.set_defaults(func=_command(_revoke))

    inventory = sub.add_parser("inventory", parents=[common],
                               help="list every credential: kind, owner, cache state, rules; never values (admin API)")
    inventory.set_defaults(func=_command(_inventory))


def _command(run: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    def main(args: argparse.Namespace) -> int:
        try:
            run(args)
        except _Failure as exc:
            print(f"secretless-proxy {args.command}: {exc}", file=sys.stderr)
            return 1
        return 0
    return main


# -- commands ----------------------------------------------------------------------------------

def _grant(args: argparse.Namespace) -> None:
    from secretless_proxy.config.durations import parse_ttl

    try:
        ttl = parse_ttl(args.ttl).total_seconds()
    except ValueError as exc:
        raise _Failure(f"--ttl: {exc}") from None
    body = {"workload": args.workload, "rule": args.rule, "ttl_seconds": ttl, "reason": args.reason,
            "break_glass": args.break_glass}
    g = _request(args, "POST", "/v1/grants", body=body)
    if args.json:
        _print_json(g)
        return
    glass = "; break-glass" if g.get("break_glass") else ""
    print(f"granted {g['id']}: {g['workload']} may use rule '{g['rule']}' until {_when(g['expires_at'])}{glass}")


def _grants(args: argparse.Namespace) -> None:
    _listing(args, "/v1/grants", empty="no grants",
             header=["ID", "STATE", "WORKLOAD", "RULE", "EXPIRES", "BREAK-GLASS", "ISSUED BY", "REASON"],
             rows=lambda doc: [[g["id"], _state(g), g["workload"], g["rule"], _when(g["expires_at"]),
                                "yes" if g["break_glass"] else "", g["issued_by"], g["reason"] or "-"]
                               for g in doc["grants"]])


def _revoke(args: argparse.Namespace) -> None:
    params = {"reason": args.reason} if args.reason else None
    g = _request(args, "DELETE", f"/v1/grants/{quote(args.id, safe='')}", params=params)
    if args.json:
        _print_json(g)
        return
    print(f"revoked {g['id']} ({g['workload']}, rule '{g['rule']}'): {g['revoke_reason']}")


def _inventory(args: argparse.Namespace) -> None:
    _listing(args, "/v1/credentials", empty="no credentials defined",
             header=["NAME", "KIND", "OWNER", "LIFETIME", "CACHED", "EXPIRES", "LAST USED", "RULES"],
             rows=lambda doc: [[c["name"], c["kind"], c["owner"] or "-", c["lifetime"], str(len(c["cached"])),
                                _when(c["expires_at"]), _when(c["last_used"]), ", ".join(c["rules"]) or "-"]
                               for c in doc["credentials"]])


def _listing(args: argparse.Namespace, path: str, *, empty: str, header: Sequence[str],
             rows: Callable[[Any], list[list[str]]]) -> None:
    """GET ``path``: its JSON with ``--json``, else a table of ``rows(answer)``, or ``empty`` when it has none."""
    doc = _request(args, "GET", path)
    if args.json:
        _print_json(doc)
        return
    table = rows(doc)
    if not table:
        print(empty)
        return
    _table(header, table)


# -- HTTP --------------------------------------------------------------------------------------

def _request(args: argparse.Namespace, method: str, path: str, *, body: dict[str, Any] | None = None,
             params: dict[str, str] | None = None) -> Any:
    """The API's JSON answer, or _Failure with the API's own sentence."""
    import httpx  # only the admin commands need it: keep `check` and `certs` fast

    api = _api_url(args)
    ctx = _tls_context(args)
    try:
        with httpx.Client(base_url=api, verify=ctx, trust_env=False, timeout=TIMEOUT) as client:
            resp = client.request(method, path, json=body, params=params)
    except httpx.TimeoutException:
        raise _Failure(f"the admin API at {api} did not answer within {TIMEOUT:g} s") from None
    except httpx.HTTPError as exc:
        text = str(exc) or type(exc).__name__
        hint = ""
        if "mismatch" in text:  # "Hostname mismatch" / "IP address mismatch"
            hint = " (the API's certificate names the host of admin.api_listen: use that host in --api)"
        elif "CERTIFICATE_VERIFY_FAILED" in text:
            hint = " (--cacert must name the CA that issued the API's certificate: <interception_ca>/mitmproxy-ca-cert.pem)"
        raise _Failure(f"cannot reach the admin API at {api}: {text}{hint}") from None
    try:
        doc = resp.json()
    except ValueError:
        raise _Failure(f"{api} answered {resp.status_code} without JSON; is it the admin API (admin.api_listen)?") from None
    if resp.status_code >= 400:
        error = doc.get("error") if isinstance(doc, dict) else None
        reason = doc.get("reason") if isinstance(doc, dict) else None
        raise _Failure(f"{error or 'the admin API refused the request'} ({resp.status_code} {reason or 'error'})")
    return doc


def _api_url(args: argparse.Namespace) -> str:
    api = _setting(args, "api")
    if not api:
        raise _Failure(f"no admin API given: pass --api https://HOST:PORT or set {ENV['api']}")
    try:
        url = urlsplit(api)
        url.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        url = None
    if url is None or url.scheme != "https" or not url.hostname or url.path not in ("", "/") or url.query:
        raise _Failure(f"--api must be https://HOST:PORT (the admin API speaks mTLS only), got {api!r}")
    return api.rstrip("/")


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext:
    import ssl

    cacert, cert, key = _setting(args, "cacert"), _setting(args, "cert"), _setting(args, "key")
    try:
        ctx = ssl.create_default_context(cafile=cacert)
    except (OSError, ssl.SSLError) as exc:
        raise _Failure(f"cannot load --cacert {cacert}: {_why(exc)}") from None
    if bool(cert) != bool(key):
        raise _Failure("give both --cert and --key (your admin X509-SVID and its private key), or neither")
    if cert and key:
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise _Failure(f"cannot load the admin certificate {cert} with key {key}: {_why(exc)}") from None
    return ctx


def _setting(args: argparse.Namespace, name: str) -> str | None:
    return getattr(args, name) or os.environ.get(ENV[name]) or None


def _why(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# -- output ------------------------------------------------------------------------------------

def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _state(grant: dict[str, Any]) -> str:
    if grant["state"] == "revoked":
        return f"revoked ({grant['revoke_reason']})"
    return str(grant["state"])


def _when(ts: float | None, now: float | None = None) -> str:
    """``2025-01-31 12:00:00Z (in 14m)``; ``-`` for none."""
    if ts is None:
        return "-"
    now = dt.datetime.now(dt.UTC).timestamp() if now is None else now
    stamp = dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    delta = ts - now
    return f"{stamp} ({'in ' + _span(delta) if delta >= 0 else _span(-delta) + ' ago'})"


def _span(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 90 * 60:
        return f"{s // 60}m"
    if s < 2 * 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d"
