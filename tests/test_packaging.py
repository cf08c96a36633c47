"""The package as packaging tools and Python see it: metadata current tools read without a warning,
module names that shadow nothing."""

from __future__ import annotations

import pkgutil
import re
import sys
import tomllib
from pathlib import Path

import secretless_proxy

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


class TestLicense:
    def test_license_is_an_spdx_expression(self) -> None:
        """`project.license` is an SPDX string (PEP 639), not the deprecated `{text = ...}` table."""
        project = tomllib.loads(PYPROJECT.read_text())["project"]
        assert project["license"] == "Apache-2.0"

    def test_build_backend_reads_spdx(self) -> None:
        """The build requires a setuptools that understands an SPDX `license` (77 or later)."""
        requires = tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]
        setuptools = [r for r in requires if r.startswith("setuptools")]
        match = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools[0]) if setuptools else None
        assert match is not None and int(match.group(1)) >= 77, requires


class TestModuleNames:
    def test_no_module_shadows_the_standard_library(self) -> None:
        """No module of ours is named like a stdlib one (`secrets.py` was): a script run from inside the
        package, or a reader of `import secrets` beside it, must get the standard library's."""
        ours = {m.name.rpartition(".")[2] for m in pkgutil.walk_packages(secretless_proxy.__path__, "secretless_proxy.")}
        assert "secretrefs" in ours  # the walk sees the package
        assert sorted(ours & sys.stdlib_module_names) == []
