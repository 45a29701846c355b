"""Secrets from the environment, hidden in every form they take on their way out.

A value substituted from `${VAR}` (an API key, a token) may reach a log line or a message as it
is, percent-encoded as a path segment (`/` as `%2F`, a space as `%20`) or as a query value (a space
as `+`), with the hex digits in either case, or quoted by Python's `repr` (a backslash doubled).
Masking only the first form let keys with a `/` or a space through. A `Masker` matches a secret
with each of its characters in any of those forms, so any mixture of encoders is caught.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

MASK = "***"


def _hex_class(digit: str) -> str:
    return f"[{digit}{digit.lower()}]" if digit.isalpha() else digit


@functools.lru_cache(maxsize=4096)
def _character(char: str) -> str:
    """A regex for one character of a secret: as it is, as repr escapes it, or percent-encoded."""
    try:
        data = char.encode("utf-8", "surrogateescape")  # an environment value that was not UTF-8
    except UnicodeEncodeError:
        data = char.encode("utf-8", "surrogatepass")
    options = {re.escape(char), re.escape(repr(char)[1:-1]),
               "".join("%" + "".join(map(_hex_class, f"{byte:02X}")) for byte in data)}
    if char == " ":
        options.add(r"\+")  # a query value's space
    return "(?:" + "|".join(sorted(options, key=len, reverse=True)) + ")"


@functools.lru_cache(maxsize=1024)
def pattern(secret: str) -> str:
    """A regex matching `secret` in any of the forms the module docstring lists."""
    return "".join(map(_character, secret))


class Masker:
    """Replaces every form of a set of secrets in text with `***`."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
        self._regex = re.compile("|".join(map(pattern, self._secrets))) if self._secrets else None

    def __bool__(self) -> bool:
        return self._regex is not None

    def __call__(self, text: str) -> str:
        if self._regex is None:
            return text
        # Without %, + or a backslash a secret can only stand as it is: the common case, checked cheaply.
        if "%" in text or "+" in text or "\\" in text or any(secret in text for secret in self._secrets):
            return self._regex.sub(MASK, text)
        return text
