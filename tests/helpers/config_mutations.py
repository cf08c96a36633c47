"""Seeded mutations of a valid config file, for the config fuzz test and ``bench/fuzz_config.py``.

Each mutation changes exactly one place of a block-style document (the value on one line, or that
line's key) and remembers where, so the checker can ask two questions of the result: did anything
escape other than ``ConfigError`` (a traceback in ``check``), and does some reported issue point at
the place that was changed (its line, or its key path, or a parent or child of that path)?
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from secretless_proxy.config import yamlsource
from secretless_proxy.config.parse import UNEXPECTED, load_config
from secretless_proxy.dev.certs import make_ca, write_ca
from secretless_proxy.errors import ConfigError

BASE = {
    "version": 1,
    # One trust domain: the shorthand (two domains need one bundle each, issue 9).
    "identity": {"trust_bundle": "ca/ca.pem", "trust_domains": ["example.org"]},
    "listen": "127.0.0.1:8080",
    "store": "memory://",
    "credentials": {
        "stripe": {"kind": "static", "secret": "env:FUZZ_STRIPE", "owner": "payments"},
        "github": {"kind": "static", "secret": "file:secrets/gh.token"},
        "payments": {"kind": "oauth2_client_credentials", "token_url": "https://auth.example.com/token",
                     "client_id": "billing", "client_secret": "env:FUZZ_STRIPE", "scopes": ["payments:read"]},
    },
    "rules": [
        {"name": "billing-to-stripe", "workloads": ["spiffe://example.org/ns/prod/sa/billing"],
         "to": {"host": "api.stripe.com", "methods": ["GET", "POST"], "paths": ["/v1/charges/*"]},
         "inject": {"credential": "stripe", "header": "Authorization", "format": "Bearer {secret}"}},
        {"name": "ci-to-github", "workloads": ["spiffe://example.org/ns/ci/**"],
         "to": {"host": ["*.github.example"], "port": [443, 8443]},
         "inject": {"credential": "github", "basic": {"username": "x-access-token"}}},
        {"name": "billing-to-payments", "workloads": ["spiffe://example.org/ns/prod/sa/billing"],
         "to": {"host": "payments.example.com"}, "inject": {"credential": "payments", "header": "Authorization",
                                                             "format": "Bearer {secret}"}},
        {"name": "anyone-to-weather", "workloads": ["spiffe://example.org/**"],
         "to": {"host": "api.weather.example"}, "action": "allow"},
    ],
    "default": "deny",
}

# Values an operator's typo, a template engine or an attacker could put on a line.
HOSTILE_VALUES = [
    "!!bool maybe", "!!bool yes", "!!int 0x", "!!int 12", "!!float nope", "!!null x", "!!str 8080",
    "!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!binary aGVsbG8=",
    "!!timestamp 2024-13-45", "!!timestamp 2024-01-01", "!!set {a, b}", "!!omap [a: 1]", "!!pairs [a: 1]",
    "!!merge x", "!!value x", "!local tag", "!<tag:example.com,2000:x> y", "!!seq x", "!!map x",
    "2024-01-01", "=", "~", "''", "[]", "{}", "[[]]", "-1", "0", "1e999", "-.inf", ".nan", "0o777",
    "999999999999999999999999", "!!int " + "9" * 5000, "true", "no", "null",
    '"\\0"', '"a\\nb"', '"\\u2028"', '"\\x7f"', "'\t'", "'spiffe://example.org/../x'", "'" + "x" * 20000 + "'",
    "[" * 1000 + "]" * 1000, "{a: " * 70 + "1" + "}" * 70, "*nowhere", "&a [*a]", "&b x", "@reserved",
    "`reserved", "%TAG", "[unclosed", "{a: 1, a: 2}", "<<: {a: 1}", "? complex", "|", ">-",
    "env:", "file:", "env:UNSET_FUZZ_VAR", "file:/nonexistent/fuzz", "'~nosuchuser_fuzz/x'", "file:~nosuchuser_fuzz/x", "memory://x", "redis://",
    "127.0.0.1:99999", "https://[::1/x", "https://h.example:99999/x", "'[::1]:8080'", "'*'", "'**'", "'/v1/**/x'", "GET", "'get'", "'Bearer {secret'",
]


@dataclass(frozen=True)
class Mutation:
    text: str
    line: int  # 1-based line that was changed
    path: str  # key path of the value on that line, as ConfigIssue renders it
    what: str

    def points_here(self, issue) -> bool:
        if issue.line == self.line:
            return True
        if issue.path and (_related(issue.path, self.path)):
            return True
        # A valid but different value can break what refers to it (rules naming a trust domain
        # that is no longer listed): such an issue names the changed key in its message.
        if self.path.split("[")[0] in issue.message or f"line {self.line}" in issue.message:
            return True
        # A document-level refusal (size, depth, YAML syntax) has no key path. The parser reports a
        # syntax error where it notices it, which can be a line or two after the change.
        return not issue.path and (issue.line is None or self.line <= issue.line <= self.line + 2)


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or a.startswith(b + "[") or b.startswith(a + ".") or b.startswith(a + "[")


def base_text() -> str:
    return yaml.safe_dump(BASE, sort_keys=False, default_flow_style=False, width=1000)


_LINE = re.compile(r"^(?P<indent>\s*(?:- )*)(?P<key>[^:\s'\"][^:]*?):(?P<rest>\s.*)?$|^(?P<lindent>\s*- )(?P<item>.+)$")


def mutations(rng: random.Random, text: str | None = None):
    """Endless stream of single-place mutations of ``text`` (the base document by default)."""
    text = text or base_text()
    src = yamlsource.load(text, file="fuzz.yaml")
    by_line: dict[int, tuple] = {}
    for path, line in src.lines.items():
        if path:
            by_line.setdefault(line, path)  # the outermost path that starts on this line
            if len(path) > len(by_line[line]):
                by_line[line] = path
    lines = text.splitlines(keepends=True)
    candidates = sorted(by_line)
    while True:
        lineno = rng.choice(candidates)
        path = by_line[lineno]
        original = lines[lineno - 1]
        m = _LINE.match(original.rstrip("\n"))
        if m is None:
            continue
        op = rng.random()
        new = original
        if m.group("key") is not None:
            indent, key, rest = m.group("indent"), m.group("key"), m.group("rest")
            if op < 0.6 or not rest:
                value = rng.choice(HOSTILE_VALUES)
                # For a key whose value is a block below, the block's lines then belong to nothing
                # and are refused too; the key's own line is still where the change is.
                new = f"{indent}{key}: {value}\n"
                what = f"value {value[:30]!r}"
            elif op < 0.8 and not _free_name(path):
                typo = _typo(rng, key)
                new = f"{indent}{typo}:{rest}\n"
                what = f"key {key!r} -> {typo!r}"
            else:
                new = f"{indent}{key}: {rng.choice(HOSTILE_VALUES)} {rng.choice(HOSTILE_VALUES)}\n"
                what = "two values"
        else:
            value = rng.choice(HOSTILE_VALUES)
            new = f"{m.group('lindent')}{value}\n"
            what = f"item {value[:30]!r}"
        if new == original:
            continue
        mutated = lines[: lineno - 1] + [new] + lines[lineno:]
        yield Mutation(text="".join(mutated), line=lineno, path=yamlsource.render_path(path), what=what)


def _free_name(path: tuple) -> bool:
    """Credential names are the operator's choice: renaming one is not an error at that key."""
    return len(path) == 2 and path[0] == "credentials"


