"""The effective config `resilience-proxy check` prints, rendered from the typed `Config`.

Every field of a model struct is printed under its own name, in the order model.py declares it,
unless one of the tables below renames it (`_NAMES`), formats it from its struct (`_SHOWN`),
leaves it out (`NOT_SHOWN`, with the reason) or prints it only while it means something
(`_LEFT_OUT_WHEN`). The breaker and retry policies print the same way. A field added to model.py
(or to a policy) is therefore printed without touching this module. Values from `${VAR}` are masked
on the way out, as they are everywhere else (`proxy.masking`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any, Callable

from yarl import URL

from proxy.adapters.vendor_codes import ResultCodes
from proxy.config.model import (
    CacheRule,
    CacheSettings,
    Config,
    Defaults,
    MetricsSettings,
    Route,
    SentinelSettings,
    ServerSettings,
    Service,
    Upstream,
)
from proxy.config.routing import MatchPattern, Template
from proxy.config.values import url_password
from proxy.config.yaml_source import Substituted
from proxy.masking import Masker
from proxy.resilience.breaker_policy import BreakerPolicy
from proxy.resilience.hedging import HedgePolicy

_OLDER = "not printed by `check` before the config split (issue 19); printing it would change check's output"

# Fields `check` leaves out, and why.
NOT_SHOWN: dict[tuple[type, str], str] = {
    (Config, "source"): "the file `check` was given",
    (Config, "events"): _OLDER,
    (Config, "secrets"): "the secrets themselves, for masking",
    (Config, "effective"): "this rendering",
    (CacheSettings, "op_timeout"): _OLDER,
    (CacheSettings, "local_ttl"): _OLDER,
    (Defaults, "breaker"): "printed on each upstream, where it applies",
    (Defaults, "retry"): "printed on each upstream, where it applies",
    (Service, "name"): "the key the service is printed under",
    (Service, "forward_headers"): _OLDER,
    (Route, "derive"): _OLDER,
    (Route, "watch"): _OLDER,
    (Route, "queries"): "printed in `paths`, after each path's ?",
    (Route, "skipped"): "printed in `paths`, as off",
    (Upstream, "service"): "the service it is printed under",
    (Upstream, "secret_query"): "which query values to mask, for masking",
    (Upstream, "secrets"): "the secrets themselves, for masking",
    (Upstream, "transform"): _OLDER,
    (Upstream, "rate_limit"): _OLDER,
    (Upstream, "keys"): "API keys: secrets",
    (Upstream, "key_cooldown"): _OLDER,
    (Upstream, "as_written"): "what `url`, `query` and `headers` print",
}

# Fields printed under another name than their own: the key routes.yaml spells them with.
_NAMES: dict[tuple[type, str], str] = {
    (Defaults, "fallback_first"): "fallback_before_retry",
    (Defaults, "hedge"): "hedge_after",
    (Service, "fallback_first"): "fallback_before_retry",
    (Route, "pattern"): "match",
    (Upstream, "hedge"): "hedge_after",
}

# Fields printed as their struct says, rather than as their value's type says.
_SHOWN: dict[tuple[type, str], Callable[[Any], Any]] = {
    (ServerSettings, "listen"): lambda server: _address(server.listen),
    (ServerSettings, "metrics_listen"): lambda server: _address(server.metrics_listen),
    (CacheSettings, "url"): lambda cache: _without_password(cache.url),
    (SentinelSettings, "hosts"): lambda sentinel: [f"{host}:{port}" for host, port in sentinel.hosts],
    (SentinelSettings, "password"): lambda sentinel: "***" if sentinel.password else "",
    (SentinelSettings, "sentinel_password"): lambda sentinel: "***" if sentinel.sentinel_password else "",
    (MetricsSettings, "prefix"): lambda metrics: metrics.prefix or None,
    (CacheRule, "stale_if_slow"): lambda rule: "off" if rule.stale_if_slow is None else rule.stale_if_slow,
    (Defaults, "hedge"): lambda defaults: _hedge_text(defaults.hedge),
    (Upstream, "hedge"): lambda upstream: _hedge_text(upstream.hedge),
    (Upstream, "url"): lambda upstream: _upstream_url(upstream),
    (Upstream, "query"): lambda upstream: dict(upstream.as_written.query),
    (Upstream, "headers"): lambda upstream: dict(upstream.as_written.headers),
    (Route, "paths"): lambda route: {**{name: _path_text(path, route.queries.get(name, ()))
                                        for name, path in route.paths.items()},
                                     **{name: "off" for name in sorted(route.skipped)}},
}

# Fields printed only while they mean something: left out while the test holds.
_LEFT_OUT_WHEN: dict[tuple[type, str], Callable[[Any], bool]] = {
    (Upstream, "result_codes"): lambda upstream: upstream.result_codes is None,
    (CacheSettings, "url"): lambda cache: cache.sentinel is not None,  # the Sentinels name the master
    (CacheSettings, "cluster"): lambda cache: not cache.cluster,
    (CacheSettings, "sentinel"): lambda cache: cache.sentinel is None,
    (CacheSettings, "tls"): lambda cache: cache.tls is None,
    (BreakerPolicy, "shared"): lambda policy: not policy.shared,
    **{(BreakerPolicy, name): lambda policy: policy.failure_rate is None  # the failure-rate trip is off
       for name in ("failure_rate", "window", "min_calls", "min_failures")},
    **{(BreakerPolicy, name): lambda policy: policy.slow_call_rate is None  # the slow-call trip is off
       for name in ("slow_call_duration", "slow_call_rate")},
}


def render(config: Config, masker: Masker) -> dict[str, Any]:
    """What `check` prints for `config`; `masker` hides every value that came from the environment."""
    effective = {
        "version": 1,
        "server": shown(config.server),
        "upstream_client": config.upstream_client,
        "cache": shown(config.cache),
        "defaults": {**shown(config.defaults), "retry_budget": shown(config.retry_budget)},
        "services": {name: shown(service) for name, service in config.services.items()},
        "metrics": shown(config.metrics),
        "tracing": shown(config.tracing),
    }
    return _plain(effective, masker)


def shown(struct: Any) -> dict[str, Any]:
    """One model struct as `check` prints it: its fields in order, as the tables above say."""
    out: dict[str, Any] = {}
    for item in fields(struct):
        if _lookup(NOT_SHOWN, struct, item.name) is not None:
            continue
        left_out = _lookup(_LEFT_OUT_WHEN, struct, item.name)
        if left_out is not None and left_out(struct):
            continue
        value = getattr(struct, item.name)
        show = _lookup(_SHOWN, struct, item.name)
        out[_lookup(_NAMES, struct, item.name) or item.name] = show(struct) if show else _value(value)
    return out


def _lookup(table: Mapping[tuple[type, str], Any], struct: Any, name: str) -> Any:
    """The entry for field `name` of `struct`'s class, or of a class it extends."""
    for klass in type(struct).__mro__:
        if (klass, name) in table:
            return table[klass, name]
    return None


