"""Command line: ``run``, ``check``, ``certs init``, ``certs issue``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ConfigError


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _cmd_run(args: argparse.Namespace) -> int:
    from .server import run  # imports mitmproxy: keep `check` and `certs` fast

    return run(args.config, args.listen)


def _cmd_check(args: argparse.Namespace) -> int:
    from .config import load_config
    from .identity import load_trust_bundle

    try:
        cfg = load_config(args.file)
        load_trust_bundle(cfg.identity.trust_bundle)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{args.file}: {len(exc.issues)} error(s)", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"{args.file}: identity.trust_bundle: {exc}", file=sys.stderr)
        return 1
    print(f"{args.file}: OK ({len(cfg.rules)} rules, {len(cfg.credentials)} credentials)")
    return 0


def _cmd_certs_init(args: argparse.Namespace) -> int:
    from . import certs

    ca = certs.make_ca(common_name=args.name, ttl=certs.parse_ttl(args.ttl))
    cert_path, key_path = certs.write_ca(ca, Path(args.out))
    print(f"wrote {cert_path} (trust bundle) and {key_path} (keep private)")
    return 0


def _cmd_certs_issue(args: argparse.Namespace) -> int:
    from . import certs

    spiffe_id = certs.validate_spiffe_id(args.spiffe_id)
    ca = certs.load_ca(Path(args.ca))
    svid = certs.make_svid(ca=ca, spiffe_id=spiffe_id, ttl=certs.parse_ttl(args.ttl))
    cert_path, key_path = certs.write_svid(svid, Path(args.out), ca=ca)
    print(f"wrote {cert_path} and {key_path} for {spiffe_id}")
    return 0


def _cmd_echo_server(args: argparse.Namespace) -> int:
    import json
    import time

    from . import certs
    from .devserver import EchoUpstream

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="secretless-proxy", description="Credential-injecting egress proxy.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--config", required=True, help="YAML config file")
    run.add_argument("--listen", type=_listen, help="HOST:PORT to listen on (default: config 'listen' or 127.0.0.1:8080)")
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check", help="validate a config file; exit 0 when valid, 1 otherwise")
    check.add_argument("file")
    check.set_defaults(func=_cmd_check)

    certs = sub.add_parser("certs", help="mint a dev workload CA and workload certificates")
    csub = certs.add_subparsers(dest="certs_command", required=True)
    init = csub.add_parser("init", help="create a dev workload CA (ca.pem, ca-key.pem)")
    init.add_argument("--out", required=True)
    init.add_argument("--name", default="secretless dev workload CA")
    init.add_argument("--ttl", default="365d")
    init.set_defaults(func=_cmd_certs_init)
    issue = csub.add_parser("issue", help="issue an X509-SVID-style client certificate")
    issue.add_argument("--ca", required=True, help="directory holding ca.pem and ca-key.pem")
    issue.add_argument("--spiffe-id", required=True)
    issue.add_argument("--ttl", default="1h")
    issue.add_argument("--out", required=True)
    issue.set_defaults(func=_cmd_certs_issue)

    echo = sub.add_parser("echo-server", help="dev HTTPS upstream that prints what it receives (quickstart)")
    echo.add_argument("--ca", required=True, help="CA directory (from `certs init`) to issue its certificate")
    echo.add_argument("--listen", type=_listen, default=("127.0.0.1", 9443))
    echo.set_defaults(func=_cmd_echo_server)
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
