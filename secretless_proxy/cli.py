"""Command line: ``run``, ``check``, ``explain``, ``certs init``, ``certs issue``, ``echo-server``;
``grant``, ``grants``, ``revoke``, ``inventory`` (the admin API's client, ``cli_admin.py``); ``--version``.

Every subcommand that reads a config takes it as ``--config FILE`` (tests/test_cli.py holds that, and
help on every argument, against the whole parser tree).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from secretless_proxy.errors import ConfigError


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _cmd_run(args: argparse.Namespace) -> int:
    from secretless_proxy.server import run  # imports mitmproxy: keep `check` and `certs` fast

    code = run(args.config, args.listen)
    # The proxy has stopped and closed what it owns (audit sinks write unbuffered to their
    # descriptors). Tearing the interpreter down, every module and object mitmproxy loaded, took
    # 0.2-0.4 s of CPU on each stop and could only add "Exception ignored" noise: flush and leave.
    for thread in threading.enumerate():  # what the interpreter's exit would still wait for
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _cmd_check(args: argparse.Namespace) -> int:
    from secretless_proxy.config.parse import load_config

    try:
        cfg = load_config(args.config)  # loads every trust bundle too (trust/config.py)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{args.config}: {len(exc.issues)} error(s)", file=sys.stderr)
        return 1
    from secretless_proxy.config.lint import cross_rule_echo
    from secretless_proxy.destinations.config import warnings

    for warning in warnings(cfg) + cross_rule_echo(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.config}: OK ({len(cfg.rules)} rules, {len(cfg.credentials)} credentials)")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    """Which rule decides a request, and why: the same decide() the proxy runs."""
    from urllib.parse import urlsplit

    from secretless_proxy.config.parse import load_config
    from secretless_proxy.identity import Workload
    from secretless_proxy.matching import normalize_host, split_spiffe_id
    from secretless_proxy.policy import Decision, Policy

    try:
        cfg = load_config(args.config, resolve_secrets=False)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 1
    try:
        td, path = split_spiffe_id(args.workload)
    except ValueError as exc:
        print(f"refused (407 identity_invalid): {exc}")
        return 2
    url = urlsplit(args.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"--url must be an absolute http(s) URL, got {args.url!r}")
    host = normalize_host(url.hostname)
    port = url.port if url.port is not None else (443 if url.scheme == "https" else 80)
    if port == 0:  # `url.port or 443` would judge :0 as :443; the proxy never connects to port 0
        print("refused (400): port 0 is not a destination port")
        return 2
    workload = Workload(spiffe_id=args.workload, trust_domain=td, path=path, not_after=float("inf"), cert_sha256="")
    if td not in cfg.identity.trust_domains:
        print(f"refused (407 identity_trust_domain): trust domain '{td}' is not in identity.trust_domains")
        return 2
    result = Policy(cfg.rules).decide(workload, host=host, port=port, scheme=url.scheme,
                                      method=args.method.upper(), path=url.path or "/")
    if isinstance(result, Decision):
        rule = result.rule
        what = "forwarded as is" if rule.inject is None else \
            f"credential '{rule.inject.credential}' injected ({rule.inject.target})"
        print(f"allowed by rule '{rule.name}' ({cfg.source.name}:{rule.line}): {what}")
        return 0 if args.no_resolve else _explain_addresses(cfg, rule, host, port)
    near = f" (nearest rule: '{result.rule}')" if result.rule else ""
    print(f"refused (403 {result.reason}){near}")
    return 2


def _explain_addresses(cfg, rule, host: str, port: int) -> int:
    """Where the proxy would connect: every address of ``host`` and its verdict (same checks as the proxy)."""
    import asyncio

    from secretless_proxy.destinations.pinning import PROXY_LISTENER, evaluate
    from secretless_proxy.destinations.resolver import DnsError, DnsTimeout, Resolver

    listeners = [a for a in (cfg.listen, cfg.admin_listen, cfg.admin_api_listen) if a]
    try:
        checked = asyncio.run(evaluate(host, port, resolver=Resolver(cfg.resolver),
                                       allowance=rule.to.private.union(cfg.allow_private), listeners=listeners))
    except DnsTimeout as exc:
        print(f"refused (504 dns_timeout): {exc}")
        return 2
    except DnsError as exc:
        print(f"refused (502 dns_failed): {exc}")
        return 2
    for c in checked.checked:
        why = "the proxy's own listener" if c.refused == PROXY_LISTENER else c.cls.describe()
        print(f"  {c.address}  {why}: {'refused' if c.refused else 'passes'}")
    if checked.refused is not None:
        print("refused (403 destination_private): the rule does not allow every address this host resolves to (to.private)")
        return 2
    return 0


def _cmd_certs_init(args: argparse.Namespace) -> int:
    from secretless_proxy.config.durations import parse_ttl
    from secretless_proxy.dev import certs

    ca = certs.make_ca(common_name=args.name, ttl=parse_ttl(args.ttl))
    cert_path, key_path = certs.write_ca(ca, Path(args.out))
    print(f"wrote {cert_path} (trust bundle) and {key_path} (keep private)")
    return 0


def _cmd_certs_issue(args: argparse.Namespace) -> int:
    from secretless_proxy.config.durations import parse_ttl
    from secretless_proxy.dev import certs

    spiffe_id = certs.validate_spiffe_id(args.spiffe_id)
    ca = certs.load_ca(Path(args.ca))
    svid = certs.make_svid(ca=ca, spiffe_id=spiffe_id, ttl=parse_ttl(args.ttl))
    cert_path, key_path = certs.write_svid(svid, Path(args.out), ca=ca)
    print(f"wrote {cert_path} and {key_path} for {spiffe_id}")
    return 0


def _cmd_echo_server(args: argparse.Namespace) -> int:
    import json
    import time

    from secretless_proxy.dev import certs
    from secretless_proxy.dev.echoserver import EchoUpstream

    ca = certs.load_ca(Path(args.ca))
    host, port = args.listen
    server_cert = certs.make_server_cert(ca=ca, hosts=("localhost", "127.0.0.1"))
    with EchoUpstream(server_cert=server_cert, host=host, port=port) as up:
        print(f"echo server on {up.url} (certificate from {args.ca}); Ctrl-C to stop", flush=True)
        seen = 0
        try:
            while True:
                time.sleep(0.2)
                for record in up.requests[seen:]:
                    print(json.dumps({k: record[k] for k in ("method", "path", "query", "headers")}), flush=True)
                seen = len(up.requests)
        except KeyboardInterrupt:
            return 0


CONFIG_HELP = "the YAML config file"


def _add_config(parser: argparse.ArgumentParser, *, old_positional: bool = False) -> None:
    """``--config FILE``, spelled alike on every subcommand that reads a config (issue 11).

    ``old_positional`` keeps ``check FILE``, the spelling from before, working for operators'
    scripts: deprecated and hidden from ``--help``, but silent, so its output (stderr included, which
    scripts may hold empty) and exit code stay exactly as they were.
    """
    if not old_positional:
        parser.add_argument("--config", metavar="FILE", required=True, help=CONFIG_HELP)
        return
    # One of the two, never both: argparse refuses either mistake with exit 2, like any usage error.
    either = parser.add_mutually_exclusive_group(required=True)
    either.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    # SUPPRESS as default: when FILE is absent argparse neither stores None over --config nor counts it as given.
    either.add_argument("config", nargs="?", metavar="FILE", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


class _Version(argparse.Action):
    """``--version``: the installed distribution's version, looked up only when asked.

    From the package metadata (importlib.metadata), so it is the version pip installed and never a
    second copy of pyproject's that could drift. Looked up lazily: ``check`` and ``certs`` stay fast.
    """

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog} {installed_version()}")
        parser.exit()


def installed_version() -> str:
    """The version of the installed ``secretless-proxy`` distribution."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("secretless-proxy")
    except PackageNotFoundError:  # imported from a source tree that pip never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="secretless-proxy", description="Credential-injecting egress proxy.")
    p.add_argument("--version", action=_Version, help="print the installed version and exit")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy")
    _add_config(run)
    run.add_argument("--listen", type=_listen, metavar="HOST:PORT",
                     help="where to listen (default: config 'listen' or 127.0.0.1:8080)")
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check", help="validate a config file; exit 0 when valid, 1 otherwise")
    _add_config(check, old_positional=True)
    check.set_defaults(func=_cmd_check)

    explain = sub.add_parser("explain", help="say which rule decides a request, and why (exit 0 allowed, 2 refused)")
    _add_config(explain)
    explain.add_argument("--workload", required=True, help="SPIFFE ID of the calling workload")
    explain.add_argument("--method", default="GET", help="the request's HTTP method (default: %(default)s)")
    explain.add_argument("--no-resolve", action="store_true",
                         help="skip resolving the host and checking its addresses (policy decision only)")
    explain.add_argument("url", help="the URL the workload calls, e.g. https://api.stripe.com/v1/charges")
    explain.set_defaults(func=_cmd_explain)

    ttl = "e.g. 90s, 15m, 1h, 7d, 1h30m"
    certs = sub.add_parser("certs", help="mint a dev workload CA and workload certificates")
    csub = certs.add_subparsers(dest="certs_command", required=True)
    init = csub.add_parser("init", help="create a dev workload CA (ca.pem, ca-key.pem)")
    init.add_argument("--out", required=True, metavar="DIR", help="directory to write ca.pem and ca-key.pem to")
    init.add_argument("--name", default="secretless dev workload CA", help="the CA's common name (default: %(default)s)")
    init.add_argument("--ttl", default="365d", help=f"how long the CA is valid, {ttl} (default: %(default)s)")
    init.set_defaults(func=_cmd_certs_init)
    issue = csub.add_parser("issue", help="issue an X509-SVID-style client certificate")
    issue.add_argument("--ca", required=True, metavar="DIR", help="directory holding ca.pem and ca-key.pem")
    issue.add_argument("--spiffe-id", required=True,
                       help="the workload's SPIFFE ID, e.g. spiffe://example.org/ns/prod/sa/billing")
    issue.add_argument("--ttl", default="1h", help=f"how long the certificate is valid, {ttl} (default: %(default)s)")
    issue.add_argument("--out", required=True, metavar="DIR", help="directory to write svid.pem and svid-key.pem to")
    issue.set_defaults(func=_cmd_certs_issue)

    echo = sub.add_parser("echo-server", help="dev HTTPS upstream that prints what it receives (quickstart)")
    echo.add_argument("--ca", required=True, metavar="DIR", help="CA directory (from `certs init`) to issue its certificate")
    echo.add_argument("--listen", type=_listen, default=("127.0.0.1", 9443), metavar="HOST:PORT",
                      help="where to listen (default: 127.0.0.1:9443)")
    echo.set_defaults(func=_cmd_echo_server)

    from secretless_proxy.admin.client import add_commands  # grant, grants, revoke, inventory: the admin API's client

    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        print(f"secretless-proxy {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
