"""YAML → plain data that remembers where each value came from.

PyYAML's ``safe_load`` forgets line numbers and silently keeps the last of two duplicate keys.
Here the document is composed into nodes and converted by hand, so every value's line is known
(for errors such as ``example.yaml:14 rules[2].inject.credential: ...``) and a duplicate key is
an error instead of a silent override.

Hostile input is bounded before PyYAML's recursive composer sees it: the text's size and its
nesting depth (counted on the parser's events, which do not recurse) are checked first, and
aliases cannot expand a document past ``MAX_DEPTH`` levels or ``MAX_VALUES`` values. Only the
plain types of the YAML 1.2 core schema are accepted (null, booleans, integers, floats, strings,
lists, mappings); any other tag (``!!binary``, ``!!timestamp``, ``!!set``, ``!!python/...``,
local ``!tags``) is an error at its line, and so is a core tag on a value it cannot hold
(``!!bool maybe``). Unquoted dates stay strings, as in YAML 1.2.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from secretless_proxy.errors import ConfigError, ConfigIssue, SecretlessError

Path_ = tuple[str | int, ...]


def render_path(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


@dataclass
class Source:
    """A parsed YAML document plus the issues found while reading it."""

    file: str
    data: Any
    lines: dict[Path_, int]
    issues: list[ConfigIssue] = field(default_factory=list)
    dropped: int = 0  # issues past MAX_ISSUES, counted and not kept

    def line(self, path: Path_) -> int | None:
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]

    def error(self, path: Path_, message: str, *, line: int | None = None) -> None:
        if len(self.issues) >= MAX_ISSUES:
            self.dropped += 1
            return
        rendered = render_path(path)
        self.issues.append(ConfigIssue(
            file=self.file, line=line or self.line(path),
            path=rendered if len(rendered) <= 200 else rendered[:200] + "...",
            message=message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "... (cut)",
        ))

    def raise_if_issues(self) -> None:
        if self.dropped:
            self.issues.append(ConfigIssue(file=self.file, line=None, path="",
                                           message=f"{self.dropped} more issue(s) not shown; fix the ones above first"))
            self.dropped = 0
        if self.issues:
            raise ConfigError(self.issues)

    # -- typed readers: each records an issue and returns None when the value is wrong --

    def mapping(self, path: Path_, value: Any, *, required: Iterable[str] = (),
                optional: Iterable[str] = ()) -> dict[str, Any] | None:
        required, optional = tuple(required), tuple(optional)
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, got {type_name(value)}")
            return None
        valid = required + optional
        for key in value:
            if key not in valid:
                hint = difflib.get_close_matches(str(key), valid, n=1)
                did = f"did you mean '{hint[0]}'? " if hint else ""
                self.error(path + (key,), f"unknown key '{key}' ({did}valid keys: {', '.join(valid)})")
        for key in required:
            if key not in value:
                self.error(path, f"missing required key '{key}'")
        return value

    def string(self, path: Path_, value: Any, *, empty_ok: bool = False) -> str | None:
        if not isinstance(value, str) or (not value and not empty_ok):
            self.error(path, f"must be a non-empty string, got {type_name(value)}")
            return None
        return value

    def boolean(self, path: Path_, value: Any) -> bool | None:
        if not isinstance(value, bool):
            self.error(path, f"must be true or false, got {type_name(value)}")
            return None
        return value

    def integer(self, path: Path_, value: Any, *, lo: int, hi: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.error(path, f"must be an integer from {lo} to {hi}, got {value!r}")
            return None
        return value

    def string_list(self, path: Path_, value: Any, *, allow_scalar: bool = True) -> list[str] | None:
        if allow_scalar and isinstance(value, str):
            value = [value]
            self.lines.setdefault(path + (0,), self.line(path) or 0)
        if not isinstance(value, list) or not value:
            self.error(path, f"must be a non-empty list of strings, got {type_name(value)}")
            return None
        out = []
        for i, item in enumerate(value):
            s = self.string(path + (i,), item)
            if s is not None:
                out.append(s)
        return out if len(out) == len(value) else None

    def choice(self, path: Path_, value: Any, choices: Iterable[str]) -> str | None:
        choices = tuple(choices)
        if value not in choices:
            self.error(path, f"must be one of {', '.join(choices)}, got {value!r}")
            return None
        return value


# A config file is a few kilobytes and a handful of levels deep; these bounds are far above any
# real one and far below what exhausts memory or Python's recursion limit (about 1,000 frames).
MAX_BYTES = 1024 * 1024
MAX_DEPTH = 64
MAX_KEY_CHARS = 256  # keys are names: config keys, credential and trust-domain names
# Issues are located and short: a hostile file (aliases of one huge key) cannot make check or a
# reload print megabytes. Past MAX_ISSUES, one more line says how many were left out.
MAX_ISSUES = 200
MAX_MESSAGE_CHARS = 600

_CORE = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_CORE + t for t in ("null", "bool", "int", "float", "str")}
_COLLECTION_TAGS = {yaml.SequenceNode: _CORE + "seq", yaml.MappingNode: _CORE + "map"}


class _Loader(yaml.SafeLoader):
    """SafeLoader that resolves plain scalars as the YAML 1.2 core schema does, not as YAML 1.1.

    PyYAML implements YAML 1.1, where ``yes``/``on`` are booleans, ``0443`` is octal 291, ``7:23``
    is base 60 (443), ``1_000`` is 1000 and ``2024-01-01`` a timestamp. Under the 1.2 core schema
    (what every other YAML tool an operator uses assumes) all of those are strings, except
    ``0443``, which is decimal 443. ``<<`` still resolves to the merge tag, so it is reported.
    """

    yaml_implicit_resolvers: dict = {}


def _core_resolvers() -> None:
    # YAML 1.2.2 §10.3.2 (core schema), in the order a plain scalar is tried.
    add = _Loader.add_implicit_resolver
    add(_CORE + "null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
    add(_CORE + "bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    add(_CORE + "int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
    add(_CORE + "float", re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    add(_CORE + "merge", re.compile(r"^(?:<<)$"), ["<"])


_core_resolvers()


class _Constructor(yaml.constructor.SafeConstructor):
    """Integers and booleans with their YAML 1.2 core meaning, for plain and ``!!int``/``!!bool`` alike."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        value = self.construct_scalar(node)
        if re.fullmatch(r"[-+]?[0-9]+", value):
            return int(value, 10)  # 0443 is 443: no YAML 1.1 octal
        if re.fullmatch(r"0o[0-7]+", value):
            return int(value[2:], 8)
        if re.fullmatch(r"0x[0-9a-fA-F]+", value):
            return int(value[2:], 16)
        raise ValueError(f"not an integer: {value!r}")

    def construct_yaml_bool(self, node: yaml.ScalarNode) -> bool:
        value = self.construct_scalar(node)
        if value.lower() not in ("true", "false"):
            raise ValueError(f"not a boolean: {value!r}")  # `yes`, `on`: YAML 1.1 only
        return value.lower() == "true"


