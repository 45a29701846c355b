"""What every part of the route-table check shares: the problems found so far, each with its line.

A reader reports a problem and carries on with a default, so one run finds every problem in the
file; `proxy.config.parse` turns them into `file:line: message` lines at the end.
"""

from __future__ import annotations

from typing import Any, Callable

from proxy.config.values import decoded_once, environment_values, type_name
from proxy.config.yaml_source import LineDict, line_of
from proxy.masking import Masker

Fields = tuple[tuple[str, Callable[[Any], Any]], ...]  # (key, reader) pairs of a mapping's simple settings

_BAD = object()  # what `Checker.get` hands back for a value it reported


class Checker:
    """Walks the parsed YAML, collecting problems with their lines instead of stopping at the first."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.problems: list[tuple[int, str]] = []
        self.secrets: set[str] = set()
        self.masker = Masker()  # every value from the environment: no message quotes one

    def problem(self, line: int, message: str) -> None:
        """Report a problem at `line`; `message` starts with where it is (`services.fx.timeout: ...`)."""
        self.problems.append((line, message))

    def mapping(self, value: Any, where: str, line: int) -> LineDict | None:
        """`value` as a mapping (an empty one for nothing), or None after reporting that it is not one."""
        if value is None:
            empty = LineDict()
            empty.line, empty.key_lines = line, {}
            return empty
        if not isinstance(value, LineDict):
            self.problem(line, f"{where}: expected a mapping, got {type_name(value)}")
            return None
        return value

    def known_keys(self, data: LineDict, allowed: set[str], where: str) -> None:
        """Report every key of `data` that is not in `allowed`, listing the allowed ones."""
        for key in data:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.problem(line_of(data, key), f"{where}: unknown key {key!r} (allowed: {hint})")

    def get(self, data: LineDict, key: str, where: str, convert: Callable[[Any], Any], default: Any) -> Any:
        """`data[key]` read by `convert`; `default` when it is not there, or after reporting why it is bad."""
        if key not in data:
            return default
        try:
            return convert(data[key])
        except (ValueError, TypeError) as exc:
            self.problem(line_of(data, key), f"{where}.{key}: {exc}")
            return default

    def changes(self, data: LineDict, where: str, fields: Fields) -> dict[str, Any]:
        """The fields a mapping sets, converted; a bad value is reported and left out."""
        found: dict[str, Any] = {}
        for key, convert in fields:
            if key in data:
                converted = self.get(data, key, where, convert, _BAD)
                if converted is not _BAD:
                    found[key] = converted
        return found

    def secret(self, value: Any) -> None:
        """Remember the values `${VAR}` put into `value`: they are masked wherever the proxy logs."""
        # A key pasted percent-encoded is sent decoded (then encoded once): both forms are secrets.
        self.secrets.update(form for v in environment_values(value) for form in (v, decoded_once(v)))
