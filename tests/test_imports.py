"""The arrows between secretless_proxy's modules: one way only (issue 11, item 1).

The graph is built with ``ast`` from every ``import`` statement in every module: at module level,
inside functions and under ``if TYPE_CHECKING:``. A function-level import is an arrow too: it only
postpones the cycle to the first call, and hiding arrows inside functions is how the cycle through
``config`` used to pass unnoticed. ``from pkg import name`` counts as an arrow to ``pkg.name`` when
that is a module, else to ``pkg``; importing ``a.b.c`` also runs the ``__init__`` of ``a.b``, so it
counts as an arrow to that package too (except to the importer's own packages, which Python has
already started before the importer runs).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = "secretless_proxy"
ROOT = Path(__file__).resolve().parent.parent


def modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package) for every module under ``root/PACKAGE``."""
    out = {}
    for file in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(file.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (file, is_pkg)
    return out


def _packages_of(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports, counting every import statement anywhere in it."""
    mods = modules(root)
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, (file, is_pkg) in mods.items():
        here = name if is_pkg else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                for dep in {target} | _packages_of(target):
                    if dep in mods and dep != name and dep not in _packages_of(name):
                        graph[name].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def _is_under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


PROVIDERS_AND_STORE = (f"{PACKAGE}.credentials", f"{PACKAGE}.store", f"{PACKAGE}.sharedcache")


class TestImportGraph:
    def test_no_cycle_among_the_package_modules(self) -> None:
        """No module reaches itself through imports, function-level and TYPE_CHECKING ones included."""
        graph = import_graph()
        assert len(graph) > 60  # the walk found the package, not an empty directory
        assert cycles(graph) == []

    def test_the_config_model_reaches_no_provider_and_no_store(self) -> None:
        """config.py imports, even lazily, nothing under credentials/ or store/ (they import it)."""
        reached = reachable(import_graph(), f"{PACKAGE}.config")
        assert not {m for m in reached if _is_under(m, *PROVIDERS_AND_STORE)}
        assert f"{PACKAGE}.configparse" not in reached

    def test_the_store_knows_no_credential(self) -> None:
        """store/ imports no credential module: it keeps opaque records, the broker encodes them."""
        graph = import_graph()
        store = [m for m in graph if _is_under(m, f"{PACKAGE}.store")]
        assert len(store) >= 6
        leaks = {(m, d) for m in store for d in graph[m]
                 if _is_under(d, f"{PACKAGE}.credentials", f"{PACKAGE}.sharedcache", f"{PACKAGE}.broker")}
        assert leaks == set()

    def test_a_cycle_through_a_function_level_import_is_found(self, tmp_path: Path) -> None:
        """The checker itself: a cycle hidden in a function (the old config → store one) is reported."""
        pkg = tmp_path / PACKAGE
        (pkg / "store").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "config.py").write_text("def parse():\n    from .store import parse_section\n")
        (pkg / "store" / "__init__.py").write_text("from .base import Store\n")
        (pkg / "store" / "base.py").write_text("from typing import TYPE_CHECKING\n"
                                               "if TYPE_CHECKING:\n    from ..config import Config\n")
        (pkg / "leaf.py").write_text("from . import config\n")
        graph = import_graph(tmp_path)
        assert graph[f"{PACKAGE}.store.base"] == {f"{PACKAGE}.config"}
        assert cycles(graph) == [[f"{PACKAGE}.config", f"{PACKAGE}.store", f"{PACKAGE}.store.base"]]


class TestConfigModelImport:
    def test_importing_config_loads_no_provider_store_or_proxy_library(self) -> None:
        """`import secretless_proxy.config` in a fresh interpreter loads no provider, store or mitmproxy module."""
        code = ("import json, sys; import secretless_proxy.config; "
                "print(json.dumps(sorted(sys.modules)))")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=60)
        loaded = json.loads(out.stdout)
        assert f"{PACKAGE}.config" in loaded
        ours = [m for m in loaded if _is_under(m, *PROVIDERS_AND_STORE, f"{PACKAGE}.configparse")]
        assert ours == []
        libraries = [m for m in loaded if _is_under(m, "httpx", "jwt", "botocore", "redis", "mitmproxy")]
        assert libraries == []
