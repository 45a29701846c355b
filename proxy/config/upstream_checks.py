"""The checks of a service's `upstreams:` list, one upstream at a time: its name, url, path, query,
headers, keys, result codes and the nearest-wins settings it may set for itself.

What needs the whole service (a placeholder no route defines, a transform's names) is checked
afterwards in `proxy.config.service_checks`.
"""

from __future__ import annotations

from typing import Any

from proxy.adapters.quota import DailyReset
from proxy.adapters.transform import check_expression
from proxy.adapters.vendor_codes import MEANINGS, Meaning, ResultCodes
from proxy.config.checker import Checker
from proxy.config.model import AsWritten, Defaults, Upstream
from proxy.config.policies import read_nearest
from proxy.config.routing import Template
from proxy.config.values import (
    HEADER_NAME,
    HOP_BY_HOP,
    NAME,
    decoded_once,
    environment_values,
    has_control,
    parse_duration,
    rate_limit,
    string,
    type_name,
    upstream_path,
    upstream_url,
)
from proxy.config.yaml_source import LineDict, LineList, Substituted, line_of

UPSTREAM_KEYS = {"name", "url", "path", "query", "headers", "timeout", "breaker", "retry", "hedge_after",
                 "transform", "rate_limit", "keys", "key_cooldown", "result_codes"}
_RESULT_CODES_KEYS = {"code", "message", "codes", "daily_reset"}


def read_upstreams(check: Checker, data: LineDict, where: str, line: int, service: str, nearest: Defaults,
                   upstream_lines: dict[str, int]) -> list[Upstream]:
    """A service's upstreams, in order; `upstream_lines` gets each name's line (names are unique across services)."""
    upstreams: list[Upstream] = []
    upstream_values = data.get("upstreams")
    if not isinstance(upstream_values, LineList) or not upstream_values:
        check.problem(line_of(data, "upstreams") if "upstreams" in data else line,
                      f"{where}.upstreams: expected a non-empty list of upstreams")
        upstream_values = LineList()
        upstream_values.line, upstream_values.item_lines = line, []
    for index, value in enumerate(upstream_values):
        u_where = f"{where}.upstreams[{index}]"
        u_line = line_of(upstream_values, index)
        u_data = check.mapping(value, u_where, u_line)
        if u_data is None:
            continue
        upstream = _read_upstream(check, u_data, u_where, u_line, service, nearest, upstream_lines)
        if upstream is not None:
            upstreams.append(upstream)
    return upstreams


def _read_upstream(check: Checker, u_data: LineDict, u_where: str, u_line: int, service: str, nearest: Defaults,
                   upstream_lines: dict[str, int]) -> Upstream | None:
    """One upstream; None when it has no name or no usable url (the problems are reported)."""
    check.known_keys(u_data, UPSTREAM_KEYS, u_where)
    u_name = check.get(u_data, "name", u_where, string, None)
    if u_name is None:
        check.problem(u_line, f"{u_where}: `name` is required")
        return None
    if not NAME.match(u_name):
        check.problem(line_of(u_data, "name"), f"{u_where}.name: {u_name!r}: use letters, digits, _ and -")
    if u_name in upstream_lines:
        check.problem(line_of(u_data, "name"), f"{u_where}.name: duplicate upstream name {u_name!r} (first at line {upstream_lines[u_name]})")
    upstream_lines.setdefault(u_name, line_of(u_data, "name"))
    if "url" not in u_data:
        check.problem(u_line, f"{u_where}: `url` is required")
    url = check.get(u_data, "url", u_where, upstream_url, None)
    path = check.get(u_data, "path", u_where, upstream_path, None)
    check.secret(u_data.get("url"))
    check.secret(u_data.get("path"))
    query, secret_query = _read_templates(check, u_data.get("query"), f"{u_where}.query", line_of(u_data, "query"), headers=False)
    headers, _ = _read_templates(check, u_data.get("headers"), f"{u_where}.headers", line_of(u_data, "headers"), headers=True)
    u_nearest = read_nearest(check, u_data, u_where, nearest)
    transform = check.get(u_data, "transform", u_where, string, None)
    keys = _read_keys(check, u_data, u_where)
    result_codes = None
    if "result_codes" in u_data:
        result_codes = _read_result_codes(check, u_data["result_codes"], f"{u_where}.result_codes",
                                         line_of(u_data, "result_codes"))
    if url is None:
        return None
    upstream = Upstream(
        name=u_name, service=service, url=url, path=Template.parse(path) if path else None,
        query=query, headers=headers, timeout=u_nearest.timeout, breaker=u_nearest.breaker, retry=u_nearest.retry,
        hedge=u_nearest.hedge, secret_query=frozenset(secret_query) | _key_query(query),
        secrets=frozenset(environment_values([u_data.get(k) for k in ("url", "path", "query", "headers", "keys")])),
        transform=transform, rate_limit=check.get(u_data, "rate_limit", u_where, rate_limit, None),
        keys=keys, key_cooldown=check.get(u_data, "key_cooldown", u_where, parse_duration, 3600.0),
        result_codes=result_codes, as_written=_as_written(u_data))
    key_values = u_data.get("keys")
    if isinstance(key_values, LineList) and key_values and all(key == "" for key in key_values):
        check.problem(line_of(u_data, "keys"), f"{u_where}.keys: every key is empty (unset variables)")
    return upstream


