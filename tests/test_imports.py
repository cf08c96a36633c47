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

import json
import subprocess
import sys
from pathlib import Path

from helpers.imports import PACKAGE, ROOT, cycles, import_graph, is_under, reachable

PROVIDERS_AND_STORE = (f"{PACKAGE}.credentials", f"{PACKAGE}.store", f"{PACKAGE}.sharedcache")


class TestImportGraph:
    def test_no_cycle_among_the_package_modules(self) -> None:
        """No module reaches itself through imports, function-level and TYPE_CHECKING ones included."""
        graph = import_graph()
        assert len(graph) > 60  # the walk found the package, not an empty directory
        assert cycles(graph) == []

    def test_the_config_model_reaches_no_provider_and_no_store(self) -> None:
        """config/model.py imports, even lazily, nothing under credentials/ or store/ (they import it)."""
        reached = reachable(import_graph(), f"{PACKAGE}.config.model")
        assert not {m for m in reached if is_under(m, *PROVIDERS_AND_STORE)}
        assert f"{PACKAGE}.config.parse" not in reached

    def test_the_store_knows_no_credential(self) -> None:
        """store/ imports no credential module: it keeps opaque records, the broker encodes them."""
        graph = import_graph()
        store = [m for m in graph if is_under(m, f"{PACKAGE}.store")]
        assert len(store) >= 6
        leaks = {(m, d) for m in store for d in graph[m]
                 if is_under(d, f"{PACKAGE}.credentials", f"{PACKAGE}.sharedcache", f"{PACKAGE}.broker")}
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
        """`import secretless_proxy.config.model` in a fresh interpreter loads no provider, store or mitmproxy module."""
        code = ("import json, sys; import secretless_proxy.config.model; "
                "print(json.dumps(sorted(sys.modules)))")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=60)
        loaded = json.loads(out.stdout)
        assert f"{PACKAGE}.config.model" in loaded
        ours = [m for m in loaded if is_under(m, *PROVIDERS_AND_STORE, f"{PACKAGE}.config.parse")]
        assert ours == []
        libraries = [m for m in loaded if is_under(m, "httpx", "jwt", "botocore", "redis", "mitmproxy")]
        assert libraries == []
