"""Response normalisation: a JMESPath expression turns each vendor's answer into one shape.

`{placeholders}` from the route's `match` (and `{upstream}`, the upstream's name) are put
into the expression text before it is compiled. Only values made of letters, digits, `_`
and `-` are put in, so a caller can never change what an expression means; compiled
expressions are cached per filled-in text.

Answers are JSON, or XML read as nested objects (public-data portals send XML where JSON was
asked, notably their error envelopes): `<a><b>1</b><b>2</b><c/></a>` reads as
`{"a": {"b": ["1", "2"], "c": ""}}`, so one expression fits both.
"""

from __future__ import annotations

import re
import zlib
from functools import lru_cache
from typing import Any
from xml.etree import ElementTree

import jmespath
import jmespath.exceptions
import orjson

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_DECODED = 16 * 1024 * 1024
_MAX_XML_DEPTH = 64
# Headers that describe the upstream's bytes, which a transform replaces.
_BODY_HEADERS = frozenset({"content-type", "content-encoding", "content-length", "etag", "content-md5",
                           "last-modified", "digest", "content-range", "accept-ranges"})


class TransformError(Exception):
    """The answer could not be normalised (not JSON, a failed expression, an unsafe value)."""


def placeholders(expression: str) -> set[str]:
    return set(_PLACEHOLDER.findall(expression))


def check_expression(expression: str, names: set[str]) -> str | None:
    """A problem with an expression as configured (placeholders filled with a sample), or None."""
    sample = _fill(expression, {name: "X" for name in names})
    try:
        jmespath.compile(sample)
    except jmespath.exceptions.JMESPathError as exc:
        return f"invalid JMESPath expression: {exc}"
    return None


def _fill(expression: str, values: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            return match.group(0)  # a JMESPath multiselect such as {base: base_code} is left alone
        return values[name]

    return _PLACEHOLDER.sub(replace, expression)


@lru_cache(maxsize=2048)
def _compiled(text: str) -> Any:
    return jmespath.compile(text)


def evaluate(expression: str, values: dict[str, str], document: Any) -> Any:
    """Run `expression` (placeholders filled from `values`) over a parsed JSON document."""
    used = {name: values[name] for name in placeholders(expression) if name in values}
    for name, value in used.items():
        if not _SAFE_VALUE.match(value):
            raise TransformError(f"the value of {{{name}}} cannot be used in a transform")
    try:
        return _compiled(_fill(expression, used)).search(document)
    except jmespath.exceptions.JMESPathError as exc:
        raise TransformError(f"transform failed: {exc}") from None


def _decoded_body(body: bytes, headers: list[tuple[str, str]]) -> bytes:
    encoding = next((v.strip().lower() for k, v in headers if k.lower() == "content-encoding"), "identity")
    if encoding in ("gzip", "x-gzip", "deflate"):
        try:
            decoder = zlib.decompressobj(wbits=47 if encoding != "deflate" else 15)
            body = decoder.decompress(body, _MAX_DECODED)
            if decoder.unconsumed_tail:
                raise TransformError("the decoded answer is too large to transform")
        except zlib.error as exc:
            raise TransformError(f"cannot decode {encoding} body: {exc}") from None
    elif encoding != "identity":
        raise TransformError(f"cannot transform a {encoding}-encoded body")
    return body


def decode_document(body: bytes, headers: list[tuple[str, str]]) -> Any:
    """The document in an upstream body (gzip/deflate undone): JSON, or XML read as nested objects."""
    body = _decoded_body(body, headers)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    if body.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        return _xml_document(body)
    raise TransformError("the answer is not JSON")


def _xml_document(body: bytes) -> Any:
    # No DTD at all: entity expansion (billion laughs) and external entities are refused before parsing;
    # UTF-16 (NUL bytes) is refused too, or a DTD could hide from that check.
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise TransformError("the XML answer declares a DTD, which is not read")
    if b"\x00" in body:
        raise TransformError("the XML answer is not in an ASCII-compatible encoding")
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        raise TransformError("the answer is neither JSON nor well-formed XML") from None
    return {_local(root.tag): _xml_value(root, 1)}


def _xml_value(element: ElementTree.Element, depth: int) -> Any:
    if depth > _MAX_XML_DEPTH:
        raise TransformError(f"the XML answer nests deeper than {_MAX_XML_DEPTH} elements")
    if len(element) == 0:
        return (element.text or "").strip()
    grouped: dict[str, list[Any]] = {}
    for child in element:
        grouped.setdefault(_local(child.tag), []).append(_xml_value(child, depth + 1))
    return {name: items[0] if len(items) == 1 else items for name, items in grouped.items()}


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]  # `{namespace}name` -> name


def decode_json(body: bytes, headers: list[tuple[str, str]]) -> Any:
    """The JSON document in an upstream body (gzip/deflate undone), or TransformError."""
    try:
        return orjson.loads(_decoded_body(body, headers))
    except orjson.JSONDecodeError:
        raise TransformError("the answer is not JSON") from None


def normalise(expression: str, values: dict[str, str], document: Any,
              headers: list[tuple[str, str]]) -> tuple[bytes, list[tuple[str, str]]]:
    """Normalise a decoded upstream answer (`decode_document`): the new body and its headers."""
    result = evaluate(expression, values, document)
    if result is None or result is False:  # `cond && {...}` yields false or null when cond fails
        raise TransformError(f"the transform produced nothing ({orjson.dumps(result).decode()})")
    kept = [(k, v) for k, v in headers if k.lower() not in _BODY_HEADERS]
    kept.append(("Content-Type", "application/json"))
    return orjson.dumps(result), kept
