"""Read YAML keeping the line of every key and item, and substitute `${VAR}` from the environment.

Config errors must point at `file:line`, so the loader keeps line numbers that plain
`yaml.safe_load` throws away. Substitution happens here too, because it must know which
values came from the environment: those are secrets to mask in logs and `check` output.

A document is bounded before it can cost much: its size (`MAX_BYTES`), its nesting, as written
and as aliases expand it (`MAX_DEPTH`), and the number of values aliases expand it to
(`MAX_VALUES`: a "billion laughs" document is a few lines long).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
MAX_BYTES = 1024 * 1024  # a route table is a few KB; a megabyte is a mistake or an attack
MAX_DEPTH = 64           # a route table nests about 8 deep
MAX_VALUES = 100_000     # keys, items and scalars once aliases are expanded


class LineDict(dict):
    """A mapping from YAML that knows its own line and the line of each key."""

    line: int
    key_lines: dict[str, int]


class LineList(list):
    """A sequence from YAML that knows its own line and the line of each item."""

    line: int
    item_lines: list[int]


class Substituted(str):
    """A string that had `${VAR}` substitutions; `masked` shows it with their values hidden."""

    masked: str
    values: tuple[str, ...]


def substitute(text: str, env: Mapping[str, str], line: int, problems: list[tuple[int, str]]) -> str:
    """Replace `${VAR}` / `${VAR:-default}`; an unset variable without a default is a problem."""
    if "${" not in text:
        return text
    values: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if default is not None and "${" in default:
            # `${A:-${B}}` would end at the first `}` and leave a literal `${B}` behind.
            problems.append((line, f"the default of ${{{name}:-...}} holds another ${{...}}: nested variables are "
                                   "not supported (set the variable, or write the default out)"))
            return ""
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                problems.append((line, f"environment variable {name} is not set and has no default"))
                return ""
            return default
        values.append(value)
        return value

    result = _VAR.sub(replace, text)
    if "${" in _VAR.sub("", text):
        problems.append((line, "a `${` that is not ${NAME} or ${NAME:-default} (unterminated, or not a variable name)"))
    masked = _VAR.sub(lambda m: "***" if env.get(m.group(1)) else (m.group(2) or ""), text)
    if not values:
        # Only defaults were used: nothing came from the environment, nothing to hide.
        return result
    out = Substituted(result)
    out.masked = masked
    out.values = tuple(values)
    return out


def load(text: str, env: Mapping[str, str]) -> tuple[Any, list[tuple[int, str]]]:
    """Parse YAML into LineDict/LineList/scalars. Returns (document, [(line, problem), ...])."""
    if len(text) > MAX_BYTES:
        return None, [(1, f"the file is larger than {MAX_BYTES // 1024} KiB: not a route table")]
    problems: list[tuple[int, str]] = []
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        return None, [(line, f"invalid YAML: {exc.problem or exc.context}")]
    except yaml.YAMLError as exc:
        return None, [(_reader_line(text, exc), f"invalid YAML: {exc}")]
    if node is None:
        return None, [(1, "the file is empty")]
    budget = _Budget()
    document = _convert(node, env, problems, budget, 0)
    return (None if budget.exceeded else document), problems


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing a document nested past `MAX_DEPTH` as it composes it: the composer
    recurses once per level, and 5,000 levels would end in a RecursionError."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels: not a route table",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _reader_line(text: str, error: yaml.YAMLError) -> int:
    """The line of a character the reader refused (a control character), else 1."""
    position = getattr(error, "position", None)
    return text.count("\n", 0, position) + 1 if isinstance(position, int) else 1


class _Budget:
    """How many values a document has expanded to so far, against `MAX_VALUES`."""

    __slots__ = ("values", "exceeded")

    def __init__(self) -> None:
        self.values = 0
        self.exceeded = False


_CONSTRUCTOR = yaml.SafeLoader("")


def _convert(node: yaml.Node, env: Mapping[str, str], problems: list[tuple[int, str]], budget: _Budget,
             depth: int) -> Any:
    line = node.start_mark.line + 1
    if budget.exceeded:
        return None
    budget.values += 1
    if budget.values > MAX_VALUES or depth > MAX_DEPTH:
        budget.exceeded = True
        problems.append((line, f"YAML aliases expand the document past {MAX_VALUES} values or {MAX_DEPTH} "
                               "levels (a recursive alias, or one that repeats a repetition): not a route table"))
        return None
    if isinstance(node, yaml.MappingNode):
        out = LineDict()
        out.line = line
        out.key_lines = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                problems.append((key_node.start_mark.line + 1, "YAML merge keys (<<) are not supported"))
                continue
            key = _convert(key_node, env, problems, budget, depth + 1)
            key_line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                problems.append((key_line, f"keys must be strings, got {key!r}"))
                continue
            if key in out:
                problems.append((key_line, f"duplicate key {key!r} (first at line {out.key_lines[key]})"))
                continue
            out[key] = _convert(value_node, env, problems, budget, depth + 1)
            out.key_lines[key] = key_line
        return out
    if isinstance(node, yaml.SequenceNode):
        seq = LineList()
        seq.line = line
        seq.item_lines = []
        for item in node.value:
            seq.append(_convert(item, env, problems, budget, depth + 1))
            seq.item_lines.append(item.start_mark.line + 1)
        return seq
    # Scalars: resolve with the safe loader's rules (ints, floats, bools, null, strings).
    try:
        value = _CONSTRUCTOR.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        problems.append((line, f"invalid value: {exc}"))
        return None
    if isinstance(value, str):
        return substitute(value, env, line, problems)
    return value


def line_of(container: Any, key: str | int | None = None) -> int:
    """The line of a key (mapping), an item (sequence) or the container itself."""
    if key is not None:
        if isinstance(container, LineDict) and key in container.key_lines:
            return container.key_lines[key]  # type: ignore[index]
        if isinstance(container, LineList) and isinstance(key, int) and key < len(container.item_lines):
            return container.item_lines[key]
    return getattr(container, "line", 1)
