"""Configuration: YAML → the frozen, typed model of ``config.py``. Every error names file, line and key path.

The parser collects every problem it can find in one pass (``ConfigError.issues``), so
``secretless-proxy check`` shows a platform team all of them at once. Unknown keys are errors:
a misspelled ``alow_plaintext`` must never be silently ignored.

Sections have their own readers: ``trustconfig`` (identity), ``destconfig`` (upstream, private
destinations), ``storeconfig`` (store), each credential kind's ``parse`` (``credentials.registry``).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal

from secretless_proxy.config import fields, yamlsource
from secretless_proxy.config.model import (
    MEMORY,
    AuditConfig,
    BrokerConfig,
    Config,
    Credential,
    Destination,
    Injection,
    LimitsConfig,
    Rule,
    SigningConfig,
)
from secretless_proxy.config.safefile import NotAFile, TooLarge, read_limited
from secretless_proxy.config.store import parse_store_section
from secretless_proxy.config.yamlsource import Path_, Source
from secretless_proxy.credentials.registry import KINDS
from secretless_proxy.destinations import config as destconfig
from secretless_proxy.destinations.addresses import NOTHING, Allowance
from secretless_proxy.destinations.resolver import ResolverConfig
from secretless_proxy.errors import ConfigError, ConfigIssue, SecretUnavailable
from secretless_proxy.matching import Glob, HostPattern, WorkloadPattern
from secretless_proxy.secretrefs import SecretRef, expand_user
from secretless_proxy.trust.config import IdentityConfig, parse_identity

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_METHOD = re.compile(r"[A-Z]+\Z")
# Headers the proxy or the HTTP layer own; a rule must not be able to overwrite them.
_RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer",
    "keep-alive", "proxy-connection", "x-secretless-request-id",
})
_LISTEN = re.compile(r"(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]]+)):(\d{1,5})\Z")

# Names a validator bug (an exception no parser above turned into an issue): the config fuzz test
# asserts it never appears, so it is a safety net and not a way to hide one.
UNEXPECTED = "the file could not be validated completely"


def load_config(path: str | Path, *, resolve_secrets: bool = True) -> Config:
    """Read and validate a config file. Raises ConfigError listing every problem found."""
    path = Path(path)
    try:
        raw = read_limited(path, limit=yamlsource.MAX_BYTES)
        text = raw.decode("utf-8")
    except FileNotFoundError as exc:
        raise ConfigError([ConfigIssue(file=str(path), line=None, path="", message="file not found")]) from exc
    except (NotAFile, TooLarge) as exc:  # a FIFO would block a live reload forever; /dev/zero never ends
        raise ConfigError([ConfigIssue(file=str(path), line=None, path="", message=str(exc))]) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(
            file=str(path), line=None, path="", message=f"cannot read the file ({type(exc).__name__})"
        )]) from exc
    src = yamlsource.load(text, file=path.name)
    try:
        # Relative paths are relative to the directory the file is named in, symlinks not followed:
        # in a Kubernetes ConfigMap or projected volume config.yaml -> ..data/config.yaml ->
        # ..<timestamp>/config.yaml, and that timestamped directory is deleted at the next update,
        # even one this process rejects. Through <dir>/<name> -> ..data the references follow it.
        base = Path(os.path.abspath(path)).parent
        cfg = _parse(src, base, path, hashlib.sha256(raw).hexdigest(),
                     resolve_secrets=resolve_secrets)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a validator bug must still be a located, clean refusal
        src.error((), f"{UNEXPECTED} ({type(exc).__name__}); the issues before it are real, please report this one")
        cfg = None
    src.raise_if_issues()
    assert cfg is not None
    return cfg


def _parse(src: Source, base: Path, path: Path, digest: str, *, resolve_secrets: bool) -> Config | None:
    top = src.mapping((), src.data, required=("version", "identity", "rules"),
                      optional=("credentials", "default", "listen", "interception_ca", "upstream", "store",
                                "admin", "signing", "broker", "audit", "limits"))
    if top is None:
        return None
    if "version" in top and (type(top["version"]) is not int or top["version"] != 1):
        src.error(("version",), f"unsupported config version {top['version']!r} (supported: 1)")
    if "default" in top:
        src.choice(("default",), top["default"], ("deny",))
    identity = parse_identity(src, top.get("identity"), base) if "identity" in top else None
    credentials = _credentials(src, top.get("credentials", {}), base)
    if resolve_secrets:
        # Even when other keys are wrong: one `check` run must report every problem it can find.
        for cred in credentials.values():
            for key, ref in cred.secret_refs().items():
                _check_resolves(src, ("credentials", cred.name, key), ref)
    rules = _rules(src, top.get("rules"), credentials, identity) if "rules" in top else ()
    listen = _listen(src, ("listen",), top["listen"]) if "listen" in top else None
    ica = _path(src, ("interception_ca",), top["interception_ca"], base) if "interception_ca" in top else None
    upstream_ca, resolver, allow_private = None, ResolverConfig(), NOTHING
    if "upstream" in top and (up := src.mapping(("upstream",), top["upstream"],
                                                 optional=("ca_bundle", "resolver", "allow_private"))):
        if "ca_bundle" in up:
            upstream_ca = _path(src, ("upstream", "ca_bundle"), up["ca_bundle"], base, must_exist=True)
        if "resolver" in up:
            resolver = destconfig.resolver(src, ("upstream", "resolver"), up["resolver"])
        if "allow_private" in up:
            allow_private = Allowance(networks=destconfig.networks(src, ("upstream", "allow_private"), up["allow_private"]))
    admin, api_listen, admins = _admin(src, top["admin"], identity) if "admin" in top else (None, None, ())
    signing = _signing(src, top["signing"], base, resolve_secrets) if "signing" in top else None
    broker = _broker(src, top["broker"]) if "broker" in top else BrokerConfig()
    audit = _audit(src, top["audit"], base, resolve_secrets) if "audit" in top else AuditConfig()
    limits = _limits(src, top["limits"]) if "limits" in top else LimitsConfig()
    for cred in credentials.values():
        ttl = getattr(cred.settings, "ttl", None)
        if cred.kind == "jwt" and ttl is not None and ttl <= broker.skew:
            src.error(("credentials", cred.name, "ttl_seconds"),
                      f"a {ttl:g} s token would never be served: it must outlive broker.skew_seconds ({broker.skew:g})")
    if admin and listen and admin[1] == listen[1] and (admin[0] == listen[0] or "0.0.0.0" in (admin[0], listen[0])):
        src.error(("admin", "listen"), "the admin listener must not share the proxy's address")
    store = parse_store_section(src, top.get("store", MEMORY), base, resolve_secrets=resolve_secrets)
    if any(r.requires_grant for r in rules) and store is not None and store.kind == "memory" and api_listen is None:
        src.error(("store",), "rules with requires_grant need grants from the admin API (admin.api_listen) "
                              "or a shared store; with neither, no grant could ever exist")
    if limits.revoke_on_shutdown and store is not None and store.kind != "memory":
        src.error(("limits", "revoke_on_shutdown"), "needs store: memory:// — with a shared store the other "
                  "replicas keep using these credentials, and one replica's shutdown would revoke them for all")
    if identity is None or store is None or src.issues:
        return None
    return Config(source=path, digest=digest, identity=identity, listen=listen, interception_ca=ica,
                  upstream_ca_bundle=upstream_ca, store=store, credentials=credentials, rules=rules,
                  admin_listen=admin, admin_api_listen=api_listen, admin_workloads=admins,
                  signing=signing, broker=broker, audit=audit, limits=limits, resolver=resolver,
                  allow_private=allow_private)


# YAML key → (field, lower bound, upper bound); sizes in bytes, times in seconds.
_LIMIT_SIZES = {
    "max_request_head_bytes": (1024, 1024 * 1024),
    "max_request_body_bytes": (0, 64 * 1024**3),
    "max_response_scan_bytes": (0, 1024**3),
    "max_response_scan_total_bytes": (0, 64 * 1024**3),
    "max_response_head_bytes": (1024, 1024 * 1024),
}
_LIMIT_TIMES = {
    "handshake_timeout_seconds": ("handshake_timeout", 0.5, 600),
    "request_head_timeout_seconds": ("request_head_timeout", 0.5, 600),
    "request_body_timeout_seconds": ("request_body_timeout", 0.5, 3600),
    "idle_timeout_seconds": ("idle_timeout", 1, 3600),
    "drain_seconds": ("drain_seconds", 0, 3600),
}
_LIMIT_COUNTS = {"max_connections": (1, 1_000_000), "max_connections_per_client": (1, 1_000_000),
                 "admin_max_connections": (2, 10_000), "admin_max_connections_per_client": (1, 10_000)}


def _limits(src: Source, value: Any) -> LimitsConfig:
    p: Path_ = ("limits",)
    m = src.mapping(p, value, optional=(*_LIMIT_SIZES, *_LIMIT_TIMES, *_LIMIT_COUNTS, "revoke_on_shutdown"))
    if not m:
        return LimitsConfig()
    out: dict[str, Any] = {}
    for key, (lo, hi) in (_LIMIT_SIZES | _LIMIT_COUNTS).items():
        if key in m and (v := src.integer(p + (key,), m[key], lo=lo, hi=hi)) is not None:
            out[key] = v
    for key, (name, lo, hi) in _LIMIT_TIMES.items():
        if key in m and (t := fields.seconds(src, p + (key,), m[key], lo=lo, hi=hi)) is not None:
            out[name] = t
    if "revoke_on_shutdown" in m and (b := src.boolean(p + ("revoke_on_shutdown",), m["revoke_on_shutdown"])) is not None:
        out["revoke_on_shutdown"] = b
    limits = LimitsConfig(**out)
    if limits.max_connections_per_client > limits.max_connections:
        src.error(p + ("max_connections_per_client",),
                  f"must not exceed limits.max_connections ({limits.max_connections})")
    if limits.admin_max_connections_per_client > limits.admin_max_connections:
        src.error(p + ("admin_max_connections_per_client",),
                  f"must not exceed limits.admin_max_connections ({limits.admin_max_connections})")
    return limits


def _check_resolves(src: Source, p: Path_, ref: SecretRef, *, pem: bool = False) -> None:
    """Report at ``p`` a secret that cannot be read now, so a bad reference fails the load, not a request."""
    try:
        ref.resolve_pem() if pem else ref.resolve()
    except SecretUnavailable as exc:
        src.error(p, f"cannot resolve {ref}: {exc}")


def _audit(src: Source, value: Any, base: Path, resolve: bool) -> AuditConfig:
    p: Path_ = ("audit",)
    m = src.mapping(p, value, optional=("sinks", "fingerprint_key", "on_sink_failure"))
    if not m:
        return AuditConfig()
    sinks: list[str] = []
    for i, sink in enumerate(src.string_list(p + ("sinks",), m["sinks"]) or () if "sinks" in m else ("stdout",)):
        if sink == "stdout":
            sinks.append(sink)
        elif sink.startswith("file:") and len(sink) > 5:
            try:
                path = expand_user(sink[5:])
            except ValueError as exc:
                src.error(p + ("sinks", i), str(exc))
                continue
            sinks.append("file:" + str(path if path.is_absolute() else base / path))
        else:
            src.error(p + ("sinks", i), f"unknown audit sink {sink!r} (use stdout or file:/path)")
    if "sinks" in m and m["sinks"] == []:
        src.error(p + ("sinks",), "an empty sink list would drop every audit event: name at least one (stdout or file:/path)")
    key = fields.secret_ref(src, p + ("fingerprint_key",), m["fingerprint_key"], base) if "fingerprint_key" in m else None
    if key is not None and resolve:
        _check_resolves(src, p + ("fingerprint_key",), key)
    mode = src.choice(p + ("on_sink_failure",), m.get("on_sink_failure", "fail_closed"),
                      ("fail_closed", "log_and_continue"))
    return AuditConfig(sinks=tuple(sinks), fingerprint_key=key, fail_closed=mode != "log_and_continue")


def _admin(src: Source, value: Any, identity: IdentityConfig | None
           ) -> tuple[tuple[str, int] | None, tuple[str, int] | None, tuple[WorkloadPattern, ...]]:
    p: Path_ = ("admin",)
    m = src.mapping(p, value, optional=("listen", "api_listen", "workloads"))
    if not m:
        return None, None, ()
    listen = _listen(src, p + ("listen",), m["listen"]) if "listen" in m else None
    api = _listen(src, p + ("api_listen",), m["api_listen"]) if "api_listen" in m else None
    admins = _workloads(src, p + ("workloads",), m["workloads"], identity) if "workloads" in m else ()
    if api is not None and not admins:
        src.error(p, "admin.api_listen needs admin.workloads: the SPIFFE IDs allowed to manage grants")
    if api is not None and listen is not None and api[1] == listen[1] and api[1] != 0:
        src.error(p + ("api_listen",), "the admin API needs its own port (it speaks mTLS; the admin listener does not)")
    return listen, api, admins or ()


def _signing(src: Source, value: Any, base: Path, resolve: bool) -> SigningConfig | None:
    p: Path_ = ("signing",)
    m = src.mapping(p, value, required=("issuer",), optional=("key", "key_id"))
    if m is None or "issuer" not in m:
        return None
    issuer = fields.url(src, p + ("issuer",), m["issuer"])
    key = fields.secret_ref(src, p + ("key",), m["key"], base) if "key" in m else None
    if key is not None and resolve:
        _check_resolves(src, p + ("key",), key, pem=True)
    key_id = src.string(p + ("key_id",), m["key_id"]) if "key_id" in m else None
    if issuer is None:
        return None
    return SigningConfig(issuer=issuer.rstrip("/"), key=key, key_id=key_id)


def _broker(src: Source, value: Any) -> BrokerConfig:
    p: Path_ = ("broker",)
    m = src.mapping(p, value, optional=("skew_seconds", "refresh_at", "timeout_seconds", "retries",
                                         "max_wait_seconds"))
    d = BrokerConfig()
    if not m:
        return d
    skew = fields.seconds(src, p + ("skew_seconds",), m["skew_seconds"], lo=0, hi=3600) if "skew_seconds" in m else d.skew
    refresh = m.get("refresh_at", d.refresh_at)
    if isinstance(refresh, bool) or not isinstance(refresh, int | float) or not 0.1 <= refresh <= 0.95:
        src.error(p + ("refresh_at",), f"must be a fraction of the lifetime from 0.1 to 0.95, got {refresh!r}")
        refresh = d.refresh_at
    timeout = fields.seconds(src, p + ("timeout_seconds",), m["timeout_seconds"], lo=0.1, hi=120) if "timeout_seconds" in m else d.timeout
    retries = src.integer(p + ("retries",), m["retries"], lo=0, hi=10) if "retries" in m else d.retries
    max_wait = fields.seconds(src, p + ("max_wait_seconds",), m["max_wait_seconds"], lo=0.1, hi=300) \
        if "max_wait_seconds" in m else d.max_wait
    return BrokerConfig(skew=d.skew if skew is None else skew, refresh_at=float(refresh),
                        timeout=timeout or d.timeout, retries=d.retries if retries is None else retries,
                        max_wait=max_wait or d.max_wait)


def _path(src: Source, p: Path_, value: Any, base: Path, *, must_exist: bool = False) -> Path | None:
    s = src.string(p, value)
    if s is None:
        return None
    try:
        out = expand_user(s)
    except ValueError as exc:
        src.error(p, str(exc))
        return None
    out = out if out.is_absolute() else base / out
    if must_exist:
        try:
            exists = out.is_file()
        except OSError as exc:  # ENAMETOOLONG, ELOOP...: is_file() only swallows "does not exist"
            src.error(p, f"file {str(out)[:200]} cannot be read ({exc.strerror or type(exc).__name__})")
            return None
        if not exists:
            src.error(p, f"file {out} is not a regular file" if out.exists() else f"file {out} does not exist")
    return out


def _listen(src: Source, p: Path_, value: Any) -> tuple[str, int] | None:
    m = _LISTEN.match(value) if isinstance(value, str) else None
    if not m or not 0 <= int(m.group(3)) <= 65535:
        src.error(p, f"must be HOST:PORT (e.g. 127.0.0.1:8080), got {value!r}")
        return None
    return (m.group(1) or m.group(2), int(m.group(3)))


def _credentials(src: Source, value: Any, base: Path) -> dict[str, Credential]:
    p: Path_ = ("credentials",)
    if not isinstance(value, dict):
        src.error(p, f"must be a mapping of credential names to definitions, got {yamlsource.type_name(value)}")
        return {}
    out = {}
    for name, body in value.items():
        cp = p + (name,)
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            src.error(cp, f"invalid credential name {name!r}: letters, digits, '_', '.', '-' only")
            continue
        if not isinstance(body, dict) or "kind" not in body:
            src.mapping(cp, body, required=("kind",))
            continue
        kind = src.choice(cp + ("kind",), body["kind"], sorted(KINDS))
        if kind is None:
            continue
        spec = KINDS[kind]
        m = src.mapping(cp, body, required=("kind", *spec.required),
                        optional=("owner", "description", *spec.optional))
        if m is None or any(k not in m for k in spec.required):
            continue
        settings = spec.parse(src, cp, m, base)
        owner = src.string(cp + ("owner",), m["owner"]) if "owner" in m else None
        if "description" in m:
            src.string(cp + ("description",), m["description"])
        if settings is not None:
            out[name] = Credential(name=name, kind=kind, settings=settings, owner=owner, line=src.line(cp))
    return out


def _rules(src: Source, value: Any, creds: dict[str, Credential],
           identity: IdentityConfig | None) -> tuple[Rule, ...]:
    if not isinstance(value, list):
        src.error(("rules",), f"must be a list of rules, got {yamlsource.type_name(value)}")
        return ()
    out: list[Rule] = []
    seen: dict[str, int] = {}
    for i, body in enumerate(value):
        p: Path_ = ("rules", i)
        m = src.mapping(p, body, required=("name", "workloads", "to"),
                        optional=("inject", "action", "allow_plaintext", "description", "requires_grant", "break_glass"))
        if m is None:
            continue
        name = src.string(p + ("name",), m["name"]) if "name" in m else None
        if name is not None and name in seen:
            src.error(p + ("name",), f"duplicate rule name '{name}' (also rules[{seen[name]}])")
        elif name is not None:
            seen[name] = i
        workloads = _workloads(src, p + ("workloads",), m.get("workloads"), identity) if "workloads" in m else None
        plaintext = src.boolean(p + ("allow_plaintext",), m["allow_plaintext"]) if "allow_plaintext" in m else False
        to = _destination(src, p + ("to",), m["to"], bool(plaintext)) if "to" in m else None
        action = _action(src, p, m)
        inject = _injection(src, p + ("inject",), m["inject"], creds) if action == "inject" else None
        if "description" in m:
            src.string(p + ("description",), m["description"])
        needs_grant = bool(src.boolean(p + ("requires_grant",), m["requires_grant"])) if "requires_grant" in m else False
        glass = bool(src.boolean(p + ("break_glass",), m["break_glass"])) if "break_glass" in m else False
        if glass and not needs_grant:
            src.error(p + ("break_glass",), "break_glass only applies to rules with requires_grant: true")
        if name and workloads and to and action and plaintext is not None and (inject or action == "allow"):
            out.append(Rule(name=name, index=i, line=src.line(p), workloads=workloads, to=to,
                            action=action, inject=inject, allow_plaintext=plaintext,
                            requires_grant=needs_grant, break_glass=glass))
    return tuple(out)


def _action(src: Source, p: Path_, m: dict) -> Literal["allow", "inject"] | None:
    action = m.get("action", "inject" if "inject" in m else None)
    if action is None:
        src.error(p, "a rule needs 'inject:' (add a credential) or 'action: allow' (forward as is)")
        return None
    if src.choice(p + ("action",), action, ("allow", "inject")) is None:
        return None
    if action == "allow" and "inject" in m:
        src.error(p + ("inject",), "'action: allow' forwards without a credential; remove 'inject:' or the action")
        return None
    if action == "inject" and "inject" not in m:
        src.error(p, "'action: inject' needs an 'inject:' block")
        return None
    return action


def _workloads(src: Source, p: Path_, value: Any, identity: IdentityConfig | None) -> tuple[WorkloadPattern, ...] | None:
    items = src.string_list(p, value)
    if items is None:
        return None
    out = []
    for i, text in enumerate(items):
        try:
            pat = WorkloadPattern.parse(text)
        except ValueError as exc:
            src.error(p + (i,), str(exc))
            continue
        if identity and pat.trust_domain not in identity.trust_domains:
            src.error(p + (i,), f"trust domain '{pat.trust_domain}' is not in identity.trust_domains "
                                f"({', '.join(identity.trust_domains)}); this pattern could never match")
            continue
        out.append(pat)
    return tuple(out) if len(out) == len(items) else None


def _destination(src: Source, p: Path_, value: Any, plaintext: bool) -> Destination | None:
    m = src.mapping(p, value, required=("host",), optional=("port", "methods", "paths", "private"))
    if m is None or "host" not in m:
        return None
    hosts = []
    for i, text in enumerate(src.string_list(p + ("host",), m["host"]) or ()):
        try:
            hosts.append(HostPattern.parse(text))
        except ValueError as exc:
            src.error(p + ("host", i) if isinstance(m["host"], list) else p + ("host",), str(exc))
    ports: frozenset[int] = frozenset({80, 443} if plaintext else {443})
    if "port" in m:
        raw = m["port"] if isinstance(m["port"], list) else [m["port"]]
        checked = [src.integer(p + ("port",), v, lo=1, hi=65535) for v in raw]
        ports = frozenset(v for v in checked if v is not None)
        if not raw:
            src.error(p + ("port",), "must name at least one port (or leave 'port' out for the default)")
    methods = None
    if "methods" in m and (items := src.string_list(p + ("methods",), m["methods"])):
        for i, meth in enumerate(items):
            if not _METHOD.match(meth):
                src.error(p + ("methods", i), f"invalid HTTP method {meth!r}: use upper case, e.g. GET")
        methods = frozenset(items)
    paths = None
    if "paths" in m and (items := src.string_list(p + ("paths",), m["paths"])):
        globs = []
        for i, text in enumerate(items):
            if not text.startswith("/"):
                src.error(p + ("paths", i), f"path pattern {text!r} must start with '/'")
                continue
            try:
                globs.append(Glob.parse(text))
            except ValueError as exc:
                src.error(p + ("paths", i), str(exc))
        paths = tuple(globs)
    private = destconfig.private(src, p + ("private",), m["private"]) if "private" in m else NOTHING
    if not hosts or src.issues:
        return None
    return Destination(hosts=tuple(hosts), ports=ports, methods=methods, paths=paths, private=private)


def _injection(src: Source, p: Path_, value: Any, creds: dict[str, Credential]) -> Injection | None:
    m = src.mapping(p, value, required=("credential",), optional=("header", "format", "basic", "query", "sigv4", "echo_check"))
    if m is None or "credential" not in m:
        return None
    name = src.string(p + ("credential",), m["credential"])
    if name is not None and name not in creds:
        known = ", ".join(sorted(creds)) or "none defined"
        src.error(p + ("credential",), f"unknown credential '{name}' (known: {known})")
    targets = [k for k in ("header", "basic", "query", "sigv4") if k in m]
    if len(targets) != 1:
        src.error(p, "give exactly one of 'header', 'basic', 'query' or 'sigv4' to say where the credential goes"
                  + (f" (found: {', '.join(targets)})" if targets else ""))
        return None
    if name in creds:
        kind = KINDS[creds[name].kind]
        if targets[0] not in kind.injections:
            src.error(p + (targets[0],), f"a {kind.name} credential cannot be injected as '{targets[0]}' "
                                         f"(use: {', '.join(sorted(kind.injections))})")
            return None
    if "format" in m and "header" not in m:
        src.error(p + ("format",), "'format' only applies to 'header' injection")
    kw: dict[str, Any] = {}
    if "header" in m and (h := src.string(p + ("header",), m["header"])):
        if not _HEADER_NAME.match(h):
            src.error(p + ("header",), f"invalid header name {h!r}")
        elif h.lower() in _RESERVED_HEADERS:
            src.error(p + ("header",), f"header {h!r} is owned by the HTTP layer and cannot carry a credential")
        kw["header"] = h
        if "format" in m and (f := _template(src, p + ("format",), m["format"])):
            kw["format"] = f
    if "basic" in m and (b := src.mapping(p + ("basic",), m["basic"], optional=("username", "password"))) is not None:
        user = _template(src, p + ("basic", "username"), b.get("username", ""), required=False)
        pw = _template(src, p + ("basic", "password"), b.get("password", "{secret}"), required=False)
        if user is not None and pw is not None and "{secret}" not in user + pw:
            src.error(p + ("basic",), "'{secret}' must appear in the username or the password")
        kw.update(basic_username=user, basic_password=pw)
    if "sigv4" in m and (sv := src.mapping(p + ("sigv4",), m["sigv4"] if m["sigv4"] is not None else {},
                                            optional=("region", "service"))) is not None:
        kw["sigv4"] = True
        for key in ("region", "service"):
            if key in sv and (v := src.string(p + ("sigv4", key), sv[key])):
                if not re.fullmatch(r"[a-z0-9-]+", v):
                    src.error(p + ("sigv4", key), f"invalid AWS {key} {v!r}")
                kw[f"sigv4_{key}"] = v
    if "query" in m and (q := src.string(p + ("query",), m["query"])):
        if not re.fullmatch(r"[A-Za-z0-9_.~-]+", q):
            src.error(p + ("query",), f"invalid query parameter name {q!r}: letters, digits, '_', '.', '~', '-' only")
        kw["query"] = q
    if name is None or name not in creds or not kw:
        return None
    if "echo_check" in m and (ec := src.boolean(p + ("echo_check",), m["echo_check"])) is not None:
        kw["echo_check"] = ec
    return Injection(credential=name, **kw)


def _template(src: Source, p: Path_, value: Any, *, required: bool = True) -> str | None:
    s = src.string(p, value, empty_ok=not required)
    if s is None:
        return None
    rest = s.replace("{secret}", "")
    if "{" in rest or "}" in rest:
        src.error(p, f"template {s!r} may only contain the placeholder {{secret}}")
        return None
    if required and "{secret}" not in s:
        src.error(p, f"template {s!r} must contain {{secret}}")
        return None
    return s