def _value(value: Any) -> Any:
    """A field's value as its type prints: structs (and policies) as mappings, sets sorted."""
    if isinstance(value, HedgePolicy):
        return _hedge_text(value)
    if isinstance(value, ResultCodes):
        return {"code": value.code, "message": value.message,
                "codes": {code: meaning.value for code, meaning in value.meanings.items()},
                "daily_reset": str(value.daily_reset) if value.daily_reset is not None else None}
    if isinstance(value, (MatchPattern, Template)):
        return value.text
    if isinstance(value, URL):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return shown(value)
    if isinstance(value, (frozenset, set)):
        return sorted(value)
    if isinstance(value, (tuple, list)):
        return [_value(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _value(item) for key, item in value.items()}
    return value


def _hedge_text(hedge: HedgePolicy | None) -> Any:
    if hedge is None:
        return "off"
    return "auto" if hedge.after is None else hedge.after


def _address(address: tuple[str, int] | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"


def _upstream_url(upstream: Upstream) -> str:
    """The URL as written when a `${VAR}` was in it (masked), else the URL as parsed."""
    return upstream.as_written.url if upstream.as_written.url is not None else str(upstream.url)


def _without_password(url: str) -> str:
    """A Redis URL with its password as `***` (a password need not come from `${VAR}` to be one)."""
    return str(URL(url).with_password("***")) if url_password(url) else url


def _path_text(path: Template, query: tuple[tuple[str, Template], ...]) -> str:
    return path.text + ("?" + "&".join(f"{name}={value.text}" for name, value in query) if query else "")


def _plain(value: Any, masker: Masker) -> Any:
    """`value` with every string that had `${VAR}` substitutions shown masked (and a plain str, which YAML can
    dump); a value from the environment that reached a string some other way (a path split at its `?`, a
    query rejoined) is masked by `masker`, in every form it can take."""
    if isinstance(value, Substituted):
        return value.masked
    if isinstance(value, str):
        return masker(value)
    if isinstance(value, dict):
        return {_plain(k, masker): _plain(v, masker) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, masker) for v in value]
    return value
