"""docs/ARCHITECTURE.md stays true: every module it names exists, and the arrows it states hold."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from helpers.imports import PACKAGE, import_graph, reachable

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
REQUEST_PATH = ("identity", "policy", "matching", "inject", "sigv4")


def named_paths(text: str) -> set[str]:
    """Every file or folder the page names: `secretless_proxy/...` paths, and the module map's entries."""
    out = set(re.findall(r"secretless_proxy/[\w/]*\w(?:\.py)?/?", text))
    block = re.search(r"```\n(secretless_proxy/\n.*?)```", text, re.S)
    assert block, "the module map (a fenced block starting with secretless_proxy/) is missing"
    folder = ""
    for line in block.group(1).splitlines()[1:]:
        m = re.match(r"  (\w+)/\s", line)
        if m:
            folder = m.group(1) + "/"
        elif re.match(r"  \w+\.py", line):
            folder = ""
        names = re.findall(r"(?<![\w/])([\w]+(?:/[\w*]+)*\.(?:py|lua))", line)
        out.update(f"secretless_proxy/{folder}{n}" for n in names)
    return out


def exists(path: str) -> bool:
    if "*" in path:
        return any(ROOT.glob(path))
    return (ROOT / path).exists()


class TestArchitectureDoc:
    def test_every_module_it_names_exists(self) -> None:
        """Each path in docs/ARCHITECTURE.md (prose, table and module map) is a file or folder of the package."""
        paths = named_paths(DOC.read_text())
        assert len(paths) > 40  # the map names the modules, not a handful
        missing = sorted(p for p in paths if not exists(p))
        assert missing == []

    def test_every_module_of_the_package_is_on_the_map(self) -> None:
        """No module is left off the map: a newcomer finds each one there."""
        mapped = named_paths(DOC.read_text())
        modules = {str(p.relative_to(ROOT)) for p in (ROOT / PACKAGE).rglob("*.py")
                   if p.name != "__init__.py" and "__pycache__" not in p.parts}
        assert sorted(modules - mapped) == []

    def test_the_request_path_imports_no_mitmproxy_layer(self) -> None:
        """identity, policy, matching, inject and sigv4 import nothing under mitmproxy.proxy."""
        for name in REQUEST_PATH:
            tree = ast.parse((ROOT / PACKAGE / f"{name}.py").read_text())
            imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
            assert not {m for m in imported if m.startswith("mitmproxy.proxy")}, name

    def test_addon_and_server_sit_on_top(self) -> None:
        """Only server imports addon, and only cli imports server, in the package."""
        graph = import_graph()
        importers = {m for m, deps in graph.items() if f"{PACKAGE}.addon" in deps}
        assert importers <= {f"{PACKAGE}.server"}
        importers = {m for m, deps in graph.items() if f"{PACKAGE}.server" in deps}
        assert importers <= {f"{PACKAGE}.cli"}

    def test_dev_tools_are_off_the_request_path(self) -> None:
        """Nothing the addon reaches imports dev/ (the throw-away PKI and echo server)."""
        reached = reachable(import_graph(), f"{PACKAGE}.addon")
        assert not {m for m in reached if m.startswith(f"{PACKAGE}.dev")}