def _read_keys(check: Checker, u_data: LineDict, u_where: str) -> tuple[str, ...]:
    """An upstream's `keys:`, in order, without the empty ones (optional keys whose variable is unset)."""
    keys: list[str] = []
    key_values = u_data.get("keys")
    if key_values is not None:
        if not isinstance(key_values, LineList) or not key_values:
            check.problem(line_of(u_data, "keys"), f"{u_where}.keys: expected a non-empty list of keys")
        else:
            for k_index, key in enumerate(key_values):
                if not isinstance(key, str):
                    check.problem(line_of(key_values, k_index), f"{u_where}.keys[{k_index}]: expected a string")
                elif has_control(key) or "\t" in key:
                    # It is put in headers as it is: a secret file's trailing newline would split the request.
                    check.problem(line_of(key_values, k_index), f"{u_where}.keys[{k_index}]: a key cannot "
                                  "contain control characters (a trailing newline from the secret's file?)")
                elif key:  # an unset optional key (${KEY_2:-}) is simply not there
                    check.secret(key)
                    keys.append(decoded_once(str(key)))
    return tuple(keys)


def _as_written(u_data: LineDict) -> AsWritten:
    """The url (when it had a `${VAR}`), query and headers as written, every `${VAR}` masked."""
    url = u_data.get("url")
    return AsWritten(url=url.masked if isinstance(url, Substituted) else None,
                     query=_written_pairs(u_data.get("query")), headers=_written_pairs(u_data.get("headers")))


def _written_pairs(value: Any) -> tuple[tuple[str, Any], ...]:
    if not isinstance(value, LineDict):
        return ()
    return tuple((key, raw.masked if isinstance(raw, Substituted) else raw) for key, raw in value.items())


def _read_templates(check: Checker, value: Any, where: str, line: int, *,
                    headers: bool) -> tuple[tuple[tuple[str, Template], ...], set[str]]:
    """An upstream's `query:` or `headers:` as templates, and the names whose values had a `${VAR}`."""
    data = check.mapping(value, where, line)
    if data is None:
        return (), set()
    items: list[tuple[str, Template]] = []
    secret_names: set[str] = set()
    for key, raw in data.items():
        key_line = line_of(data, key)
        if headers and not HEADER_NAME.match(key):
            check.problem(key_line, f"{where}: bad header name {key!r}")
            continue
        if headers and key.lower() in HOP_BY_HOP | {"host", "content-length"}:
            check.problem(key_line, f"{where}: header {key!r} is managed by the proxy and cannot be set")
            continue
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            check.problem(key_line, f"{where}.{key}: expected a string, got {type_name(raw)}")
            continue
        text = raw if isinstance(raw, str) else str(raw)
        if headers and ("\r" in text or "\n" in text):
            check.problem(key_line, f"{where}.{key}: header values cannot contain line breaks")
            continue
        if headers and has_control(text):
            check.problem(key_line, f"{where}.{key}: header values cannot contain control characters")
            continue
        if not headers:
            text = decoded_once(text)  # a query value is sent percent-encoded once, however it was written
        check.secret(raw)
        if isinstance(raw, Substituted):
            secret_names.add(key)
        items.append((key, Template.parse(text)))
    return tuple(items), secret_names


def _read_result_codes(check: Checker, value: Any, where: str, line: int) -> ResultCodes | None:
    """`result_codes: {code, message, codes: {"00": success, ...}, daily_reset}`."""
    data = check.mapping(value, where, line)
    if data is None:
        return None
    check.known_keys(data, _RESULT_CODES_KEYS, where)
    code = check.get(data, "code", where, string, None)
    message = check.get(data, "message", where, string, None)
    for key, expression in (("code", code), ("message", message)):
        problem = check_expression(expression, set()) if expression is not None else None
        if problem:
            check.problem(line_of(data, key), f"{where}.{key}: {problem}")
    if "code" not in data:
        check.problem(line, f"{where}: `code` is required (a JMESPath to the code in the answer, "
                            "such as response.header.resultCode)")
    meanings: dict[str, Meaning] = {}
    codes = check.mapping(data.get("codes"), f"{where}.codes", line_of(data, "codes") if "codes" in data else line)
    if codes is not None and not codes:
        check.problem(line_of(data, "codes") if "codes" in data else line,
                      f"{where}.codes: expected a mapping of code to meaning, such as \"00\": success")
    for value_code, meaning in (codes or {}).items():
        if meaning not in {m.value for m in Meaning}:
            check.problem(line_of(codes, value_code), f"{where}.codes.{value_code}: unknown meaning {meaning!r} "
                                                      f"(use {MEANINGS})")
        elif value_code.strip() != value_code or not value_code:
            check.problem(line_of(codes, value_code), f"{where}.codes: code {value_code!r} has spaces around it; "
                                                      "codes are matched as the answer gives them, trimmed")
        else:
            meanings[value_code] = Meaning(meaning)
    reset = check.get(data, "daily_reset", where, DailyReset.parse, None)
    if code is None:
        return None
    return ResultCodes(code=code, meanings=meanings, message=message, daily_reset=reset)


def _key_query(query: tuple[tuple[str, Template], ...]) -> frozenset[str]:
    """Query parameters filled with {key}: their values are API keys, masked in logs."""
    return frozenset(name for name, template in query if "key" in template.names)
