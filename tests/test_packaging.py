"""The package's own metadata (pyproject.toml) says what current packaging tools read without a warning."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

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
