"""One vocabulary and one tree: reasons.Reason against the docs and the code, errors.py against the classes."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import re
from pathlib import Path

import pytest

import secretless_proxy
from secretless_proxy import reasons
from secretless_proxy.errors import CredentialError, IdentityError, SecretlessError
from secretless_proxy.metrics import DENY_REASONS, ERROR_REASONS, IDENTITY_REASONS, decision_for
from secretless_proxy.reasons import Reason
from secretless_proxy.refusal import Refusal, error_response

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "secretless_proxy"
BACKTICKED = re.compile(r"`([^`]+)`")
SNAKE = re.compile(r"[a-z]+(?:_[a-z]+)+")

# Constructors that take a refusal reason, and the position of that argument.
REASON_ARG = {"Refusal": 1, "_Refusal": 1, "refusal_layer": 1, "IdentityError": 0, "CredentialError": 0, "Deny": 0}

# Exceptions not (yet) under SecretlessError, each with the reason it may stay outside.
OUTSIDE_THE_TREE: dict[str, str] = {}


def error_contract() -> tuple[str, str]:
    """README's error contract: the proxy port's table, then the admin API's."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Error contract\n", 1)[1].split("\n## ", 1)[0]
    proxy, admin = section.split("The admin API (`admin.api_listen`)", 1)
    return proxy, admin


def documented(text: str) -> set[str]:
    return set(BACKTICKED.findall(text))


def metrics_row(name: str) -> str:
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        if line.startswith(f"| `{name}` |"):
            return line.split("|")[4]  # the meaning column
    raise AssertionError(f"docs/metrics.md has no row for {name}")


class TestVocabulary:
    def test_a_reason_is_its_string(self) -> None:
        """A member serialises, formats and compares as its value, so bodies and labels are unchanged."""
        assert json.dumps({"reason": Reason.NO_RULE}) == '{"reason": "no_rule"}'
        assert f"{Reason.STORE_UNAVAILABLE}" == str(Reason.STORE_UNAVAILABLE) == "store_unavailable"
        assert all(SNAKE.fullmatch(r) or r.isalpha() for r in Reason)

    def test_groups_partition_the_vocabulary(self) -> None:
        """Every reason is the proxy port's or the admin API's; identity and failure reasons are the proxy's."""
        assert set(Reason) == reasons.PROXY | reasons.ADMIN_API and not reasons.PROXY & reasons.ADMIN_API
        assert reasons.IDENTITY <= reasons.PROXY and reasons.PROXY_FAILURES <= reasons.PROXY
        assert {r.value for r in reasons.IDENTITY} == {r for r in Reason if r.startswith("identity_")}

    def test_metrics_sets_derive_from_it(self) -> None:
        """The closed label sets are the vocabulary's groups; anything else is counted as other."""
        assert DENY_REASONS == reasons.PROXY and ERROR_REASONS == reasons.PROXY_FAILURES
        assert IDENTITY_REASONS == reasons.IDENTITY
        assert {decision_for(r) for r in reasons.PROXY_FAILURES} == {"error"}
        assert {decision_for(r) for r in reasons.PROXY - reasons.PROXY_FAILURES} == {"denied"}

    def test_metrics_doc_lists_every_denied_series(self) -> None:
        """docs/metrics.md names exactly the reasons secretless_denied_total exports, and other."""
        names = documented(metrics_row("secretless_denied_total")) - {"reason"}  # "the `reason` in the client's JSON"
        assert names == {r.value for r in reasons.PROXY} | {"other"}

    def test_readme_gives_every_proxy_reason_a_status(self) -> None:
        """README's error-contract table names every reason a proxy-port refusal carries, and no other."""
        proxy, _ = error_contract()
        names = documented(proxy)
        assert not reasons.PROXY - names, "missing from README's error contract"
        assert not {n for n in names if SNAKE.fullmatch(n)} - set(Reason), "README names a reason the code lacks"

    def test_readme_gives_every_admin_reason_a_status(self) -> None:
        """README's admin API table names every reason only the admin API gives, and no unknown one."""
        _, admin = error_contract()
        names = documented(admin)
        assert not reasons.ADMIN_API - names, "missing from README's admin API table"
        assert not {n for n in names if SNAKE.fullmatch(n)} - set(Reason), "README names a reason the code lacks"


class TestRefusal:
    def test_str_reason_becomes_the_member(self) -> None:
        """A plain string is accepted (StrEnum is a str) and stored as the Reason member."""
        assert Refusal(403, "no_rule", "no").reason is Reason.NO_RULE
        assert IdentityError("identity_missing", "no cert").reason is Reason.IDENTITY_MISSING
        assert CredentialError(Reason.CREDENTIAL_UNAVAILABLE, "down").reason is Reason.CREDENTIAL_UNAVAILABLE

    @pytest.mark.parametrize("make", [lambda r: Refusal(403, r, "no"), lambda r: IdentityError(r, "no"),
                                      lambda r: CredentialError(r, "no")])
    def test_unknown_reason_is_refused(self, make) -> None:
        """A reason outside the vocabulary is a bug caught where it is made."""
        with pytest.raises(ValueError, match="'no_such_reason' is not a valid Reason"):
            make("no_such_reason")

    def test_error_response_body_is_unchanged(self) -> None:
        """The client's JSON body is byte for byte what it was with plain strings."""
        body = error_response("rid", Refusal(503, Reason.STORE_UNAVAILABLE, "down", "r")).content
        assert body == b'{"error": "down", "reason": "store_unavailable", "rule": "r", "request_id": "rid"}'


