"""A seeded fuzz of the config loader: 2,000 single-place mutations of a valid file, 0 tracebacks,
and every refusal points at the place that was changed. ``bench/fuzz_config.py`` runs more."""

from __future__ import annotations

import config_mutations
import pytest


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    config_mutations.prepare(directory)
    return directory


class TestConfigFuzz:
    def test_base_document_is_valid(self, fuzz_dir):
        """The document every mutation starts from loads cleanly (else every refusal would be noise)."""
        from secretless_proxy.config import load_config

        (fuzz_dir / "base.yaml").write_text(config_mutations.base_text())
        assert len(load_config(fuzz_dir / "base.yaml").rules) == 4

    def test_two_thousand_mutations(self, fuzz_dir):
        """2,000 seeded mutations: nothing but ConfigError escapes, and each refusal is located at the change."""
        out = config_mutations.run(fuzz_dir, count=2000, seed=20261203)
        assert out.escaped == []
        assert out.unexpected == []
        assert out.misplaced == []
        assert out.accepted + out.refused == 2000
        assert out.refused > 1500  # the mutations are hostile: most must be refused, not waved through
