"""A seeded fuzz of the config loader: 2,000 single-place mutations of a valid file, 0 tracebacks,
and every refusal points at the place that was changed. ``bench/fuzz_config.py`` runs more."""

from __future__ import annotations

import pytest
from helpers import config_mutations


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    config_mutations.prepare(directory)
    return directory


@pytest.mark.slow  # two thousand mutated configs
class TestConfigFuzz:
    def test_base_document_is_valid(self, fuzz_dir):
        """The document every mutation starts from loads cleanly (else every refusal would be noise)."""
        from secretless_proxy.config.parse import load_config

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


class TestFuzzFindings:
    """What the fuzz found, pinned: each escaped the loader as an exception before it was fixed."""

    @pytest.mark.parametrize("key, value, located", [
        ("trust_bundle", "'~nosuchuser_fuzz/ca.pem'", "identity.trust_bundle: cannot expand '~nosuchuser_fuzz/ca.pem'"),
        ("trust_bundle", "'" + "x" * 20000 + "'", "identity.trust_bundle: file "),
    ])
    def test_unreadable_paths_are_located_issues(self, fuzz_dir, key, value, located):
        """A '~user' that does not exist (RuntimeError) or a name too long for the OS (OSError) is an issue at its key."""
        from secretless_proxy.config.parse import load_config
        from secretless_proxy.errors import ConfigError

        text = config_mutations.base_text().replace("trust_bundle: ca/ca.pem", f"{key}: {value}")
        (fuzz_dir / "found.yaml").write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(fuzz_dir / "found.yaml")
        assert any(str(i).startswith(f"found.yaml:3 {located}") for i in err.value.issues), err.value.issues

    def test_unknown_user_in_secret_file_and_audit_sink(self, fuzz_dir):
        """`file:~nobody/...` in a secret reference or an audit sink is refused at its key, not raised."""
        from secretless_proxy.config.parse import load_config
        from secretless_proxy.errors import ConfigError

        text = config_mutations.base_text().replace("file:secrets/gh.token", "file:~nosuchuser_fuzz/gh.token")
        text += "audit:\n  sinks:\n  - file:~nosuchuser_fuzz/audit.log\n"
        (fuzz_dir / "found.yaml").write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(fuzz_dir / "found.yaml")
        found = [str(i) for i in err.value.issues]
        assert any("credentials.github.secret" in i and "~nosuchuser_fuzz" in i for i in found), found
        assert any("audit.sinks[0]: cannot expand" in i for i in found), found

    @pytest.mark.parametrize("url", ["redis:// [unclosed", "https://[::1/token", "https://auth.example.com:99999/token"])
    def test_unparseable_token_url_is_a_located_issue(self, fuzz_dir, url):
        """A URL that urlsplit() rejects (unbalanced '[', bad port) is an issue at its key, not a ValueError."""
        from secretless_proxy.config.parse import load_config
        from secretless_proxy.errors import ConfigError

        text = config_mutations.base_text().replace("token_url: https://auth.example.com/token", f"token_url: {url}")
        (fuzz_dir / "found.yaml").write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(fuzz_dir / "found.yaml")
        line = 1 + text.splitlines().index(f"    token_url: {url}")
        assert (f"found.yaml:{line} credentials.payments.token_url: must be an absolute https:// URL, got {url!r}"
                in [str(i) for i in err.value.issues])


@pytest.mark.slow  # runs the CLI in a subprocess (an interpreter start and mitmproxy's imports each)
class TestWhatIsAtThePath:
    """Found by a hostile review: files were read whole, and blocking, before any check."""

    def _check(self, path):
        import subprocess
        import sys
        from pathlib import Path

        cli = Path(sys.executable).with_name("secretless-proxy")
        return subprocess.run([str(cli), "check", str(path)], capture_output=True, text=True, timeout=60)

    def test_fifo_config_is_refused_not_waited_on(self, tmp_path):
        """`check` on a FIFO answers at once that it is not a regular file (it used to hang forever)."""
        import os

        os.mkfifo(tmp_path / "config.yaml")
        out = self._check(tmp_path / "config.yaml")
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert "config.yaml is not a regular file (a FIFO)" in out.stderr

    def test_dev_zero_config_is_refused(self, tmp_path):
        """A symlink to /dev/zero is refused without reading it (it used to end in MemoryError)."""
        (tmp_path / "config.yaml").symlink_to("/dev/zero")
        out = self._check(tmp_path / "config.yaml")
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert "is not a regular file (a character device)" in out.stderr

    def test_huge_sparse_files_are_refused_unread(self, fuzz_dir, tmp_path):
        """A 3 GB sparse config or trust bundle is refused by its size, never read into memory."""
        from secretless_proxy.config.parse import load_config
        from secretless_proxy.errors import ConfigError

        big = tmp_path / "big.yaml"
        with open(big, "wb") as fh:
            fh.truncate(3 * 1024 ** 3)
        with pytest.raises(ConfigError, match=r"big\.yaml is larger than 1 MiB \(3072 MiB\)"):
            load_config(big)
        bundle = tmp_path / "bundle.pem"
        with open(bundle, "wb") as fh:
            fh.truncate(3 * 1024 ** 3)
        text = config_mutations.base_text().replace("trust_bundle: ca/ca.pem", f"trust_bundle: {bundle}")
        (fuzz_dir / "found.yaml").write_text(text)
        with pytest.raises(ConfigError, match=r"identity\.trust_bundle: .*bundle\.pem is larger than 16 MiB"):
            load_config(fuzz_dir / "found.yaml")

    def test_fifo_secret_file_is_a_located_issue(self, fuzz_dir):
        """A `file:` secret that is a FIFO is an issue at its key (it used to block the loader)."""
        import os

        from secretless_proxy.config.parse import load_config
        from secretless_proxy.errors import ConfigError

        fifo = fuzz_dir / "secrets" / "fifo.token"
        if not fifo.exists():
            os.mkfifo(fifo)
        text = config_mutations.base_text().replace("file:secrets/gh.token", "file:secrets/fifo.token")
        (fuzz_dir / "found.yaml").write_text(text)
        with pytest.raises(ConfigError, match=r"credentials\.github\.secret: .*fifo\.token is not a regular file \(a FIFO\)"):
            load_config(fuzz_dir / "found.yaml")
