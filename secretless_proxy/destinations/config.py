"""Config sections for destination checks: ``to.private``, ``upstream.resolver``, ``upstream.allow_private``.

```yaml
upstream:
  resolver:                       # default: the system resolver
    nameservers: ["10.0.0.2", "[fd00::53]:5353"]
    timeout_seconds: 2
    cache_size: 1024
    max_ttl_seconds: 300
  allow_private: [127.0.0.0/8]    # test/dev only: every rule may reach these networks
rules:
  - to: {host: db.internal.example, private: true}        # or a list: [10.20.0.0/16]
```
"""

from __future__ import annotations

import re
from typing import Any

from secretless_proxy.config import fields
from secretless_proxy.config.yamlsource import Path_, Source
from secretless_proxy.destinations.addresses import Allowance, classify, ip_literal, parse_network
from secretless_proxy.destinations.resolver import ResolverConfig

_NAMESERVER = re.compile(r"(?:\[([0-9a-fA-F:.]+)\]|([0-9.]+))(?::(\d{1,5}))?\Z|([0-9a-fA-F:]+)\Z")


def private(src: Source, p: Path_, value: Any) -> Allowance:
    """``true`` (any private address), ``false``, or a list of CIDRs the rule may reach."""
    if isinstance(value, bool):
        return Allowance(everything=value)
    return Allowance(networks=networks(src, p, value))


def networks(src: Source, p: Path_, value: Any) -> tuple:
    items = src.string_list(p, value) if not isinstance(value, bool) else None
    if items is None:
        if isinstance(value, bool):
            src.error(p, "must be a list of CIDR networks (e.g. [127.0.0.0/8])")
        return ()
    out = []
    for i, text in enumerate(items):
        try:
            out.append(parse_network(text))
        except ValueError as exc:
            src.error(p + (i,), str(exc))
    return tuple(out)


def resolver(src: Source, p: Path_, value: Any) -> ResolverConfig:
    m = src.mapping(p, value, optional=("nameservers", "timeout_seconds", "cache_size", "min_ttl_seconds",
                                        "max_ttl_seconds", "system_cache_seconds"))
    if not m:
        return ResolverConfig()
    kw: dict[str, Any] = {}
    if "nameservers" in m and (items := src.string_list(p + ("nameservers",), m["nameservers"])):
        servers = []
        for i, text in enumerate(items):
            mm = _NAMESERVER.match(text.strip())
            host = mm and (mm.group(1) or mm.group(2) or mm.group(4))
            if not mm or ip_literal(host) is None or not 1 <= int(mm.group(3) or 53) <= 65535:
                src.error(p + ("nameservers", i), f"must be an IP address with an optional port "
                                                 f"(10.0.0.2, 10.0.0.2:5353, [fd00::53]:5353), got {text!r}")
                continue
            servers.append((str(ip_literal(host)), int(mm.group(3) or 53)))
        kw["nameservers"] = tuple(servers)
    for key, name, lo, hi in (("timeout_seconds", "timeout", 0.05, 60), ("min_ttl_seconds", "min_ttl", 0, 3600),
                              ("max_ttl_seconds", "max_ttl", 0, 86400),
                              ("system_cache_seconds", "system_cache_seconds", 0, 3600)):
        if key in m and (t := fields.seconds(src, p + (key,), m[key], lo=lo, hi=hi)) is not None:
            kw[name] = t
    if "cache_size" in m and (n := src.integer(p + ("cache_size",), m["cache_size"], lo=0, hi=1_000_000)) is not None:
        kw["cache_size"] = n
    cfg = ResolverConfig(**kw)
    if cfg.min_ttl > cfg.max_ttl:
        src.error(p + ("min_ttl_seconds",), f"must not exceed max_ttl_seconds ({cfg.max_ttl:g})")
    return cfg


def warnings(cfg) -> list[str]:
    """What ``check`` warns about: rules that open private destinations wider than they look."""
    out = []
    for rule in cfg.rules:
        where = f"{cfg.source.name}:{rule.line} rules[{rule.index}].to"
        wild = [h.text for h in rule.to.hosts if h.exact is None]
        if wild and rule.to.private.everything:
            out.append(f"{where}.private: 'private: true' with the wildcard host {wild[0]}: anyone who controls a "
                       "name under it can point it at any internal address; list the CIDRs it needs instead")
        for h in rule.to.hosts:
            ip = ip_literal(h.exact) if h.exact else None
            if ip is None:
                continue
            cls = classify(ip)
            allowed = rule.to.private.union(cfg.allow_private)
            if not cls.public and not allowed.covers(cls):
                out.append(f"{where}.host: {h.text} is a {cls.describe()} address and to.private does not allow it: "
                           "every request to it will be refused (destination_private)")
    return out