_Constructor.add_constructor(_CORE + "int", _Constructor.construct_yaml_int)
_Constructor.add_constructor(_CORE + "bool", _Constructor.construct_yaml_bool)


def _shown(value: str) -> str:
    return repr(value) if len(value) <= 40 else repr(value[:40]) + "..."


def _tag_name(tag: str) -> str:
    return "!!" + tag[len(_CORE):] if tag.startswith(_CORE) else tag


def _check_depth(text: str, *, file: str) -> None:
    """Refuse a document nested deeper than MAX_DEPTH before anything recursive reads it."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError([ConfigIssue(
                    file=file, line=event.start_mark.line + 1, path="",
                    message=f"the document is nested more than {MAX_DEPTH} levels deep; refusing to read it",
                )])
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


# PyYAML quotes what it could not read: an alias, an anchor, a token. A secret pasted into the file
# (`secret: *a1b2...`) would come back in the log and in /readyz (hostile review 6.04). A quoted run
# longer than a character or two is not shown; a single quoted character still is ('\t').
_QUOTED_RUN = re.compile(r"'[^']{3,}'|\"[^\"]{3,}\"")


def _unquoted(problem: str) -> str:
    return _QUOTED_RUN.sub("(not shown)", problem)


def load(text: str, *, file: str) -> Source:
    """Parse one YAML document; syntax errors, duplicate keys and hostile shapes become ConfigError."""
    if len(text) > MAX_BYTES:
        raise ConfigError([ConfigIssue(
            file=file, line=None, path="",
            message=f"the file is larger than {MAX_BYTES // 1024} KiB; refusing to read it",
        )])
    try:
        _check_depth(text, file=file)
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark, start = exc.problem_mark, exc.context_mark
        context = exc.context or ""
        if context and start is not None and (mark is None or start.line != mark.line):
            context += f" that starts on line {start.line + 1}"  # where the mistake usually is
        raise ConfigError([ConfigIssue(
            file=file, line=mark.line + 1 if mark else None, path="",
            message=f"invalid YAML: {_unquoted(exc.problem or '')}" + (f" ({context})" if context else ""),
        )]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(file=file, line=None, path="", message=f"invalid YAML: {_unquoted(str(exc))}")]) from exc
    src = Source(file=file, data=None, lines={})
    if node is None:
        src.error((), "the file is empty")
        src.raise_if_issues()
    try:
        src.data = _convert(node, (), src, _Constructor(), set())
    except _TooDeep as exc:
        raise ConfigError([ConfigIssue(
            file=file, line=src.lines.get(exc.top), path=render_path(exc.top),
            message=f"YAML aliases nest this value more than {MAX_DEPTH} levels deep; write it out",
        )]) from None
    except _TooLarge:
        raise ConfigError([ConfigIssue(
            file=file, line=None, path="",
            message=f"the document expands to more than {MAX_VALUES} values (YAML aliases?); refusing to read it",
        )]) from None
    return src


# Aliases are expanded where they are used; a "billion laughs" document would expand forever.
MAX_VALUES = 100_000


class _TooLarge(SecretlessError):
    """Internal: the document expands to more than MAX_VALUES values (caught in this module)."""


class _TooDeep(SecretlessError):
    """Internal: YAML aliases nest a value under ``top`` more than MAX_DEPTH levels (caught in this module)."""

    def __init__(self, top: Path_) -> None:
        self.top = top


def _convert(node: yaml.Node, path: Path_, src: Source, ctor: yaml.constructor.SafeConstructor,
             open_nodes: set[int]) -> Any:
    src.lines.setdefault(path, node.start_mark.line + 1)
    if len(src.lines) > MAX_VALUES:
        raise _TooLarge
    if len(path) > MAX_DEPTH:  # reached through aliases: the text itself was checked already
        raise _TooDeep(path[:1])
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        if node.tag != _COLLECTION_TAGS[type(node)]:
            src.error(path, f"unsupported YAML tag '{_tag_name(node.tag)}' (plain lists and mappings only)")
            return None
        # An alias inside its own anchor (`&a [*a]`) would recurse until RecursionError.
        if id(node) in open_nodes:
            src.error(path, "a YAML alias refers to its own anchor; write the value out")
            return None
        open_nodes.add(id(node))
        try:
            return _convert_collection(node, path, src, ctor, open_nodes)
        finally:
            open_nodes.discard(id(node))
    return _scalar(node, path, src, ctor)


def _scalar(node: yaml.Node, path: Path_, src: Source, ctor: yaml.constructor.SafeConstructor,
            *, line: int | None = None) -> Any:
    """A scalar of the core schema, or None with an issue recorded (never an exception)."""
    if node.tag not in _SCALAR_TAGS:
        src.error(path, f"unsupported YAML tag '{_tag_name(node.tag)}' "
                        "(plain strings, numbers, booleans and null only)", line=line)
        return None
    try:
        return ctor.construct_object(node, deep=True)
    except Exception as exc:  # noqa: BLE001 - PyYAML raises KeyError/ValueError for `!!bool maybe`
        shown = node.value if len(node.value) <= 40 else node.value[:40] + "..."
        src.error(path, f"{shown!r} is not a valid {_tag_name(node.tag)} ({type(exc).__name__})", line=line)
        return None


def _convert_collection(node: yaml.MappingNode | yaml.SequenceNode, path: Path_, src: Source,
                        ctor: yaml.constructor.SafeConstructor, open_nodes: set[int]) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                src.error(path, "YAML merge keys (<<) are not supported; write the keys out",
                          line=key_line)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                src.error(path, "mapping keys must be plain strings", line=key_line)
                continue
            if key_node.tag != _CORE + "str":
                # `1:`, `~:`, `true:` are not names: str() would make "1", "None", "True" of them.
                src.error(path, f"mapping keys must be plain strings, got {_shown(key_node.value)} "
                                f"({_tag_name(key_node.tag)}); quote it if it is a name", line=key_line)
                continue
            key = key_node.value
            if len(key) > MAX_KEY_CHARS:
                src.error(path, f"a key of {len(key)} characters (at most {MAX_KEY_CHARS}): {_shown(key)}",
                          line=key_line)
                continue
            kpath = path + (key,)
            if key in out:
                src.error(kpath, f"duplicate key '{key}' (first defined on line {src.lines[kpath]})",
                          line=key_line)
                continue
            src.lines[kpath] = key_line
            out[key] = _convert(value_node, kpath, src, ctor, open_nodes)
        return out
    return [_convert(item, path + (i,), src, ctor, open_nodes) for i, item in enumerate(node.value)]
