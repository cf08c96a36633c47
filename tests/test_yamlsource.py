"""Hostile YAML never crashes anything: bounded size and depth, only the core schema's types,
and every refusal located by file, line and key path (issue: hostile configuration)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from secretless_proxy.config import yamlsource
from secretless_proxy.errors import ConfigError

CLI = Path(sys.executable).with_name("secretless-proxy")


def issues(text: str) -> list[str]:
    """The issues of one document as strings, whether raised at once or collected."""
    try:
        return [str(i) for i in yamlsource.load(text, file="t.yaml").issues]
    except ConfigError as exc:
        return [str(i) for i in exc.issues]


def nested(depth: int) -> str:
    return "a: " + "[" * depth + "]" * depth + "\n"


class TestBounds:
    def test_thousand_levels_refused_with_line(self):
        """A 2 KB file nested 1,000 levels deep is refused with its line, not a RecursionError."""
        text = "version: 1\n" + nested(1000)
        assert len(text) < 2100
        assert issues(text) == ["t.yaml:2: the document is nested more than 64 levels deep; refusing to read it"]

    def test_block_nesting_refused(self):
        """Block-style nesting counts the same as flow-style nesting."""
        text = "".join("  " * i + f"k{i}:\n" for i in range(80)) + "  " * 80 + "leaf: 1\n"
        assert issues(text) == ["t.yaml:65: the document is nested more than 64 levels deep; refusing to read it"]

    def test_depth_at_limit_accepted(self):
        """64 levels, the limit, still load."""
        src = yamlsource.load(nested(63), file="t.yaml")
        assert src.issues == []

    def test_aliases_cannot_nest_past_the_limit(self):
        """Anchors used inside anchors cannot build a document deeper than the limit."""
        lines = ["a0: &a0 " + "[" * 30 + "]" * 30]
        for i in range(1, 4):
            lines.append(f"a{i}: &a{i} " + "[" * 30 + f"*a{i - 1}" + "]" * 30)
        assert issues("\n".join(lines) + "\n") == [
            "t.yaml:3 a2: YAML aliases nest this value more than 64 levels deep; write it out"]

    def test_oversized_file_refused(self):
        """A file over 1 MiB is refused before it is parsed."""
        assert issues("a: '" + "x" * (1024 * 1024) + "'\n") == [
            "t.yaml: the file is larger than 1024 KiB; refusing to read it"]

    def test_syntax_error_names_where_the_construct_starts(self):
        """An unclosed flow list is reported where the parser notices it, with the line it starts on."""
        found = issues("a:\n  b: [unclosed\n  c: 1\n  d: 2\n")
        assert len(found) == 1 and found[0].startswith("t.yaml:3: invalid YAML:")
        assert "that starts on line 2" in found[0]


class TestAmplification:
    def test_aliased_huge_keys_give_bounded_output(self):
        """2,000 aliases of one 100 KB key: a few short issues, not 400 MB of duplicate-key errors."""
        text = "\n".join(["version: 1", "junk: &a " + "x" * 100_000, "zz:"] + [f"  *a : {i}" for i in range(2000)])
        src = yamlsource.load(text + "\n", file="t.yaml")
        with pytest.raises(ConfigError) as err:
            src.raise_if_issues()
        found = [str(i) for i in err.value.issues]
        assert len(found) == 201 and sum(len(i) for i in found) < 50_000
        assert found[0] == "t.yaml: 1800 more issue(s) not shown; fix the ones above first"
        assert found[1].startswith("t.yaml:2 zz: a key of 100000 characters (at most 256): 'xxxx")

    def test_long_values_are_cut_in_messages(self):
        """An issue quoting a 100 KB value is cut to a readable length."""
        src = yamlsource.load("n: 1\n", file="t.yaml")
        src.error(("n",), "must be short, got " + "y" * 100_000)
        assert len(str(src.issues[0])) < 700 and str(src.issues[0]).endswith("... (cut)")


class TestTags:
    @pytest.mark.parametrize("value, tag", [
        ("!!binary aGVsbG8=", "!!binary"),
        ("!!timestamp 2024-01-01", "!!timestamp"),
        ("!!timestamp 2024-13-45", "!!timestamp"),
        ("!!set {a, b}", "!!set"),
        ("!!omap [a: 1]", "!!omap"),
        ("!!pairs [a: 1]", "!!pairs"),
        ("!!python/object/apply:os.system ['true']", "!!python/object/apply:os.system"),
        ("!!python/name:os.system ''", "!!python/name:os.system"),
        ("!local x", "!local"),
        ("!<tag:example.com,2000:x> y", "tag:example.com,2000:x"),
        ("!!seq x", "!!seq"),
        ("!!map x", "!!map"),
        ("!!value x", "!!value"),
    ])
    def test_tag_outside_core_schema_refused_at_its_key(self, value, tag):
        """Every tag outside the YAML 1.2 core types is an issue at its line and key path."""
        found = issues(f"top:\n  ok: 1\n  bad: {value}\n")
        assert len(found) == 1, found
        assert found[0].startswith("t.yaml:3 top.bad: unsupported YAML tag ")
        assert f"'{tag}'" in found[0]

    @pytest.mark.parametrize("value, tag", [
        ("!!bool maybe", "!!bool"), ("!!int 0x", "!!int"), ("!!float nope", "!!float"),
        ("!!int " + "9" * 5000, "!!int"),
    ])
    def test_core_tag_on_wrong_value_refused(self, value, tag):
        """A core tag on a value it cannot hold is an issue, not a KeyError or ValueError."""
        found = issues(f"list:\n- fine\n- {value}\n")
        assert len(found) == 1, found
        assert found[0].startswith("t.yaml:3 list[1]: ") and f"is not a valid {tag}" in found[0]

    def test_tag_on_a_key_refused(self):
        """A tagged mapping key is refused where it is, and the rest of the mapping still loads."""
        src = yamlsource.load("m:\n  ? !!binary aGk=\n  : 1\n  b: 2\n", file="t.yaml")
        assert [str(i) for i in src.issues] == [
            "t.yaml:2 m: mapping keys must be plain strings, got 'aGk=' (!!binary); quote it if it is a name"]
        assert src.data == {"m": {"b": 2}}

    @pytest.mark.parametrize("text, value", [
        ("port: 0443", 443), ("port: 7:23", "7:23"), ("private: yes", "yes"), ("private: on", "on"),
        ("n: 1_000", "1_000"), ("x: 0o17", 15), ("x: 0x1F", 31), ("b: TRUE", True), ("b: Yes", "Yes"),
    ])
    def test_plain_scalars_mean_what_yaml_1_2_says(self, text, value):
        """Plain scalars resolve by the YAML 1.2 core schema: no 1.1 octal, base 60 or yes/on booleans."""
        src = yamlsource.load(text + "\n", file="t.yaml")
        assert src.issues == [] and list(src.data.values()) == [value]
        assert type(list(src.data.values())[0]) is type(value)

    @pytest.mark.parametrize("key, tag", [("~", "!!null"), ("null", "!!null"), ("1", "!!int"), ("true", "!!bool"),
                                          ("1.5", "!!float")])
    def test_non_string_keys_refused(self, key, tag):
        """`~:`, `1:`, `true:` are refused where they are, not turned into the names "None", "1", "True"."""
        src = yamlsource.load(f"credentials:\n  {key}: {{kind: static}}\n  ok: 1\n", file="t.yaml")
        assert [str(i) for i in src.issues] == [
            f"t.yaml:2 credentials: mapping keys must be plain strings, got {key!r} ({tag}); quote it if it is a name"]
        assert src.data == {"credentials": {"ok": 1}}

    def test_core_values_still_load(self):
        """Plain and explicitly tagged core values load as before; unquoted dates stay strings."""
        src = yamlsource.load("a: !!str 8080\nb: !!int '5'\nc: 2024-01-01\nd: =\ne: true\nf: 1.5\ng: ~\n",
                              file="t.yaml")
        assert src.issues == []
        assert src.data == {"a": "8080", "b": 5, "c": "2024-01-01", "d": "=", "e": True, "f": 1.5, "g": None}


@pytest.mark.slow  # runs the CLI in a subprocess (an interpreter start and mitmproxy's imports each)
class TestCheckCommand:
    @pytest.mark.parametrize("text, expected", [
        (nested(1000), "config.yaml:1: the document is nested more than 64 levels deep"),
        ("version: !!bool maybe\n", "config.yaml:1 version: 'maybe' is not a valid !!bool"),
        ("version: !!python/object/apply:os.system ['true']\n", "config.yaml:1 version: unsupported YAML tag"),
        ("version: 1\nidentity: {trust_bundle: !!binary aGk=, trust_domains: [example.org]}\nrules: []\n",
         "config.yaml:2 identity.trust_bundle: unsupported YAML tag '!!binary'"),
    ])
    def test_hostile_file_exits_1_without_traceback(self, tmp_path, text, expected):
        """`check` on a hostile file prints located issues and exits 1; no traceback, no blame on another key."""
        (tmp_path / "config.yaml").write_text(text)
        out = subprocess.run([str(CLI), "check", str(tmp_path / "config.yaml")], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 1, out
        assert "Traceback" not in out.stderr + out.stdout
        assert expected in out.stderr
        if "trust_bundle" not in expected:
            assert "trust_bundle" not in out.stderr


def test_a_yaml_error_never_quotes_a_pasted_secret() -> None:
    """PyYAML quotes what it cannot read: `secret: *sk_live_...` (an undefined alias) came back whole in
    the error, which the log and /readyz show (hostile review 6.04). Quoted runs are not shown; a single
    quoted character (a tab) still is."""
    from secretless_proxy.config import yamlsource
    from secretless_proxy.errors import ConfigError

    pasted = "sk_live_51PastedByMistake0123456789"
    with pytest.raises(ConfigError) as info:
        yamlsource.load(f"version: 1\ncredentials:\n  x:\n    secret: *{pasted}\n", file="c.yaml")
    assert pasted not in str(info.value) and "undefined alias (not shown)" in str(info.value)
    with pytest.raises(ConfigError) as info:
        yamlsource.load("a:\t\tb\n  c", file="c.yaml")
    assert "found character '\\t'" in str(info.value)
