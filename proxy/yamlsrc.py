"""Read YAML keeping the line of every key and item, and substitute `${VAR}` from the environment.

Config errors must point at `file:line`, so the loader keeps line numbers that plain
`yaml.safe_load` throws away. Substitution happens here too, because it must know which
values came from the environment: those are secrets to mask in logs and `check` output.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                problems.append((line, f"environment variable {name} is not set and has no default"))
                return ""
            return default
        values.append(value)
        return value

    result = _VAR.sub(replace, text)
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
    problems: list[tuple[int, str]] = []
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        return None, [(line, f"invalid YAML: {exc.problem or exc.context}")]
    except yaml.YAMLError as exc:
        return None, [(1, f"invalid YAML: {exc}")]
    if node is None:
        return None, [(1, "the file is empty")]
    return _convert(node, env, problems), problems


_CONSTRUCTOR = yaml.SafeLoader("")


def _convert(node: yaml.Node, env: Mapping[str, str], problems: list[tuple[int, str]]) -> Any:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out = LineDict()
        out.line = line
        out.key_lines = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                problems.append((key_node.start_mark.line + 1, "YAML merge keys (<<) are not supported"))
                continue
            key = _convert(key_node, env, problems)
            key_line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                problems.append((key_line, f"keys must be strings, got {key!r}"))
                continue
            if key in out:
                problems.append((key_line, f"duplicate key {key!r} (first at line {out.key_lines[key]})"))
                continue
            out[key] = _convert(value_node, env, problems)
            out.key_lines[key] = key_line
        return out
    if isinstance(node, yaml.SequenceNode):
        seq = LineList()
        seq.line = line
        seq.item_lines = []
        for item in node.value:
            seq.append(_convert(item, env, problems))
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
