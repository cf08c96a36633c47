"""Warnings ``check`` prints about rules that are valid but weaker than they look.

Echoes are checked per response, on inject rules only: an ``action: allow`` rule to a host that
an inject rule sends a credential to lets a workload read back whatever that host reflects of
other requests (a request-log endpoint, a debug page showing the last ``Authorization`` it
received). Nothing in a single response can tell the proxy that; the rule set can.
"""

from __future__ import annotations

from secretless_proxy.matching import HostPattern


def _overlap(a: HostPattern, b: HostPattern) -> bool:
    if a.exact is not None and b.exact is not None:
        return a.exact == b.exact
    if a.exact is not None:
        return b.matches(a.exact)
    if b.exact is not None:
        return a.matches(b.exact)
    assert a.suffix is not None and b.suffix is not None
    return a.suffix.endswith(b.suffix) or b.suffix.endswith(a.suffix)


def cross_rule_echo(cfg) -> list[str]:
    """An allow rule sharing a host (and port) with an inject rule: its responses are not checked."""
    out = []
    injecting = [r for r in cfg.rules if r.action == "inject"]
    for rule in cfg.rules:
        if rule.action != "allow":
            continue
        for other in injecting:
            if not rule.to.ports & other.to.ports:
                continue
            shared = next(((a, b) for a in rule.to.hosts for b in other.to.hosts if _overlap(a, b)), None)
            if shared is None:
                continue
            out.append(
                f"{cfg.source.name}:{rule.line} rules[{rule.index}].action: allow rule '{rule.name}' reaches "
                f"{shared[0].text}, where rule '{other.name}' injects credential '{other.inject.credential}': "
                "responses on allow rules are not checked for echoes, so anything that host reflects of other "
                "requests (request logs, debug pages) can carry the credential back; narrow its paths or inject here too")
            break
    return out
