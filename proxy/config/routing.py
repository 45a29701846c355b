"""Route matching and upstream path templates (pure: no I/O).

A request path is matched to a service by prefix (on a segment boundary), then to the
first route whose `match` template fits. `{name}` in a template stands for one path
segment; the captured values fill the upstream's `path`/`query` templates, percent-encoded
so a placeholder can never add a `/`, `?` or `..` of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
SEGMENT_CHARS = "-._~!$&'()*+,;=:@"  # RFC 3986 pchar sub-delims kept as they are
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


class UnsafePath(ValueError):
    """A request target the proxy refuses to forward (400)."""


@dataclass(frozen=True, slots=True)
class Template:
    """A string with `{placeholders}`, e.g. `/v6/latest/{base}`."""

    text: str
    names: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "Template":
        return cls(text, tuple(_PLACEHOLDER.findall(text)))

    def render(self, params: dict[str, str], *, encode: bool) -> str:
        if not self.names:
            return self.text

        def fill(match: re.Match[str]) -> str:
            value = params[match.group(1)]
            return quote(value, safe=SEGMENT_CHARS) if encode else value

        return _PLACEHOLDER.sub(fill, self.text)


@dataclass(frozen=True, slots=True)
class MatchPattern:
    """A route's `match`, compiled once: `/fx/latest/{base}` matches `/fx/latest/USD`."""

    text: str
    regex: re.Pattern[str]
    names: tuple[str, ...]

    @classmethod
    def compile(cls, text: str) -> "MatchPattern":
        parts: list[str] = []
        position = 0
        for found in _PLACEHOLDER.finditer(text):
            parts.append(re.escape(text[position:found.start()]))
            parts.append(f"(?P<{found.group(1)}>[^/]+)")
            position = found.end()
        parts.append(re.escape(text[position:]))
        return cls(text, re.compile("".join(parts) + r"/?\Z"), tuple(_PLACEHOLDER.findall(text)))

    def match(self, decoded_path: str) -> dict[str, str] | None:
        found = self.regex.match(decoded_path)
        return found.groupdict() if found else None


def prefix_matches(prefix: str, path: str) -> bool:
    """`/fx` matches `/fx` and `/fx/...`, never `/fxy`."""
    if prefix == "/":
        return True
    return path == prefix or path.startswith(prefix + "/")


def prefixes_overlap(a: str, b: str) -> bool:
    return prefix_matches(a, b) or prefix_matches(b, a)


def check_target(raw_path: str) -> str:
    """Validate a request target and return its decoded path.

    Refuses what would let a caller steer the proxy somewhere the route table does not
    name: absolute-form targets, `..` and `.` segments (also percent-encoded, also with a
    `;parameter` as Tomcat and Spring read `..;`), an escape that decodes to another escape
    (`%252e`: some server down the line decodes twice), a raw `#` (a fragment is never sent;
    upstreams disagree on what follows it), `//` (scheme-relative hosts), backslashes and
    control characters.
    """
    if not raw_path.startswith("/"):
        raise UnsafePath("the request target must be a path (absolute-form and authority-form are refused)")
    if "#" in raw_path:
        raise UnsafePath("a raw # is not allowed in the request target")
    path = raw_path.split("?", 1)[0]
    if "%" not in path and "." not in path and "\\" not in path and "//" not in path and path.isprintable() \
            and path.isascii():
        return path  # nothing to decode and nothing that could be a dot segment, a // or a control character
    if path.startswith("//"):
        raise UnsafePath("the path must not start with //")
    decoded = unquote(path, errors="strict")
    if _ESCAPE.search(decoded):
        raise UnsafePath("percent-encoded escapes (such as %252e) are not allowed in the path")
    for text in (path, decoded):
        if "\\" in text:
            raise UnsafePath("backslashes are not allowed in the path")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
            raise UnsafePath("control characters are not allowed in the path")
        if any(segment.split(";", 1)[0] in ("..", ".") for segment in text.split("/")):
            raise UnsafePath("dot segments (. or .., also with a ;parameter) are not allowed in the path")
        if "//" in text:
            raise UnsafePath("empty path segments (//) are not allowed")
    return decoded