def sources() -> list[tuple[str, ast.Module]]:
    return [(str(p.relative_to(ROOT)), ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def callee(node: ast.Call) -> str | None:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


class TestEmittedReasons:
    def test_refusals_name_their_reason_by_member(self) -> None:
        """No refusal, identity or credential error spells its reason as a string literal."""
        literal, unknown = [], []
        for where, tree in sources():
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call) or (name := callee(node)) not in REASON_ARG:
                    continue
                pos = REASON_ARG[name]
                arg = node.args[pos] if len(node.args) > pos else next(
                    (k.value for k in node.keywords if k.arg == "reason"), None)
                if isinstance(arg, ast.Constant):
                    literal.append(f"{where}:{node.lineno} {name}({arg.value!r})")
                elif (isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name) and arg.value.id == "Reason"
                      and arg.attr not in Reason.__members__):
                    unknown.append(f"{where}:{node.lineno} Reason.{arg.attr}")
        assert not literal, f"use a Reason member: {literal}"
        assert not unknown

    def test_reasons_are_spelled_once(self) -> None:
        """No module but reasons.py binds a name to a reason's string (a second definition)."""
        values = {r.value for r in Reason}
        found = []
        for where, tree in sources():
            if where.endswith("reasons.py"):
                continue
            for node in ast.walk(tree):
                value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
                if isinstance(value, ast.Constant) and value.value in values:
                    found.append(f"{where}:{node.lineno} {value.value!r}")
        assert not found


def package_exceptions() -> dict[str, type[BaseException]]:
    found = {}
    for info in pkgutil.walk_packages(secretless_proxy.__path__, "secretless_proxy."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = obj
    return found


# "    │   └── ProviderError        credentials.base: ...": depth from the indent, module before the colon.
TREE_LINE = re.compile(r"    (?P<indent>(?:│   |    )*)(?P<branch>[├└]── )?(?P<name>\w+)(?: \((?P<also>\w+)\))? +"
                       r"(?P<module>[a-z_.]+): ")


def drawn_tree() -> dict[str, tuple[str | None, str | None]]:
    """errors.py's tree: qualified class name → (qualified parent, builtin it also subclasses)."""
    import secretless_proxy.errors as errors

    assert errors.__doc__
    tree: dict[str, tuple[str | None, str | None]] = {}
    stack: list[str] = []
    for line in errors.__doc__.splitlines():
        if not (m := TREE_LINE.match(line)):
            continue
        depth = len(m["indent"]) // 4 + (1 if m["branch"] else 0)
        qualified = f"secretless_proxy.{m['module']}.{m['name']}"
        del stack[depth:]
        assert len(stack) == depth, f"errors.py's tree skips a level at {line.strip()!r}"
        tree[qualified] = (stack[-1] if stack else None, m["also"])
        stack.append(qualified)
    return tree


class TestExceptionTree:
    def test_tree_parses(self) -> None:
        """The drawing has one root, SecretlessError, and names a parent for everything else."""
        tree = drawn_tree()
        assert [k for k, (parent, _) in tree.items() if parent is None] == ["secretless_proxy.errors.SecretlessError"]
        assert tree["secretless_proxy.breaker.Backoff"][0] == "secretless_proxy.credentials.base.ProviderError"

    def test_every_exception_is_in_the_tree(self) -> None:
        """Every exception class the package defines is a SecretlessError drawn under its real base."""
        tree, classes = drawn_tree(), package_exceptions()
        for qualified, cls in classes.items():
            if qualified in OUTSIDE_THE_TREE:
                continue
            assert issubclass(cls, SecretlessError), f"{qualified} is not a SecretlessError"
            assert qualified in tree, f"{qualified} is not drawn in errors.py's tree"
            parent, also = tree[qualified]
            bases = {f"{b.__module__}.{b.__qualname__}" for b in cls.__bases__}
            if parent is None:  # the root
                assert cls.__bases__ == (Exception,)
                continue
            assert parent in bases, f"{qualified} is drawn under {parent}, but its bases are {bases}"
            builtins = {b.__name__ for b in cls.__bases__ if b.__module__ == "builtins"}
            assert builtins == ({also} if also else set()), f"{qualified}: builtin bases {builtins}, drawn {also}"

    def test_the_tree_draws_nothing_that_is_gone(self) -> None:
        """Every class in the drawing, and every exception allowed outside it, still exists."""
        classes = package_exceptions()
        assert not set(drawn_tree()) - set(classes)
        assert not set(OUTSIDE_THE_TREE) - set(classes), "remove it from OUTSIDE_THE_TREE"
