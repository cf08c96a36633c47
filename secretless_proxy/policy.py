"""Compiled routing rules: ``decide(workload, destination, method, path) → Decision | Deny``.

Precedence is **first match in file order**, like a firewall: the first rule whose workloads,
host, port, method and path all match decides. Nothing matching means deny (``default: deny``).
When no rule matches, the reason names how close the nearest rule came: ``path`` if a rule
matched workload, host and port but not the path, ``method`` if it also matched the path but
not the method (the rule that covers this very path is the one an operator wants named), else
``no_rule``. A plain ``http://`` upstream needs ``allow_plaintext`` on the rule, whether it
injects or only allows (``plaintext_upstream``). Rules are indexed by host so a decision looks at the few rules
for that host only.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from secretless_proxy.config.model import Rule
from secretless_proxy.identity import Workload
from secretless_proxy.matching import canonical_path
from secretless_proxy.reasons import Reason

_CLOSENESS = {Reason.NO_RULE: 0, Reason.PATH: 1, Reason.METHOD: 2}


@dataclass(frozen=True, slots=True)
class Decision:
    rule: Rule


@dataclass(frozen=True, slots=True)
class Deny:
    reason: Reason
    rule: str | None = None


class Policy:
    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        exact: dict[str, list[Rule]] = defaultdict(list)
        wild: dict[str, list[Rule]] = defaultdict(list)
        for rule in rules:
            for h in rule.to.hosts:
                if h.exact is not None:
                    exact[h.exact].append(rule)
                else:
                    assert h.suffix is not None
                    wild[h.suffix].append(rule)
        self._exact = dict(exact)
        self._wild = dict(wild)

    def candidates(self, host: str) -> list[Rule]:
        """Rules that name ``host`` (normalised), in file order."""
        found = list(self._exact.get(host, ()))
        dot = host.find(".")
        while dot != -1:
            found.extend(self._wild.get(host[dot:], ()))
            dot = host.find(".", dot + 1)
        if len(found) > 1:
            found = sorted(set(found), key=lambda r: r.index)
        return found

    def decide(self, workload: Workload, *, host: str, port: int, scheme: str,
               method: str, path: str) -> Decision | Deny:
        """``host`` must be normalised and be the host the proxy will connect to."""
        nearest, nearest_rule = Reason.NO_RULE, None
        canon: str | None | bool = False  # computed lazily: most rules have no path list
        for rule in self.candidates(host):
            to = rule.to
            if port not in to.ports:
                continue
            if not any(w.matches(workload.trust_domain, workload.path) for w in rule.workloads):
                continue
            if to.paths is not None:
                if canon is False:
                    canon = canonical_path(path)
                if canon is None or not any(g.matches(canon) for g in to.paths):  # type: ignore[arg-type]
                    if _CLOSENESS[Reason.PATH] > _CLOSENESS[nearest]:
                        nearest, nearest_rule = Reason.PATH, rule.name
                    continue
            if to.methods is not None and method not in to.methods:
                if nearest != Reason.METHOD:
                    nearest, nearest_rule = Reason.METHOD, rule.name
                continue
            if scheme != "https" and not rule.allow_plaintext:  # inject and allow rules alike (README)
                return Deny(Reason.PLAINTEXT_UPSTREAM, rule.name)
            return Decision(rule)
        return Deny(nearest, nearest_rule)
