"""The command line's surface (secretless_proxy/cli.py, admin/client.py): every argument explained,
``--config`` spelled alike wherever a config is read, ``--version`` from the installed metadata."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from secretless_proxy.cli import build_parser, main
from secretless_proxy.dev.certs import make_ca, write_ca

CLI = Path(sys.executable).with_name("secretless-proxy")
# Old spellings kept working for operators' scripts, hidden from --help: (subcommand path, dest).
DEPRECATED = {(("check",), "config")}
# What each config-taking subcommand needs besides --config to parse at all.
OTHER_REQUIRED = {("run",): [], ("check",): [], ("explain",): ["--workload", "spiffe://example.org/a", "https://a.example/"]}


def subcommands(parser: argparse.ArgumentParser,
                path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser in the tree, with the words that reach it; argparse has no public walk, hence ``_actions``."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subcommands(sub, (*path, name))


def arguments(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            yield action


def valid_config(tmp_path: Path) -> Path:
    write_ca(make_ca(), tmp_path / "ca")
    path = tmp_path / "c.yaml"
    path.write_text("version: 1\nidentity: {trust_bundle: ca/ca.pem, trust_domains: [example.org]}\n"
                    "rules:\n  - {name: weather, workloads: ['spiffe://example.org/*'], to: {host: api.weather.example}, "
                    "action: allow}\n")
    return path


class TestHelp:
    def test_every_argument_of_every_subcommand_has_help(self) -> None:
        """No argument shows up in --help without a sentence; only the deprecated aliases are hidden."""
        missing, hidden = [], set()
        for path, parser in subcommands(build_parser()):
            for action in arguments(parser):
                if action.help is argparse.SUPPRESS:
                    hidden.add((path, action.dest))
                elif not action.help:
                    missing.append(f"{' '.join(path) or '(top)'} {'/'.join(action.option_strings) or action.dest}")
        assert missing == []
        assert hidden == DEPRECATED

    def test_every_subcommand_has_help(self) -> None:
        """Each subcommand is described in its parent's listing."""
        for path, parser in subcommands(build_parser()):
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    described = {c.dest: c.help for c in action._choices_actions}
                    assert set(described) == set(action.choices), path
                    assert all(described.values()), (path, described)

    def test_the_walk_reaches_every_subcommand(self) -> None:
        """The tree the tests above walk is the whole CLI, nested `certs` commands and admin commands included."""
        paths = {" ".join(p) for p, _ in subcommands(build_parser())}
        assert {"run", "check", "explain", "certs init", "certs issue", "echo-server", "grant", "grants", "revoke",
                "inventory"} <= paths


class TestConfigSpelling:
    def test_config_is_spelled_alike_everywhere(self) -> None:
        """Wherever an argument names a config, it is `--config` (no `-c`, `--config-file`, `--conf`)."""
        for path, parser in subcommands(build_parser()):
            for action in arguments(parser):
                for option in action.option_strings:
                    assert "conf" not in option or option == "--config", (path, option)
                if action.dest == "config" and (path, "config") not in DEPRECATED:
                    assert action.option_strings == ["--config"], path

    def test_the_subcommands_that_read_a_config(self) -> None:
        """`run`, `check` and `explain` read a config; no other subcommand has a config argument."""
        taking = {path for path, parser in subcommands(build_parser())
                  if any(a.dest == "config" for a in arguments(parser))}
        assert taking == set(OTHER_REQUIRED)

    @pytest.mark.parametrize("path", sorted(OTHER_REQUIRED))
    def test_every_config_taking_subcommand_accepts_config(self, path: tuple[str, ...]) -> None:
        """`--config FILE` parses on each of them, into the same attribute."""
        args = build_parser().parse_args([*path, "--config", "x.yaml", *OTHER_REQUIRED[path]])
        assert args.config == "x.yaml"

    @pytest.mark.parametrize("path", sorted(OTHER_REQUIRED))
    def test_config_is_required(self, path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
        """Without a config the subcommand exits 2 and names `--config`."""
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([*path, *OTHER_REQUIRED[path]])
        assert exited.value.code == 2
        assert "--config" in capsys.readouterr().err

    def test_check_with_config(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """`check --config FILE` validates the file and says nothing of deprecation."""
        path = valid_config(tmp_path)
        assert main(["check", "--config", str(path)]) == 0
        out = capsys.readouterr()
        assert out.out == f"{path}: OK (1 rules, 0 credentials)\n"
        assert out.err == ""


class TestDeprecatedCheckFile:
    def test_positional_file_still_works(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """`check FILE` (the old spelling) validates the same way, with the same output, stderr as empty as before."""
        path = valid_config(tmp_path)
        assert main(["check", str(path)]) == 0
        out = capsys.readouterr()
        assert out.out == f"{path}: OK (1 rules, 0 credentials)\n"
        assert out.err == ""

    def test_positional_file_still_fails_an_invalid_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The old spelling keeps its exit code 1 for an invalid file."""
        path = tmp_path / "c.yaml"
        path.write_text("version: 2\n")
        assert main(["check", str(path)]) == 1
        assert f"{path}: " in capsys.readouterr().err

    def test_both_spellings_at_once_are_refused(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A file given both ways is ambiguous: exit 2, naming both."""
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(["check", "--config", "a.yaml", "b.yaml"])
        assert exited.value.code == 2
        assert "not allowed with argument --config" in capsys.readouterr().err

    def test_positional_is_hidden_from_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`check --help` shows only `--config FILE`."""
        with pytest.raises(SystemExit):
            build_parser().parse_args(["check", "--help"])
        help_text = capsys.readouterr().out
        assert "usage: secretless-proxy check [-h] --config FILE\n" in help_text
        assert "positional arguments" not in help_text


class TestVersion:
    def test_version_prints_the_installed_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`--version` prints the version pip installed (package metadata) and exits 0."""
        with pytest.raises(SystemExit) as exited:
            main(["--version"])
        assert exited.value.code in (0, None)
        assert capsys.readouterr().out == f"secretless-proxy {version('secretless-proxy')}\n"

    def test_installed_command_prints_it(self) -> None:
        """The console script answers `--version` without a subcommand, on stdout."""
        out = subprocess.run([str(CLI), "--version"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout == f"secretless-proxy {version('secretless-proxy')}\n"
        assert version("secretless-proxy")[0].isdigit()
