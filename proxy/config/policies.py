"""The policies a service, route or upstream takes from the level above and may change: the breaker, the
retry policy, the cache rule, and the rest of the nearest-wins settings (`timeout`, `deadline`,
`hedge_after`, `fallback_before_retry`).

Each reader starts from the inherited value and applies what the mapping sets, reporting bad values
to the `Checker` and keeping the inherited value for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from proxy.config.checker import Checker, Fields
from proxy.config.model import CacheRule, CacheSettings, Defaults
from proxy.config.values import (
    boolean,
    coalesce_mode,
    fraction,
    fraction_or_off,
    header_names,
    hedge_after,
    parse_duration,
    positive_duration,
    positive_int,
    retry_count,
    retry_on,
    stale_if_slow,
    status_list,
)
from proxy.config.yaml_source import LineDict, line_of
from proxy.resilience.breaker_policy import PROFILES, BreakerPolicy
from proxy.resilience.retry_policy import POLICIES, RetryPolicy

NEAREST_KEYS = {"timeout", "deadline", "breaker", "retry", "hedge_after", "fallback_before_retry"}
CACHE_RULE_KEYS = {"ttl", "stale", "statuses", "vary", "key_by_credential", "stale_while_revalidate",
                   "stale_if_slow", "coalesce"}
BREAKER_FIELDS: Fields = (
    ("fail_threshold", positive_int), ("open_timeout", parse_duration), ("half_open_max_calls", positive_int),
    ("failure_rate", fraction_or_off), ("window", parse_duration), ("min_calls", positive_int),
    ("min_failures", positive_int), ("slow_call_duration", parse_duration), ("slow_call_rate", fraction),
    ("trip_on_429", boolean), ("trip_on_refused", boolean), ("max_rest", parse_duration),
    ("shared", boolean))
RETRY_FIELDS: Fields = (("retries", retry_count), ("base_delay", parse_duration), ("max_delay", parse_duration),
                        ("retry_on", retry_on))
_CACHE_RULE_FIELDS: Fields = (
    ("ttl", parse_duration), ("stale", parse_duration), ("statuses", status_list), ("vary", header_names),
    ("key_by_credential", boolean), ("coalesce", coalesce_mode))


def read_nearest(check: Checker, data: LineDict, where: str, base: Defaults) -> Defaults:
    """`base` with what `data` sets of the nearest-wins settings."""
    changes: dict[str, Any] = {}
    for key, name, convert in (("timeout", "timeout", positive_duration), ("deadline", "deadline", positive_duration),
                               ("fallback_before_retry", "fallback_first", boolean)):
        if key in data:
            changes[name] = check.get(data, key, where, convert, getattr(base, name))
    if "hedge_after" in data:
        changes["hedge"] = check.get(data, "hedge_after", where, hedge_after, base.hedge)
    if "breaker" in data:
        changes["breaker"] = read_breaker(check, data["breaker"], f"{where}.breaker", line_of(data, "breaker"), base.breaker)
    if "retry" in data:
        changes["retry"] = read_retry(check, data["retry"], f"{where}.retry", line_of(data, "retry"), base.retry)
    return replace(base, **changes)


def read_breaker(check: Checker, value: Any, where: str, line: int, base: BreakerPolicy) -> BreakerPolicy:
    """A breaker profile's name, or a mapping of `BREAKER_FIELDS` (optionally starting from a `profile`)."""
    return _named_or_custom(check, value, where, line, base, named=PROFILES, kind="breaker profile",
                            start_key="profile", fields=BREAKER_FIELDS)


def read_retry(check: Checker, value: Any, where: str, line: int, base: RetryPolicy) -> RetryPolicy:
    """A retry policy's name, or a mapping of `RETRY_FIELDS` (optionally starting from a `policy`)."""
    return _named_or_custom(check, value, where, line, base, named=POLICIES, kind="retry policy",
                            start_key="policy", fields=RETRY_FIELDS)


def _named_or_custom(check: Checker, value: Any, where: str, line: int, base: Any, *, named: Mapping[str, Any],
                     kind: str, start_key: str, fields: Fields) -> Any:
    """A breaker profile or retry policy: a name, or a mapping of fields (optionally starting from a name)."""
    if isinstance(value, str):
        if value.upper() not in named:
            check.problem(line, f"{where}: unknown {kind} {value!r} (use {', '.join(named)} or a mapping)")
            return base
        return named[value.upper()]
    data = check.mapping(value, where, line)
    if data is None:
        return base
    check.known_keys(data, {start_key, *(key for key, _ in fields)}, where)
    start = base
    if start_key in data:
        start = _named_or_custom(check, data[start_key], f"{where}.{start_key}", line_of(data, start_key), base,
                                 named=named, kind=kind, start_key=start_key, fields=fields)
    try:
        return replace(start, **check.changes(data, where, fields))
    except (ValueError, TypeError) as exc:
        check.problem(line, f"{where}: {exc}")
        return base


def read_cache_rule(check: Checker, value: Any, where: str, line: int, base: CacheRule,
                    cache: CacheSettings) -> CacheRule:
    """A service's or route's `cache:`, starting from the rule it inherits."""
    data = check.mapping(value, where, line)
    if data is None:
        return base
    check.known_keys(data, CACHE_RULE_KEYS, where)
    rule = replace(base, **check.changes(data, where, _CACHE_RULE_FIELDS))
    if "stale_while_revalidate" in data and "stale_if_slow" in data:
        check.problem(line_of(data, "stale_while_revalidate"), f"{where}: set stale_if_slow or stale_while_revalidate, "
                      "not both (stale_while_revalidate: true is stale_if_slow: 0, false is stale_if_slow: off)")
    elif "stale_while_revalidate" in data:
        revalidate = check.get(data, "stale_while_revalidate", where, boolean, None)
        if revalidate is not None:
            rule = replace(rule, stale_if_slow=0.0 if revalidate else None)
    elif "stale_if_slow" in data:
        rule = replace(rule, stale_if_slow=check.get(data, "stale_if_slow", where, stale_if_slow, rule.stale_if_slow))
    max_stale = cache.max_stale
    if rule.stale > max_stale:
        check.problem(line_of(data, "stale"), f"{where}.stale: {rule.stale:g}s is longer than cache.max_stale ({max_stale:g}s)")
        rule = replace(rule, stale=max_stale)
    if "coalesce" in data and rule.coalesce == "cluster" and cache.backend != "redis":
        check.problem(line_of(data, "coalesce"), f"{where}.coalesce: cluster needs cache.backend: redis (replicas share the lock there)")
    return rule