def _typo(rng: random.Random, key: str) -> str:
    if len(key) > 2 and rng.random() < 0.5:
        i = rng.randrange(len(key) - 1)
        return key[:i] + key[i + 1] + key[i] + key[i + 2:]
    return key + rng.choice(["s", "_", "x"])


def prepare(directory: Path) -> None:
    """The files and environment the base document refers to."""
    import os

    write_ca(make_ca(), directory / "ca")
    (directory / "secrets").mkdir(exist_ok=True)
    (directory / "secrets" / "gh.token").write_text("ghs_fuzz_value\n")
    os.environ.setdefault("FUZZ_STRIPE", "sk_fuzz_value")


@dataclass
class Outcome:
    accepted: int = 0
    refused: int = 0
    escaped: list[str] | None = None  # "<what>: <exception type>" for anything other than ConfigError
    unexpected: list[str] | None = None  # issues that are the validator's safety net (a bug)
    misplaced: list[str] | None = None  # refusals none of whose issues point at the mutated place

    def __post_init__(self) -> None:
        self.escaped, self.unexpected, self.misplaced = [], [], []


def run(directory: Path, *, count: int, seed: int) -> Outcome:
    """Load ``count`` mutations of the base document from ``directory``; classify every outcome."""
    rng = random.Random(seed)
    out = Outcome()
    target = directory / "fuzz.yaml"
    for i, mutation in zip(range(count), mutations(rng), strict=False):
        target.write_text(mutation.text)
        try:
            load_config(target)
        except ConfigError as exc:
            out.refused += 1
            if any(UNEXPECTED in issue.message for issue in exc.issues):
                out.unexpected.append(f"#{i} {mutation.what} at {mutation.path}: {exc.issues}")
            elif not any(mutation.points_here(issue) for issue in exc.issues):
                out.misplaced.append(f"#{i} {mutation.what} at line {mutation.line} {mutation.path}: "
                                     + "; ".join(str(x) for x in exc.issues))
        except BaseException as exc:  # noqa: BLE001 - counting exactly these is the point
            out.escaped.append(f"#{i} {mutation.what} at {mutation.path}: {type(exc).__name__}: {exc}"[:300])
        else:
            out.accepted += 1
    return out
